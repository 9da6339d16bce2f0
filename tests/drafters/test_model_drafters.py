"""The model-based drafters, ``layerskip`` (SWIFT) and ``draft-model``: lossless greedy output,
exact sampling distributions, the skip-set search, errors, and the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freespec import kernels
from freespec.api import Model
from freespec.drafters import DraftModel, LayerSkip
from freespec.drafters.chain import ChainSampler
from freespec.drafters.layerskip import SkipSearch
from freespec.model.loading import from_transformers
from tests.helpers import runner_for, tiny_model, word_tokenizer

PROMPTS = [[2, 5, 6, 7, 3], [2, *range(40, 90), 3], [2, *[4 + (i * 7) % 250 for i in range(200)], 3]]
NAMES = ["layerskip", "draft-model", "layerskip+lookup", "draft-model+recycling"]


def make_model(family: str, draft: str = "same", budget: int | None = 6, layers: int = 4) -> Model:
    """A 4-layer tiny target; its draft model is the same weights (drafts are accepted) or another
    random model over the same vocabulary (most are not)."""
    target = tiny_model(family, seed=0, scale=8.0, layers=layers)
    small = tiny_model(family, seed=0 if draft == "same" else 9, scale=8.0, layers=layers if draft == "same" else 1)
    return Model(from_transformers(target, word_tokenizer(), family), budget=budget,
                 draft_model=from_transformers(small, word_tokenizer(), f"{draft}-draft"))


def generate(model: Model, prompt: list[int], drafter: str, max_new_tokens: int = 32):
    return model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=max_new_tokens)


# -- greedy: token for token what plain decoding gives --------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_model_drafters_equal_plain_greedy(family):
    model = make_model(family)
    other = make_model(family, draft="other")
    plain = [generate(model, prompt, "none").token_ids for prompt in PROMPTS]
    for name in NAMES:
        results = [generate(model, prompt, name) for prompt in PROMPTS]
        assert [r.token_ids for r in results] == plain, name
        if name == "draft-model":  # the draft is the target itself: its chains are accepted
            assert sum(r.stats.new_tokens for r in results) > 1.5 * sum(r.stats.forward_passes for r in results)
    assert [generate(other, prompt, "draft-model").token_ids for prompt in PROMPTS] == plain
    skipping = [generate(model, prompt, "layerskip") for prompt in PROMPTS]
    assert sum(r.stats.new_tokens for r in skipping) > sum(r.stats.forward_passes for r in skipping)


@pytest.mark.parametrize("options", [{"logit_bias": "banned"}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 2.0, "repetition_penalty": 1.3}])
def test_model_drafts_follow_the_bias_and_penalties(options):
    """A draft model that is the target itself drafts the very tokens the request chooses, bias and
    penalties included (they were left out: a banned token was drafted and rejected each step)."""
    model = make_model("llama")
    prompt = PROMPTS[1]
    if options.get("logit_bias") == "banned":
        first = generate(model, prompt, "none").token_ids
        options = {"logit_bias": {token: -100.0 for token in dict.fromkeys(first[:4])}}
    plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32, **options)
    fast = model.generate(prompt_ids=prompt, drafter="draft-model", max_new_tokens=32, **options)
    assert fast.token_ids == plain.token_ids
    stats = fast.stats  # every drafted token is accepted (the last step may be cut by the token limit)
    assert stats.accepted_lengths[:-1] == [size + 1 for size in stats.draft_sizes[:-1]] and sum(stats.draft_sizes)


def test_the_draft_model_keeps_its_rows_for_a_request_that_starts_alike(monkeypatch):
    """A chat's next turn: the draft cache still holds the conversation, so the first proposal
    forwards only what is new, and the answer is still plain greedy's."""
    model = make_model("llama")
    first = generate(model, PROMPTS[1], "draft-model")
    runner, kept = model.draft_runner, []
    keep_prefix = runner.keep_prefix
    monkeypatch.setattr(runner, "keep_prefix", lambda tokens: kept.append(keep_prefix(tokens)) or kept[-1])
    follow_up = PROMPTS[1] + first.token_ids + [2, 5, 6, 3]
    assert generate(model, follow_up, "draft-model").token_ids == generate(model, follow_up, "none").token_ids
    assert kept[0] >= len(PROMPTS[1])


@pytest.mark.parametrize("name", ["layerskip", "draft-model"])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_token_limit_inside_a_draft(name, max_new_tokens):
    model = make_model("llama", budget=8)
    plain = generate(model, PROMPTS[0], "none", max_new_tokens)
    fast = generate(model, PROMPTS[0], name, max_new_tokens)
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) == max_new_tokens
    assert fast.finish_reason == "length"


