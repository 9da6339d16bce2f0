"""The prefix cache (issue 21, item 4): rows filed by earlier requests come back bit for bit, per
scope, under a byte budget with the least recently used rows dropped first."""

from __future__ import annotations

import pytest
import torch

from freespec.model.kv_cache import SKIPPED, KVCache
from freespec.model.prefix_cache import PrefixCache
from tests.helpers import runner_for, tiny_model

ROW_BYTES = 2 * 2 * 3 * 4 * 4  # keys and values, 2 layers x 3 kv heads x 4 dims, fp32


def filled(tokens: list[int]) -> KVCache:
    """A cache whose committed rows hold ``tokens``, each row's values a function of its whole prefix
    (as a model's are): same prefix, same rows."""
    cache = KVCache(layers=2, kv_heads=3, head_dim=4, max_positions=64)
    cache.reset(len(tokens))
    for row in range(len(tokens)):
        generator = torch.Generator().manual_seed(hash(tuple(tokens[: row + 1])) % 2**31)
        cache.keys[:, :, row] = torch.randn(2, 3, 4, generator=generator)
        cache.values[:, :, row] = torch.randn(2, 3, 4, generator=generator)
    cache.pending = list(tokens)
    cache.commit(range(len(tokens)))
    return cache


def loaded(store: PrefixCache, tokens: list[int], scope="a") -> tuple[int, KVCache]:
    cache = KVCache(layers=2, kv_heads=3, head_dim=4, max_positions=64)
    cache.reset(0)
    return store.load(cache, tokens, scope), cache


def assert_rows_of(cache: KVCache, tokens: list[int]) -> None:
    assert cache.length == len(tokens) and cache.row_tokens == tokens
    if not tokens:
        return
    expected = filled(tokens)
    assert torch.equal(cache.keys[:, :, : len(tokens)], expected.keys[:, :, : len(tokens)])
    assert torch.equal(cache.values[:, :, : len(tokens)], expected.values[:, :, : len(tokens)])


def test_the_longest_filed_prefix_comes_back_bit_for_bit_across_branches():
    store = PrefixCache(budget_bytes=1 << 20)
    store.save(filled([1, 2, 3, 4]), "a")
    store.save(filled([1, 2, 5, 6, 7]), "a")  # splits the first run after [1, 2]
    assert store.rows == 7 and store.bytes == 7 * ROW_BYTES
    for prompt, length in [([1, 2, 5, 6, 7, 8], 5), ([1, 2, 3, 9], 3), ([1, 2, 5], 3), ([9], 0), ([1, 2, 3, 4], 4)]:
        matched, cache = loaded(store, prompt)
        assert matched == length
        assert_rows_of(cache, prompt[:length])


def test_a_cache_keeps_its_own_rows_when_they_match_as_far():
    store = PrefixCache(budget_bytes=1 << 20)
    store.save(filled([1, 2, 3]), "a")
    cache = filled([1, 2, 3, 4, 5])
    assert store.load(cache, [1, 2, 3, 4, 9], "a") == 4  # its own rows go further than the store's
    assert cache.length == 5  # the caller keeps the prefix it needs (ModelRunner.reuse)
    cache = filled([1, 7])
    assert store.load(cache, [1, 2, 3, 4], "a") == 3
    assert_rows_of(cache, [1, 2, 3])


def test_scopes_never_see_each_others_rows():
    store = PrefixCache(budget_bytes=1 << 20)
    store.save(filled([1, 2, 3, 4]), "alice")
    assert loaded(store, [1, 2, 3, 4], "mallory")[0] == 0
    assert loaded(store, [1, 2, 3, 4], None)[0] == 0
    store.save(filled([1, 2, 9]), "mallory")
    matched, cache = loaded(store, [1, 2, 3, 4], "mallory")
    assert matched == 2
    assert_rows_of(cache, [1, 2])
    assert loaded(store, [1, 2, 3, 4], "alice")[0] == 4


def test_the_budget_drops_least_recently_used_rows_first():
    store = PrefixCache(budget_bytes=10 * ROW_BYTES)
    store.save(filled([1, 2, 3, 4]), "a")
    store.save(filled([5, 6, 7, 8]), "b")
    assert loaded(store, [1, 2, 3, 4], "a")[0] == 4  # a is now more recent than b
    evicted = store.save(filled([9, 10, 11, 12]), "c")  # 12 rows: 2 must go, from b's tail
    assert evicted == 2 and store.rows == 10 and store.bytes <= store.budget_bytes
    assert loaded(store, [5, 6, 7, 8], "b")[0] == 2
    assert loaded(store, [1, 2, 3, 4], "a")[0] == 4
    matched, cache = loaded(store, [5, 6], "b")
    assert_rows_of(cache, [5, 6])
    assert store.save(filled(list(range(20, 40))), "d") == 20  # larger than the budget: its head stays
    assert loaded(store, list(range(20, 40)), "d")[0] == 10
    assert [loaded(store, prompt, scope)[0] for prompt, scope in [([1], "a"), ([5], "b"), ([9], "c")]] == [0, 0, 0]


def test_shared_prefixes_are_held_once():
    store = PrefixCache(budget_bytes=1 << 20)
    system = list(range(100, 120))
    for user in range(5):
        store.save(filled([*system, user]), "a")
    assert store.rows == len(system) + 5


def test_rows_of_skipping_passes_are_not_filed_and_no_budget_files_nothing():
    cache = filled([1, 2, 3, 4])
    cache.row_tokens[2] = SKIPPED
    store = PrefixCache(budget_bytes=1 << 20)
    store.save(cache, "a")
    assert store.rows == 2 and loaded(store, [1, 2, 3, 4])[0] == 2
    empty = PrefixCache(budget_bytes=0)
    empty.save(filled([1, 2]), "a")
    assert empty.rows == 0 and loaded(empty, [1, 2])[0] == 0
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(budget_bytes=-1)


def test_filed_rows_are_the_rows_a_fresh_prefill_writes(c_kernels):
    """On a real runner: prefill A, file it, prefill B over it, load A back: every row equals a
    cold prefill of A, and the next pass's logits too."""
    runner = runner_for(tiny_model("llama"), c_kernels)
    a, b = [2, *range(10, 40)], [2, *range(50, 70)]
    store = PrefixCache(budget_bytes=1 << 20)
    runner.reset(64)
    runner.prefill(torch.tensor(a))
    store.save(runner.cache, "t")
    runner.reset(64)
    runner.prefill(torch.tensor(b))
    assert store.load(runner.cache, [*a, 5], "t") == len(a)
    assert runner.reuse([*a, 5], 64) == len(a)
    keys, values = runner.cache.keys[:, :, : len(a)].clone(), runner.cache.values[:, :, : len(a)].clone()
    warm = runner.logits(runner.forward(torch.tensor([5]), torch.tensor([len(a)]), torch.ones(1, 1, dtype=torch.bool)))
    runner.reset(64)
    runner.prefill(torch.tensor(a))
    assert torch.equal(runner.cache.keys[:, :, : len(a)], keys)
    assert torch.equal(runner.cache.values[:, :, : len(a)], values)
    cold = runner.logits(runner.forward(torch.tensor([5]), torch.tensor([len(a)]), torch.ones(1, 1, dtype=torch.bool)))
    assert torch.equal(warm, cold)
