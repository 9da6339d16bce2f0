"""Lossless sampling: speculative sampling keeps the target distribution exactly.

Statistical tests compare sampled token sequences with the exact distribution of plain sampling,
computed by enumerating every sequence on a model with a 12-token vocabulary. The significance
level is fixed in advance: a chi-square test rejects below ``ALPHA``; the seeds are fixed, so each
test is deterministic. Deliberately wrong rules run through the same test and must be rejected,
which shows the test has the power to fail.

Tree-level tests run the verification rules themselves on the model's real logits at every node
of fixed trees (20,000 draws each); end-to-end tests run the engine for whole short sequences.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from freespec import api, kernels
from freespec.api import Model
from freespec.drafters import BaseDrafter, TokenRecycling
from freespec.engine.budget import BudgetPolicy
from freespec.engine.costs import SIZES, CostCurve
from freespec.engine.distribution import (
    answer_penalties,
    biased,
    draw,
    repetition_penalty,
    target_probs,
    tree_answer_penalties,
    tree_penalties,
    tree_repetition_penalty,
)
from freespec.engine.sampling import OPTIONS, SAMPLING_KEYS, SamplingParams
from freespec.engine.tree import DraftTree
from freespec.engine.verify import rejection_accept, sample_accept
from freespec.model.loading import from_transformers
from freespec.model.runner import ModelRunner
from tests.helpers import (
    ALPHA,
    CONTEXT,
    DEPTH,
    FULL,
    OPENAI,
    VOCAB,
    chi_square_p,
    exact_joint,
    exact_table,
    make_model,
    runner_for,
    small_model,
    tiny_model,
    total_variation,
    word_tokenizer,
)

SAMPLES = 20_000  # per tree shape
FEW_SAMPLES = 5_000  # for the wrong rules (rejected by orders of magnitude) and extra cases
PLAIN = SamplingParams(temperature=1.0)


# -- helpers -----------------------------------------------------------------------------------


def tree_logits(runner: ModelRunner, tree: DraftTree) -> torch.Tensor:
    """[n, vocab] the real tree-attention logits of ``tree`` after CONTEXT."""
    runner.reset(64)
    runner.prefill(torch.from_numpy(CONTEXT[:-1]))
    return runner.logits(runner.forward(*tree.attention_inputs(runner.length)))


def node_targets(runner: ModelRunner, tree: DraftTree, params: SamplingParams) -> list[torch.Tensor]:
    """Each node's target from the real tree-attention logits, penalised with its own prefix."""
    penalised = tree_penalties(tree_logits(runner, tree), CONTEXT, len(CONTEXT), tree, params)  # CONTEXT: the prompt
    return [target_probs(row, params) for row in penalised]


