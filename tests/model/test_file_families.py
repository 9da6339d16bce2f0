"""Gemma 1-3 and Phi-3 read from their files in place, like Llama: tiny random models written as
llama.cpp writes GGUF files (Gemma's norms stored as 1 + w, Phi-3's fused qkv and gate/up) and
as safetensors directories, against transformers' own loading of the same file: logits within
fp32 rounding, the same greedy tokens, the same bits as the model transformers dequantized, no
weight matrix in fp32 (speculative == plain on these files: tests/model/test_gguf.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from freespec.api import Model
from freespec.kernels import GGMLWeight, Stacked
from freespec.model.gguf_file import gguf_name
from freespec.model.loading import load
from freespec.model.runner import ModelRunner
from freespec.model.weights import weight_formats
from tests.helpers import (
    GGUF_ARCHITECTURES,
    PROMPTS,
    WINDOW,
    assert_matches_transformers,
    assert_same_bits,
    greedy,
    model_for,
    runner_for,
    word_tokenizer,
    write_gguf,
)

GGUF_FAMILIES = ["gemma2", "gemma3_text", "phi3"]
LAYERS = 6  # Gemma 3 (from a GGUF file: transformers' default pattern) makes every sixth layer global
Q4_K_M_LIKE = {"default": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_qkv": "Q5_K", "ffn_up": "Q8_0",
               "ffn_down": "Q6_K", "output": "Q6_K", "token_embd": "Q5_0"}
"""A mix as llama.cpp's Q4_K_M makes one (q, k, v and gate, up of different types in one layer)."""


def matrices(weights) -> list:
    """Every weight matrix a pass streams, stacked parts one by one."""
    found = [weights.embed, weights.lm_head.weight]
    for layer in weights.layers:
        for matrix in (layer.qkv.weight, layer.o.weight, layer.up.weight, layer.down.weight):
            found += list(matrix.parts) if isinstance(matrix, Stacked) else [matrix]
    return found


def assert_read_in_place(weights, path) -> None:
    """No matrix is an fp32 copy: each is the file's bytes, mapped (Gemma and Phi-3 are not permuted)."""
    for matrix in matrices(weights):
        assert isinstance(matrix, GGMLWeight) and isinstance(matrix.data, np.memmap), matrix
        assert str(path) in str(matrix.data.filename)


@pytest.fixture
def written(tmp_path):
    """(file, transformers' model of it): a family written as llama.cpp writes it, in ``types``."""

    def write(family: str, types):
        model = model_for(family, types, tied=family.startswith("gemma"), layers=LAYERS)  # Gemma ties its head
        path = write_gguf(tmp_path / "model.gguf", model, types)
        oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        return path, oracle

    return write


def test_gguf_names_are_gguf_pys():
    """The names the reader looks for are the ones gguf-py's tensor map gives each architecture."""
    import gguf

    modules = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.down_proj", "post_attention_layernorm"]
    extra = {"gemma2": ["mlp.gate_proj", "mlp.up_proj", "pre_feedforward_layernorm", "post_feedforward_layernorm"],
             "gemma3_text": ["mlp.gate_proj", "mlp.up_proj", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"],
             "phi3": ["self_attn.qkv_proj", "mlp.gate_up_proj"], "llama": ["mlp.gate_proj", "mlp.up_proj"]}
    for family, more in extra.items():
        architecture = GGUF_ARCHITECTURES[family]
        arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
        names = gguf.get_tensor_name_map(arch, 4)
        for module in modules + more:
            expected = names.get_name(f"model.layers.3.{module}")
            assert gguf_name(f"model.layers.3.{module}.weight", architecture) == f"{expected}.weight", module
        for module in ("model.embed_tokens", "model.norm"):
            assert gguf_name(f"{module}.weight", architecture) == f"{names.get_name(module)}.weight"
    assert gguf_name("model.layers.0.mlp.gate_up_proj.weight", "llama") is None  # Llama's ffn_up is up alone


@pytest.mark.parametrize("types", ["F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q4_K_M-like"])
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_a_gguf_file_matches_transformers_gguf_loading(written, c_kernels, family, types):
    path, oracle = written(family, Q4_K_M_LIKE if types == "Q4_K_M-like" else types)
    loaded = load(path)
    assert loaded.config.model_type == oracle.config.model_type
    assert_read_in_place(loaded.weights, path)
    reference = runner_for(oracle, c_kernels, pack=False)  # transformers' model of the file, taken over
    assert [(layer.window, layer.rotary) for layer in loaded.weights.layers] == [
        (layer.window, layer.rotary) for layer in reference.weights.layers]
    assert loaded.weights.heads == reference.weights.heads
    assert (loaded.weights.embed_scale, loaded.weights.final_softcap) == (
        reference.weights.embed_scale, reference.weights.final_softcap)
    windows = [layer.window for layer in loaded.weights.layers]
    if family != "phi3":
        assert WINDOW in windows and None in windows  # sliding and global layers both run
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), oracle)
    assert_same_bits(ModelRunner(loaded.config, loaded.weights, c_kernels), reference)


