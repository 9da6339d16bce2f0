"""A transformers model's parameters as typed weights (:class:`freespec.kernels.ModelWeights`).

The forward pass needs its own layout, not the modules': fused QKV and gate/up matrices (one
matmul each), GPT-2's Conv1D weights turned to [out, in], every matrix contiguous fp32, norms
as (weight, eps) (Gemma's ``x * (1 + w)`` norms with the 1 added to the weight in fp32, as
transformers adds it), each layer's sliding window as transformers' masks give it. Weights that
are exact 4/8-bit blocks are then packed (:func:`pack_weights`).
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
PHI3_STYLE = ("phi3",)
GEMMA_STYLE = ("gemma", "gemma2", "gemma3_text", "gemma3")  # gemma3: the text part of the multimodal model
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + PHI3_STYLE + GEMMA_STYLE + GPT2_STYLE
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that make a model a mixture of experts when set."""


class UnsupportedModelError(ValueError):
    """A model freespec cannot run; the message is one line and names what it supports."""


def supported() -> str:
    return f"supported: {', '.join(SUPPORTED_FAMILIES)}"


def check_architecture(config) -> None:
    """Refuse, in one line, models no runner serves: encoder-decoder and mixture-of-experts models.
    Needs only the config, so a loader can ask before reading any weights."""
    family = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{family!r} is an encoder-decoder model; freespec runs decoder-only causal "
                                    f"language models ({supported()})")
    if any(getattr(config.get_text_config(), name, None) for name in EXPERT_COUNTS):
        raise UnsupportedModelError(f"{family!r} is a mixture-of-experts model, which freespec does not run yet "
                                    f"({supported()})")


def extract(hf_model: torch.nn.Module) -> ModelWeights:
    """The weights of a supported transformers causal LM (see SUPPORTED_FAMILIES)."""
    config = hf_model.config
    check_architecture(config)
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"unsupported architecture {family!r}; {supported()}")
    output = hf_model.get_output_embeddings()
    lm_head = Linear(_fp32(output.weight), _optional_fp32(getattr(output, "bias", None)))
    embed = _fp32(hf_model.get_input_embeddings().weight)
    if family in GPT2_STYLE:
        return _gpt2(hf_model, embed, lm_head)
    return _rotary_decoder(hf_model, embed, lm_head)


def decoder_stack(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the decoder layers (and the rotary tables): ``model``, the language
    model inside a multimodal model (Gemma 3), or GPT-2's ``transformer``."""
    inner = hf_model.model if hasattr(hf_model, "model") else hf_model.transformer
    return inner.language_model if hasattr(inner, "language_model") else inner


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


def _linear(module: torch.nn.Module) -> Linear:
    return Linear(_fp32(module.weight), _optional_fp32(module.bias))


def _rms_norm(module: torch.nn.Module | None) -> RMSNorm | None:
    """Llama's RMSNorm (``w * x_normed``), or Gemma's (``(1 + w) * x_normed``, told apart by its
    ``eps`` where Llama's has ``variance_epsilon``): the weight is what the normed row is
    multiplied by, 1 + w computed in fp32 as transformers computes it (the same bits)."""
    if module is None:
        return None
    if hasattr(module, "variance_epsilon"):
        return RMSNorm(_fp32(module.weight), float(module.variance_epsilon))
    return RMSNorm(_fp32(1.0 + module.weight.float()), float(module.eps))


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window as transformers' masks give it: per ``layer_types`` where the
    config has them (Gemma 2/3, Qwen2/3), else ``sliding_window`` for every layer (Mistral, Phi-3).
    Needs only the (text) config: loaders that read weights from files use it too."""
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(f"{config.model_type!r} has {', '.join(unknown)} layers, which freespec does not "
                                    f"run yet ({supported()})")
    return [window if kind == "sliding_attention" else None for kind in types]


def _rotary_decoder(hf_model: torch.nn.Module, embed: torch.Tensor, lm_head: Linear) -> ModelWeights:
    """Llama-style decoders and their relatives: Phi-3 (fused projections), Gemma (scaled
    embeddings, GeGLU, (1 + w) norms; Gemma 2 and 3: post-norms, sliding windows on alternate
    layers, soft-capping; Gemma 3: per-head query and key norms, a rotary table per layer type)."""
    config, inner = hf_model.config.get_text_config(), decoder_stack(hf_model)
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{config.model_type!r} with bidirectional attention is not a causal language "
                                    f"model ({supported()})")
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError(f"{config.model_type!r} with a partial rotary embedding (e.g. Phi-4-mini) is not "
                                    f"supported ({supported()})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_type_rotary = isinstance(getattr(inner.rotary_emb, "rope_type", None), dict)  # Gemma 3
    layers, scale = [], head_dim**-0.5
    for index, (layer, window) in enumerate(zip(inner.layers, layer_windows(config))):
        attn, mlp = layer.self_attn, layer.mlp
        scale = getattr(attn, "scaling", scale)
        # Gemma 2 and 3 norm the MLP's input with pre_feedforward_layernorm; post_attention_layernorm is a post-norm
        pre_mlp = getattr(layer, "pre_feedforward_layernorm", None)
        layers.append(DecoderLayer(
            attn_norm=_rms_norm(layer.input_layernorm),
            qkv=_linear(attn.qkv_proj) if hasattr(attn, "qkv_proj")  # Phi-3's projections come fused
            else _fused([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=_linear(attn.o_proj),
            mlp_norm=_rms_norm(layer.post_attention_layernorm if pre_mlp is None else pre_mlp),
            up=_linear(mlp.gate_up_proj) if hasattr(mlp, "gate_up_proj") else _fused([mlp.gate_proj, mlp.up_proj]),
            down=_linear(mlp.down_proj),
            gated=True,
            q_norm=_rms_norm(getattr(attn, "q_norm", None)),
            k_norm=_rms_norm(getattr(attn, "k_norm", None)),
            post_attn_norm=_rms_norm(layer.post_attention_layernorm) if pre_mlp is not None else None,
            post_mlp_norm=_rms_norm(getattr(layer, "post_feedforward_layernorm", None)),
            window=window,
            rotary=config.layer_types[index] if per_type_rotary else None,
        ))
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    embedding = hf_model.get_input_embeddings()
    embed_scale = getattr(embedding, "embed_scale", None)  # Gemma: sqrt(hidden), in the weights' dtype
    return ModelWeights(
        embed, None, layers, _rms_norm(inner.norm), lm_head,
        Heads(heads, kv_heads, head_dim, scale, getattr(config, "attn_logit_softcapping", None)),
        getattr(config, "hidden_activation", None) or config.hidden_act,
        embed_scale=None if embed_scale is None else float(embed_scale.to(embedding.weight.dtype)),
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )


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
