"""Pure pieces on tiny integer arrays: tree, verification, budget policy, recycling matrix."""

import numpy as np
import pytest
import torch

from freespec.drafters.grow import HitRate
from freespec.drafters.recycling import (
    PAPER_TEMPLATE,
    PairRows,
    TokenRecycling,
    order_template,
)
from freespec.engine.budget import BudgetPolicy, accepted_within
from freespec.engine.tree import DraftTree
from freespec.engine.verify import greedy_accept


def tree(tokens, parents):
    return DraftTree(np.array(tokens), np.array(parents))


def test_tree_mask_positions_children():
    #      0(root)
    #     /  \
    #    1    3
    #    |
    #    2
    t = tree([10, 11, 12, 13], [-1, 0, 1, 0])
    assert t.depths.tolist() == [0, 1, 2, 1]
    assert t.children == [[1, 3], [2], [], []]
    tokens, positions, mask = t.attention_inputs(cache_length=5)
    assert tokens.tolist() == [10, 11, 12, 13]
    assert positions.tolist() == [5, 6, 7, 6]
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 0, 3, 1], [-1, -1]])
def test_tree_rejects_bad_parents(parents):
    with pytest.raises(ValueError):
        tree(list(range(len(parents))), parents)


def test_greedy_accept_longest_agreeing_path():
    t = tree([5, 1, 2, 3, 9, 4], [-1, 0, 0, 2, 3, 1])
    # root predicts 2 → node 2; node 2 predicts 3 → node 3; node 3 predicts 9 → node 4; bonus after node 4
    assert greedy_accept(t, np.array([2, 0, 3, 9, 8, 0])) == ([0, 2, 3, 4], 8)
    # the branch through node 1: root predicts 1, node 1 predicts 4 → node 5
    assert greedy_accept(t, np.array([1, 4, 0, 0, 0, 6])) == ([0, 1, 5], 6)
    # nothing matches: plain decoding's one token
    assert greedy_accept(t, np.array([7, 0, 0, 0, 0, 0])) == ([0], 7)
    assert greedy_accept(DraftTree.root_only(3), np.array([42])) == ([0], 42)


def test_accepted_within_budget():
    assert accepted_within([0], 10) == 1
    assert accepted_within([0, 2, 5], 10) == 3
    assert accepted_within([0, 2, 5], 4) == 2
    assert accepted_within([0, 2, 5], 1) == 1


def test_policy_turns_speculation_off_when_it_does_not_pay():
    # verifying 8 nodes costs 4x one token: needs tau > 4 to pay
    policy = BudgetPolicy({1: 1.0, 9: 4.0}, candidates=[8], explore_every=1)
    assert policy.choose(limit=100) == 8  # unexplored: probe it
    policy.observe(8, [0, 1, 2])  # 3 tokens per pass < 4
    assert policy.best(limit=100) == 0
    cheap = BudgetPolicy({1: 1.0, 9: 1.2}, candidates=[8], explore_every=1)
    cheap.observe(8, [0, 1, 2])
    assert cheap.best(limit=100) == 8
    assert cheap.best(limit=5) == 0  # no room for 8 nodes


def test_policy_learns_costs_from_timed_steps():
    policy = BudgetPolicy({1: 1.0, 9: 4.0}, candidates=[8], smoothing=0.5)
    policy.observe(8, [0, 1, 2])  # tau(8) = 3, but 9 tokens cost 4x: off
    assert policy.best(limit=100) == 0
    for _ in range(10):
        policy.record_cost(9, 1.5)  # the machine turned out to verify 9 tokens cheaply
    assert policy.cost(9) < 1.6 and policy.best(limit=100) == 8
    policy.record_cost(5, 100.0)  # sizes outside the table are ignored
    assert policy.cost(5) < 1.6


def test_policy_probes_about_twice_the_best_size():
    policy = BudgetPolicy({1: 1.0, 81: 2.0}, candidates=[1, 3, 7, 15, 31, 80], explore_every=2)
    assert [policy.choose(limit=100) for _ in range(2)] == [0, 3]  # nothing known: probe min_probe
    policy.tau.update({3: 1.5, 7: 1.9})
    assert policy.best(limit=100) == 7
    assert [policy.choose(limit=100) for _ in range(2)] == [7, 15]
    assert [policy.choose(limit=10) for _ in range(2)] == [7, 7]  # no room above 7 within the limit