def sequence_counts(rule, tree: DraftTree, target, table, samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """Counts of the first DEPTH tokens: one verification step, then plain sampling if it emitted fewer.

    The continuation is drawn with numpy from the exact table (fast; it is plain sampling).
    """
    generator = torch.Generator().manual_seed(seed)
    continuation = np.random.default_rng(seed)
    cdfs = {prefix: np.cumsum(probs.numpy()) for prefix, probs in table.items()}
    counts = np.zeros(VOCAB ** DEPTH, dtype=np.int64)
    for _ in range(samples):
        path, bonus = rule(tree, target, generator)
        tokens = [int(t) for t in tree.tokens[path[1:]]] + [bonus]
        while len(tokens) < DEPTH:
            cdf = cdfs[tuple(tokens)]
            tokens.append(int(np.searchsorted(cdf, continuation.random() * cdf[-1], side="right")))
        counts[np.ravel_multi_index(tokens[:DEPTH], (VOCAB,) * DEPTH)] += 1
    return counts


def tree_from_paths(root: int, paths: list[tuple[int, ...]]) -> DraftTree:
    """A tree from token paths below ``root`` (each path's prefix must come earlier)."""
    index = {(): 0}
    tokens, parents = [root], [-1]
    for path in paths:
        index[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(index[path[:-1]])
    return DraftTree(np.array(tokens), np.array(parents))


def top(probs: torch.Tensor, k: int) -> list[int]:
    return torch.topk(probs, k).indices.tolist()


def trees(table: dict[tuple, torch.Tensor], hf_model) -> dict[str, DraftTree]:
    """Every tree shape freespec drafts: chain, wide, deep and wide, repeated siblings, recycling's two."""
    root = int(CONTEXT[-1])
    first = top(table[()], 1)[0]
    second = top(table[(first,)], 1)[0]
    chain = [(first,), (first, second), (first, second, top(table[(first, second)], 1)[0])]
    wide = [(t,) for t in top(table[()], 6)]
    bushy = [(a,) for a in top(table[()], 3)]
    bushy += [(a, b) for (a,) in bushy for b in top(table[(a,)], 3)]
    bushy += [(a, b, c) for (a, b) in bushy[3:] for c in top(table[(a, b)], 2)]
    shapes = {"chain": tree_from_paths(root, chain), "wide": tree_from_paths(root, wide),
              "bushy": tree_from_paths(root, bushy)}
    a, b = top(table[()], 2)
    shapes["repeated-siblings"] = DraftTree(np.array([root, a, b, a, second]), np.array([-1, 0, 0, 0, 3]))
    warm = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        warm_logits = hf_model(warm[None]).logits[0]  # [64, vocab]
    for shape in ("static", "dynamic"):
        drafter = TokenRecycling(VOCAB, tree_shape=shape)
        drafter.begin(warm.numpy(), warm_logits)
        shapes[f"recycling-{shape}"] = drafter.propose(CONTEXT, 80)
    return shapes


# -- deliberately wrong rules: the statistical test must reject them ----------------------------


def best_path_rule(tree: DraftTree, target, generator):
    """Wrong: accept the most likely child without sampling, then sample the bonus."""
    path, node = [0], 0
    while tree.children[node]:
        p = target(node)
        node = max(tree.children[node], key=lambda c: p[tree.tokens[c]])
        path.append(node)
    return path, draw(target(node), generator)


def independent_rule(tree: DraftTree, target, generator):
    """Wrong: accept each child with its own probability (no residual), as per-candidate top-p paths do."""
    path, node = [0], 0
    while True:
        p = target(node)
        follow = next((c for c in tree.children[node]
                       if torch.rand((), generator=generator) < p[tree.tokens[c]]), None)
        if follow is None:
            return path, draw(p, generator)
        path.append(follow)
        node = follow


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    hf_model = small_model()
    runner = runner_for(hf_model, kernels.select())
    tables = {"full": exact_table(hf_model, FULL), "plain": exact_table(hf_model, PLAIN),
              "openai": exact_table(hf_model, OPENAI)}
    return hf_model, runner, tables, trees(tables["full"], hf_model)


# -- the processors match transformers ----------------------------------------------------------


@pytest.mark.parametrize("params", [FULL, PLAIN, SamplingParams(temperature=1.3, top_k=3),
                                    SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=0.7),
                                    SamplingParams(temperature=1.0, min_p=0.2)])
def test_processing_matches_transformers(params):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3  # [rows, vocab]
    prefixes = torch.randint(0, 50, (4, 20), generator=generator)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)),
                              TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        hf.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        hf.append(MinPLogitsWarper(params.min_p))
    expected = torch.softmax(hf(prefixes, logits.clone()), dim=-1)
    for row, prefix, want in zip(logits, prefixes, expected):
        got = target_probs(repetition_penalty(row, prefix.numpy(), params.repetition_penalty), params)
        assert torch.equal(got, want)


def test_tree_penalty_uses_each_nodes_own_prefix():
    tree = DraftTree(np.array([1, 4, 6, 4]), np.array([-1, 0, 1, 0]))  # 1→4→6 and 1→4 again
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))  # [nodes, vocab]
    context = np.array([2, 1])
    got = tree_repetition_penalty(logits, context, tree, 2.0)
    for node, prefix in enumerate([[2, 1], [2, 1, 4], [2, 1, 4, 6], [2, 1, 4]]):
        assert torch.equal(got[node], repetition_penalty(logits[node], np.array(prefix), 2.0))