def test_phi3_reads_its_fused_projections_as_they_lie(written):
    path, _ = written("phi3", Q4_K_M_LIKE)
    layer = load(path).weights.layers[0]
    assert isinstance(layer.qkv.weight, GGMLWeight) and layer.qkv.weight.type.name == "Q5_K"
    assert isinstance(layer.up.weight, GGMLWeight) and layer.up.weight.shape == (2 * 512, 256)


def test_gemma_norms_are_one_plus_the_models_weight(written):
    """llama.cpp stores 1 + w; the norm multiplies by 1 + w: the file's value, as transformers computes it."""
    path, oracle = written("gemma3_text", "F32")
    loaded, state = load(path), oracle.state_dict()
    layer = loaded.weights.layers[1]
    for norm, name in [(layer.attn_norm, "input_layernorm"), (layer.mlp_norm, "pre_feedforward_layernorm"),
                       (layer.post_attn_norm, "post_attention_layernorm"),
                       (layer.post_mlp_norm, "post_feedforward_layernorm"), (layer.q_norm, "self_attn.q_norm")]:
        assert torch.equal(norm.weight, 1.0 + state[f"model.layers.1.{name}.weight"]), name
    assert loaded.weights.embed_scale == float(torch.tensor(loaded.config.hidden_size**0.5))
    assert loaded.weights.lm_head.weight is loaded.weights.embed


GGML_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.mark.parametrize("dtype", list(GGML_NAMES))
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "phi3", "phi3-longrope"])
def test_a_safetensors_directory_matches_transformers(tmp_path, c_kernels, family, dtype):
    model_for(family, tied=family.startswith("gemma"), layers=LAYERS).to(dtype).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = load(tmp_path)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert weight_formats(loaded.weights) == [GGML_NAMES[dtype]]
    assert_read_in_place(loaded.weights, tmp_path)
    reference = runner_for(oracle, c_kernels, pack=False)
    assert [(layer.window, layer.rotary) for layer in loaded.weights.layers] == [
        (layer.window, layer.rotary) for layer in reference.weights.layers]
    assert loaded.weights.heads == reference.weights.heads
    assert_matches_transformers(ModelRunner(loaded.config, loaded.weights, c_kernels), oracle)
    assert_same_bits(ModelRunner(loaded.config, loaded.weights, c_kernels), reference)


def test_phi3_longrope_from_a_gguf_file(tmp_path, c_kernels):
    """llama.cpp stores LongRoPE's factors as tensors, which transformers' GGUF reading drops: the
    config gets them back, so decoding across the original context (64) is the model's own."""
    model = model_for("phi3-longrope", "F32", seed=4)
    path = write_gguf(tmp_path / "model.gguf", model, "F32")
    loaded = load(path)
    assert loaded.config.rope_parameters["rope_type"] == "longrope"
    prompt = PROMPTS[1]  # 52 tokens: decoding passes position 64, where the long factors take over
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy(ModelRunner(loaded.config, loaded.weights, c_kernels), prompt, 24) == expected
    peer = loaded.transformers_model()  # the hf-greedy peer runs the completed config too
    assert peer.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist() == expected


def test_a_variant_without_a_fast_path_loads_through_transformers(tmp_path):
    """Phi-4-mini's partial rotary embedding: the file is not read natively; transformers runs it."""
    model = model_for("phi3")
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.5}
    model.config.sliding_window = None  # the fallback caps its context at a window: 12 is too short to calibrate
    model = AutoModelForCausalLM.from_config(model.config).eval()
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.weights is None and loaded.hf_model is not None
    result = Model(loaded).generate(prompt_ids=PROMPTS[0], drafter="lookup", max_new_tokens=8)
    assert len(result.token_ids) == 8
