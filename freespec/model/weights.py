"""A model's parameters as typed weights (:class:`freespec.kernels.ModelWeights`), from its files
or from a transformers model in memory.

The forward pass needs its own layout, not the modules': fused QKV and gate/up matrices (one
matmul each: :class:`freespec.kernels.Stacked` when read from files, whose parts may be of
different formats), GPT-2's Conv1D weights turned to [out, in], norms as (weight, eps) (Gemma's
``x * (1 + w)`` norms with the 1 added to the weight in fp32, as transformers adds it), each
layer's sliding window as transformers' masks give it. :func:`from_tensors` builds a Llama-style,
Phi-3 or Gemma 1-3 model from named tensors (a GGUF or safetensors file, read in place:
:mod:`freespec.model.gguf_file`, :mod:`freespec.model.safetensors_file`), checking every shape
against the config; :func:`extract` takes a transformers model's parameters as fp32 (tests' tiny
models, architectures without a file reader), and :func:`pack_weights` replaces those that are
exact 4/8-bit blocks by their packed form.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import torch

from freespec.kernels.weights import (
    DecoderLayer,
    GGMLWeight,
    Heads,
    LayerNorm,
    Linear,
    Matrix,
    ModelWeights,
    PackedWeight,
    RMSNorm,
    Stacked,
)
from freespec.model.errors import ModelLoadError
from freespec.model.quant import pack_all
from freespec.model.rotary import rope_parameters

log = logging.getLogger(__name__)

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
PHI3_STYLE = ("phi3",)
GEMMA_STYLE = ("gemma", "gemma2", "gemma3_text", "gemma3")  # gemma3: the text part of the multimodal model
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + PHI3_STYLE + GEMMA_STYLE + GPT2_STYLE
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that make a model a mixture of experts when set."""


ATTENTION_KINDS = ("full_attention", "sliding_attention")  # layer types the runners' masks cover
RECURRENT_KINDS = ("linear_attention", "mamba", "conv", "recurrent")
"""Layer types that carry a state from token to token (transformers 5.25 names Mamba's layers
``linear_attention`` and no longer marks its model class stateful)."""
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # architecture names that generate


class UnsupportedModelError(ValueError):
    """A model freespec cannot run; the message is one line and names what it supports."""


def supported() -> str:
    """What freespec runs, for error messages."""
    return (f"supported: decoder-only causal LMs with a tokenizer (fast path: {', '.join(SUPPORTED_FAMILIES)}; "
            "any other through transformers)")


def refuse_unsupported(config) -> None:
    """Raise :class:`UnsupportedModelError` in one line for a model no runner takes, from its config
    alone (before any weight loads): encoder-decoder models, checkpoints without a causal-LM head,
    mixture-of-experts models, models with recurrent state (Mamba, RWKV, linear attention) and
    layer types no mask covers. The one place these refusals are worded."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    family = config.model_type
    # a decoder taken out of an encoder-decoder model (BartForCausalLM) says is_encoder_decoder=False
    if getattr(config, "is_encoder_decoder", False) or family in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"{family} is an encoder-decoder model; {supported()}")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(CAUSAL_HEADS) for name in architectures):
        raise UnsupportedModelError(f"the {family} checkpoint has no causal-LM head ({', '.join(architectures)}); "
                                    f"{supported()}")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # asks the mapping's names: imports no model
        raise UnsupportedModelError(f"{family} is not a causal LM transformers knows; {supported()}")
    text = config.get_text_config(decoder=True)
    if any(isinstance(experts := getattr(text, key, None), int) and experts > 1 for key in EXPERT_COUNTS):
        raise UnsupportedModelError(f"{family} is a mixture-of-experts model, not supported yet; {supported()}")
    layer_types = set(getattr(text, "layer_types", None) or [])
    # the fast-path families keep no state; asking another's model class imports its module (seconds)
    if family not in SUPPORTED_FAMILIES and (
            layer_types & set(RECURRENT_KINDS)
            or getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_is_stateful", False)):
        raise UnsupportedModelError(f"{family} keeps a recurrent state, which cannot follow a draft tree; "
                                    f"{supported()}")
    unknown = layer_types - set(ATTENTION_KINDS)
    if unknown:
        raise UnsupportedModelError(f"{family} has {', '.join(sorted(unknown))} layers, which freespec cannot run "
                                    f"on a draft tree; {supported()}")


class TensorSource(Protocol):
    """A model file's tensors under transformers' names (``model.layers.0.self_attn.q_proj.weight``)."""

    norm_shift: float
    """What the file adds to Gemma's norm weights: llama.cpp's converter stores ``1 + w``
    (the factor its runtime multiplies by), a safetensors checkpoint ``w`` itself (0)."""

    rope_interleaved: bool
    """Whether the query and key matrices' rows of each head are in llama.cpp's interleaved rotary
    order (GGUF ``llama`` files): the layers then put the projection's outputs back in
    transformers' order (``DecoderLayer.interleaved_qk``), the matrices stay as the file has them."""

    def has(self, name: str) -> bool: ...

    def matrix(self, name: str) -> Matrix:
        """[out, in] in the file's own format, not copied."""

    def vector(self, name: str) -> torch.Tensor:
        """fp32 copy [n] (norm weights, biases)."""

    def where(self, name: str) -> str:
        """The file and the tensor's name in it, for messages."""

    def unused(self, names: set[str]) -> list[str]:
        """The file's tensors that none of ``names`` is."""