def test_answer_penalties_count_the_answer_and_each_nodes_path():
    """A node's penalised logits are the bits plain decoding gives the same position: the answer
    so far plus the node's path below the root, counted once each, the prompt not at all."""
    tree = DraftTree(np.array([1, 4, 6, 4, 4]), np.array([-1, 0, 1, 0, 3]))  # 1→4→6, 1→4→4
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)) * 3  # [nodes, vocab]
    answer = np.array([6, 1])  # generated so far, ending with the root's token
    got = tree_answer_penalties(logits, answer, tree, 0.7, -0.3)
    for node, path in enumerate([[], [4], [4, 6], [4], [4, 4]]):
        assert torch.equal(got[node], answer_penalties(logits[node], np.array([*answer, *path]), 0.7, -0.3))
    assert torch.equal(got[4, [0, 2, 3, 5, 7]], logits[4, [0, 2, 3, 5, 7]])  # tokens not in the answer
    assert got[4, 4] == logits[4, 4] - (np.float32(2) * np.float32(0.7) + np.float32(-0.3))
    assert torch.equal(tree_answer_penalties(logits, answer, tree, 0.0, 0.0), logits)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, r"temperature must be a number in \[0, 2\], got -0.1"),
    ("temperature", 2.5, r"temperature must be a number in \[0, 2\], got 2.5"),  # OpenAI's bound
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, "top_p must be"),
    ("min_p", 1.5, r"min_p must be a number in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a number > 0"),
    ("frequency_penalty", 2.5, r"frequency_penalty must be a number in \[-2, 2\]"),
    ("presence_penalty", -3, r"presence_penalty must be a number in \[-2, 2\]"),
    ("logit_bias", {5: 101}, r"logit_bias: the bias of token 5 must be a number in \[-100, 100\], got 101"),
    ("logit_bias", {-1: 1}, "logit_bias: -1 is not a token id"),
    ("logit_bias", {"5": 1}, "logit_bias: '5' is not a token id"),
    ("logit_bias", {token: 1 for token in range(301)}, "logit_bias names 301 tokens; at most 300"),
    ("logit_bias", [5, 1], "logit_bias must map token ids to biases"),
    ("seed", "7", r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\] or None, got '7'"),
    ("seed", 2**64, "seed must be an integer in"),  # beyond what torch's generator takes
    ("temperature", float("nan"), "temperature must be"),
    ("temperature", True, "temperature must be"),
])
def test_bad_sampling_params_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_the_bounds_are_inclusive_where_they_say_so():
    for options in (dict(temperature=2), dict(min_p=1), dict(top_p=1), dict(seed=-(2**63)), dict(seed=2**64 - 1)):
        SamplingParams(**options)


def test_every_field_reaches_the_cli_the_server_and_the_api_with_its_bounds():
    """One carrier: each SamplingParams field is a CLI flag, a request field with the same bounds
    and description, and an API keyword (an unknown one is a TypeError)."""
    from freespec.cli import _parser
    from freespec.serve.app import ChatRequest, CompletionRequest

    flags = {action.dest: action for action in _parser()._subparsers._group_actions[0].choices["generate"]._actions}
    for option in OPTIONS:
        assert flags[option.name].option_strings == [f"--{option.name.replace('_', '-')}"]
        assert flags[option.name].default == option.default and flags[option.name].type is option.kind
        for request in (ChatRequest, CompletionRequest):
            field = request.model_fields[option.name]
            assert field.description == option.help
            bounds = {name: value for m in field.metadata for name, value in dataclasses.asdict(m).items()}
            assert bounds == option.bounds, (option.name, bounds)
    assert SAMPLING_KEYS == tuple(option.name for option in OPTIONS)
    model = make_model("llama")
    with pytest.raises(TypeError):
        model.generate(prompt_ids=[1, 2], max_new_tokens=2, temprature=1.0)
    keywords = model.generate(prompt_ids=[1, 2], max_new_tokens=4, temperature=0.9, top_k=7, seed=5)
    carried = model.generate(prompt_ids=[1, 2], max_new_tokens=4,
                             sampling=SamplingParams(temperature=0.9, top_k=7, seed=5))
    assert keywords.token_ids == carried.token_ids


