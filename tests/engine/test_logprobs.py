"""Log-probabilities of the emitted tokens: the model's own (log-softmax of its logits), the same
bits whatever the drafter, the batch or the sampling options, and asking for them changes no token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freespec.api import Model
from freespec.engine.batch import Batch, Running
from freespec.engine.logprobs import check_top, token_logprobs
from freespec.model.loading import from_transformers
from tests.helpers import PROMPTS, tiny_model, word_tokenizer

DRAFTERS = ["none", "recycling", "lookup", "suffix", "jacobi", "recycling+lookup"]


def _model(family: str = "llama", budget: int | None = None) -> tuple[Model, torch.nn.Module]:
    hf_model = tiny_model(family, seed=0, scale=8.0)
    return Model(from_transformers(hf_model, word_tokenizer(), family), budget=budget), hf_model


def _records(result) -> list[tuple]:
    return [(entry.token, entry.logprob, entry.top) for entry in result.logprobs]


def test_token_logprobs_are_the_log_softmax_with_ties_by_lower_id():
    rows = np.array([[1.0, 3.0, 3.0, -2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    entries = token_logprobs(rows, [3, 4], top=2)
    expected = torch.log_softmax(torch.from_numpy(rows).double(), dim=-1)
    assert [entry.logprob for entry in entries] == pytest.approx([expected[0, 3].item(), expected[1, 4].item()],
                                                                 abs=1e-12)
    assert [token for token, _ in entries[0].top] == [1, 2]  # three tie at the top: the lower ids first
    assert [token for token, _ in entries[1].top] == [0, 1]
    assert token_logprobs(rows[:1], [0], top=20)[0].top[-1][0] == 3  # no more alternatives than the vocabulary
    assert token_logprobs(rows[:1], [0], top=0)[0].top == ()
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(ValueError, match="logprobs must be None or an integer in"):
            check_top(bad)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # the one-call C decoder; the per-op path, soft-capped
def test_logprobs_are_the_models_and_the_same_bits_for_every_drafter(family):
    model, hf_model = _model(family)
    for prompt in PROMPTS[:3]:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32)
        reference = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32, logprobs=3)
        assert reference.token_ids == plain.token_ids  # asking changes no token
        assert [entry.token for entry in reference.logprobs] == reference.token_ids
        for entry in reference.logprobs:  # greedy: each token is its row's first maximum
            assert entry.top[0] == (entry.token, entry.logprob) and len(entry.top) == 3
            assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
        # the oracle: transformers' fp32 forward over prompt + answer, log-softmax in float64
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + reference.token_ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.double(), dim=-1)
        ours = torch.tensor([entry.logprob for entry in reference.logprobs], dtype=torch.float64)
        assert torch.allclose(ours, expected[torch.arange(len(ours)), reference.token_ids], atol=1e-4)
        for drafter in DRAFTERS[1:]:
            fast = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=32, logprobs=3)
            assert fast.token_ids == plain.token_ids
            assert _records(fast) == _records(reference), drafter


def test_sampled_tokens_get_the_models_raw_logprobs_and_keep_their_seeded_draws():
    """Log-probabilities are the model's before temperature and top-p: a sampled answer's equal
    those of the same tokens decoded greedily through a fixed prompt, and recording them leaves
    the seeded draws alone."""
    model, _ = _model()
    sampling = dict(temperature=0.8, top_p=0.9, seed=5)
    prompt = PROMPTS[0]
    for drafter in ("none", "recycling", "suffix"):
        without = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=24, **sampling)
        sampled = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=24, logprobs=2, **sampling)
        assert sampled.token_ids == without.token_ids
        # each token's row alone: the answer's prefix as a prompt, one greedy step with logprobs
        for index in (0, len(sampled.token_ids) // 2, len(sampled.token_ids) - 1):
            step = model.generate(prompt_ids=prompt + sampled.token_ids[:index], drafter="none", max_new_tokens=1,
                                  logprobs=2, reuse_prefix=False)
            token = sampled.token_ids[index]
            row_top = dict(step.logprobs[0].top)
            assert sampled.logprobs[index].top == step.logprobs[0].top
            if token in row_top:
                assert sampled.logprobs[index].logprob == row_top[token]


def test_a_batch_gives_each_request_the_logprobs_it_gets_alone():
    model, _ = _model()
    sampled = [{}, {"temperature": 0.9}]
    requests = [dict(prompt_ids=PROMPTS[index % len(PROMPTS)] + [4 + index], drafter=DRAFTERS[index % len(DRAFTERS)],
                     max_new_tokens=20, logprobs=index % 3, seed=index, **sampled[index % 2]) for index in range(6)]
    alone = [model.fork().generate(**request) for request in requests]
    running = [Running(model.fork().stream(**request)) for request in requests]
    batch = Batch()
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    for request, single in zip(running, alone):
        assert request.error is None
        assert request.generation.token_ids == single.token_ids
        assert [(e.token, e.logprob, e.top) for e in request.generation.logprobs] == _records(single)


def test_bad_logprobs_are_refused_before_any_pass():
    model, _ = _model()
    with pytest.raises(ValueError, match=r"logprobs must be None or an integer in \[0, 20\]"):
        model.generate(prompt_ids=PROMPTS[0], logprobs=21)
    assert model.generate(prompt_ids=PROMPTS[0], max_new_tokens=4).logprobs is None


@pytest.mark.parametrize("drafter", ["none", "suffix", "recycling"])
def test_scoring_a_text_gives_the_bits_decoding_it_gave(drafter):
    """The prompt's log-probabilities come from its prefilled rows, which are the bits decoding
    writes: scoring prompt + answer repeats the answer's own log-probabilities exactly."""
    model, _ = _model()
    prompt = PROMPTS[1]
    answer = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=24, logprobs=2)
    scored = model.generate(prompt_ids=prompt + answer.token_ids, max_new_tokens=0, prompt_logprobs=2)
    assert scored.token_ids == [] and scored.logprobs is None
    assert scored.stats.cached_tokens == 0  # every row prefilled (the previous request left this prompt's rows)
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(prompt) + len(answer.token_ids)
    assert [entry.token for entry in scored.prompt_logprobs[1:]] == (prompt + answer.token_ids)[1:]
    assert [(e.token, e.logprob, e.top) for e in scored.prompt_logprobs[len(prompt):]] == _records(answer)
    both = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=24, logprobs=2, prompt_logprobs=2)
    assert _records(both) == _records(answer)
    assert both.prompt_logprobs == scored.prompt_logprobs[:len(prompt)]


def test_a_scoring_request_in_a_batch_scores_its_whole_prompt():
    """A batch prefills prompts in chunks beside other requests' steps: the scores are the same."""
    model, _ = _model()
    long_prompt = [2, *[4 + (7 * i) % 250 for i in range(150)], 3]
    alone = model.fork().generate(prompt_ids=long_prompt, max_new_tokens=0, prompt_logprobs=1)
    running = [Running(model.fork().stream(prompt_ids=long_prompt, max_new_tokens=0, prompt_logprobs=1)),
               Running(model.fork().stream(prompt_ids=PROMPTS[0], drafter="suffix", max_new_tokens=30))]
    batch = Batch()
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    assert running[0].error is None and running[0].generation.prompt_logprobs == alone.prompt_logprobs
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        model.generate(prompt_ids=PROMPTS[0], max_new_tokens=0)
