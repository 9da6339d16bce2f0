"""The suffix drafter (SuffixDecoding): its automaton against brute force, the per-tenant store and
its bounds, the corpus read off a suffix array, and learning through the engine.

Equality with plain greedy for ``suffix`` (alone and fused) runs with every other drafter in
test_drafters.py, test_real_drafters.py and test_sampling_drafters.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from freespec.drafters import DrafterSettings, create, datastore
from freespec.drafters.suffix import (
    MAX_MATCH,
    CorpusSource,
    RequestSource,
    StoreSource,
    Suffix,
    SuffixAutomaton,
    SuffixStore,
    TenantStores,
)
from tests.helpers import PROMPTS, generate, make_model, word_tokenizer


def _brute_counts(tokens: list[int], depth: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens)) for n in range(1, depth + 1)
                   if i + n <= len(tokens))


@pytest.mark.parametrize("seed", range(12))
def test_automaton_counts_every_substring_up_to_its_depth(seed):
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 9))
    tokens = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(1, 250))).tolist()
    if seed % 3 == 0:  # a loop, where the suffix links run long
        tokens = ([1, 2, 3] * 100)[: len(tokens)]
    automaton = SuffixAutomaton(depth=depth)
    for end, token in enumerate(tokens, 1):
        automaton.append(token)
        assert automaton.recent == automaton.find(tokens[max(end - depth, 0) : end])
    for substring, count in _brute_counts(tokens, depth).items():
        assert automaton.counts[automaton.find(list(substring))] == count, substring
    query = rng.integers(0, 4, 40).tolist()
    state, length = 0, 0
    for end, token in enumerate(query, 1):  # streaming match: the longest suffix (<= 6) that occurs
        state, length = automaton.advance(state, length, token, limit=min(6, depth))
        occurs = [n for n in range(1, min(6, depth, end) + 1) if automaton.find(query[end - n : end])]
        assert length == max(occurs, default=0)
        assert state == (automaton.find(query[end - length : end]) if length else 0)


def test_request_source_drafts_what_followed_by_frequency():
    source = RequestSource()
    source.begin(np.array([], dtype=np.int64), None)
    context = np.array([5, 1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 4, 8, 1, 2])  # "1 2" went on with 3 twice, 4 once
    tree = source.propose(context, budget=4)
    assert tree.tokens[0] == 2
    first = {int(tree.tokens[c]): float(tree.scores[c]) for c in tree.children[0]}
    assert set(first) <= {3, 4} and 3 in first and first[3] > first.get(4, 0.0)
    assert np.all(np.diff(tree.scores[1:]) <= 0)  # best-first
    assert len(source.propose(np.array([7, 8, 9]), budget=4)) == 1  # nothing repeats: no draft


def test_store_drops_the_oldest_requests_and_skips_what_the_previous_one_shared():
    store = SuffixStore(capacity=100, overlap=4)
    chat = list(range(10, 60))
    store.add(chat)
    store.add(chat + [7, 8, 9])  # a chat's next turn: only its new part and 4 tokens before it are stored
    assert store.tokens == 50 + 7 and store.automaton.find([56, 57, 58, 59, 7, 8, 9]) and store.version == 2
    store.add(list(range(100, 160)))  # 117 tokens: the oldest requests go until 75 or fewer are kept
    assert store.version == 3 and store.tokens == 67 and len(store.pieces) == 2
    assert not store.automaton.find([10, 11]) and store.automaton.find([58, 59, 7]) and store.automaton.find([100])
    stores = TenantStores(capacity=100, tenants=2)
    a, b = stores("a"), stores("b")
    assert stores("a") is a and stores("c") is not None and "b" not in stores.stores and b is not stores("b")


def test_each_tenant_is_drafted_from_its_own_earlier_requests_only():
    model = make_model("llama", 1, budget=16)
    first = generate(model, PROMPTS[1], "suffix", 40)
    assert first.token_ids == generate(model, PROMPTS[1], "none", 40).token_ids
    stranger = model.generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="someone else")
    again = model.generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40)  # tenant None again
    assert stranger.token_ids == again.token_ids == first.token_ids
    assert again.stats.mean_accepted > max(3.0, 1.5 * stranger.stats.mean_accepted)
    drafter, _ = model.drafter("suffix")
    store = drafter.drafters[1]
    assert isinstance(store, StoreSource) and set(store.stores.stores) == {None, "someone else"}


def test_a_models_forks_draft_from_one_set_of_stores():
    """A server runs a tenant's requests on any of its forks: each drafts from all of them, and a
    match into a store that another fork added to is redone (the automaton changed under it)."""
    model = make_model("llama", 1, budget=16)
    forks = [model.fork(), model.fork()]
    stores = [fork.drafter("suffix")[0].drafters[1].stores for fork in (model, *forks)]
    assert stores[0] is stores[1] is stores[2]
    first = forks[0].generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="a")
    forks[0].generate(prompt_ids=PROMPTS[0], drafter="suffix", max_new_tokens=8, tenant="a")  # files the first
    again = forks[1].generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="a")
    stranger = forks[1].generate(prompt_ids=PROMPTS[1], drafter="suffix", max_new_tokens=40, tenant="b")
    assert again.token_ids == stranger.token_ids == first.token_ids
    assert again.stats.mean_accepted > max(3.0, 1.5 * stranger.stats.mean_accepted)
    source = forks[1].drafter("suffix")[0].drafters[1]
    source.begin(np.array(PROMPTS[1]), None)  # files tenant b's request: a's store is unchanged
    source.set_tenant("a")
    source.begin(np.array(PROMPTS[1]), None)
    context = np.array([*PROMPTS[1], *first.token_ids[:5]])
    assert source.matches(context)
    # another fork files a request with the matched text after another token: the automaton splits the match's state
    stores[0]("a").add([251, *context[-MAX_MATCH:].tolist(), 250])
    fresh = StoreSource(stores[0])
    fresh.set_tenant("a")
    fresh.begin(np.array(PROMPTS[1]), None)
    assert source.matches(context) == fresh.matches(context)  # redone in the changed automaton
    model.reset()
    assert model.fork().drafter("suffix")[0].drafters[1].stores is not stores[0]


def test_suffix_calibration_learns_from_verified_steps_and_shadow_drafts():
    model = make_model("llama", 1)  # budget chosen by the policy: shadow drafts
    generate(model, PROMPTS[0], "suffix", 48)
    drafter = model.drafter("suffix")[0]
    for calibration in (drafter.drafters[0].calibration, drafter.calibration):  # the request's, the merged tree's
        assert calibration.tries.sum() > 10 and 0 < calibration.hits.sum() < calibration.tries.sum()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tokenizer = word_tokenizer()
    rng = np.random.default_rng(5)
    documents = [rng.integers(4, 60, 80).tolist() for _ in range(6)] + [[4, 5, 6, 7, 8, 9] * 5]
    path = tmp_path_factory.mktemp("corpus")
    datastore.build([" ".join(tokenizer.convert_ids_to_tokens(d)) for d in documents], tokenizer, path)
    return datastore.Datastore(path, tokenizer), documents


def test_corpus_source_reads_children_off_the_suffix_array(corpus):
    store, documents = corpus
    source = CorpusSource(store)
    tokens = [t for d in documents for t in d]
    for length in (1, 2, 3):
        source.begin(np.array([], dtype=np.int64), None)
        query = documents[2][10 : 10 + length]
        context = np.array([1, *query])
        (handle, matched), = source.matches(context)
        assert matched == length
        children = {token: share for token, share, _ in source.expand(handle)}
        following = Counter(d[i + length] for d in documents for i in range(len(d) - length)
                            if d[i : i + length] == query)
        occurrences = sum(1 for d in documents for i in range(len(d) - length + 1) if d[i : i + length] == query)
        assert children == {t: c / (occurrences + 1) for t, c in following.items()}  # every child: 16 samples
    source.begin(np.array([], dtype=np.int64), None)
    copy = documents[-1][:8]
    for end in range(2, 8):  # the match grows with the context, one token at a time
        assert source.matches(np.array(copy[:end]))[0][1] == end
    assert source.matches(np.array([*copy, 3])) == [] and 3 not in tokens  # no match left: none found afresh


def test_suffix_with_a_corpus_drafts_from_it(corpus):
    store, documents = corpus
    drafter = create("suffix", DrafterSettings(256))
    assert isinstance(drafter, Suffix) and len(drafter.drafters) == 2  # no datastore: request and store
    drafter = Suffix(store)
    drafter.begin(np.array([1]), None)
    tree = drafter.propose(np.array([1, 2, *documents[3][:6]]), budget=6)
    assert len(tree) >= 5 and tree.tokens[1:].tolist() == documents[3][6 : 5 + len(tree)]  # copied from the corpus