def test_a_temperature_that_overflows_the_logits_is_refused():
    """At temperature 1e-300 the logits overflow and every probability is NaN; drawing from that
    used to return the last token of the vocabulary."""
    with pytest.raises(ValueError, match="not finite or all 0 .*use 0 for greedy"):
        draw(torch.tensor([float("nan"), float("nan"), 1.0]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not finite or all 0"):
        draw(torch.zeros(3), torch.Generator().manual_seed(0))
    model = make_model("llama")
    for drafter in ("none", "recycling"):
        with pytest.raises(ValueError, match="cannot sample: the token probabilities are not finite"):
            model.generate(prompt_ids=[1, 2, 3], max_new_tokens=4, drafter=drafter, temperature=1e-300, seed=0)


# -- tree-level statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("shape, samples", [("chain", SAMPLES), ("wide", SAMPLES), ("bushy", SAMPLES),
                                            ("recycling-static", SAMPLES), ("recycling-dynamic", SAMPLES),
                                            ("repeated-siblings", FEW_SAMPLES)])
def test_sampling_rule_keeps_the_distribution(setup, shape, samples):
    _, runner, tables, shapes = setup
    tree = shapes[shape]
    targets = node_targets(runner, tree, FULL)
    counts = sequence_counts(sample_accept, tree, targets.__getitem__, tables["full"], samples)
    probs = exact_joint(tables["full"])
    p_value = chi_square_p(counts, probs)
    assert p_value > ALPHA, f"{shape}: p = {p_value:.2e}, total variation {total_variation(counts, probs):.4f}"


def test_sampling_rule_without_penalty_or_truncation(setup):
    _, runner, tables, shapes = setup
    tree = shapes["bushy"]
    targets = node_targets(runner, tree, PLAIN)
    counts = sequence_counts(sample_accept, tree, targets.__getitem__, tables["plain"], FEW_SAMPLES, seed=1)
    assert chi_square_p(counts, exact_joint(tables["plain"])) > ALPHA


@pytest.mark.parametrize("shape", ["chain", "bushy"])
def test_sampling_rule_keeps_the_distribution_under_openais_penalties(setup, shape):
    """Frequency and presence penalties count each node's own answer: the root's generated
    tokens (none here) and its path; plain sampling's exact distribution applies them the same."""
    _, runner, tables, shapes = setup
    targets = node_targets(runner, shapes[shape], OPENAI)
    counts = sequence_counts(sample_accept, shapes[shape], targets.__getitem__, tables["openai"], SAMPLES, seed=2)
    assert chi_square_p(counts, exact_joint(tables["openai"])) > ALPHA


def test_a_logit_bias_left_out_fails_the_same_test(setup):
    _, runner, tables, shapes = setup
    unbiased = dataclasses.replace(OPENAI, logit_bias=())
    targets = node_targets(runner, shapes["bushy"], unbiased)
    counts = sequence_counts(sample_accept, shapes["bushy"], targets.__getitem__, tables["openai"], FEW_SAMPLES)
    assert chi_square_p(counts, exact_joint(tables["openai"])) < ALPHA


def test_openais_penalties_from_the_answer_so_far_only_fail_the_same_test(setup):
    """Ignoring the node's path in the frequency and presence penalties is detected."""
    _, runner, tables, shapes = setup
    tree = shapes["bushy"]
    penalised = tree_repetition_penalty(biased(tree_logits(runner, tree), OPENAI.logit_bias), CONTEXT, tree,
                                        OPENAI.repetition_penalty)  # the answer's penalties: none (nor its path's)
    wrong = [target_probs(row, OPENAI) for row in penalised]
    counts = sequence_counts(sample_accept, tree, wrong.__getitem__, tables["openai"], FEW_SAMPLES)
    assert chi_square_p(counts, exact_joint(tables["openai"])) < ALPHA


