"""Token Recycling on tiny integer arrays: the template, both tree shapes, pair rows, warm state."""

from pathlib import Path

import numpy as np
import pytest
import torch

from freespec.cli import main
from freespec.drafters import DrafterSettings, create
from freespec.drafters.recycling import (
    PAPER_TEMPLATE,
    PairRows,
    TokenRecycling,
    order_template,
)
from freespec.drafters.state import DamagedStateError
from freespec.engine.tree import DraftTree
from tests.helpers import PROMPTS, make_model


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
    drafter = TokenRecycling(vocab_size=20, k=2, tree_shape="static", template=[(0,), (1,), (0, 0), (0, 1)])
    drafter.tables.successors[7] = [3, 4]
    drafter.tables.successors[3] = [9, 5]
    t = drafter.propose(np.array([1, 7]), budget=4)
    assert t.tokens[0] == 7
    assert sorted(zip(t.parents.tolist(), t.tokens.tolist())) == [(-1, 7), (0, 3), (0, 4), (1, 5), (1, 9)]
    assert len(drafter.propose(np.array([7]), budget=2)) == 3
    logits = torch.full((len(t), 20), -10.0)
    logits[0, 11], logits[0, 12] = 2.0, 1.0  # after 7 the model ranks 11 then 12
    logits[1, 13], logits[1, 14] = 1.0, 3.0
    drafter.learn(t, logits, accepted=[0])
    assert drafter.tables.successors[7].tolist() == [11, 12]
    assert drafter.tables.successors[t.tokens[1]].tolist() == [14, 13]
    expected = torch.softmax(logits[0], dim=-1)[[11, 12]].numpy()
    np.testing.assert_allclose(drafter.tables.probs[7], expected, rtol=1e-5)


def test_dynamic_tree_goes_deep_when_confident_and_wide_when_not():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.95, 0.04]  # confident chain 1→2→4→...
    drafter.tables.successors[2], drafter.tables.probs[2] = [4, 5], [0.9, 0.05]
    drafter.tables.successors[4], drafter.tables.probs[4] = [6, 7], [0.9, 0.05]
    deep = drafter.propose(np.array([1]), budget=3)
    assert deep.tokens.tolist() == [1, 2, 4, 6] and deep.depths.tolist() == [0, 1, 2, 3]
    drafter.tables.probs[1] = [0.5, 0.48]  # hesitant: both candidates of the root come early
    wide = drafter.propose(np.array([1]), budget=3)
    assert wide.tokens.tolist() == [1, 2, 3, 4] and wide.parents.tolist() == [-1, 0, 0, 1]
    # a cold matrix (probability 0 everywhere) drafts nothing
    assert len(TokenRecycling(vocab_size=10, k=2).propose(np.array([5]), budget=8)) == 1


def test_dynamic_tree_learns_that_recycled_confidence_overstates():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.95, 0.04]
    drafter.tables.successors[2], drafter.tables.probs[2] = [4, 5], [0.92, 0.05]
    tree = drafter.propose(np.array([1]), budget=3)  # 1→2 (0.95), 1→2→4 (0.874), 1→2→5 (0.0475)
    assert tree.tokens.tolist() == [1, 2, 4, 5] and tree.parents.tolist() == [-1, 0, 1, 1]
    tried = drafter.tables.calibration.tries.copy()
    drafter.learn(tree, torch.zeros(4, 10), accepted=[0, 1])  # 2 accepted, then neither 4 nor 5
    assert (drafter.tables.calibration.tries - tried).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]  # 0.05, 0.92, 0.95
    for _ in range(30):  # predictions of 0.9+ keep failing: the tree stops going deep on them
        drafter.tables.calibration.learn(np.array([0.9, 0.95]), np.array([False, False]))
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.95, 0.04]
    drafter.tables.successors[2], drafter.tables.probs[2] = [4, 5], [0.9, 0.05]
    scores = drafter.propose(np.array([1]), budget=3).scores
    assert scores[1] < 0.2 and scores[2] < 0.2 * 0.2