@pytest.mark.parametrize("name", ["layerskip", "draft-model"])
def test_stop_token_inside_a_draft(name):
    model = make_model("llama", budget=8)
    reference = generate(model, PROMPTS[0], "none", 32).token_ids
    stop = next(t for i, t in enumerate(reference) if i > 10 and t not in reference[:i])  # reached mid-draft
    model.stop_ids = {stop}
    plain = generate(model, PROMPTS[0], "none", 32)
    fast = generate(model, PROMPTS[0], name, 32)
    assert plain.token_ids == reference[: reference.index(stop) + 1]
    assert fast.token_ids == plain.token_ids and fast.finish_reason == "stop"
    assert max(fast.stats.accepted_lengths) > 1


def test_context_limit_with_model_drafts():
    model = make_model("llama", budget=8)
    prompt = [2, *([7] * 490), 3]  # context is 512: the last drafts must shrink, then stop
    plain = generate(model, prompt, "none", 40)
    for name in ("layerskip", "draft-model"):
        fast = generate(model, prompt, name, 40)
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) == 512 - len(prompt)


# -- the pieces ----------------------------------------------------------------------------------


def test_skip_search_keeps_the_best_rate():
    search = SkipSearch(num_layers=6, trial_steps=2, search_steps=40)
    assert search.best == search.current == frozenset({1, 3})  # every other layer between first and last
    rates = {}
    while search.steps_left > 0:
        current = search.current
        drafted = 4
        emitted = 1 + (3 if current == frozenset({1, 2}) else 1)  # a neighbour of the start drafts best
        search.learn(drafted, emitted)
        rates.setdefault(current, emitted / (1 + drafted * (6 - len(current)) / 6))
    assert search.best == max(rates, key=rates.get) == frozenset({1, 2})
    assert len(rates) >= 5  # its neighbours were tried too
    assert search.current == search.best  # the search is over: the best set drafts from now on


def test_draft_chain_rolls_the_target_cache_back():
    model = make_model("llama")
    runner = model.runner
    drafter = LayerSkip(runner)
    runner.reset(64)
    runner.prefill(torch.tensor(PROMPTS[1][:-1]))
    tree = drafter.propose(np.array(PROMPTS[1]), budget=5)
    assert runner.length == len(PROMPTS[1]) - 1
    assert 2 <= len(tree) <= 6 and tree.draft_probs is None
    assert np.all(np.diff(tree.scores) <= 0) and tree.parents.tolist() == list(range(-1, len(tree) - 1))


def test_sampled_drafts_carry_their_distribution():
    from freespec.engine.sampling import SamplingParams

    sampler = ChainSampler()
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert sampler.pick(logits, np.array([1]))[0] == 0  # greedy: the argmax, no q
    sampler.set_sampling(SamplingParams(temperature=1.0, top_k=2), torch.Generator().manual_seed(0))
    draws = [sampler.pick(logits, np.array([1])) for _ in range(200)]
    assert {d[0] for d in draws} == {0, 1}  # top-k 2: only the two best, drawn at random
    assert all(torch.allclose(d[2], torch.tensor([0.7311, 0.2689, 0, 0]), atol=1e-4) for d in draws)
    sampler.set_sampling(SamplingParams(temperature=1.0), None)  # inside a fused tree: point masses
    assert sampler.pick(logits, np.array([1]))[2] is None


def test_drafter_errors_are_clear():
    target = tiny_model("llama", seed=0)
    plain = Model(from_transformers(target, word_tokenizer(), "tiny"))
    with pytest.raises(ValueError, match="needs a draft model.*--draft-model PATH"):
        plain.generate(prompt_ids=[2, 5], drafter="draft-model", max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a draft model"):
        plain.generate(prompt_ids=[2, 5], drafter="lookup+draft-model", max_new_tokens=2)
    plain.use_draft_model(from_transformers(target, word_tokenizer(), "itself"))
    first = plain.drafter("draft-model")[0]
    assert first.runner is plain.draft_runner
    plain.use_draft_model(from_transformers(tiny_model("llama", seed=1), word_tokenizer(), "another"))
    assert plain.drafter("draft-model")[0].runner is plain.draft_runner is not first.runner
    other_tokenizer = word_tokenizer()
    other_tokenizer.add_tokens(["extra"])
    with pytest.raises(ValueError, match="different vocabulary from tiny: it must use the same tokenizer"):
        Model(from_transformers(target, word_tokenizer(), "tiny"),
              draft_model=from_transformers(target, other_tokenizer, "other"))
    with pytest.raises(ValueError, match="vocabulary has 256 tokens, the target's 300"):
        DraftModel(runner_for(target, kernels.select()), vocab_size=300)


def test_cli_draft_model(tiny_model_dir, capsys):
    import freespec
    from freespec.cli import main

    prompt = "w1 w2 w3 w4 w5 w6"
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", "draft-model",
                 "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("freespec: error: the draft-model drafter needs --draft-model PATH "
                                               "(a smaller model with the same tokenizer)")
    expected = freespec.load(str(tiny_model_dir)).generate(prompt, max_new_tokens=12, drafter="none")
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", "draft-model", "--draft-model",
                 str(tiny_model_dir), "--max-new-tokens", "12", "--quiet"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", "draft-model", "--draft-model",
                 "/nonexistent", "--max-new-tokens", "2"]) == 2
    assert "freespec: error: the draft model: model not found: /nonexistent" in capsys.readouterr().err


