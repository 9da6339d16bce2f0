"""Lossless: speculative output equals plain greedy output, token for token.

Plain decoding runs through the same runner (a tree of one node per step), and the runner is
batch-invariant, so the comparison is strict: any difference is a bug, not floating point.
"""

import threading

import numpy as np
import pytest
import torch

from freespec.drafters import BaseDrafter
from freespec.engine.budget import BudgetPolicy
from freespec.engine.loop import Generation
from freespec.engine.tree import DraftTree
from tests.helpers import PROMPTS, generate, make_model, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("budget", [1, 4, 16, 80, None])
@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_recycling_equals_plain_greedy(family, seed, budget, tree):
    model = make_model(family, seed, budget, tree_shape=tree)
    tokens = passes = 0
    for prompt in PROMPTS:
        plain = generate(model, prompt, "none")
        fast = generate(model, prompt, "recycling")
        assert fast.token_ids == plain.token_ids
        assert fast.finish_reason == plain.finish_reason
        assert fast.stats.new_tokens == len(plain.token_ids)
        tokens, passes = tokens + fast.stats.new_tokens, passes + fast.stats.forward_passes
    # the matrix stays warm across requests, so drafts get accepted: acceptance paths are exercised
    if budget and budget >= 4 and tokens >= 40:
        assert tokens / passes > 1.2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("drafter", ["none", "recycling", "lookup"])
def test_a_reused_prefix_changes_no_token(family, drafter):
    """A chat's second turn finds the first turn's rows still cached: keeping them gives the same
    tokens as prefilling the whole conversation afresh in another process."""
    model = make_model(family, 0)
    first = generate(model, PROMPTS[1], drafter)
    second_prompt = PROMPTS[1] + first.token_ids + [2, 7, 8, 9, 3]
    warm = generate(model, second_prompt, drafter)
    cold = make_model(family, 0).generate(prompt_ids=second_prompt, drafter=drafter, max_new_tokens=48,
                                          reuse_prefix=False)
    assert warm.token_ids == cold.token_ids
    assert warm.stats.cached_tokens >= len(PROMPTS[1]) + len(first.token_ids) - 1 and cold.stats.cached_tokens == 0
    model.reset()  # forgets the rows too
    assert generate(model, second_prompt, drafter).stats.cached_tokens == 0


@pytest.mark.parametrize("drafter", ["none", "suffix", "recycling"])
def test_a_generation_whose_cache_rows_another_took_stops_instead_of_decoding_wrong_tokens(drafter):
    """Two streams of one model share its cache: interleaved, both decoded wrong tokens silently.
    A stream left unfinished is no obstacle to the next; a fork runs beside."""
    model = make_model("llama", 0)
    expected = make_model("llama", 0).generate(prompt_ids=PROMPTS[0], drafter="none", max_new_tokens=24).token_ids
    stale = "this generation's cache rows are gone"
    first = iter(model.stream(prompt_ids=PROMPTS[0], drafter=drafter, max_new_tokens=24))
    second = iter(model.stream(prompt_ids=PROMPTS[1], drafter=drafter, max_new_tokens=24))
    next(first), next(second)
    with pytest.raises(RuntimeError, match=stale):
        next(first)
    next(second)  # the newer one goes on
    assert model.generate(prompt_ids=PROMPTS[0], drafter=drafter, max_new_tokens=24).token_ids == expected
    left = iter(model.stream(prompt_ids=PROMPTS[0], drafter=drafter, max_new_tokens=24))
    next(left)
    model.reset()
    with pytest.raises(RuntimeError, match=stale):
        next(left)
    beside = model.fork()
    streams = [iter(m.stream(prompt_ids=PROMPTS[0], drafter=drafter, max_new_tokens=24)) for m in (model, beside)]
    tokens = [[], []]
    for _ in range(24):
        for own, stream in zip(tokens, streams):
            own += next(stream, [])
    assert tokens == [expected, expected]