def test_recycling_drafts_from_the_pair_row_when_the_pair_was_seen():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.9, 0.05]  # after 1 in general: 2
    assert drafter.propose(np.array([5, 1]), budget=1).tokens.tolist() == [1, 2]
    logits = torch.full((2, 10), -9.0)
    logits[0, 4], logits[1, 6] = 5.0, 5.0  # after "5 1" the model says 4; after "1 2", 6
    drafter.learn(DraftTree(np.array([1, 2]), np.array([-1, 0])), logits, accepted=[0])
    assert drafter.tables.successors[1].tolist()[0] == 4  # the token's own row is recycled too
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.9, 0.05]  # ...and later overwritten elsewhere
    assert drafter.propose(np.array([7, 5, 1]), budget=1).tokens.tolist() == [1, 4]  # the pair (5, 1) remembers
    assert drafter.propose(np.array([7, 8, 1]), budget=1).tokens.tolist() == [1, 2]  # an unseen pair: the token's row
    assert drafter.propose(np.array([1]), budget=1).tokens.tolist() == [1, 2]  # no predecessor: the token's row
    assert drafter.tables.row(1, 2)[0].tolist()[0] == 6  # a drafted node's pair is keyed by its parent's token
    paper = TokenRecycling(vocab_size=10, k=2, pair_slots=0)  # one-token rows only, as in the paper
    paper.tables.successors[1], paper.tables.probs[1] = [2, 3], [0.9, 0.05]
    paper.learn(DraftTree(np.array([1, 2]), np.array([-1, 0])), logits, accepted=[0])
    assert paper.tables.pairs is None and paper.propose(np.array([5, 1]), budget=1).tokens.tolist() == [1, 4]
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
    assert drafter.tables.row(2, 3)[2] is drafter.tables.text_pairs.calibration
    drafter.learn(tree, torch.zeros(4, 10), accepted=[0])  # rejected: the prompt's follower is trusted less
    assert drafter.tables.text_pairs.calibration(1.0) < 0.95
    # once verified, the model's own row comes first
    assert drafter.tables.row(2, 3)[2] is drafter.tables.pairs.calibration
    assert drafter.tables.row(1, 2)[0].tolist()[0] == 3
    assert drafter.tables.row(1, 2)[2] is drafter.tables.text_pairs.calibration
    fresh = TokenRecycling(vocab_size=10, k=2)
    fresh.begin(np.array([3]), None)
    fresh.propose(np.array([9, 9, 1, 2, 3]), budget=1)
    assert fresh.tables.row(1, 2)[0].tolist() == [3, 3]  # the first draft's context was the prompt; later ones are not
    fresh.propose(np.array([9, 9, 1, 2, 3, 6, 7]), budget=1)
    assert fresh.tables.text_pairs.find(3, 6) == -1
    assert TokenRecycling(vocab_size=10, k=2, tree_shape="static", template=[(0,)]).tables.text_pairs is None


def test_each_row_kind_keeps_its_own_calibration():
    drafter = TokenRecycling(vocab_size=10, k=2)
    drafter.tables.successors[1], drafter.tables.probs[1] = [2, 3], [0.95, 0.04]
    drafter.tables.pairs.store([5], [1], np.array([[4, 3]]), np.array([[0.55, 0.4]]))
    tree = drafter.propose(np.array([5, 1]), budget=1)
    assert tree.tokens.tolist() == [1, 4]
    pair_tries, token_tries = drafter.tables.pairs.calibration.tries.copy(), drafter.tables.calibration.tries.copy()
    drafter.learn(tree, torch.zeros(2, 10), accepted=[0, 1])
    assert (drafter.tables.pairs.calibration.tries - pair_tries).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # 0.55
    assert (drafter.tables.calibration.tries == token_tries).all()


