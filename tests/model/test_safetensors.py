"""safetensors model directories read in place: BF16, F16 and F32 matrices are views of the mapped
files, against transformers' own loading (16-bit weights widen to fp32 exactly, so the bits are
those of transformers' fp32 model), sharded checkpoints, tied heads, speculative == plain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from freespec.api import Model
from freespec.kernels import GGMLWeight
from freespec.model.loading import load
from freespec.model.runner import ModelRunner
from tests.helpers import (
    PROMPTS,
    assert_matches_transformers,
    assert_same_bits,
    model_for,
    runner_for,
    word_tokenizer,
)

GGML_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def save(directory: Path, family: str, dtype: torch.dtype, tied: bool = False, shard: str | None = None) -> Path:
    model_for(family, tied=tied).to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    word_tokenizer().save_pretrained(directory)
    return directory


def oracle(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("dtype", list(GGML_NAMES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_directory_matches_transformers(tmp_path, c_kernels, family, dtype):
    directory = save(tmp_path, family, dtype)
    loaded, reference = load(directory), oracle(directory)
    layer = loaded.weights.layers[0]
    matrices = [*layer.qkv.weight.parts, layer.o.weight, *layer.up.weight.parts, layer.down.weight,
                loaded.weights.embed, loaded.weights.lm_head.weight]
    assert {matrix.type.name for matrix in matrices} == {GGML_NAMES[dtype]}
    assert all(isinstance(matrix.data, np.memmap) for matrix in matrices)  # the file's bytes, not copies
    assert (layer.qkv.bias is not None) == (family == "qwen2") and (layer.q_norm is not None) == (family == "qwen3")
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), reference)
    ours = ModelRunner(loaded.config, loaded.weights, c_kernels)
    assert_same_bits(ours, runner_for(reference, c_kernels, pack=False))


def test_a_sharded_tied_checkpoint(tmp_path, c_kernels):
    directory = save(tmp_path, "llama", torch.bfloat16, tied=True, shard="40KB")
    assert len(list(directory.glob("*.safetensors"))) > 2
    loaded, reference = load(directory), oracle(directory)
    assert loaded.weights.lm_head.weight is loaded.weights.embed
    ours = ModelRunner(loaded.config, loaded.weights, c_kernels)
    assert_same_bits(ours, runner_for(reference, c_kernels, pack=False))


@pytest.mark.parametrize("drafter", ["recycling", "lookup"])
def test_speculative_equals_plain_greedy_on_a_bf16_checkpoint(tmp_path, drafter):
    model = Model(load(save(tmp_path, "qwen2", torch.bfloat16)), budget=8)
    assert isinstance(model.runner.weights.layers[0].down.weight, GGMLWeight)
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=40)
        fast = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=40)
        assert fast.token_ids == plain.token_ids
    assert max(fast.stats.draft_sizes) > 0


def test_a_directory_without_safetensors_is_read_through_transformers(tmp_path, c_kernels):
    """Old checkpoints (pytorch_model.bin): the transformers model's weights, taken over."""
    model = model_for("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 writes only safetensors
    word_tokenizer().save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.hf_model is not None and loaded.weights.lm_head.weight.dtype == torch.float32
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), oracle(tmp_path))