def test_drafts_are_accepted_in_these_trees(setup):
    """The statistics above exercise deep acceptance, not only the bonus at the root."""
    _, runner, tables, shapes = setup
    generator = torch.Generator().manual_seed(0)
    for shape in ("chain", "bushy", "recycling-dynamic"):
        targets = node_targets(runner, shapes[shape], FULL)
        lengths = [len(sample_accept(shapes[shape], targets.__getitem__, generator)[0]) for _ in range(500)]
        assert np.mean(lengths) > 1.3 and max(lengths) >= 3, shape


@pytest.mark.parametrize("rule", [best_path_rule, independent_rule])
@pytest.mark.parametrize("shape", ["wide", "bushy"])
def test_wrong_rules_fail_the_same_test(setup, rule, shape):
    _, runner, tables, shapes = setup
    targets = node_targets(runner, shapes[shape], FULL)
    counts = sequence_counts(rule, shapes[shape], targets.__getitem__, tables["full"], FEW_SAMPLES)
    assert chi_square_p(counts, exact_joint(tables["full"])) < ALPHA


def test_penalty_from_the_context_only_fails_the_same_test(setup):
    """Ignoring the node's ancestors in the repetition penalty is detected."""
    _, runner, tables, shapes = setup
    tree = shapes["bushy"]
    wrong = [target_probs(repetition_penalty(row, CONTEXT, FULL.repetition_penalty), FULL)
             for row in tree_logits(runner, tree)]
    counts = sequence_counts(sample_accept, tree, wrong.__getitem__, tables["full"], FEW_SAMPLES)
    assert chi_square_p(counts, exact_joint(tables["full"])) < ALPHA


# -- recursive rejection for drafts with probabilities ---------------------------------------------

SMALL = 5  # vocabulary of the hand-made distributions