FILE_FAMILIES = LLAMA_STYLE + PHI3_STYLE + ("gemma", "gemma2", "gemma3_text")
"""Families whose weights are read from their files in place (:func:`from_tensors`); the others
(GPT-2, Gemma 3's multimodal checkpoints) load through transformers and :func:`extract`."""
POST_NORM_FAMILIES = ("gemma2", "gemma3_text")
"""Gemma 2 and 3: a norm before the MLP (pre_feedforward_layernorm) and a norm of each block's
output before its residual add (post_attention_layernorm, post_feedforward_layernorm)."""


def from_tensors(config, source: TensorSource) -> ModelWeights:
    """The weights of a model of :data:`FILE_FAMILIES` from its file, in the file's formats: the
    ModelWeights :func:`extract` takes from the same model in transformers.

    Every matrix's shape is checked against ``config``; q, k, v and gate, up are stacked (each
    keeps its own format) unless the file holds them fused (Phi-3's qkv_proj and gate_up_proj),
    biases where the file has them. Gemma's norms multiply by ``1 + w``, computed in fp32 from
    the file's ``w`` (``source.norm_shift``) as transformers computes it. With
    ``tie_word_embeddings`` (a GGUF file without an output matrix) the head is the embedding matrix itself.
    """
    family = config.model_type
    if family not in FILE_FAMILIES:
        raise UnsupportedModelError(f"{family} has no file reader; {supported()}")
    refuse_unsupported(config)
    check_text_config(config)
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate, vocab, eps = config.intermediate_size, config.vocab_size, config.rms_norm_eps
    gemma, post_norms = family in GEMMA_STYLE, family in POST_NORM_FAMILIES
    if source.rope_interleaved and head_dim % 2:
        raise ModelLoadError(f"cannot load {source.where('model.layers.0.self_attn.q_proj.weight')}: heads of "
                             f"{head_dim} rows cannot hold llama.cpp's interleaved rotary pairs")
    read: set[str] = set()

    def matrix(name: str, rows: int, columns: int) -> Matrix:
        read.add(name)
        weight = source.matrix(name)
        if tuple(weight.shape) != (rows, columns):
            raise ModelLoadError(f"cannot load {source.where(name)} has shape {list(weight.shape)} where the model's "
                                 f"config needs [{rows}, {columns}]")
        return weight

    def vector(name: str, size: int) -> torch.Tensor:
        read.add(name)
        values = source.vector(name)
        if values.shape != (size,):
            raise ModelLoadError(f"cannot load {source.where(name)} has {values.numel()} values where the model's "
                                 f"config needs {size}")
        return values

    def bias(name: str, size: int) -> torch.Tensor | None:
        return vector(name, size) if source.has(name) else None

    def stacked(prefix: str, names: Sequence[str], sizes: Sequence[int], columns: int) -> Linear:
        parts = tuple(matrix(f"{prefix}.{name}.weight", size, columns) for name, size in zip(names, sizes))
        biases = [bias(f"{prefix}.{name}.bias", size) for name, size in zip(names, sizes)]
        return Linear(Stacked(parts), _stacked_bias(biases, sizes))

    def linear(name: str, rows: int, columns: int) -> Linear:
        return Linear(matrix(f"{name}.weight", rows, columns), bias(f"{name}.bias", rows))

    def fused_or_stacked(prefix: str, fused: str, names: Sequence[str], sizes: Sequence[int]) -> Linear:
        """Phi-3's fused projection where the file has it, else the parts stacked."""
        if source.has(f"{prefix}.{fused}.weight"):
            return linear(f"{prefix}.{fused}", sum(sizes), hidden)
        return stacked(prefix, names, sizes, hidden)

    def norm(name: str, size: int) -> RMSNorm:
        weight = vector(name, size)
        if gemma:  # as transformers does: its GGUF loading subtracts the 1 llama.cpp added, the norm adds 1
            weight = 1.0 + (weight - source.norm_shift)
        return RMSNorm(weight, float(eps))

    layers = []
    for index, (window, rotary) in enumerate(zip(layer_windows(config), layer_rotary(config))):
        prefix = f"model.layers.{index}"
        qk_norm = source.has(f"{prefix}.self_attn.q_norm.weight")
        layers.append(DecoderLayer(
            attn_norm=norm(f"{prefix}.input_layernorm.weight", hidden),
            qkv=fused_or_stacked(f"{prefix}.self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"),
                                 (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)),
            o=linear(f"{prefix}.self_attn.o_proj", hidden, heads * head_dim),
            mlp_norm=norm(f"{prefix}.{'pre_feedforward' if post_norms else 'post_attention'}_layernorm.weight",
                          hidden),
            up=fused_or_stacked(f"{prefix}.mlp", "gate_up_proj", ("gate_proj", "up_proj"), (intermediate,) * 2),
            down=linear(f"{prefix}.mlp.down_proj", hidden, intermediate),
            gated=True,
            q_norm=norm(f"{prefix}.self_attn.q_norm.weight", head_dim) if qk_norm else None,
            k_norm=norm(f"{prefix}.self_attn.k_norm.weight", head_dim) if qk_norm else None,
            post_attn_norm=norm(f"{prefix}.post_attention_layernorm.weight", hidden) if post_norms else None,
            post_mlp_norm=norm(f"{prefix}.post_feedforward_layernorm.weight", hidden) if post_norms else None,
            window=window,
            rotary=rotary,
            interleaved_qk=source.rope_interleaved,
        ))
    embed = matrix("model.embed_tokens.weight", vocab, hidden)
    lm_head = Linear(embed) if getattr(config, "tie_word_embeddings", False) else linear("lm_head", vocab, hidden)
    scale = (getattr(config, "query_pre_attn_scalar", None) or head_dim) ** -0.5 if post_norms else head_dim**-0.5
    weights = ModelWeights(
        embed, None, layers, norm("model.norm.weight", hidden), lm_head,
        Heads(heads, kv_heads, head_dim, scale, getattr(config, "attn_logit_softcapping", None)),
        getattr(config, "hidden_activation", None) or config.hidden_act,
        embed_scale=float(torch.tensor(hidden**0.5)) if gemma else None,  # as transformers' fp32 model scales
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )
    unused = source.unused(read)
    if unused:
        more = " ..." if len(unused) > 8 else ""
        log.warning("ignoring tensors the model does not use: %s%s", ", ".join(unused[:8]), more)
    return weights


