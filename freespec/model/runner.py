"""ModelRunner: the target model's forward pass over a preallocated KV cache with tree attention.

One code path serves prefill, plain decoding (a tree of one node) and tree verification, so a
token's logits and cache rows do not depend on which mode produced them, and the rows of an
earlier request can serve a later one that starts with the same tokens (:meth:`ModelRunner.reuse`).
The matmuls go through the batch-invariant kernels in :mod:`freespec.kernels`; rotary tables,
activations, LayerNorms and the RMSNorm weights and epsilons are the Hugging Face model's own,
so no model file is forked. What is replaced is the orchestration: a static cache with a length
pointer (commit = gather of the kept rows), fused QKV and gate/up weights, and an explicit tree
mask. The passes of Llama-style models run as one C call each
(:class:`freespec.kernels.FusedDecoder`), and weights that are exact 4/8-bit blocks (GGUF
Q4_1/Q8_0 files) are streamed in that form.

Supported families: Llama-style decoders (llama, mistral, qwen2, qwen3) and GPT-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from freespec.kernels import (
    FusedDecoder,
    LlamaLayer,
    RMSNorm,
    TreeAttention,
    kernel_available,
    linear,
)
from freespec.model.quant import PackedWeight, pack_all

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + GPT2_STYLE
PREFILL_CHUNK = 512
SKIPPED = -1  # the token recorded for a cache row written by a pass that skipped layers
PREFILL_SCRATCH = 1 << 24  # attention scores (floats) one prefill chunk may hold: 64 MB


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5]), common_prefix(np.array([1]), np.array([1, 2]))
    (2, 1)
    """
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class UnsupportedModelError(ValueError):
    pass


class PrefillCancelled(Exception):
    """A prefill's ``should_stop`` said stop (a server's client left); the chunks run so far stay committed."""


def _contiguous(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).contiguous()