def test_recycling_warm_start_and_save_load(tmp_path):
    drafter = TokenRecycling(vocab_size=10, k=2)
    logits = torch.tensor([[0.0, 5.0, 4.0] + [-9.0] * 7, [0.0, 0.0, 0.0, 7.0, 6.0] + [-9.0] * 5])
    drafter.begin(np.array([4, 5]), logits)
    assert drafter.tables.successors[4].tolist() == [1, 2] and drafter.tables.successors[5].tolist() == [3, 4]
    assert drafter.tables.probs[4][0] > drafter.tables.probs[4][1] > 0
    drafter.save(tmp_path / "state.npz")
    other = TokenRecycling(vocab_size=10, k=2)
    other.load(tmp_path / "state.npz")
    assert np.array_equal(other.tables.successors, drafter.tables.successors)
    assert np.array_equal(other.tables.probs, drafter.tables.probs)
    assert other.tables.row(4, 5)[0].tolist() == [3, 4]
    assert np.array_equal(other.tables.pairs.keys, drafter.tables.pairs.keys)
    drafter.propose(np.array([6, 7, 8]), budget=1)  # the prompt's pairs: "6 7" was followed by 8
    drafter.save(tmp_path / "state.npz")
    other.load(tmp_path / "state.npz")
    assert other.tables.row(6, 7)[0].tolist()[0] == 8
    with pytest.raises(ValueError, match="saved for a vocabulary of 10 tokens"):
        TokenRecycling(vocab_size=11, k=2, template=[(0,)]).load(tmp_path / "state.npz")
    with pytest.raises(ValueError, match="tree shape must be"):
        TokenRecycling(vocab_size=11, tree_shape="bushy")


def warm_recycling(vocab_size: int = 10) -> TokenRecycling:
    drafter = TokenRecycling(vocab_size=vocab_size, k=2)
    drafter.begin(np.array([4, 5]), torch.randn(2, vocab_size, generator=torch.Generator().manual_seed(0)))
    drafter.propose(np.array([6, 7, 8]), budget=1)
    return drafter


def test_state_is_saved_to_exactly_the_path_given_and_atomically(tmp_path, monkeypatch):
    drafter = warm_recycling()
    drafter.save(tmp_path / "warm.state")  # numpy alone would write warm.state.npz, which no run reads
    assert [p.name for p in tmp_path.iterdir()] == ["warm.state"]
    other = TokenRecycling(vocab_size=10, k=2)
    other.load(tmp_path / "warm.state")
    assert np.array_equal(other.tables.successors, drafter.tables.successors)
    assert other.tables.row(6, 7)[0].tolist()[0] == 8
    saved = (tmp_path / "warm.state").read_bytes()

    def dies_half_way(file, **arrays):  # a full disk, a killed process: the file is left half written
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        drafter.save(tmp_path / "warm.state")
    assert (tmp_path / "warm.state").read_bytes() == saved  # the previous state is intact
    assert [p.name for p in tmp_path.iterdir()] == ["warm.state"]  # and nothing is left behind


def test_save_state_errors_name_the_path_given_not_the_temporary_file(tmp_path):
    model = make_model("llama", 1)
    for path, error in ((tmp_path / "missing" / "warm.state", FileNotFoundError), (tmp_path, IsADirectoryError)):
        with pytest.raises(error) as raised:
            model.save_state(path)
        assert raised.value.filename == str(path) and ".tmp" not in str(raised.value)


