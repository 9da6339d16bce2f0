"""A transformers model's parameters as typed weights (:class:`freespec.kernels.ModelWeights`).

The forward pass needs its own layout, not the modules': fused QKV and gate/up matrices (one
matmul each), GPT-2's Conv1D weights turned to [out, in], every matrix contiguous fp32, norms
as (weight, eps). Weights that are exact 4/8-bit blocks are then packed (:func:`pack_weights`).
The rotary tables and activation stay the model's own (:mod:`freespec.model.rotary`), so no
model file is forked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from freespec.kernels.weights import (
    DecoderLayer,
    Heads,
    LayerNorm,
    Linear,
    ModelWeights,
    PackedWeight,
    RMSNorm,
)
from freespec.model.quant import pack_all

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + GPT2_STYLE


class UnsupportedModelError(ValueError):
    pass


def extract(hf_model: torch.nn.Module) -> ModelWeights:
    """The weights of a supported transformers causal LM (see SUPPORTED_FAMILIES)."""
    family = hf_model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"unsupported architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    output = hf_model.get_output_embeddings()
    lm_head = Linear(_fp32(output.weight), _optional_fp32(getattr(output, "bias", None)))
    embed = _fp32(hf_model.get_input_embeddings().weight)
    if family in LLAMA_STYLE:
        return _llama(hf_model, embed, lm_head)
    return _gpt2(hf_model, embed, lm_head)


def _fp32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).contiguous()


def _optional_fp32(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else _fp32(weight)


def _fused(modules: Sequence[torch.nn.Module]) -> Linear:
    """One linear layer for several that read the same input: weights (and biases, if any) stacked."""
    weight = _fp32(torch.cat([m.weight for m in modules]))
    if all(m.bias is None for m in modules):
        return Linear(weight)
    biases = [m.bias if m.bias is not None else torch.zeros(m.weight.shape[0]) for m in modules]
    return Linear(weight, _fp32(torch.cat(biases)))


def _rms_norm(module: torch.nn.Module | None) -> RMSNorm | None:
    return None if module is None else RMSNorm(_fp32(module.weight), float(module.variance_epsilon))


def _llama(hf_model: torch.nn.Module, embed: torch.Tensor, lm_head: Linear) -> ModelWeights:
    config, inner = hf_model.config, hf_model.model
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers, scale = [], head_dim**-0.5
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        scale = getattr(attn, "scaling", scale)
        layers.append(DecoderLayer(
            attn_norm=_rms_norm(layer.input_layernorm),
            qkv=_fused([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=Linear(_fp32(attn.o_proj.weight), _optional_fp32(attn.o_proj.bias)),
            mlp_norm=_rms_norm(layer.post_attention_layernorm),
            up=_fused([mlp.gate_proj, mlp.up_proj]),
            down=Linear(_fp32(mlp.down_proj.weight), _optional_fp32(mlp.down_proj.bias)),
            gated=True,
            q_norm=_rms_norm(getattr(attn, "q_norm", None)),
            k_norm=_rms_norm(getattr(attn, "k_norm", None)),
        ))
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelWeights(embed, None, layers, _rms_norm(inner.norm), lm_head, Heads(heads, kv_heads, head_dim, scale),
                        config.hidden_act)


def _layer_norm(module: torch.nn.LayerNorm) -> LayerNorm:
    return LayerNorm(_fp32(module.weight), _fp32(module.bias), module.eps)


def _conv1d(module: torch.nn.Module) -> Linear:
    """GPT-2's Conv1D stores weights as [in, out]; the kernels want [out, in]."""
    return Linear(_fp32(module.weight.t()), _fp32(module.bias))


def _gpt2(hf_model: torch.nn.Module, embed: torch.Tensor, lm_head: Linear) -> ModelWeights:
    config, inner = hf_model.config, hf_model.transformer
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise UnsupportedModelError("GPT-2 variants with per-layer attention scaling are not supported")
    head_dim = config.n_embd // config.n_head
    layers = [
        DecoderLayer(attn_norm=_layer_norm(block.ln_1), qkv=_conv1d(block.attn.c_attn), o=_conv1d(block.attn.c_proj),
                     mlp_norm=_layer_norm(block.ln_2), up=_conv1d(block.mlp.c_fc), down=_conv1d(block.mlp.c_proj),
                     gated=False)
        for block in inner.h
    ]
    return ModelWeights(embed, _fp32(inner.wpe.weight), layers, _layer_norm(inner.ln_f), lm_head,
                        Heads(config.n_head, config.n_head, head_dim, head_dim**-0.5), config.activation_function)


def pack_weights(weights: ModelWeights, cache: Path | None) -> list[str]:
    """Replace the matrices that are exact 4/8-bit blocks by their packed form (bit-identical
    results, see :mod:`freespec.model.quant`), cached in ``cache``; return the formats now used."""
    linears = {"lm_head": weights.lm_head}
    for index, layer in enumerate(weights.layers):
        # the names are the cache file's keys: keep them stable
        names = {"qkv": layer.qkv, "o": layer.o, "gate_up" if layer.gated else "up": layer.up, "down": layer.down}
        linears.update({f"{index}.{name}": linear for name, linear in names.items()})
    packed = pack_all({name: linear.weight for name, linear in linears.items()}, cache)
    for name, linear in linears.items():
        linear.weight = packed[name]
    return sorted({w.kind if isinstance(w, PackedWeight) else "fp32" for w in packed.values()})