def test_threads_sharing_a_model_take_turns_and_never_read_each_others_rows():
    """Two threads generating on one model corrupted the heap (a cache reallocated under the other's
    pass). Whole requests (generate) take turns and get their answers; streams take turns a step at
    a time, and one whose rows the other took stops with the RuntimeError, never with wrong tokens."""
    model = make_model("llama", 0)
    expected = {index: make_model("llama", 0).generate(prompt_ids=PROMPTS[index], drafter="suffix",
                                                         max_new_tokens=32).token_ids for index in (0, 1)}
    outcomes = []

    def ask(index: int, streaming: bool) -> None:
        for _ in range(4):
            try:
                if streaming:
                    tokens = [token for chunk in model.stream(prompt_ids=PROMPTS[index], drafter="suffix",
                                                              max_new_tokens=32) for token in chunk]
                else:
                    tokens = model.generate(prompt_ids=PROMPTS[index], drafter="suffix", max_new_tokens=32).token_ids
                outcomes.append((streaming, tokens == expected[index]))
            except RuntimeError as error:
                assert streaming and "cache rows are gone" in str(error)
                outcomes.append((streaming, "stopped"))

    for streaming in (False, True):
        threads = [threading.Thread(target=ask, args=(index, streaming)) for index in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcomes.count((False, True)) == 8 and (True, False) not in outcomes


def test_forks_in_threads_stream_their_own_answers():
    """Forks share the decoder's buffers and tables: two threads streaming on two forks crashed the
    process (a segmentation fault). They take turns a pass at a time, each answer its own."""
    model = make_model("llama", 0)
    expected = {index: make_model("llama", 0).generate(prompt_ids=PROMPTS[index], drafter="none",
                                                         max_new_tokens=32).token_ids for index in (0, 1)}
    forks, answers = [model.fork(), model.fork()], {}

    def stream(index: int) -> None:
        for drafter in ("suffix", "recycling", "suffix+recycling"):
            answers[index, drafter] = [token for chunk in forks[index].stream(
                prompt_ids=PROMPTS[index], drafter=drafter, max_new_tokens=32) for token in chunk]

    threads = [threading.Thread(target=stream, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {(index, drafter): expected[index] for index in (0, 1)
                       for drafter in ("suffix", "recycling", "suffix+recycling")}


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_token_limit_inside_a_draft(max_new_tokens, tree):
    model = make_model("llama", 0, budget=80, tree_shape=tree)
    generate(model, PROMPTS[0], "recycling", 64)  # warm: later drafts accept several tokens per pass
    plain = generate(model, PROMPTS[0], "none", max_new_tokens)
    fast = generate(model, PROMPTS[0], "recycling", max_new_tokens)
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) == max_new_tokens
    assert fast.finish_reason == "length"


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_stop_token_inside_a_draft(tree):
    model = make_model("llama", 0, budget=80, tree_shape=tree)
    reference = generate(model, PROMPTS[0], "none", 64).token_ids
    generate(model, PROMPTS[0], "recycling", 64)  # warm the matrix
    # a token first produced late in the reply, so it is reached inside an accepted draft
    stop = next(t for i, t in enumerate(reference) if i > 10 and t not in reference[:i])
    model.stop_ids = {stop}
    plain = generate(model, PROMPTS[0], "none", 64)
    fast = generate(model, PROMPTS[0], "recycling", 64)
    assert plain.token_ids == reference[: reference.index(stop) + 1]
    assert fast.token_ids == plain.token_ids and fast.finish_reason == "stop"
    assert max(fast.stats.accepted_lengths) > 1


def test_plain_path_matches_transformers_generate():
    model = make_model("qwen2", 3)
    hf = model.runner  # the runner wraps the same weights
    hf_model = tiny_model("qwen2", seed=3, scale=8.0)
    prompt = torch.tensor([PROMPTS[1]])
    expected = hf_model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, PROMPTS[1], "none", 24)
    assert ours.token_ids == expected[0, prompt.shape[1] :].tolist()
    assert hf.length > 0


def test_context_limit_stops_cleanly():
    model = make_model("llama", 0, budget=16)
    prompt = [2, *([7] * 500), 3]  # context is 512
    plain = generate(model, prompt, "none", 100)
    fast = generate(model, prompt, "recycling", 100)
    assert len(plain.token_ids) == 512 - len(prompt) == len(fast.token_ids)
    assert fast.token_ids == plain.token_ids
    with pytest.raises(ValueError, match="the model's context is 512"):
        generate(model, [5] * 512, "none", 4)


def test_bad_requests_are_refused():
    model = make_model("llama", 0)
    with pytest.raises(ValueError, match="empty"):
        model.generate(prompt_ids=[], max_new_tokens=4)
    with pytest.raises(ValueError, match="positive"):
        model.generate(prompt_ids=[1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown drafter 'magic'"):
        model.generate(prompt_ids=[1, 2], drafter="magic")
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate("   ")
    with pytest.raises(ValueError, match="must be a string, got int"):
        model.generate(42)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        model.generate(prompt_ids=[1, 2], budget=-1)


class ReplayDrafter(BaseDrafter):
    """Test-only drafter: a chain whose first ``right`` tokens are what plain decoding produced next
    (read from its output) and whose later tokens are wrong. Records the sizes it was asked for.
    ``scored``: it knows it, scoring right nodes 0.99 and wrong ones 0.01."""

    shadow_drafts = True

    def __init__(self, prompt: list[int], reference: list[int], right: int, vocab: int, scored: bool = False):
        self.prompt, self.reference, self.right, self.vocab = prompt, reference, right, vocab
        self.scored = scored
        self.asked: list[int] = []

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        self.asked.append(budget)
        upcoming = self.reference[len(context) - len(self.prompt):][:budget]
        chain = [t if i < self.right else (t + 1) % self.vocab for i, t in enumerate(upcoming)]
        scores = np.cumprod([1.0] + [0.99 if i < self.right else 0.01 for i in range(len(chain))])
        return DraftTree(np.array([context[-1], *chain]), np.arange(-1, len(chain)), scores if self.scored else None)


class LearningReplayDrafter(ReplayDrafter):
    """Also records what the engine says of the unverified part of its shadow drafts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.learned: list[tuple[int, list[int], int]] = []  # (nodes, path, verified)

    def learn_shadow(self, tree, path, verified) -> None:
        self.learned.append((len(tree), path, verified))


class FixedCostPolicy(BudgetPolicy):
    """The policy with its given costs only: timed steps (which a busy machine stretches) are
    not folded in, so what it learns from drafts alone decides its sizes."""

    def record_cost(self, q: int, seconds: float) -> None:
        pass


def replay(right: int, tokens: int, drafter_class=ReplayDrafter, **options):
    """Greedy generation with the budget policy and a replay drafter of ``right`` right tokens;
    returns (generation, drafter, plain decoding's tokens)."""
    model = make_model("llama", 0)
    prompt = PROMPTS[1]
    reference = generate(model, prompt, "none", tokens).token_ids
    drafter = drafter_class(prompt, reference, right, model.runner.vocab_size, **options)
    policy = FixedCostPolicy({1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 1.5}, candidates=[1, 3, 7, 15])
    generation = Generation(model.runner, drafter, policy, prompt, tokens, set())
    for _ in generation:
        pass
    return generation, drafter, reference


@pytest.mark.parametrize("right", [0, 100])
def test_shadow_drafts_learn_sizes_they_do_not_verify(right):
    """The policy drafts more than it verifies and learns from what followed: a drafter that is
    always wrong never gets a node verified, one that is always right soon gets the largest size."""
    generation, drafter, reference = replay(right, 64)
    assert generation.token_ids == reference
    assert min(drafter.asked) >= 3  # always a draft to learn from
    if right == 0:
        assert max(generation.stats.draft_sizes) == 0  # yet no forward pass spent on it
    else:
        assert max(generation.stats.draft_sizes) == 15 and generation.stats.forward_passes <= 64 / 4


@pytest.mark.parametrize("right", [0, 3])
def test_shadow_learners_hear_what_their_unverified_nodes_would_have_done(right):
    generation, drafter, reference = replay(right, 48, LearningReplayDrafter)
    assert generation.token_ids == reference
    assert len(drafter.learned) > 10
    for nodes, path, verified in drafter.learned:
        assert verified < nodes - 1
        assert path == list(range(min(right, nodes - 1) + 1))  # a chain: right nodes, then wrong ones


def test_a_scored_draft_is_verified_as_far_as_its_scores_pay():
    """Each step verifies the prefix its scores make worth it: the right nodes, not the wrong."""
    generation, drafter, reference = replay(2, 64, scored=True)
    assert generation.token_ids == reference
    assert set(generation.stats.draft_sizes[:-1]) == {2}  # the last step may lack room
    assert set(generation.stats.accepted_lengths[:-1]) == {3}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_openais_penalties_give_every_drafter_the_greedy_tokens_of_plain_decoding(family):
    """Frequency and presence penalties change greedy decoding; each draft node is penalised for
    its own answer so far, so speculative output stays plain greedy's, which is transformers'
    logits penalised and maximised token by token."""
    from freespec.engine.distribution import answer_penalties, repetition_penalty

    model, hf_model = make_model(family, 0, budget=8), tiny_model(family, seed=0, scale=8.0)
    penalties = dict(repetition_penalty=1.1, frequency_penalty=1.0, presence_penalty=0.5)
    changed, accepted = False, 0.0
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32, **penalties)
        changed |= plain.token_ids != generate(model, prompt, "none", 32).token_ids
        ids, answer = list(prompt), []
        with torch.no_grad():
            while len(answer) < len(plain.token_ids):
                logits = repetition_penalty(hf_model(torch.tensor([ids])).logits[0, -1], np.array(ids), 1.1)
                token = int(torch.argmax(answer_penalties(logits, np.array(answer, np.int64), 1.0, 0.5)))
                answer.append(token), ids.append(token)
        assert answer == plain.token_ids
        for drafter in ("recycling", "lookup", "suffix", "trie", "jacobi", "aded", "recycling+lookup"):
            fast = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=32, **penalties)
            assert fast.token_ids == plain.token_ids, drafter
            accepted = max(accepted, fast.stats.mean_accepted)
    assert changed  # the penalties are strong enough to change the answers
    assert accepted > 1.2  # and drafts were verified under them


def test_a_logit_bias_gives_every_drafter_the_greedy_tokens_of_plain_decoding():
    from freespec.engine.distribution import biased

    model, hf_model = make_model("llama", 0, budget=8), tiny_model("llama", seed=0, scale=8.0)
    prompt = PROMPTS[1]
    unbiased = generate(model, prompt, "none", 24).token_ids
    bias = {unbiased[0]: -100.0, unbiased[3]: -100.0, 17: 3.0}  # ban two of its tokens, favour another
    plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=24, logit_bias=bias)
    assert plain.token_ids != unbiased and unbiased[0] not in plain.token_ids
    ids, answer, pairs = list(prompt), [], tuple(sorted(bias.items()))
    with torch.no_grad():
        while len(answer) < len(plain.token_ids):
            token = int(torch.argmax(biased(hf_model(torch.tensor([ids])).logits[0, -1], pairs)))
            answer.append(token), ids.append(token)
    assert answer == plain.token_ids
    for drafter in ("recycling", "lookup", "suffix", "trie", "jacobi", "aded", "recycling+lookup"):
        assert model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=24, logit_bias=bias).token_ids == (
            plain.token_ids), drafter
    with pytest.raises(ValueError, match=r"logit_bias: token id 9999 is outside the vocabulary \(0 to 255\)"):
        model.generate(prompt_ids=prompt, logit_bias={9999: 1.0})