def test_probes_that_lose_back_off_and_a_winning_probe_restores_the_pace():
    # 4 draft nodes cost 2x one token: a probe pays only when it accepts more than 2 tokens
    policy = BudgetPolicy({1: 1.0, 5: 2.0}, candidates=[4], explore_every=2, max_interval=8)
    sizes = []
    for _ in range(40):
        size = policy.choose(limit=100)
        sizes.append(size)
        policy.observe(size, [0, 1] if size else [0])  # 2 tokens per probe: never worth it
    probes = [step for step, size in enumerate(sizes) if size]
    assert probes == [1, 5, 13, 21, 29, 37]  # waits 2, 4, 8, 8, ... steps
    assert policy.interval == 8
    policy.observe(4, [0])  # not a probe the policy asked for: the pace is unchanged
    assert policy.interval == 8
    while not policy.choose(limit=100):
        pass
    policy.observe(4, [0, 1, 2, 3, 4])  # 5 tokens for 2x the cost: probe again soon
    assert policy.interval == 2


def test_order_template_parents_first_and_by_score():
    ordered = order_template(PAPER_TEMPLATE, np.array([0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]))
    assert len(ordered) == 80 and ordered[:3] == [(0,), (0, 0), (1,)]
    seen = set()
    for path in ordered:
        assert len(path) == 1 or path[:-1] in seen
        seen.add(path)
    assert [sum(1 for p in PAPER_TEMPLATE if len(p) == d) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    with pytest.raises(ValueError, match="no parent"):
        order_template([(0, 1)], np.ones(2))


def test_static_tree_follows_the_matrix_and_update_recycles_topk():
    drafter = TokenRecycling(vocab_size=20, k=2, tree="static", template=[(0,), (1,), (0, 0), (0, 1)])
    drafter.successors[7] = [3, 4]
    drafter.successors[3] = [9, 5]
    t = drafter.propose(np.array([1, 7]), budget=4)
    assert t.tokens[0] == 7
    assert sorted(zip(t.parents.tolist(), t.tokens.tolist())) == [(-1, 7), (0, 3), (0, 4), (1, 5), (1, 9)]
    assert len(drafter.propose(np.array([7]), budget=2)) == 3
    logits = torch.full((len(t), 20), -10.0)
    logits[0, 11], logits[0, 12] = 2.0, 1.0  # after 7 the model ranks 11 then 12
    logits[1, 13], logits[1, 14] = 1.0, 3.0
    drafter.update(t, logits, accepted=[0])
    assert drafter.successors[7].tolist() == [11, 12]
    assert drafter.successors[t.tokens[1]].tolist() == [14, 13]
    expected = torch.softmax(logits[0], dim=-1)[[11, 12]].numpy()
    np.testing.assert_allclose(drafter.probs[7], expected, rtol=1e-5)


def test_dynamic_tree_goes_deep_when_confident_and_wide_when_not():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.95, 0.04]  # confident chain 1→2→4→...
    drafter.successors[2], drafter.probs[2] = [4, 5], [0.9, 0.05]
    drafter.successors[4], drafter.probs[4] = [6, 7], [0.9, 0.05]
    deep = drafter.propose(np.array([1]), budget=3)
    assert deep.tokens.tolist() == [1, 2, 4, 6] and deep.depths.tolist() == [0, 1, 2, 3]
    drafter.probs[1] = [0.5, 0.48]  # hesitant: both candidates of the root come early
    wide = drafter.propose(np.array([1]), budget=3)
    assert wide.tokens.tolist() == [1, 2, 3, 4] and wide.parents.tolist() == [-1, 0, 0, 1]
    # a cold matrix (probability 0 everywhere) drafts nothing
    assert len(TokenRecycling(vocab_size=10, k=2).propose(np.array([5]), budget=8)) == 1


def test_dynamic_tree_learns_that_recycled_confidence_overstates():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.95, 0.04]
    drafter.successors[2], drafter.probs[2] = [4, 5], [0.92, 0.05]
    tree = drafter.propose(np.array([1]), budget=3)  # 1→2 (0.95), 1→2→4 (0.874), 1→2→5 (0.0475)
    assert tree.tokens.tolist() == [1, 2, 4, 5] and tree.parents.tolist() == [-1, 0, 1, 1]
    tried = drafter.calibration.tries.copy()
    drafter.update(tree, torch.zeros(4, 10), accepted=[0, 1])  # 2 accepted, then neither 4 nor 5
    assert (drafter.calibration.tries - tried).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]  # 0.05, 0.92, 0.95
    for _ in range(30):  # predictions of 0.9+ keep failing: the tree stops going deep on them
        drafter.calibration.observe(np.array([0.9, 0.95]), np.array([False, False]))
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.95, 0.04]
    drafter.successors[2], drafter.probs[2] = [4, 5], [0.9, 0.05]
    scores = drafter.propose(np.array([1]), budget=3).scores
    assert scores[1] < 0.2 and scores[2] < 0.2 * 0.2