def test_damaged_state_files_are_refused_in_one_line_and_change_nothing(tmp_path):
    good = tmp_path / "good.npz"
    warm_recycling().save(good)
    data = good.read_bytes()
    arrays = dict(np.load(good))

    def variant(name: str, **changes) -> Path:
        path = tmp_path / name
        np.savez(path, **{**arrays, **changes})
        return path

    damaged = {
        "cut short": tmp_path / "cut", "empty": tmp_path / "empty", "garbled": tmp_path / "garbled",
        "no successors": variant("none.npz", successors=np.zeros(0)),
        "id -3": variant("negative.npz", successors=np.where(arrays["successors"] == 0, -3, arrays["successors"])),
        "id = vocab": variant("vocab.npz", successors=np.full_like(arrays["successors"], 10)),
        "pair row id": variant("pair.npz", pairs_successors=np.full_like(arrays["pairs_successors"], 99)),
        "nan probability": variant("nan.npz", probs=np.full_like(arrays["probs"], np.nan)),
        "float ids": variant("float.npz", successors=arrays["successors"].astype(np.float64)),
        "hits above tries": variant("hits.npz", calibration_hits=arrays["calibration_tries"] + 1),
        "no calibration": tmp_path / "old.npz",
    }
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbled").write_bytes(data[:200] + bytes(len(data) - 200))
    np.savez(tmp_path / "old.npz", **{k: v for k, v in arrays.items() if k != "calibration_tries"})
    drafter = warm_recycling()
    before = drafter.tables.successors.copy()
    for why, path in damaged.items():
        with pytest.raises(DamagedStateError) as caught:
            drafter.load(path)
        message = str(caught.value)
        assert message.startswith(f"{path} is damaged") and "\n" not in message, (why, message)
        assert np.array_equal(drafter.tables.successors, before), why
    (tmp_path / "notes.txt").write_text("not a matrix")
    with pytest.raises(ValueError, match="notes.txt is not a drafter state file") as caught:
        drafter.load(tmp_path / "notes.txt")  # maybe not ours to overwrite: an error, not a warning
    assert not isinstance(caught.value, DamagedStateError)
    with pytest.raises(ValueError, match="saved for a vocabulary of 10 tokens and k=2, not 11") as caught:
        TokenRecycling(vocab_size=11, k=2).load(good)
    assert not isinstance(caught.value, DamagedStateError)


def test_the_cli_warns_about_a_damaged_state_file_and_replaces_it(tiny_model_dir, tmp_path, capsys):
    state = tmp_path / "warm.state"
    state.write_bytes(b"PK\x03\x04 cut short by a crash")
    args = ["generate", "w1 w2 w3", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--state", str(state)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"freespec: warning: cannot load drafter state: {state} is damaged (BadZipFile" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "warning" in line]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm.state"]  # rewritten where it was asked for
    assert main(args) == 0 and "warning" not in capsys.readouterr().err  # the next run starts warm


def test_a_models_forks_draft_from_one_set_of_tables():
    """A server's slots (forks) share what recycling learned: a fork that never ran a request
    drafts from the rows another fork verified, and answers exactly as a cold drafter does."""
    model = make_model("llama", 1)
    forks = [model.fork(), model.fork()]
    tables = [fork.drafter("recycling")[0].tables for fork in (model, *forks)]
    assert tables[0] is tables[1] is tables[2]
    cold = make_model("llama", 1).generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    forks[0].generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    warm = forks[1].generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    assert warm.token_ids == cold.token_ids
    assert warm.stats.mean_accepted > cold.stats.mean_accepted
    # a fusion with a drafter that samples its drafts keeps its members' state to itself
    shared = {}
    alone = create("recycling", DrafterSettings(model.runner.vocab_size, shared=shared))
    fused = create("layerskip+recycling", DrafterSettings(model.runner.vocab_size, runner=model.runner, shared=shared))
    assert fused.drafters[1].tables is not alone.tables and list(shared) == ["recycling-dynamic"]
    model.reset()
    assert model.fork().drafter("recycling")[0].tables is not tables[0]


def test_a_model_with_its_own_state_learns_apart():
    """What a benchmark gives each method: the same model whose drafters start empty and keep
    what they learn to themselves (the original's tables neither warm them nor are warmed)."""
    model = make_model("llama", 1)
    model.generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    own = model.with_own_state()
    assert own.runner is model.runner
    assert own.drafter("recycling")[0].tables is not model.drafter("recycling")[0].tables
    apart = own.generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    warm = model.fork().generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=40)
    assert apart.token_ids == warm.token_ids
    assert warm.stats.mean_accepted > apart.stats.mean_accepted  # only the fork saw this answer