def test_a_draft_verified_whole_and_followed_whole_is_drafted_deeper_next():
    """When every drafted node is verified (no shadow beyond them) and the text follows them all,
    the next draft goes about twice as deep, as after a shadow the text followed whole: a policy
    whose averages still hold an earlier phase's failures at the larger sizes otherwise kept
    verifying the same size, every pass accepted whole, for dozens of passes (Gemma-3-270M on
    Spec-Bench: 5 nodes, 27 passes in a row, before its averages caught up)."""
    model = make_model("llama", 0)
    prompt = PROMPTS[1]
    reference = generate(model, prompt, "none", 96).token_ids
    drafter = ReplayDrafter(prompt, reference, right=1000, vocab=model.runner.vocab_size, scored=True)
    policy = FixedCostPolicy({1: 1.0, 2: 1.25, 4: 1.75, 8: 2.75, 16: 4.75}, candidates=[1, 3, 7, 15])
    policy.tau.update({1: 1.9, 3: 2.9, 7: 3.0, 15: 3.0})  # long drafts failed before
    generation = Generation(model.runner, drafter, policy, prompt, 96, set())
    for _ in generation:
        pass
    assert generation.token_ids == reference
    assert generation.stats.draft_sizes[:3] == [7, 15, 7]  # 7 followed whole: 15 next, once
