"""Lossless sampling per drafter: every drafter's real trees through the engine's real loop.

:class:`freespec.engine.loop.Generation` runs unchanged (draft → verify → cut → commit and update,
with each request's SamplingParams and generator) over a :class:`ReplayRunner`: the runner
protocol answered from a cache of the tiny model's logits per prefix, each prefix computed once
by the transformers model. A run then costs the drafter's and the verifier's work only, so every
drafter and tree shape gets ``SAMPLES`` whole generations, compared with the exact distribution of
plain sampling over all sequences of up to ``LENGTH`` tokens (a sequence ends at eos). The
threshold ``ALPHA`` is fixed in advance and the seeds are fixed, so each test is deterministic.
The same harness with a deliberately wrong acceptance rule must fail the same test.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from freespec.drafters import FACTORIES, DrafterSettings, create, datastore
from freespec.engine import loop as engine
from freespec.engine.budget import BudgetPolicy
from freespec.engine.distribution import (
    draw,
    repetition_penalty,
    target_probs,
    tree_repetition_penalty,
)
from freespec.engine.loop import Generation
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.kernels import Kernels
from freespec.model.kv_cache import common_prefix
from freespec.model.runner import PassLogits, forward_logits
from tests.helpers import (
    ALPHA,
    VOCAB,
    chi_square_p,
    small_model,
    total_variation,
    word_tokenizer,
)

# Whole generations per drafter and tree shape. A run costs 1-6 ms of drafting and verification
# on one CPU thread, so the default keeps the file near a minute; FREESPEC_STATS_SAMPLES=20000
# runs the full proof (several minutes).
SAMPLES = int(os.environ.get("FREESPEC_STATS_SAMPLES", 1_500))
FEW_SAMPLES = max(SAMPLES // 2, 800)  # plain temperature
WRONG_SAMPLES = 600  # the wrong rules are rejected by many orders of magnitude
ADED_ITERATIONS = 30  # MCTS iterations per aded draft (150 by default): a smaller search, 5x faster
LENGTH = 3  # tokens per generation; the statistics are over whole sequences (eos ends one early)
EOS = 0  # the tiny model's eos: about 5-18% likely at each step, so many sequences end early
BUDGET = 12  # draft nodes per step
GREEDY = [1, 2, 3, 4, 5, 10, 8, 3, 10, 8, 3, 10, 8, 3]  # the model's greedy text after 1 2 3 4 5
PROMPT = [*GREEDY, 10]  # repeats itself: lookup, trie, aded and retrieval find continuations
FULL = SamplingParams(temperature=0.8, top_k=9, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
PLAIN = SamplingParams(temperature=1.0)


# -- the harness ------------------------------------------------------------------------------------


class LogitCache:
    """prefix (tuple of token ids) → the model's [vocab] logits after it, each computed once."""

    def __init__(self, hf_model: torch.nn.Module):
        self.model = hf_model
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
        """[len(prefixes), vocab], running the model once per length over the prefixes not cached yet."""
        missing = sorted({p for p in prefixes if p not in self.rows}, key=len)
        for _, group in itertools.groupby(missing, key=len):
            group = list(group)
            with torch.no_grad():
                rows = self.model(torch.tensor(group)).logits[:, -1]  # [group, vocab]
            self.rows.update(zip(group, rows))
        return torch.stack([self.rows[p] for p in prefixes])


class ReplayRunner:
    """The runner protocol the engine uses, answered from a :class:`LogitCache`.

    ``forward`` returns each node's logits for its own prefix (the committed tokens, then the
    node's ancestors and itself, read off the tree mask) in place of hidden states, and
    ``logits`` passes them through; ``commit`` keeps the tokens of the accepted nodes.
    """

    max_positions = 512
    vocab_size = VOCAB
    kernels = Kernels()  # torch's argmax, for greedy steps

    def __init__(self, cache: LogitCache):
        self.cache = cache
        self.capacity = 0
        self.sequence: list[int] = []  # the committed tokens
        self._nodes: list[int] = []  # tokens of the last forward
        self.holder = None  # the request whose rows these are (Generation.plan)
        self.lock = threading.RLock()  # held for each step

    @property
    def length(self) -> int:
        return len(self.sequence)

    def reset(self, capacity: int) -> None:
        self.capacity, self.sequence = capacity, []

    def reuse(self, tokens: list[int], capacity: int) -> int:
        kept = common_prefix(self.sequence, tokens)
        self.capacity, self.sequence = max(capacity, self.capacity), self.sequence[:kept]
        return kept

    def prefill(self, tokens: torch.Tensor, should_stop=None) -> torch.Tensor:
        start = self.length
        self.sequence += tokens.tolist()
        if start == self.length:
            return torch.empty(0, 0)
        return self.cache.logits([tuple(self.sequence[: i + 1]) for i in range(start, len(self.sequence))])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
        self._nodes = tokens.tolist()
        committed = tuple(self.sequence)
        prefixes = [committed + tuple(t for t, seen in zip(self._nodes, row) if seen) for row in tree_mask.tolist()]
        assert positions.tolist() == [len(p) - 1 for p in prefixes], "positions disagree with the tree mask"
        return self.cache.logits(prefixes)  # [nodes, vocab]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def tree_logits(self, tokens: np.ndarray, depths: np.ndarray, tree_mask: np.ndarray) -> PassLogits:
        return forward_logits(self, tokens, depths, tree_mask)

    def commit(self, kept: list[int]) -> None:
        self.sequence += [self._nodes[i] for i in kept]