def _fused(modules: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases, if any) of linear layers that read the same input."""
    weight = _contiguous(torch.cat([m.weight for m in modules]))
    if all(m.bias is None for m in modules):
        return weight, None
    biases = [m.bias if m.bias is not None else torch.zeros(m.weight.shape[0]) for m in modules]
    return weight, _contiguous(torch.cat(biases))


def _rms_norm(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm module as one fused op (its eager version is seven small ops)."""
    return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Forward passes of a causal LM over a KV cache, with tree masks and cache compaction.

    Protocol: ``forward(tokens, positions, tree_mask)`` writes the new tokens' keys/values after
    the committed prefix and returns their final hidden states; ``commit(kept)`` then keeps the
    rows of the nodes in ``kept`` (in that order) and drops the rest.
    """

    def __init__(self, hf_model: torch.nn.Module, packed_cache: Path | None = None, pack: bool = True):
        """``pack``: stream weights that are exact 4/8-bit blocks (e.g. from GGUF) in that form,
        cached in ``packed_cache``; results are bit-identical either way (see :mod:`freespec.model.quant`)."""
        config = hf_model.config
        self.family = config.model_type
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        self.config = config
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            # Within the window, sliding attention equals full attention: stay there.
            self.max_positions = min(self.max_positions, int(window))
        self._embed = _contiguous(hf_model.get_input_embeddings().weight)
        self._lm_head = _contiguous(hf_model.get_output_embeddings().weight)
        self._lm_head_bias = getattr(hf_model.get_output_embeddings(), "bias", None)
        if self.family in LLAMA_STYLE:
            self._init_llama(hf_model)
        else:
            self._init_gpt2(hf_model)
        self.num_layers = len(self._layers)
        self.weight_formats: list[str] = ["fp32"]
        if pack:
            self._pack_weights(packed_cache)
        self._decoder = self._fused_decoder()
        self.length = 0  # committed cache rows
        self._keys = torch.empty(0)
        self._values = torch.empty(0)
        self._row_tokens: list[int] = []  # the token of each committed row; SKIPPED: not reusable
        self._forwarded: list[int] = []  # the last forward's tokens, as commit would record them

    # -- weights ---------------------------------------------------------------------------------

    def _init_llama(self, hf_model) -> None:
        config = self.config
        inner = hf_model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self._rotary = inner.rotary_emb
        self._cos_table = self._sin_table = torch.empty(0, self.head_dim)
        self._final_norm = inner.norm
        self._act = ACT2FN[config.hidden_act]
        self._layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
            qkv_w, qkv_b = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_w, gate_up_b = _fused([mlp.gate_proj, mlp.up_proj])
            self._layers.append(
                dict(
                    attn_norm=layer.input_layernorm,
                    mlp_norm=layer.post_attention_layernorm,
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    qkv=qkv_w, qkv_bias=qkv_b,
                    o=_contiguous(attn.o_proj.weight), o_bias=attn.o_proj.bias,
                    gate_up=gate_up_w, gate_up_bias=gate_up_b,
                    down=_contiguous(mlp.down_proj.weight), down_bias=mlp.down_proj.bias,
                )
            )

    def _init_gpt2(self, hf_model) -> None:
        config = self.config
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
            raise UnsupportedModelError("GPT-2 variants with per-layer attention scaling are not supported")
        inner = hf_model.transformer
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scale = self.head_dim**-0.5
        self._positions = _contiguous(inner.wpe.weight)
        self._final_norm = inner.ln_f
        self._act = ACT2FN[config.activation_function]
        self._layers = []
        for block in inner.h:
            # GPT-2's Conv1D stores weights as [in, out]; the kernel wants [out, in].
            self._layers.append(
                dict(
                    attn_norm=block.ln_1, mlp_norm=block.ln_2,
                    qkv=_contiguous(block.attn.c_attn.weight.t()), qkv_bias=block.attn.c_attn.bias.detach(),
                    o=_contiguous(block.attn.c_proj.weight.t()), o_bias=block.attn.c_proj.bias.detach(),
                    up=_contiguous(block.mlp.c_fc.weight.t()), up_bias=block.mlp.c_fc.bias.detach(),
                    down=_contiguous(block.mlp.c_proj.weight.t()), down_bias=block.mlp.c_proj.bias.detach(),
                )
            )

    def _pack_weights(self, cache: Path | None) -> None:
        matrices = {"lm_head": self._lm_head}
        for index, layer in enumerate(self._layers):
            for key in ("qkv", "o", "gate_up", "up", "down"):
                if key in layer:
                    matrices[f"{index}.{key}"] = layer[key]
        packed = pack_all(matrices, cache)
        self._lm_head = packed.pop("lm_head")
        for name, weight in packed.items():
            index, key = name.split(".")
            self._layers[int(index)][key] = weight
        every = [self._lm_head, *packed.values()]
        self.weight_formats = sorted({w.kind if isinstance(w, PackedWeight) else "fp32" for w in every})

    def _fused_decoder(self) -> FusedDecoder | None:
        """The one-call C decoder for Llama-style models with SiLU MLPs, where kernels exist."""
        if self.family not in LLAMA_STYLE or self.config.hidden_act != "silu" or not kernel_available():
            return None
        if any(w["o_bias"] is not None or w["gate_up_bias"] is not None or w["down_bias"] is not None
               for w in self._layers):
            return None  # only QKV biases (Qwen2) are fused

        def norm(module):
            return None if module is None else RMSNorm(module.weight, float(module.variance_epsilon))

        layers = [
            LlamaLayer(norm(w["attn_norm"]), norm(w["mlp_norm"]), norm(w["q_norm"]), norm(w["k_norm"]), w["qkv"],
                       w["qkv_bias"], w["o"], w["gate_up"], w["down"])
            for w in self._layers
        ]
        final_norm = RMSNorm(self._final_norm.weight, float(self._final_norm.variance_epsilon))
        return FusedDecoder(layers, self._embed, final_norm, self.num_heads, self.num_kv_heads, self.head_dim,
                            self.scale)

    # -- cache -----------------------------------------------------------------------------------

    def reset(self, capacity: int) -> None:
        """Empty the cache and make sure it holds ``capacity`` positions."""
        if capacity > self.max_positions:
            raise ValueError(f"{capacity} positions exceed the model's context of {self.max_positions}")
        if self.capacity < capacity:
            rounded = min(self.max_positions, -(-capacity // 256) * 256)
            shape = (self.num_layers, self.num_kv_heads, rounded, self.head_dim)
            self._keys, self._values = torch.zeros(shape), torch.zeros(shape)
        self.length = 0
        self._row_tokens = []

    def reuse(self, tokens: Sequence[int], capacity: int) -> int:
        """Keep the committed rows of the longest prefix of ``tokens`` the cache already holds,
        drop the rest, make sure the cache holds ``capacity`` positions; return the rows kept.

        A row depends only on the tokens up to it (every pass is batch-invariant, prefill
        included), so a kept row is bit-identical to the one a fresh prefill would write: what
        came before never changes a request's output. Rows of passes that skipped layers are
        never kept. Without the kernels nothing is kept (torch's kernels are not batch-invariant).
        """
        if not kernel_available():
            self.truncate(0)
        kept = self.keep_prefix(tokens)
        self.reserve(capacity)
        return kept

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the committed rows after the longest prefix of ``tokens`` they hold; return how
        many rows are left."""
        kept = common_prefix(self._row_tokens, tokens)
        self.truncate(kept)
        return kept

    @property
    def capacity(self) -> int:
        return self._keys.shape[2] if self._keys.dim() == 4 else 0

    def reserve(self, capacity: int) -> None:
        """Make sure the cache holds ``capacity`` positions, keeping the committed rows (a draft
        model's cache grows with the request instead of being sized for the longest one)."""
        if capacity <= self.capacity:
            return
        keys, values, length, row_tokens = self._keys, self._values, self.length, self._row_tokens
        self.reset(capacity)
        if length:
            self._keys[:, :, :length] = keys[:, :, :length]
            self._values[:, :, :length] = values[:, :, :length]
        self.length, self._row_tokens = length, row_tokens

    def truncate(self, length: int) -> None:
        """Drop the committed rows from ``length`` on: rows a drafter committed while drafting
        (e.g. with skipped layers) are rolled back before verification overwrites them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate the cache to {length} rows: it holds {self.length}")
        self.length = length
        del self._row_tokens[length:]

    def commit(self, kept: Sequence[int]) -> None:
        """Keep the cache rows of the last forward's nodes ``kept`` (ascending), drop the others."""
        start, count = self.length, len(kept)
        if list(kept) != list(range(count)):
            source = torch.as_tensor(kept, dtype=torch.long) + start
            self._keys[:, :, start : start + count] = self._keys[:, :, source]
            self._values[:, :, start : start + count] = self._values[:, :, source]
        self.length += count
        self._row_tokens += [self._forwarded[node] for node in kept]

    # -- forward ---------------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run and commit a prompt (causally, in chunks); return its final hidden states [n, hidden].

        The same batch-invariant pass as decoding, so the rows do not depend on the chunks. A
        chunk holds up to PREFILL_CHUNK tokens, fewer deep in a long context, where its attention
        scores (tokens x heads x keys) would outgrow PREFILL_SCRATCH. ``should_stop`` is asked
        before each chunk; True raises :class:`PrefillCancelled`.
        """
        hidden, start = [], 0
        while start < tokens.shape[0]:
            if should_stop is not None and should_stop():
                raise PrefillCancelled(f"prefill stopped after {start} of {tokens.shape[0]} tokens")
            size = max(1, min(PREFILL_CHUNK, PREFILL_SCRATCH // (self.num_heads * (self.length + PREFILL_CHUNK))))
            chunk = tokens[start : start + size]
            n = chunk.shape[0]
            positions = torch.arange(self.length, self.length + n)
            hidden.append(self._run(chunk, positions, torch.ones(n, n, dtype=torch.bool).tril_()))
            self.commit(range(n))
            start += n
        return torch.cat(hidden) if hidden else torch.empty(0, self._embed.shape[1])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final hidden states [q, hidden] for ``tokens`` [q] at ``positions`` [q].

        ``tree_mask`` [q, q] (bool, True = attend) says which new tokens each new token sees; all
        of them see the whole committed prefix. Their keys/values are written after the prefix.
        A token's result is bit-identical for any tree it sits in (see :mod:`freespec.kernels`).

        ``skip``: decoder layers to leave out (a cheaper draft of the same model, as SWIFT drafts):
        the hidden state passes them unchanged and their cache rows are not written, so such rows
        are only good for further skipping passes; :meth:`truncate` drops them before verification.
        """
        n = tokens.shape[0]
        if tokens.ndim != 1 or n == 0 or positions.shape != (n,) or tree_mask.shape != (n, n):
            raise ValueError(f"forward needs tokens [q], positions [q] and a tree mask [q, q] with q >= 1; got "
                             f"{list(tokens.shape)}, {list(positions.shape)} and {list(tree_mask.shape)}")
        bad = [index for index in skip if not 0 <= index < self.num_layers]
        if bad:
            raise ValueError(f"cannot skip layers {sorted(bad)}: the model has layers 0..{self.num_layers - 1}")
        return self._run(tokens, positions, tree_mask, skip=frozenset(skip))

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
             skip: frozenset[int] = frozenset()) -> torch.Tensor:
        end = self.length + tokens.shape[0]
        if end > self.capacity:
            raise ValueError(f"cache overflow: {end} rows needed, capacity {self.capacity}")
        self._forwarded = [SKIPPED] * len(tokens) if skip else tokens.tolist()
        # the dtypes every path reads (the C decoder by pointer): any integer ids, any mask
        tokens, positions, tree_mask = tokens.to(torch.int64), positions.to(torch.int64), tree_mask.to(torch.bool)
        with torch.inference_mode():
            if self._decoder is not None:
                cos_table, sin_table, rope_rows = self._rotary_rows(positions)
                return self._decoder(tokens, self._keys, self._values, self.length, tree_mask, cos_table, sin_table,
                                     rope_rows, skip)
            cos = sin = None
            if self.family in LLAMA_STYLE:
                cos_table, sin_table, rope_rows = self._rotary_rows(positions)
                cos, sin = cos_table[rope_rows], sin_table[rope_rows]
            if kernel_available():
                attention = TreeAttention(self.length, tree_mask, self.num_heads, self.num_kv_heads, self.head_dim,
                                          self.scale, cos, sin)
            else:
                attention = self._sdpa(tree_mask, cos, sin)
            if self.family in LLAMA_STYLE:
                return self._forward_llama(tokens, attention, skip)
            return self._forward_gpt2(tokens, positions, attention, skip)

    def embedding_probe(self) -> list[float]:
        """A few embedding values: tells models of the same shape apart in cache keys."""
        return self._embed[:4, :8].flatten().tolist()

    def _rotary_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos table, sin table, rows): token i's rotary (cos, sin) [head_dim] are row ``rows[i]``
        of the tables. Tables computed once by the model's own rotary module, so a position's
        values never depend on the other positions in the pass."""
        if "dynamic" in str(getattr(self._rotary, "rope_type", "")):  # tables change with length
            cos, sin = self._rotary(self._embed[:1], positions.unsqueeze(0))
            return cos[0].contiguous(), sin[0].contiguous(), torch.arange(len(positions))
        end = int(positions.max()) + 1
        if self._cos_table.shape[0] < end:
            size = min(self.max_positions, max(end, 2 * self._cos_table.shape[0], 1024))
            cos, sin = self._rotary(self._embed[:1], torch.arange(size).unsqueeze(0))
            self._cos_table, self._sin_table = cos[0].contiguous(), sin[0].contiguous()
        return self._cos_table, self._sin_table, positions

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, hidden] → [q, vocab] fp32 logits."""
        with torch.inference_mode():
            return linear(hidden, self._lm_head, self._lm_head_bias)

    def _sdpa(self, tree_mask: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        """torch's rotary, cache writes and attention, where the kernels are not built (not
        batch-invariant). Same contract as :class:`freespec.kernels.TreeAttention`."""
        n, start = tree_mask.shape[0], self.length
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        mask = torch.cat([torch.ones(n, start, dtype=torch.bool), tree_mask], dim=1)
        if cos is not None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [n, 1, head_dim]

        def attend(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            qk, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads + kv_heads, kv_heads], dim=1)
            if cos is not None:
                qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split([heads, kv_heads], dim=1)
            keys[:, start : start + n] = k.transpose(0, 1)
            values[:, start : start + n] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys[:, : start + n].unsqueeze(0), values[:, : start + n].unsqueeze(0),
                attn_mask=mask, scale=self.scale, enable_gqa=kv_heads != heads,
            )  # [1, heads, n, head_dim]
            return out[0].transpose(0, 1).reshape(n, heads * dim)

        return attend

    def _forward_llama(self, tokens, attention, skip) -> torch.Tensor:
        h = self._embed[tokens]  # [n, hidden]
        for index, w in enumerate(self._layers):
            if index in skip:
                continue
            qkv = linear(_rms_norm(h, w["attn_norm"]), w["qkv"], w["qkv_bias"])  # [n, (heads + 2 kv_heads) head_dim]
            if w["q_norm"] is not None:
                qkv = self._norm_queries_and_keys(qkv, w)
            h = h + linear(attention(qkv, self._keys[index], self._values[index]), w["o"], w["o_bias"])
            gate, up = linear(_rms_norm(h, w["mlp_norm"]), w["gate_up"], w["gate_up_bias"]).chunk(2, dim=-1)
            h = h + linear(self._act(gate) * up, w["down"], w["down_bias"])
        return _rms_norm(h, self._final_norm)

    def _norm_queries_and_keys(self, qkv: torch.Tensor, w: dict) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of queries and keys, before the rotary embedding."""
        n, heads, kv_heads, dim = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
        return torch.cat([_rms_norm(q, w["q_norm"]), _rms_norm(k, w["k_norm"]), v], dim=1).view(n, -1)

    def _forward_gpt2(self, tokens, positions, attention, skip) -> torch.Tensor:
        h = self._embed[tokens] + self._positions[positions]
        for index, w in enumerate(self._layers):
            if index in skip:
                continue
            qkv = linear(w["attn_norm"](h), w["qkv"], w["qkv_bias"])
            h = h + linear(attention(qkv, self._keys[index], self._values[index]), w["o"], w["o_bias"])
            h = h + linear(self._act(linear(w["mlp_norm"](h), w["up"], w["up_bias"])), w["down"], w["down_bias"])
        return self._final_norm(h)