def test_recycling_drafts_from_the_pair_row_when_the_pair_was_seen():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.9, 0.05]  # after 1 in general: 2
    assert drafter.propose(np.array([5, 1]), budget=1).tokens.tolist() == [1, 2]
    logits = torch.full((2, 10), -9.0)
    logits[0, 4], logits[1, 6] = 5.0, 5.0  # after "5 1" the model says 4; after "1 2", 6
    drafter.update(DraftTree(np.array([1, 2]), np.array([-1, 0])), logits, accepted=[0])
    assert drafter.successors[1].tolist()[0] == 4  # the token's own row is recycled too
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.9, 0.05]  # ...and later overwritten elsewhere
    assert drafter.propose(np.array([7, 5, 1]), budget=1).tokens.tolist() == [1, 4]  # the pair (5, 1) remembers
    assert drafter.propose(np.array([7, 8, 1]), budget=1).tokens.tolist() == [1, 2]  # an unseen pair: the token's row
    assert drafter.propose(np.array([1]), budget=1).tokens.tolist() == [1, 2]  # no predecessor: the token's row
    assert drafter.row(1, 2)[0].tolist()[0] == 6  # a drafted node's pair is keyed by its parent's token
    paper = TokenRecycling(vocab_size=10, k=2, pair_slots=0)  # one-token rows only, as in the paper
    paper.successors[1], paper.probs[1] = [2, 3], [0.9, 0.05]
    paper.update(DraftTree(np.array([1, 2]), np.array([-1, 0])), logits, accepted=[0])
    assert paper.pairs is None and paper.propose(np.array([5, 1]), budget=1).tokens.tolist() == [1, 4]
    with pytest.raises(ValueError, match="power of two"):
        TokenRecycling(vocab_size=10, pair_slots=12)


def test_pair_rows_are_a_bounded_table_whose_pairs_evict_each_other():
    table = PairRows(vocab_size=1000, k=2, slots=16)
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 1000, (200, 2)).tolist()
    rows = rng.integers(0, 1000, (200, 2))
    table.store([a for a, _ in pairs], [b for _, b in pairs], rows, np.ones((200, 2)))
    kept = [(i, table.find(a, b)) for i, (a, b) in enumerate(pairs) if table.find(a, b) >= 0]
    assert 0 < len(kept) <= 16 and len(table.keys) == 16
    for i, slot in kept:  # whatever survived holds its own row
        assert table.successors[slot].tolist() == rows[i].tolist()
    assert table.find(-1, 5) == -1


def test_recycling_drafts_what_followed_a_pair_in_the_prompt():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.begin(np.array([3, 4]), None)
    tree = drafter.propose(np.array([1, 2, 3, 4, 5, 2, 3]), budget=3)  # "2 3" was followed by 4, "3 4" by 5, ...
    assert tree.tokens.tolist() == [3, 4, 5, 2] and tree.parents.tolist() == [-1, 0, 1, 2]
    assert drafter.row(2, 3)[2] is drafter.text_pairs.calibration
    drafter.update(tree, torch.zeros(4, 10), accepted=[0])  # rejected: the prompt's follower is trusted less
    assert drafter.text_pairs.calibration(1.0) < 0.95
    assert drafter.row(2, 3)[2] is drafter.pairs.calibration  # once verified, the model's own row comes first
    assert drafter.row(1, 2)[0].tolist()[0] == 3 and drafter.row(1, 2)[2] is drafter.text_pairs.calibration
    fresh = TokenRecycling(vocab_size=10, k=2)
    fresh.begin(np.array([3]), None)
    fresh.propose(np.array([9, 9, 1, 2, 3]), budget=1)
    assert fresh.row(1, 2)[0].tolist() == [3, 3]  # the first draft's context was the prompt; later ones are not
    fresh.propose(np.array([9, 9, 1, 2, 3, 6, 7]), budget=1)
    assert fresh.text_pairs.find(3, 6) == -1
    assert TokenRecycling(vocab_size=10, k=2, tree="static", template=[(0,)]).text_pairs is None


