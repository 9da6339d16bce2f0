"""Calibrated node scores: per group and depth, learned from verified steps and shadow drafts."""

import numpy as np
import pytest

from freespec.drafters.scoring import CalibratedDrafter, DepthCalibration
from freespec.engine.tree import DraftTree


def test_depth_calibration_learns_each_depth_and_borrows_above():
    calibration = DepthCalibration(groups=2, max_depth=4, refresh=1)
    for attempt in range(40):  # half the first nodes of share 0.95 fail; the second ones all hold
        calibration.learn(0, [1], [0.95], [attempt % 2 == 1])
        calibration.learn(0, [2], [0.95], [True])
    assert 0.5 < calibration(0, 1, 0.95) < 0.6  # 21.9 / 42, pooled with the bins below it (kept non-decreasing)
    assert calibration(0, 2, 0.95) > 0.95 and calibration(0, 3, 0.95) == pytest.approx(calibration(0, 2, 0.95))
    assert calibration(1, 1, 0.95) == pytest.approx(0.95)  # another group learned nothing
    assert calibration(0, 9, 0.95) == calibration(0, 4, 0.95)  # deeper than max_depth: the deepest map
    shares = np.linspace(0, 1, 21)
    assert all(np.diff([calibration(0, 1, s) for s in shares]) >= 0)  # never falls as the share rises


class ChainDrafter(CalibratedDrafter):
    """Test-only: a chain of ``length`` nodes, every share 0.95."""

    shadow_drafts = True

    def propose(self, context, budget):
        return self.grow(int(context[-1]), 0, lambda depth: [(depth + 1, 0.95, depth + 1)] if depth < 4 else [],
                         budget)


def test_calibrated_drafter_learns_a_verified_prefix_then_the_shadow_beyond_it():
    drafter = ChainDrafter(groups=1)
    drafter.calibration.refresh = 1
    tree = drafter.propose(np.array([0]), budget=4)
    assert tree.tokens.tolist() == [0, 1, 2, 3, 4] and np.all(np.diff(tree.scores) < 0)
    drafter.learn(tree.prefix(3), None, [0, 1])  # nodes 1 and 2 verified: 1 accepted, 2 not
    assert drafter.calibration.tries[0, 1:4, 9].tolist() == [1, 1, 0]
    assert drafter.calibration.hits[0, 1:4, 9].tolist() == [1, 0, 0]
    drafter.learn_shadow(tree, [0, 1], verified=2)  # nodes 3 and 4 never had their parent accepted
    assert drafter.calibration.tries.sum() == 2
    again = drafter.propose(np.array([0]), budget=4)
    drafter.learn(again.prefix(2), None, [0, 1])
    drafter.learn_shadow(again, [0, 1, 2, 3, 4], verified=1)  # the rest of the chain would have held
    assert drafter.calibration.tries[0, 1:5, 9].tolist() == [2, 2, 1, 1]
    assert drafter.calibration.hits[0, 1:5, 9].tolist() == [2, 1, 1, 1]
    drafter.learn(DraftTree.root_only(0), None, [0])  # a root-only step teaches nothing
    drafter.learn(DraftTree(np.array([0, 1]), np.array([-1, 0])), None, [0])  # nor a tree it did not grow
    assert drafter.calibration.tries.sum() == 6


@pytest.mark.parametrize("name", ["suffix", "lookup", "trie", "recycling+lookup", "suffix+trie"])
def test_a_models_forks_score_by_one_set_of_calibrations(name):
    """Every fork's drafter of one name scores by what all the model's requests taught: at 8
    requests at once, each fork's own calibration saw an eighth of the steps, and its drafts
    stayed out of the batched passes. Models with their own state (a benchmark's methods) do not share."""
    from tests.helpers import PROMPTS, make_model

    model = make_model("llama", 1, budget=16)
    drafters = [fork.drafter(name)[0] for fork in (model, model.fork(), model.fork())]
    parts = [[part for part in (drafter, *getattr(drafter, "drafters", ()))
              if isinstance(getattr(part, "calibration", None), DepthCalibration)] for drafter in drafters]
    assert parts[0] and len({id(part.calibration) for part in parts[0]}) == len(parts[0])
    for same in zip(*parts):
        assert same[0].calibration is same[1].calibration is same[2].calibration
    forks = model.fork(), model.fork()
    assert model.drafter(name)[1] is forks[0].drafter(name)[1] is forks[1].drafter(name)[1]  # one budget policy
    forks[0].generate(prompt_ids=PROMPTS[1], drafter=name, max_new_tokens=24)
    assert parts[0][0].calibration.tries.sum() > 0  # one fork's request taught every fork
    own = model.with_own_state().drafter(name)[0]
    assert own.calibration is not drafters[0].calibration


def test_a_new_calibration_takes_its_first_lessons_at_once_then_batches_them():
    calibration = DepthCalibration(groups=1)  # refresh=32
    prior = calibration(0, 1, 0.55)
    calibration.learn(0, [1] * 8, [0.55] * 8, [True] * 8)
    first = calibration(0, 1, 0.55)
    assert first > prior  # the first lesson counts at once (it waited 32 calls)
    for _ in range(200):  # later ones are batched: the maps are rebuilt every 32 calls at most
        calibration.learn(0, [1], [0.55], [False])
    before = calibration(0, 1, 0.55)
    calibration.learn(0, [1] * 50, [0.55] * 50, [True] * 50)
    assert calibration(0, 1, 0.55) == before


def test_a_drawing_drafters_forks_keep_their_own_policies():
    """layerskip's drafts decide which sampled token comes out: a seed's tokens must not depend
    on what another fork's requests taught its budget policy."""
    from tests.helpers import make_model

    model = make_model("llama", 1)
    fork = model.fork()
    for name in ("layerskip", "layerskip+lookup"):
        assert model.drafter(name)[1] is not fork.drafter(name)[1]