def _distributions(seed: int, rows: int, sharpness: float = 2.0) -> torch.Tensor:
    logits = torch.randn(rows, SMALL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(logits * sharpness, dim=-1)  # [rows, SMALL]


PARENTS = np.array([-1, 0, 1, 1, 0, 4, 4, 0, 7, 7])  # 3 children of the root, 2 below each
FIRSTS, SECONDS = [1, 4, 7], [[2, 3], [5, 6], [8, 9]]  # node indices of each level


def _rejection_counts(deterministic_draft: bool, samples: int = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first two tokens, and their exact probabilities, for drafts drawn from q."""
    p_root, p_next = _distributions(0, 1)[0], _distributions(1, SMALL)  # target: first, second token
    q_root, q_next = _distributions(2, 1)[0], _distributions(3, SMALL)  # draft: first, second token
    generator = torch.Generator().manual_seed(5)

    def gumbel(*shape: int) -> torch.Tensor:
        return -torch.log(-torch.log(torch.rand(*shape, dtype=torch.float64, generator=generator)))

    # children drawn without replacement from q (Gumbel top-k), all samples at once
    if deterministic_draft:  # wrong: q's most likely tokens, not samples from q
        firsts = torch.topk(q_root, 3).indices.repeat(samples, 1)  # [samples, 3]
        seconds = torch.topk(q_next[firsts], 2).indices  # [samples, 3, 2]
    else:
        firsts = torch.topk(q_root.log() + gumbel(samples, SMALL), 3).indices
        seconds = torch.topk(q_next[firsts].log() + gumbel(samples, 3, SMALL), 2).indices
    tokens = torch.zeros(samples, len(PARENTS), dtype=torch.long)  # [samples, nodes]; the root is token 0
    tokens[:, FIRSTS] = firsts
    tokens[:, np.array(SECONDS)] = seconds
    uniform = torch.full((SMALL,), 1.0 / SMALL, dtype=torch.float64)
    draft = uniform.repeat(samples, len(PARENTS), 1)  # [samples, nodes, SMALL]; leaves' rows are unused
    draft[:, 0], draft[:, FIRSTS] = q_root, q_next[firsts]
    target = uniform.repeat(samples, len(PARENTS), 1)  # leaves' rows are the third token's, not counted
    target[:, 0], target[:, FIRSTS] = p_root, p_next[firsts]
    counts = np.zeros(SMALL * SMALL, dtype=np.int64)
    for row_tokens, row_draft, row_target in zip(tokens.numpy(), draft, target):
        tree = DraftTree(row_tokens, PARENTS, draft_probs=row_draft)
        path, bonus = rejection_accept(tree, row_target.__getitem__, generator)
        emitted = [int(row_tokens[i]) for i in path[1:]] + [bonus]
        if len(emitted) == 1:
            emitted.append(draw(p_next[emitted[0]], generator))
        counts[emitted[0] * SMALL + emitted[1]] += 1
    return counts, (p_root[:, None] * p_next).reshape(-1).numpy()


def test_recursive_rejection_keeps_the_distribution():
    counts, probs = _rejection_counts(deterministic_draft=False, samples=10_000)
    assert chi_square_p(counts, probs) > ALPHA


def test_recursive_rejection_needs_children_sampled_from_q():
    counts, probs = _rejection_counts(deterministic_draft=True, samples=FEW_SAMPLES)
    assert chi_square_p(counts, probs) < ALPHA


def test_rejection_refuses_malformed_drafts():
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    target = lambda node: torch.tensor([0.2, 0.3, 0.5])  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="repeated child tokens"):
        rejection_accept(DraftTree(np.array([0, 1, 1]), np.array([-1, 0, 0]), draft_probs=q), target, generator)
    with pytest.raises(ValueError, match="node 2 drafts token 2, to which its draft_probs give 0"):
        rejection_accept(DraftTree(np.array([0, 1, 2]), np.array([-1, 0, 0]), draft_probs=q), target, generator)
    with pytest.raises(ValueError, match="needs a tree with draft_probs"):
        rejection_accept(DraftTree(np.array([0, 1]), np.array([-1, 0])), target, generator)
    with pytest.raises(ValueError, match=r"draft_probs must be \[2, vocab\]"):
        DraftTree(np.array([0, 1]), np.array([-1, 0]), draft_probs=q)


# -- end to end: the engine ----------------------------------------------------------------------

PROMPTS = [[2, 5, 6, 7, 3], [2, *range(40, 90), 3]]
SAMPLED = [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)]
E2E_SAMPLES = 600  # whole engine runs (a prefill and a few forward passes each): slower than the rules alone


@pytest.mark.parametrize("tree, budget", [("dynamic", None), ("static", 16)])
def test_speculative_sampling_equals_plain_sampling_with_the_same_seed(tree, budget, monkeypatch):
    """One uniform number per emitted token either way, so a seed fixes the text whatever the drafter.
    With the budget left to the policy, its cost curve is pinned flat (a pass costs the same at any
    size) and its timing of real steps is off, so that it drafts whatever the machine's load: the
    measured curve of the tiny model on a busy machine made it draft too little to count."""
    if budget is None:
        monkeypatch.setattr(api, "load_or_measure", lambda runner: CostCurve({q: 1e-3 for q in SIZES}))
        monkeypatch.setattr(BudgetPolicy, "record_cost", lambda self, q, seconds: None)
    model = make_model("llama", budget=budget, tree_shape=tree)
    tokens = passes = 0
    for options in SAMPLED:
        for seed in range(2):
            for prompt in PROMPTS:
                plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32, seed=seed, **options)
                fast = model.generate(prompt_ids=prompt, drafter="recycling", max_new_tokens=32, seed=seed, **options)
                assert fast.token_ids == plain.token_ids
                assert fast.finish_reason == plain.finish_reason
                tokens, passes = tokens + fast.stats.new_tokens, passes + fast.stats.forward_passes
    assert tokens / passes > 1.1, tokens / passes  # drafts were accepted: the tree paths were exercised


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", [4, 80, None])
def test_greedy_with_repetition_penalty_equals_plain_greedy(family, budget):
    model = make_model(family, budget=budget)
    changed = False
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=40, repetition_penalty=1.5)
        fast = model.generate(prompt_ids=prompt, drafter="recycling", max_new_tokens=40, repetition_penalty=1.5)
        assert fast.token_ids == plain.token_ids
        changed |= plain.token_ids != model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=40).token_ids
    assert changed  # the penalty changed the text


def test_penalised_greedy_matches_transformers():
    model = make_model("qwen2", seed=3)
    prompt = torch.tensor([PROMPTS[1]])
    expected = tiny_model("qwen2", seed=3, scale=8.0).generate(
        prompt, max_new_tokens=24, do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    ours = model.generate(prompt_ids=PROMPTS[1], drafter="none", max_new_tokens=24, repetition_penalty=1.3)
    assert ours.token_ids == expected[0, prompt.shape[1]:].tolist()


def test_a_seed_repeats_a_run_and_no_seed_does_not():
    model = make_model("llama", budget=16)
    runs = [model.generate(prompt_ids=PROMPTS[0], max_new_tokens=32, temperature=2.0, seed=seed).token_ids
            for seed in (7, 7, None, None)]
    assert runs[0] == runs[1]  # the drafter learned in between: the text does not depend on it
    assert runs[2] != runs[3]


def test_bad_sampling_options_are_refused_by_the_api():
    model = make_model("llama")
    with pytest.raises(ValueError, match="top_p must be a number in"):
        model.generate(prompt_ids=[1, 2], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError):
        model.generate(prompt_ids=[1, 2], max_new_tokens=2, temprature=1.0)


class SampledDrafter(BaseDrafter):
    """Test-only drafter with probabilities: a random bigram draft model q(next | token), whose
    children are drawn without replacement (3 below the root, 2 below each of those)."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.q = torch.softmax(torch.randn(VOCAB, VOCAB, generator=generator) * 2, dim=-1)  # [token, next]
        self.generator = generator

    def _children(self, token: int, k: int) -> list[int]:
        noise = -torch.log(-torch.log(torch.rand(VOCAB, generator=self.generator)))
        return torch.topk(self.q[token].log() + noise, k).indices.tolist()  # Gumbel top-k: no replacement

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        tokens, parents = [root], [-1]
        for first in self._children(root, 3):
            tokens.append(first), parents.append(0)
            parent = len(tokens) - 1
            for second in self._children(first, 2):
                tokens.append(second), parents.append(parent)
        tokens, parents = tokens[: budget + 1], parents[: budget + 1]
        return DraftTree(np.array(tokens), np.array(parents), draft_probs=self.q[tokens])


@pytest.mark.parametrize("drafter", ["recycling", "sampled"])
def test_engine_runs_keep_the_distribution(setup, drafter):
    """Whole generations of 2 tokens from the engine, against the exact distribution."""
    from freespec.engine.budget import BudgetPolicy
    from freespec.engine.loop import Generation

    hf_model, _, tables, _ = setup
    model = Model(from_transformers(hf_model, word_tokenizer(), "tiny"), budget=8)
    options = dict(temperature=FULL.temperature, top_k=FULL.top_k, top_p=FULL.top_p, min_p=FULL.min_p,
                   repetition_penalty=FULL.repetition_penalty)
    sampled = SampledDrafter()
    policy = BudgetPolicy({q: 1.0 for q in range(1, 10)}, candidates=[8])
    counts = np.zeros(VOCAB * VOCAB, dtype=np.int64)
    tokens = passes = 0
    for seed in range(E2E_SAMPLES):
        if drafter == "recycling":
            generation = model.stream(prompt_ids=list(CONTEXT), drafter="recycling", max_new_tokens=2, seed=seed,
                                      **options)
        else:
            generation = Generation(model.runner, sampled, policy, list(CONTEXT), 2, set(), 9,
                                    SamplingParams(**options, seed=seed))
        generation.stop_ids = set()
        for _ in generation:
            pass
        counts[generation.token_ids[0] * VOCAB + generation.token_ids[1]] += 1
        tokens, passes = tokens + generation.stats.new_tokens, passes + generation.stats.forward_passes
    assert tokens - passes >= 50  # drafted tokens were accepted, not only bonus tokens
    first_two = exact_joint(tables["full"]).reshape(VOCAB * VOCAB, VOCAB).sum(axis=1)
    assert chi_square_p(counts, first_two) > ALPHA


# -- command line and benchmark --------------------------------------------------------------------


def test_cli_samples_as_the_api_does(tiny_model_dir, tmp_path, capsys):
    import freespec
    from freespec.cli import main

    prompt = "w1 w2 w3 w4 w5 w6"
    model = freespec.load(str(tiny_model_dir))
    expected = model.generate(prompt, max_new_tokens=12, drafter="none", temperature=0.8, top_p=0.9, seed=3)
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3", "--quiet"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"

    lines = [{"prompt": prompt, "temperature": 1.0, "top_k": 5, "seed": 1}, {"prompt": prompt},
             {"prompt": prompt, "repetition_penalty": 1.3, "min_p": 0.1, "seed": 2}]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                 "--max-new-tokens", "12", "--temperature", "0.5", "--seed", "9", "--quiet"]) == 0
    results = [json.loads(line) for line in output.read_text().splitlines()]
    for line, result in zip(lines, results):  # each line's keys override the flags
        options = {"temperature": 0.5, "seed": 9, **{k: v for k, v in line.items() if k != "prompt"}}
        assert result["token_ids"] == model.generate(prompt, max_new_tokens=12, drafter="none", **options).token_ids

    source.write_text(json.dumps({"prompt": prompt, "top_p": 0}) + "\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"freespec: error: {source} line 1: top_p must be a number in (0, 1], got 0"


@pytest.mark.parametrize("argv, message", [
    (["generate", "w1", "--temperature", "-1"], "temperature must be a number in [0, 2], got -1.0"),
    (["generate", "w1", "--min-p", "1.5"], "min_p must be a number in [0, 1], got 1.5"),
    (["generate", "w1", "--top-k", "two"], "argument --top-k: invalid int value: 'two'"),
    (["bench", "--repetition-penalty", "0", "--questions", "q.jsonl"], "repetition_penalty must be a number > 0"),
])
def test_bad_sampling_flags_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, message):
    from freespec.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "category": "qa", "turns": ["w1"]}\n')
    assert main([*argv, "--model", "no/such/dir"]) == 2
    assert message in capsys.readouterr().err