def test_each_row_kind_keeps_its_own_calibration():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.successors[1], drafter.probs[1] = [2, 3], [0.95, 0.04]
    drafter.pairs.store([5], [1], np.array([[4, 3]]), np.array([[0.55, 0.4]]))
    tree = drafter.propose(np.array([5, 1]), budget=1)
    assert tree.tokens.tolist() == [1, 4]
    pair_tries, token_tries = drafter.pairs.calibration.tries.copy(), drafter.calibration.tries.copy()
    drafter.update(tree, torch.zeros(2, 10), accepted=[0, 1])
    assert (drafter.pairs.calibration.tries - pair_tries).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # 0.55
    assert (drafter.calibration.tries == token_tries).all()


def test_recycling_warm_start_and_save_load(tmp_path):
    drafter = TokenRecycling(vocab_size=10, k=2)
    logits = torch.tensor([[0.0, 5.0, 4.0] + [-9.0] * 7, [0.0, 0.0, 0.0, 7.0, 6.0] + [-9.0] * 5])
    drafter.begin(np.array([4, 5]), logits)
    assert drafter.successors[4].tolist() == [1, 2] and drafter.successors[5].tolist() == [3, 4]
    assert drafter.probs[4][0] > drafter.probs[4][1] > 0
    drafter.save(tmp_path / "state.npz")
    other = TokenRecycling(vocab_size=10, k=2)
    other.load(tmp_path / "state.npz")
    assert np.array_equal(other.successors, drafter.successors) and np.array_equal(other.probs, drafter.probs)
    assert other.row(4, 5)[0].tolist() == [3, 4] and np.array_equal(other.pairs.keys, drafter.pairs.keys)
    drafter.propose(np.array([6, 7, 8]), budget=1)  # the prompt's pairs: "6 7" was followed by 8
    drafter.save(tmp_path / "state.npz")
    other.load(tmp_path / "state.npz")
    assert other.row(6, 7)[0].tolist()[0] == 8
    with pytest.raises(ValueError, match="shape"):
        TokenRecycling(vocab_size=11, k=2, template=[(0,)]).load(tmp_path / "state.npz")
    with pytest.raises(ValueError, match="tree must be"):
        TokenRecycling(vocab_size=11, tree="bushy")


def test_policy_learns_from_shadow_drafts_without_probing():
    policy = BudgetPolicy({1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}, candidates=[1, 3, 7], min_probe=3)
    assert policy.best(limit=100) == 0  # nothing known yet: verify no draft...
    assert policy.shadow_size(limit=100) == 3  # ...but draft min_probe nodes to learn from
    policy.observe_shadow(3, [0, 1, 2, 3], verified=0)  # the tokens that followed spelled nodes 1-3
    assert policy.tau == {0: 1.0, 1: 2, 3: 4}
    assert policy.best(limit=100) == 3 and policy.shadow_size(limit=100) == 7
    policy.observe(3, [0, 1])  # a verified step of 3 nodes
    policy.observe_shadow(7, [0, 1], verified=3)  # its shadow teaches only the sizes above 3
    assert policy.tau[7] == 2 and policy.tau[3] == 4 + policy.smoothing * (2 - 4)
    assert policy.shadow_size(limit=5) == 3  # no room for 7
    assert all(policy.size_for(None, limit=100) == policy.best(limit=100) for _ in range(20))  # never a probe


def test_policy_sizes_a_scored_draft_by_its_own_scores():
    policy = BudgetPolicy({1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}, candidates=[1, 3, 7])
    confident = np.array([1.0, 0.99, 0.98, 0.97, 0.2, 0.1])
    assert policy.size_for(confident, limit=100) == 3  # 3.94 tokens / t(4) = 1.3 beats 1.99 / 1.1 and 4.24 / 1.65
    assert policy.size_for(confident, limit=2) == 2
    assert policy.size_for(np.array([1.0, 0.05]), limit=100) == 0  # 1.05 / 1.1: plain decoding pays more


def test_hit_rate_learns_each_depth():
    rate = HitRate()
    chain = DraftTree(np.arange(5), np.arange(-1, 4))  # the root and 4 nodes in a row
    for attempt in range(20):  # half the first nodes fail; a copy that has started goes on
        rate.observe(chain, [0, 1, 2, 3, 4] if attempt % 2 else [0])
    assert rate(1) == pytest.approx((10 + 2 * 0.5) / (20 + 2))
    assert rate(2) == pytest.approx((10 + 2 * rate(1)) / (10 + 2))
    assert rate(4) > rate(3) > rate(2) > 0.9
    assert rate(5) == rate(4) == rate(100)  # never tried deeper: the depth above's rate
