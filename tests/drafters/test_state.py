"""State files: what drafters learned across requests (Token Recycling's tables, the suffix
drafter's per-tenant stores) saved by one process and taken over by the next, checked before use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from freespec.drafters.state import DamagedStateError, StateCheck, read_state
from freespec.drafters.suffix import StoreSource, TenantStores
from tests.helpers import PROMPTS, make_model


def _stores() -> TenantStores:
    stores = TenantStores(capacity=100, tenants=3)
    stores(None).add(list(range(10, 40)))
    stores(None).add([*range(10, 40), 7, 8, 9])  # a chat's next turn: stored from 24 tokens before its new part
    stores("alice").add([1, 2, 3, 4, 5])
    stores("").add([6, 6, 6])  # a tenant named "" is not the anonymous one
    return stores


def _restored(stores: TenantStores, tmp_path: Path, **limits) -> TenantStores:
    path = tmp_path / "state.npz"
    np.savez(path, **stores.arrays())
    other = TenantStores(**{"capacity": 100, "tenants": 3, **limits})
    other.prepare(StateCheck(read_state(path), path, vocab_size=256))()
    return other


def test_tenant_stores_come_back_as_they_were(tmp_path):
    stores = _stores()
    other = _restored(stores, tmp_path)
    assert list(other.stores) == [None, "alice", ""]  # least recently used first, as saved
    for tenant, store in stores.stores.items():
        again = other.stores[tenant]
        assert list(again.pieces) == list(store.pieces) and again.tokens == store.tokens
        assert again.previous == store.previous
        assert again.automaton.counts == store.automaton.counts
        assert again.automaton.transitions == store.automaton.transitions
    other(None).add([*range(10, 40), 7, 8, 9, 5])  # compared with the restored previous request
    assert list(other(None).pieces)[-1] == [*range(19, 40), 7, 8, 9, 5]


def test_restored_stores_keep_the_newest_that_fit(tmp_path):
    stores = _stores()
    fewer = _restored(stores, tmp_path, tenants=2)
    assert list(fewer.stores) == ["alice", ""]  # the least recently used tenant goes
    smaller = _restored(stores, tmp_path, capacity=30)
    assert [len(piece) for piece in smaller.stores[None].pieces] == [27]  # the older 30-token piece does not fit


def test_a_request_under_way_or_not_yet_stored_is_saved_and_the_stores_are_left_alone():
    """A source stores its request when its next one begins; a save takes it as it would be
    stored (without what it shares with the tenant's previous request but for the overlap), and
    leaves the live store alone, so the request is stored once, whole, when the next one begins."""
    stores = TenantStores()
    stores("a").add(list(range(100, 130)))
    source = StoreSource(stores)
    source.set_tenant("a")
    source.begin(np.array([1, 2, 3]), None)
    source.matches(np.array([*range(100, 130), *range(40)]))  # the chat's next turn, under way
    arrays = stores.arrays()
    assert arrays["suffix_piece_lengths"].tolist() == [30, 24 + 40]  # the overlap, then the new part
    assert arrays["suffix_tokens"].tolist()[30:] == [*range(106, 130), *range(40)]
    assert stores("a").tokens == 30 and arrays["suffix_previous"].tolist() == list(range(100, 130))
    source.matches(np.array([*range(100, 130), *range(50)]))  # the request goes on
    source.begin(np.array([1, 2, 3]), None)
    assert list(stores("a").pieces) == [list(range(100, 130)), [*range(106, 130), *range(50)]]


def test_damaged_suffix_arrays_are_refused_in_one_line_and_change_nothing(tmp_path):
    arrays = _stores().arrays()
    damaged = {
        "id beyond the vocabulary": {"suffix_tokens": np.full_like(arrays["suffix_tokens"], 256)},
        "negative id": {"suffix_previous": -arrays["suffix_previous"] - 1},
        "lengths off": {"suffix_piece_lengths": arrays["suffix_piece_lengths"] + 1},
        "owner out of range": {"suffix_piece_tenants": arrays["suffix_piece_tenants"] + 3},
        "empty piece": {"suffix_piece_lengths": np.zeros_like(arrays["suffix_piece_lengths"])},
        "tenants not strings": {"suffix_tenants": np.arange(3)},
        "named flag missing": {"suffix_tenant_named": np.zeros(0, dtype=np.int8)},
    }
    target = _stores()
    before = {tenant: list(store.pieces) for tenant, store in target.stores.items()}
    for why, changes in damaged.items():
        path = tmp_path / "damaged.npz"
        np.savez(path, **{**arrays, **changes})
        with pytest.raises(DamagedStateError) as caught:
            target.prepare(StateCheck(read_state(path), path, vocab_size=256))
        message = str(caught.value)
        assert message.startswith(f"{path} is damaged") and "\n" not in message, (why, message)
        assert {tenant: list(store.pieces) for tenant, store in target.stores.items()} == before, why


def test_a_saved_model_drafts_warm_in_the_next_process(tmp_path):
    """Suffix stores and recycling tables in one file: the loading model drafts the earlier
    answer from its first request (many fewer passes), for that tenant only, with the same tokens."""
    model = make_model("llama", 1, budget=16)
    first = model.generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="a")
    model.generate(prompt_ids=PROMPTS[1], drafter="recycling", max_new_tokens=8)
    model.save_state(tmp_path / "state")
    assert {"successors", "suffix_tokens", "vocab_size"} <= set(np.load(tmp_path / "state").files)

    def fresh(load: bool):
        again = make_model("llama", 1, budget=16)
        if load:
            again.load_state(tmp_path / "state")
        return again

    cold = fresh(False).generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="a")
    warm = fresh(True).generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="a")
    stranger = fresh(True).generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="b")
    assert warm.token_ids == cold.token_ids == stranger.token_ids == first.token_ids
    assert warm.stats.mean_accepted > max(3.0, 1.5 * cold.stats.mean_accepted, 1.5 * stranger.stats.mean_accepted)
    loaded = fresh(True)
    assert np.array_equal(loaded.drafter("recycling")[0].tables.successors,
                          model.drafter("recycling")[0].tables.successors)
    assert loaded.drafter("suffix")[0].calibration.tries.sum() == 0  # calibrations relearn: an old workload's would mislead


def test_a_state_holds_what_has_run_and_another_models_is_refused(tmp_path):
    model = make_model("llama", 1)
    model.save_state(tmp_path / "nothing")  # no drafter has run: a valid file with nothing to warm
    assert set(np.load(tmp_path / "nothing").files) == {"vocab_size"}
    model.load_state(tmp_path / "nothing")
    model.generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=8)
    model.save_state(tmp_path / "suffix")
    assert "successors" not in np.load(tmp_path / "suffix").files
    arrays = dict(np.load(tmp_path / "suffix"))
    np.savez(tmp_path / "other.npz", **{**arrays, "vocab_size": np.array(arrays["vocab_size"] + 1)})
    with pytest.raises(ValueError, match=r"other.npz was saved for a vocabulary of \d+ tokens, not \d+: another") as caught:
        model.load_state(tmp_path / "other.npz")
    assert not isinstance(caught.value, DamagedStateError)