def weight_formats(weights: ModelWeights) -> list[str]:
    """The formats the linear layers' matrices (what a pass streams) are stored in: "fp32", "q4"/"q8"
    (packed blocks), ggml type names ("Q4_K", "BF16", ...)."""
    def formats(matrix: Matrix) -> set[str]:
        if isinstance(matrix, Stacked):
            return set().union(*(formats(part) for part in matrix.parts))
        if isinstance(matrix, GGMLWeight):
            return {matrix.type.name}
        return {matrix.kind if isinstance(matrix, PackedWeight) else "fp32"}

    matrices = [weights.lm_head.weight]
    for layer in weights.layers:
        matrices += [layer.qkv.weight, layer.o.weight, layer.up.weight, layer.down.weight]
    return sorted(set().union(*(formats(matrix) for matrix in matrices)))


def extract(hf_model: torch.nn.Module) -> ModelWeights:
    """The weights of a supported transformers causal LM (see SUPPORTED_FAMILIES)."""
    config = hf_model.config
    refuse_unsupported(config)
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"{family} has no fast path; {supported()}")
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


def _stacked_bias(biases: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> torch.Tensor | None:
    """The biases of stacked matrices (``sizes`` rows each) as one fp32 vector, zeros where a part
    has none; None when no part has one."""
    if all(b is None for b in biases):
        return None
    return _fp32(torch.cat([torch.zeros(size) if b is None else _fp32(b) for b, size in zip(biases, sizes)]))


def _fused(modules: Sequence[torch.nn.Module]) -> Linear:
    """One linear layer for several that read the same input: weights (and biases, if any) stacked."""
    weight = _fp32(torch.cat([m.weight for m in modules]))
    return Linear(weight, _stacked_bias([m.bias for m in modules], [m.weight.shape[0] for m in modules]))


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
    Needs only the (text) config: loaders that read weights from files use it too. Other layer
    types are refused earlier (:func:`refuse_unsupported`)."""
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def check_text_config(config) -> None:
    """Refuse, in one line, rotary decoders of a fast-path family in a variant it does not compute."""
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{config.model_type} with bidirectional attention has no fast path; {supported()}")
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError(f"{config.model_type} with a partial rotary embedding (e.g. Phi-4-mini) has no "
                                    f"fast path; {supported()}")


def layer_rotary(config) -> list[str | None]:
    """Each layer's rotary table (:attr:`DecoderLayer.rotary`): its layer type where the config's
    rope parameters are per layer type (Gemma 3: local and global bases), else None (one table)."""
    types, rope = getattr(config, "layer_types", None), rope_parameters(config)
    if types is None or not all(kind in rope for kind in types):
        return [None] * config.num_hidden_layers
    return list(types)


def _rotary_decoder(hf_model: torch.nn.Module, embed: torch.Tensor, lm_head: Linear) -> ModelWeights:
    """Llama-style decoders and their relatives: Phi-3 (fused projections), Gemma (scaled
    embeddings, GeGLU, (1 + w) norms; Gemma 2 and 3: post-norms, sliding windows on alternate
    layers, soft-capping; Gemma 3: per-head query and key norms, a rotary table per layer type)."""
    config, inner = hf_model.config.get_text_config(), decoder_stack(hf_model)
    check_text_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers, scale = [], head_dim**-0.5
    for layer, window, rotary in zip(inner.layers, layer_windows(config), layer_rotary(config)):
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
            rotary=rotary,
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
        raise UnsupportedModelError(f"GPT-2 with per-layer attention scaling has no fast path; {supported()}")
    head_dim = config.n_embd // config.n_head
    layers = [
        DecoderLayer(attn_norm=_layer_norm(block.ln_1), qkv=_conv1d(block.attn.c_attn), o=_conv1d(block.attn.c_proj),
                     mlp_norm=_layer_norm(block.ln_2), up=_conv1d(block.mlp.c_fc), down=_conv1d(block.mlp.c_proj),
                     gated=False)
        for block in inner.h
    ]
    return ModelWeights(embed, _fp32(inner.wpe.weight), layers, _layer_norm(inner.ln_f), lm_head,
                        Heads(config.n_head, config.n_head, head_dim, head_dim**-0.5), config.activation_function)


def pack_weights(weights: ModelWeights, cache: Path | None) -> None:
    """Replace the fp32 matrices that are exact 4/8-bit blocks by their packed form (bit-identical
    results, see :mod:`freespec.model.quant`), cached in ``cache``. Matrices in a file's own
    format (:class:`GGMLWeight`) stay as they are."""
    linears = {"lm_head": weights.lm_head}
    for index, layer in enumerate(weights.layers):
        # the names are the cache file's keys: keep them stable
        names = {"qkv": layer.qkv, "o": layer.o, "gate_up" if layer.gated else "up": layer.up, "down": layer.down}
        linears.update({f"{index}.{name}": linear for name, linear in names.items()})
    linears = {name: linear for name, linear in linears.items() if isinstance(linear.weight, torch.Tensor)}
    packed = pack_all({name: linear.weight for name, linear in linears.items()}, cache)
    for name, linear in linears.items():
        linear.weight = packed[name]