def run_requests(runner: ReplayRunner, drafter, params: SamplingParams,
                 samples: int) -> tuple[list[tuple[int, ...]], int]:
    """(the sequence each request seeded 0, 1, ... generated, drafted tokens accepted in all)."""
    policy = BudgetPolicy({q: 1.0 for q in range(1, BUDGET + 2)}, candidates=[BUDGET])
    sequences, accepted = [], 0
    for seed in range(samples):
        options = dataclasses.replace(params, seed=seed)
        generation = Generation(runner, drafter, policy, PROMPT, LENGTH, {EOS}, BUDGET, options)
        for _ in generation:
            pass
        sequences.append(tuple(generation.token_ids))
        accepted += generation.stats.new_tokens - generation.stats.forward_passes
    return sequences, accepted


def exact_sequences(cache: LogitCache, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Plain sampling's probability of every sequence: ``LENGTH`` tokens, or fewer ending in eos."""
    done: dict[tuple[int, ...], float] = {}
    open_ = {(): 1.0}
    for step in range(LENGTH):
        prefixes = list(open_)
        rows = cache.logits([(*PROMPT, *p) for p in prefixes])  # [prefixes, vocab]
        grown = {}
        for prefix, row in zip(prefixes, rows):
            seen = np.array([*PROMPT, *prefix])
            probs = target_probs(repetition_penalty(row, seen, params.repetition_penalty), params).double()
            for token in np.flatnonzero(probs.numpy()):
                sequence = (*prefix, int(token))
                probability = open_[prefix] * float(probs[token])
                if token == EOS or step == LENGTH - 1:
                    done[sequence] = probability
                else:
                    grown[sequence] = probability
        open_ = grown
    return done


def compare(sequences: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """(chi-square p-value, total variation) of the sequences' counts against the exact distribution."""
    counts = Counter(sequences)
    outcomes = sorted(set(exact) | set(counts))
    observed = np.array([counts.get(o, 0) for o in outcomes])
    probs = np.array([exact.get(o, 0.0) for o in outcomes])
    return chi_square_p(observed, probs), total_variation(observed, probs)


# -- drafters ---------------------------------------------------------------------------------------

CASES = ["recycling-dynamic", "recycling-static", "lookup", "trie", "aded", "jacobi", "retrieval", "suffix",
         "recycling+lookup", "suffix+recycling"]


def corpus_store(cache: LogitCache, path) -> None:
    """A datastore of sampled continuations of the prompt, written as text of the word tokenizer."""
    words = word_tokenizer().convert_ids_to_tokens(list(range(VOCAB)))
    generator = torch.Generator().manual_seed(0)
    documents = []
    for _ in range(40):
        tokens = list(PROMPT)
        for _ in range(8):
            probs = target_probs(cache.logits([tuple(tokens)])[0], PLAIN)
            tokens.append(draw(probs, generator))
        documents.append(" ".join(words[t] for t in tokens))
    datastore.build(documents, word_tokenizer(), path)


def make_drafter(case: str, cache: LogitCache, runner: ReplayRunner, store):
    """A fresh drafter by its registry name (aded with the datastore's tri-grams as its prior),
    warmed by one previous (greedy) request."""
    name, _, tree = case.partition("-")
    drafter = create(name, DrafterSettings(VOCAB, tree or "dynamic", store, word_tokenizer()))
    if name == "aded":
        drafter.iterations = ADED_ITERATIONS
    policy = BudgetPolicy({q: 1.0 for q in range(1, BUDGET + 2)}, candidates=[BUDGET])
    for _ in Generation(runner, drafter, policy, PROMPT, 24, set(), BUDGET):
        pass
    return drafter


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The logit cache and its runner, the datastore, and per options the exact distribution and
    plain sampling's sequence for each seed, shared by the tests."""
    cache = LogitCache(small_model())
    runner = ReplayRunner(cache)
    store = tmp_path_factory.mktemp("store")
    corpus_store(cache, store)
    exact = {"full": exact_sequences(cache, FULL), "plain": exact_sequences(cache, PLAIN)}
    plain = {"full": run_requests(runner, None, FULL, SAMPLES)[0],
             "plain": run_requests(runner, None, PLAIN, FEW_SAMPLES)[0]}
    return cache, runner, store, exact, plain


# Drafters that run a model to draft (the target itself, or a second model) cannot replay cached
# logits: tests/test_model_drafters.py runs them through the real engine against the same tables.
MODEL_DRAFTERS = {"layerskip", "draft-model"}


def test_every_registered_drafter_is_covered():
    assert {case.partition("-")[0] for case in CASES} | MODEL_DRAFTERS >= set(FACTORIES)
    assert any("+" in case for case in CASES)  # and a fused drafter


@pytest.mark.parametrize("options", ["full", "plain"])
def test_the_harness_without_a_drafter_is_plain_sampling(harness, options):
    """The reference the drafters are held to passes the test itself."""
    *_, exact, plain = harness
    p_value, distance = compare(plain[options], exact[options])
    assert p_value > ALPHA, f"p = {p_value:.2e}, total variation {distance:.4f}"
    assert Counter(map(len, plain[options]))[1] > len(plain[options]) // 20  # many end early with eos


@pytest.mark.parametrize("case, options, samples", [
    *((case, "full", SAMPLES) for case in CASES),
    *((case, "plain", FEW_SAMPLES) for case in CASES
      if case not in ("aded", "retrieval", "recycling+lookup", "suffix+recycling")),
])
def test_each_drafter_keeps_the_distribution(harness, case, options, samples):
    """Chi-square against the exact distribution; and, as drafts only decide how far a pass reaches
    (one uniform number per emitted token), each seed gives plain sampling's very sequence."""
    cache, runner, store, exact, plain = harness
    drafter = make_drafter(case, cache, runner, store)
    sequences, accepted = run_requests(runner, drafter, FULL if options == "full" else PLAIN, samples)
    p_value, distance = compare(sequences, exact[options])
    assert accepted >= samples // 5, f"{case}: only {accepted} drafted tokens accepted in {samples} runs"
    assert p_value > ALPHA, f"{case}: p = {p_value:.2e}, total variation {distance:.4f}"
    assert sequences == plain[options][:samples]


# -- deliberately wrong rules: the same test must reject them ---------------------------------------


def kept_child_rule(tree: DraftTree, logits: PassLogits, context: np.ndarray, params: SamplingParams,
                    generator: torch.Generator, answer_start: int | None = None) -> tuple[list[int], int]:
    """Wrong: accept the first drafted child the target keeps (top-k, top-p, min-p) without sampling."""
    logits = tree_repetition_penalty(logits.tensor, context, tree, params.repetition_penalty)
    path, node = [0], 0
    while True:
        probs = target_probs(logits[node], params)
        follow = next((c for c in tree.children[node] if probs[tree.tokens[c]] > 0), None)
        if follow is None:
            return path, draw(probs, generator)
        path.append(follow)
        node = follow


def independent_rule(tree: DraftTree, logits: PassLogits, context: np.ndarray, params: SamplingParams,
                     generator: torch.Generator, answer_start: int | None = None) -> tuple[list[int], int]:
    """Wrong: accept each drafted child with its own target probability, else draw from the whole
    target (no residual), as sampling each candidate path independently does."""
    logits = tree_repetition_penalty(logits.tensor, context, tree, params.repetition_penalty)
    path, node = [0], 0
    while True:
        probs = target_probs(logits[node], params)
        follow = next((c for c in tree.children[node]
                       if torch.rand((), dtype=torch.float64, generator=generator) < probs[tree.tokens[c]]), None)
        if follow is None:
            return path, draw(probs, generator)
        path.append(follow)
        node = follow


@pytest.mark.parametrize("rule", [kept_child_rule, independent_rule])
@pytest.mark.parametrize("case", ["recycling-dynamic", "trie"])
def test_wrong_rules_fail_the_same_test(harness, monkeypatch, rule, case):
    cache, runner, store, exact, _ = harness
    drafter = make_drafter(case, cache, runner, store)
    monkeypatch.setattr(engine, "verify", rule)
    sequences, accepted = run_requests(runner, drafter, FULL, WRONG_SAMPLES)
    p_value, distance = compare(sequences, exact["full"])
    assert accepted >= WRONG_SAMPLES // 5
    assert p_value < ALPHA, f"{case}: p = {p_value:.2e}, total variation {distance:.4f}"
