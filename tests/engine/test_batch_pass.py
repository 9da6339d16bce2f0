"""A batched pass (several requests' rows in one forward, each attending to its own cache) gives
every request the bits its own pass gives, on the one-call C decoder and on the per-op path."""

from __future__ import annotations

import pytest
import torch

from freespec import kernels
from freespec.model.runner import BatchPass, ModelRunner, forward_batch
from tests.helpers import runner_for, tiny_model

FAMILIES = ["llama", "qwen3", "gemma2", "mistral"]  # C decoder; C decoder with q/k norms; per-op with windows


def _tree() -> torch.Tensor:
    """[5, 5] a root with two children, one of which has two children."""
    parents = [-1, 0, 0, 1, 1]
    mask = torch.eye(5, dtype=torch.bool)
    for node, parent in enumerate(parents):
        while parent >= 0:
            mask[node, parent] = True
            parent = parents[parent]
    return mask


def _requests(vocab: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(prompt, pass tokens, pass tree mask) of three requests: a draft tree, a 40-token prefill
    chunk (the causal attention path) and one plain decoding step."""
    generator = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(4, vocab, (n,), generator=generator)  # noqa: E731
    causal = torch.ones(40, 40, dtype=torch.bool).tril_()
    return [(ids(21).tolist(), ids(5), _tree()), (ids(7).tolist(), ids(40), causal),
            (ids(30).tolist(), ids(1), torch.ones(1, 1, dtype=torch.bool))]


def _ready(base: ModelRunner, prompt: list[int]) -> ModelRunner:
    runner = base.fork()
    runner.reset(len(prompt) + 64)
    runner.prefill(torch.tensor(prompt))
    return runner


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("one_call", [True, False])
def test_each_request_of_a_batch_gets_the_bits_of_its_own_pass(family, one_call):
    base = runner_for(tiny_model(family, scale=4.0), kernels.select(one_call_decoder=one_call))
    requests = _requests(base.vocab_size)
    alone = []
    for prompt, tokens, mask in requests:
        runner = _ready(base, prompt)
        positions = torch.arange(runner.length, runner.length + len(tokens))
        alone.append((runner.logits(runner.forward(tokens, positions, mask)), runner))
    together = [_ready(base, prompt) for prompt, _, _ in requests]
    hidden = forward_batch([BatchPass(runner, tokens, torch.arange(runner.length, runner.length + len(tokens)), mask)
                            for runner, (_, tokens, mask) in zip(together, requests)])
    for (logits, solo), runner, states in zip(alone, together, hidden):
        assert torch.equal(runner.logits(states), logits)
        rows = solo.length + len(logits)
        assert torch.equal(runner.cache.keys[:, :, :rows], solo.cache.keys[:, :, :rows])
        assert torch.equal(runner.cache.values[:, :, :rows], solo.cache.values[:, :, :rows])
        runner.commit(range(len(logits)))
        solo.commit(range(len(logits)))
        assert runner.cache.row_tokens == solo.cache.row_tokens


def test_a_batched_pass_takes_forks_of_one_model_each_once(c_kernels):
    base = runner_for(tiny_model("llama"), c_kernels)
    other = runner_for(tiny_model("llama", seed=1), c_kernels)
    one = torch.ones(1, 1, dtype=torch.bool)
    first, second = _ready(base, [5, 6]), _ready(other, [5, 6])
    with pytest.raises(ValueError, match="forked from one model"):
        forward_batch([BatchPass(first, torch.tensor([7]), torch.tensor([2]), one),
                       BatchPass(second, torch.tensor([7]), torch.tensor([2]), one)])
    with pytest.raises(ValueError, match="cache once"):
        forward_batch([BatchPass(first, torch.tensor([7]), torch.tensor([2]), one)] * 2)
    assert forward_batch([]) == []