def test_bench_with_sampling(tmp_path):
    from freespec.bench import run as bench
    from freespec.bench.methods import Setup

    model = make_model("llama")
    questions = [bench.Question(i, "qa", (f"w{i} w{i + 1}", f"w{i + 2}")) for i in (1, 2)]
    methods = ["none", "recycling", "hf-sample", "hf-greedy"]
    setup = Setup(model, 8, seed=1, sampling=SamplingParams(temperature=0.7, top_p=0.9))
    bench.run_bench(model, questions, methods, tmp_path, setup, progress=False)
    summary = bench.write_reports(tmp_path, "hf-sample", "freespec bench --temperature 0.7 --top-p 0.9")
    overall = summary["overall"]
    assert overall["recycling"]["identical"] == 1.0  # seeded alike per question and turn: plain sampling's text
    assert "identical" not in overall["hf-sample"] and "identical" not in overall["hf-greedy"]
    assert overall["recycling"]["mean_accepted"] >= 1.0 and "speedup" in overall["recycling"]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records if r.get("sampled")} == {"none", "recycling", "hf-sample"}
    text = (tmp_path / "summary.md").read_text()
    assert "recycling 100% (vs none)" in text
    assert "hf-greedy n/a (sampled)" in text and "hf-sample n/a (sampled)" in text