# -- sampling: the distribution of plain sampling, exactly ------------------------------------------


SAMPLED_RUNS = 600  # whole engine runs of 2 tokens each, as test_sampling's end-to-end test
WRONG_RUNS = 200  # a biased rule is rejected by dozens of orders of magnitude already


def first_two_counts(model: Model, drafter: str, runs: int = SAMPLED_RUNS) -> tuple[np.ndarray, int]:
    """Counts of the first two sampled tokens over seeded runs, and how many drafted tokens were kept."""
    from tests.helpers import CONTEXT, FULL, VOCAB

    options = dict(temperature=FULL.temperature, top_k=FULL.top_k, top_p=FULL.top_p, min_p=FULL.min_p,
                   repetition_penalty=FULL.repetition_penalty)
    model.stop_ids = set()
    counts = np.zeros(VOCAB * VOCAB, dtype=np.int64)
    kept = 0
    for seed in range(runs):
        result = model.generate(prompt_ids=list(CONTEXT), drafter=drafter, max_new_tokens=2, seed=seed, **options)
        counts[result.token_ids[0] * VOCAB + result.token_ids[1]] += 1
        kept += result.stats.new_tokens - result.stats.forward_passes
    return counts, kept


@pytest.fixture(scope="module")
def sampled_setup():
    from tests.helpers import FULL, VOCAB, exact_joint, exact_table, small_model

    target = small_model(seed=0, layers=3)
    model = Model(from_transformers(target, word_tokenizer(), "small"), budget=4,
                  draft_model=from_transformers(small_model(seed=1, layers=1), word_tokenizer(), "small-draft"))
    first_two = exact_joint(exact_table(target, FULL)).reshape(VOCAB * VOCAB, VOCAB).sum(axis=1)
    return model, first_two


@pytest.mark.parametrize("drafter", ["layerskip", "draft-model"])
def test_sampling_keeps_the_distribution(sampled_setup, drafter):
    from tests.helpers import ALPHA, chi_square_p

    model, first_two = sampled_setup
    counts, kept = first_two_counts(model, drafter)
    assert kept >= 50  # drafted tokens were accepted, not only bonus tokens
    assert model.drafter(drafter)[0].sampler.samples  # drafts were sampled from q and verified against it
    assert chi_square_p(counts, first_two) > ALPHA


def test_drafts_not_drawn_from_their_q_fail_the_same_test(sampled_setup, monkeypatch):
    """The argmax drafted but declared as drawn from q: the rejection rule is then biased, and the
    test sees it, so it can fail."""
    from tests.helpers import ALPHA, chi_square_p

    model, first_two = sampled_setup
    honest = ChainSampler.pick

    def argmax_as_if_sampled(self, logits, prefix):
        token, probability, q = honest(self, logits, prefix)
        if q is None:
            return token, probability, q
        best = int(torch.argmax(q))
        return best, float(q[best]), q

    monkeypatch.setattr(ChainSampler, "pick", argmax_as_if_sampled)
    counts, _ = first_two_counts(model, "draft-model", WRONG_RUNS)
    assert chi_square_p(counts, first_two) < ALPHA


@pytest.mark.parametrize("name", ["layerskip+lookup", "draft-model+recycling"])
def test_fused_model_drafts_are_point_masses_so_a_seed_repeats_plain_sampling(name):
    """Inside a fused tree the model drafters draft their argmax; the point-mass rule then emits
    exactly plain sampling's tokens for the same seed."""
    model = make_model("llama")
    options = dict(max_new_tokens=24, temperature=0.8, top_k=20, repetition_penalty=1.2, seed=3)
    plain = model.generate(prompt_ids=PROMPTS[1], drafter="none", **options)
    fast = model.generate(prompt_ids=PROMPTS[1], drafter=name, **options)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.forward_passes < len(fast.token_ids)
    assert not model.drafter(name)[0].drafters[0].sampler.samples


def test_a_seed_repeats_a_sampled_run():
    """Sampled output follows the drafts (recursive rejection), so it repeats when they do: always
    for draft-model; for layerskip once its skip-set search is over."""
    model = make_model("qwen2")
    options = dict(prompt_ids=PROMPTS[0], max_new_tokens=16, temperature=0.9, seed=11)
    assert (model.generate(drafter="draft-model", **options).token_ids
            == model.generate(drafter="draft-model", **options).token_ids)
    generate(model, PROMPTS[1], "layerskip", 200)  # long enough to end the search
    assert model.drafter("layerskip")[0].search.steps_left == 0
    assert (model.generate(drafter="layerskip", **options).token_ids
            == model.generate(drafter="layerskip", **options).token_ids)
