"""Exact block weights: found only where they reproduce every fp32 weight, and bit-identical results."""

import json
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from freespec import kernels
from freespec.api import Model
from freespec.engine.tree import DraftTree
from freespec.model import quant
from freespec.model.loading import from_transformers
from tests.helpers import (
    PROMPTS,
    decode_one_by_one,
    runner_for,
    tiny_model,
    word_tokenizer,
)


def gguf_roundtrip(weight: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    """What a GGUF file of this type holds, dequantized to fp32 as transformers loads it."""
    array = weight.detach().numpy().astype(np.float32)
    return torch.from_numpy(quants.dequantize(quants.quantize(array, kind), kind).reshape(array.shape).copy())


def quantized_like_gguf(model: torch.nn.Module) -> torch.nn.Module:
    """Layer matrices as Q4_1 and the (tied) embedding as Q8_0, like the embedded SmolLM2 file."""
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            if any(part in name for part in ("embed", "wte", "lm_head")):
                weight.copy_(gguf_roundtrip(weight, GGMLQuantizationType.Q8_0))
            elif isinstance(module, Conv1D):  # GPT-2 stores [in, out]; files hold blocks along "in"
                weight.copy_(gguf_roundtrip(weight.t(), GGMLQuantizationType.Q4_1).t())
            else:
                weight.copy_(gguf_roundtrip(weight, GGMLQuantizationType.Q4_1))
    return model


@pytest.mark.parametrize("kind,expected", [(GGMLQuantizationType.Q4_1, "q4"), (GGMLQuantizationType.Q8_0, "q8")])
def test_gguf_blocks_are_recovered_and_multiply_bit_identically(kind, expected, kernel_build):
    torch.manual_seed(0)
    weight = gguf_roundtrip(torch.randn(45, 96) * 0.05, kind)
    packed = quant.pack(weight)
    assert packed is not None and packed.kind == expected
    x = torch.randn(20, 96)
    dense = kernel_build.linear(x, weight)
    for rows in (0, 1, 2, 3, 4, 7, 13, 20):  # every path of the kernel: no rows, one to four, buffered, edge rows
        assert torch.equal(kernel_build.linear(x[:rows], packed), dense[:rows])
    assert packed.shape == weight.shape
    assert torch.equal(packed.dense, weight)  # torch's fallback decodes the same fp32 matrix from the blocks


def test_plain_fp32_weights_are_left_alone():
    torch.manual_seed(0)
    assert quant.pack(torch.randn(64, 96)) is None
    assert quant.pack(torch.randn(64, 40)) is None  # not a whole number of blocks
    nearly = gguf_roundtrip(torch.randn(64, 96), GGMLQuantizationType.Q4_1)
    nearly[40, 7] += 1e-3  # one weight off its block grid: the whole matrix stays fp32
    assert quant.pack(nearly) is None


def test_packed_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    weights = {"a": gguf_roundtrip(torch.randn(8, 64), GGMLQuantizationType.Q4_1), "b": torch.randn(8, 64)}
    cache = tmp_path / "packed.safetensors"
    first = quant.pack_all(weights, cache)
    assert cache.exists() and isinstance(first["a"], kernels.PackedWeight) and first["b"] is weights["b"]
    again = quant.pack_all(weights, cache)
    assert torch.equal(again["a"].codes, first["a"].codes) and torch.equal(again["a"].scales, first["a"].scales)
    assert torch.equal(again["a"].dense, weights["a"])
    with pytest.raises(ValueError, match="do not match"):  # a cache written for another shape
        quant._load_packed(cache, {"a": torch.zeros(8, 96), "b": weights["b"]})
    cache.write_bytes(b"garbage")
    assert isinstance(quant.pack_all(weights, cache)["a"], kernels.PackedWeight)  # rebuilt, not crashed


def test_a_damaged_packed_cache_is_packed_afresh_never_trusted(tmp_path, caplog):
    """The loader checked shapes only: blocks stored with another dtype or under an unknown kind
    reached the C kernels as they were, and a file without metadata raised a TypeError. Now any
    damage means packing afresh, with a warning."""
    torch.manual_seed(0)
    weights = {"a": gguf_roundtrip(torch.randn(8, 64), GGMLQuantizationType.Q4_1),
               "b": gguf_roundtrip(torch.randn(8, 64), GGMLQuantizationType.Q8_0)}
    cache = tmp_path / "packed.safetensors"
    good = quant.pack_all(weights, cache)
    assert [good[name].kind for name in "ab"] == ["q4", "q8"]
    tensors = {f"{name}.{part}": getattr(good[name], part) for name in "ab" for part in ("codes", "scales")}
    kinds = {"a": "q4", "b": "q8"}
    damaged = {
        "codes of another dtype": ({**tensors, "a.codes": tensors["a.codes"].float()}, kinds),
        "an unknown kind": (tensors, {"a": "q4", "b": "q16"}),
        "swapped kinds": (tensors, {"a": "q8", "b": "q4"}),
        "scales of another shape": ({**tensors, "b.scales": tensors["b.scales"][:, :1].contiguous()}, kinds),
        "a kind that is not a string": (tensors, {"a": ["q4"], "b": "q8"}),
        "kinds that are not a mapping": (tensors, ["q4", "q8"]),
        "kinds for other weights": (tensors, {**kinds, "c": "q8"}),
        "no metadata": (tensors, None),
    }
    for damage, (stored, stored_kinds) in damaged.items():
        metadata = None if stored_kinds is None else {"kinds": json.dumps(stored_kinds)}
        save_file(stored, str(cache), metadata=metadata)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="freespec.model.quant"):
            again = quant.pack_all(weights, cache)
        assert "packing the weights afresh" in caplog.text, damage
        for name in "ab":
            assert again[name].kind == good[name].kind, damage
            assert torch.equal(again[name].codes, good[name].codes), damage
    cache.write_bytes(cache.read_bytes()[:200])  # a truncated file
    assert torch.equal(quant.pack_all(weights, cache)["a"].codes, good["a"].codes)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_packed_runner_gives_the_same_bits_as_fp32(family, kernel_build):
    model = quantized_like_gguf(tiny_model(family, seed=2))
    packed, dense = runner_for(model, kernel_build), runner_for(model, kernel_build, pack=False)
    assert packed.weight_formats == ["q4", "q8"] and dense.weight_formats == ["fp32"]
    ids = torch.randint(packed.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    tree = DraftTree(np.array(ids[8:12].tolist() + [5, 6]), np.array([-1, 0, 1, 2, 0, 4]))
    results = []
    for runner in (packed, dense):
        runner.reset(32)
        runner.prefill(ids[:8])
        results.append(runner.logits(runner.forward(*tree.attention_inputs(runner.length))))
    assert torch.equal(results[0], results[1])
    # and a packed tree's logits equal packed one-token decoding
    packed.reset(32)
    packed.prefill(ids[:8])
    assert torch.equal(results[0][:4], decode_one_by_one(packed, ids, 8, 12))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", [4, 32])
def test_speculation_on_packed_weights_equals_plain_greedy(family, budget, kernel_build):
    quantized = quantized_like_gguf(tiny_model(family, seed=3, scale=8.0))
    model = Model(from_transformers(quantized, word_tokenizer(), family),
                  budget=budget, kernels=kernel_build)
    assert model.runner.weight_formats == ["q4", "q8"]
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=40)
        fast = model.generate(prompt_ids=prompt, drafter="recycling", max_new_tokens=40)
        assert fast.token_ids == plain.token_ids
