"""GGUF files read in place, end to end: tiny Llama and Qwen2 models written as llama.cpp writes
them, in every weight type freespec reads, against transformers' own GGUF loading (which
dequantizes with gguf's formulas): logits within fp32 tolerance and the same greedy tokens, the
same bits as the dequantized model's weights taken from transformers; speculative == plain on
these and on Gemma 2/3 and Phi-3 files (whose other tests are in test_file_families.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from freespec import kernels
from freespec.api import Model
from freespec.kernels import GGMLWeight, PackedWeight, Stacked
from freespec.model import loading
from freespec.model.loading import load
from freespec.model.runner import ModelRunner
from tests.helpers import (
    PROMPTS,
    assert_matches_transformers,
    assert_same_bits,
    model_for,
    runner_for,
    write_gguf,
)

BLOCK_32_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# random blocks: gguf cannot quantize to them
HAND_PACKED_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                     "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"]
Q4_K_M_LIKE = {"default": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "ffn_up": "Q8_0", "ffn_down": "Q6_K",
               "output": "Q6_K", "token_embd": "Q5_0"}
"""A mix as llama.cpp's Q4_K_M makes one: q, k, v (and gate, up) of different types in one layer."""
LOW_BIT_MIX = {"default": "Q3_K", "attn_k": "Q2_K", "attn_v": "IQ4_XS", "ffn_up": "IQ4_NL", "ffn_down": "Q4_K",
               "attn_q": "IQ3_XXS", "ffn_gate": "IQ3_S", "attn_output": "IQ2_S", "output": "Q6_K", "token_embd": "Q3_K"}
"""The types of Q2_K, Q3_K_M, IQ3 and IQ4 files, all in one model."""
MIXES = {"Q4_K_M-like": Q4_K_M_LIKE, "low-bit mix": LOW_BIT_MIX}


@pytest.fixture
def written(tmp_path):
    """(file, transformers' model of it) for a family, types and tying."""

    def write(family: str, types, tied: bool = False):
        path = write_gguf(tmp_path / "model.gguf", model_for(family, types, tied), types)
        oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        return path, oracle

    return write


@pytest.mark.parametrize("types", BLOCK_32_TYPES + HAND_PACKED_TYPES + list(MIXES))
def test_a_tiny_llama_file_matches_transformers_gguf_loading(written, c_kernels, types):
    path, oracle = written("llama", MIXES.get(types, types))
    loaded = load(path)
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), oracle)
    backends = [c_kernels, kernels.select(one_call_decoder=False), kernels.select("torch")]
    for backend in backends:  # the file's blocks give the bits its dequantized fp32 weights give
        assert_same_bits(ModelRunner(loaded.config, loaded.weights, backend), runner_for(oracle, backend, pack=False))


@pytest.mark.parametrize("types", ["Q8_0", "Q5_1", "BF16"])
def test_qwen2_with_biases_matches_transformers(written, c_kernels, types):
    path, oracle = written("qwen2", types)
    loaded = load(path)
    assert loaded.weights.layers[0].qkv.bias is not None
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), oracle)
    assert_same_bits(ModelRunner(loaded.config, loaded.weights, c_kernels), runner_for(oracle, c_kernels, pack=False))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tied_head_is_the_embedding_matrix_itself(written, c_kernels, family):
    path, oracle = written(family, "Q8_0", tied=True)
    loaded = load(path)
    assert loaded.weights.lm_head.weight is loaded.weights.embed
    runner = ModelRunner(loaded.config, loaded.weights, c_kernels)
    assert runner.weights.lm_head.weight is runner.weights.embed  # re-packed once (AVX2), still one matrix
    kind = PackedWeight if c_kernels.isa == "avx2" else GGMLWeight
    assert isinstance(runner.weights.embed, kind) and runner.weight_formats == ["Q8_0"]
    assert_matches_transformers(runner, oracle)


def test_matrices_are_the_files_bytes_in_their_own_format(written):
    """No weight matrix is dequantized or copied, the query and key matrices whose rows llama.cpp
    reordered included: the layer puts their outputs back in transformers' order instead."""
    path, _ = written("llama", Q4_K_M_LIKE)
    loaded = load(path)

    def mapped(matrix: GGMLWeight) -> bool:  # a view of the mapped file (numpy keeps its name on views)
        return isinstance(matrix.data, np.memmap) and Path(matrix.data.filename).resolve() == path.resolve()

    layer = loaded.weights.layers[0]
    q, k, v = layer.qkv.weight.parts
    gate, up = layer.up.weight.parts
    assert [part.type.name for part in (q, k, v, gate, up, layer.down.weight)] == [
        "Q4_K", "Q5_K", "Q6_K", "Q4_K", "Q8_0", "Q6_K"]
    assert isinstance(layer.qkv.weight, Stacked) and layer.qkv.weight.shape == (256 + 2 * 128, 256)
    for matrix in (q, k, v, gate, up, layer.down.weight, layer.o.weight, loaded.weights.embed,
                   loaded.weights.lm_head.weight):
        assert isinstance(matrix, GGMLWeight) and mapped(matrix)
    assert all(layer.interleaved_qk for layer in loaded.weights.layers)
    assert loaded.weights.embed.type.name == "Q5_0" and loaded.weights.lm_head.weight.type.name == "Q6_K"


def test_the_cache_holds_metadata_only_and_a_second_load_reads_it(written, monkeypatch):
    def files() -> set:
        """Every file in the cache, the metadata folder included (the tests share it through a link)."""
        roots = [loading.cache_dir(), (loading.cache_dir() / "gguf").resolve()]
        return {file.resolve() for root in roots for file in root.rglob("*") if file.is_file()}

    before = files()  # what other tests of this session left
    path, _ = written("llama", "Q4_0")
    first = load(path)
    written_now = [file for file in files() if file not in before]
    assert not [file for file in written_now if file.suffix in (".safetensors", ".bin", ".gguf")]
    metadata = list(loading.gguf_metadata(path).iterdir())  # built now, or for an earlier file of the same header
    assert metadata and sum(file.stat().st_size for file in metadata) < 2_000_000  # tokenizer and configs
    assert not [file for file in metadata if file.suffix in (".safetensors", ".bin", ".gguf")]

    def no_second_read(*args, **kwargs):
        raise AssertionError("transformers read the GGUF file again")

    for reader in ("modeling_gguf_pytorch_utils.load_gguf_checkpoint", "integrations.gguf.read_gguf_metadata",
                   "integrations.gguf.get_gguf_tokenizer"):
        monkeypatch.setattr(f"transformers.{reader}", no_second_read)
    second = load(path)
    assert second.config.to_dict() == first.config.to_dict()
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


@pytest.mark.parametrize("family, types", [("llama", "Q4_K_M-like"), ("llama", "low-bit mix"), ("llama", "Q8_0"),
                                           ("gemma2", "Q8_0"), ("gemma3_text", "Q4_K_M-like"), ("phi3", "Q8_0")])
@pytest.mark.parametrize("drafter", ["recycling", "lookup"])
def test_speculative_equals_plain_greedy_on_a_gguf_file(written, family, types, drafter):
    path, _ = written(family, MIXES.get(types, types), tied=family.startswith("gemma"))
    model = Model(load(path), budget=8)
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=40)
        fast = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=40)
        assert fast.token_ids == plain.token_ids
    assert max(fast.stats.draft_sizes) > 0  # drafts were verified
