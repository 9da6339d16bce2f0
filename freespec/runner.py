"""ModelRunner: the target model's forward pass over a preallocated KV cache with tree attention.

One code path serves prefill, plain decoding (a tree of one node) and tree verification, so a
token's logits do not depend on which mode produced them. The matmuls go through the
batch-invariant kernel in :mod:`freespec.kernels`; norms, rotary embeddings and activations are
the Hugging Face model's own modules, so no model file is forked. What is replaced is the
orchestration: a static cache with a length pointer (commit = gather of the kept rows), fused
QKV and gate/up weights, and an explicit tree mask.

Supported families: Llama-style decoders (llama, mistral, qwen2, qwen3) and GPT-2.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from freespec.kernels import kernel_available, linear, tree_attention

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + GPT2_STYLE
PREFILL_CHUNK = 512


class UnsupportedModelError(ValueError):
    pass


def _contiguous(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).contiguous()


def _fused(modules: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases, if any) of linear layers that read the same input."""
    weight = _contiguous(torch.cat([m.weight for m in modules]))
    if all(m.bias is None for m in modules):
        return weight, None
    biases = [m.bias if m.bias is not None else torch.zeros(m.weight.shape[0]) for m in modules]
    return weight, _contiguous(torch.cat(biases))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Forward passes of a causal LM over a KV cache, with tree masks and cache compaction.

    Protocol: ``forward(tokens, positions, tree_mask)`` writes the new tokens' keys/values after
    the committed prefix and returns their final hidden states; ``commit(kept)`` then keeps the
    rows of the nodes in ``kept`` (in that order) and drops the rest.
    """

    def __init__(self, hf_model: torch.nn.Module):
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
        self.length = 0  # committed cache rows
        self._keys = torch.empty(0)
        self._values = torch.empty(0)

    # -- weights ---------------------------------------------------------------------------------

    def _init_llama(self, hf_model) -> None:
        config = self.config
        inner = hf_model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self._rotary = inner.rotary_emb
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

    @property
    def capacity(self) -> int:
        return self._keys.shape[2] if self._keys.dim() == 4 else 0

    def commit(self, kept: Sequence[int]) -> None:
        """Keep the cache rows of the last forward's nodes ``kept`` (ascending), drop the others."""
        start, count = self.length, len(kept)
        if list(kept) != list(range(count)):
            source = torch.as_tensor(kept, dtype=torch.long) + start
            self._keys[:, :, start : start + count] = self._keys[:, :, source]
            self._values[:, :, start : start + count] = self._values[:, :, source]
        self.length += count

    # -- forward ---------------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run and commit a prompt (causally, in chunks); return its final hidden states [n, hidden].

        Uses torch's SDPA, faster than the batch-invariant attention on long sequences; plain
        and speculative decoding share the prefill, so this does not affect their equality.
        """
        hidden = []
        for start in range(0, tokens.shape[0], PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            n = chunk.shape[0]
            positions = torch.arange(self.length, self.length + n)
            hidden.append(self._run(chunk, positions, torch.ones(n, n, dtype=torch.bool).tril_(), exact=False))
            self.commit(range(n))
        return torch.cat(hidden) if hidden else torch.empty(0, self._embed.shape[1])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [q, hidden] for ``tokens`` [q] at ``positions`` [q].

        ``tree_mask`` [q, q] (bool, True = attend) says which new tokens each new token sees; all
        of them see the whole committed prefix. Their keys/values are written after the prefix.
        A token's result is bit-identical for any tree it sits in (see :mod:`freespec.kernels`).
        """
        return self._run(tokens, positions, tree_mask, exact=True)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor, exact: bool) -> torch.Tensor:
        end = self.length + tokens.shape[0]
        if end > self.capacity:
            raise ValueError(f"cache overflow: {end} rows needed, capacity {self.capacity}")
        exact = exact and kernel_available()
        with torch.inference_mode():
            if self.family in LLAMA_STYLE:
                return self._forward_llama(tokens, positions, tree_mask, exact)
            return self._forward_gpt2(tokens, positions, tree_mask, exact)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, hidden] → [q, vocab] fp32 logits."""
        with torch.inference_mode():
            return linear(hidden, self._lm_head, self._lm_head_bias)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
                exact: bool) -> torch.Tensor:
        # q: [n, heads, head_dim]; k, v: [n, kv_heads, head_dim]; tree_mask: [n, n] → [n, heads * head_dim]
        n = q.shape[0]
        start, end = self.length, self.length + n
        self._keys[layer, :, start:end] = k.transpose(0, 1)
        self._values[layer, :, start:end] = v.transpose(0, 1)
        if exact:
            out = tree_attention(q, self._keys[layer], self._values[layer], start, tree_mask, self.scale)
            return out.reshape(n, self.num_heads * self.head_dim)
        mask = torch.cat([torch.ones(n, start, dtype=torch.bool), tree_mask], dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            self._keys[layer, :, :end].unsqueeze(0),
            self._values[layer, :, :end].unsqueeze(0),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [1, heads, n, head_dim]
        return out[0].transpose(0, 1).reshape(n, self.num_heads * self.head_dim)

    def _forward_llama(self, tokens, positions, tree_mask, exact) -> torch.Tensor:
        n = tokens.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        h = self._embed[tokens]  # [n, hidden]
        cos, sin = self._rotary(h, positions.unsqueeze(0))  # [1, n, head_dim] each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [n, 1, head_dim]
        for index, w in enumerate(self._layers):
            qkv = linear(w["attn_norm"](h), w["qkv"], w["qkv_bias"])  # [n, (heads + 2 kv_heads) dim]
            q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q, k, v = q.view(n, heads, dim), k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)
            if w["q_norm"] is not None:
                q, k = w["q_norm"](q), w["k_norm"](k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            attended = self._attend(index, q, k, v, tree_mask, exact)
            h = h + linear(attended, w["o"], w["o_bias"])
            gate, up = linear(w["mlp_norm"](h), w["gate_up"], w["gate_up_bias"]).chunk(2, dim=-1)
            h = h + linear(self._act(gate) * up, w["down"], w["down_bias"])
        return self._final_norm(h)

    def _forward_gpt2(self, tokens, positions, tree_mask, exact) -> torch.Tensor:
        n = tokens.shape[0]
        heads, dim = self.num_heads, self.head_dim
        h = self._embed[tokens] + self._positions[positions]
        for index, w in enumerate(self._layers):
            qkv = linear(w["attn_norm"](h), w["qkv"], w["qkv_bias"])
            q, k, v = (t.view(n, heads, dim) for t in qkv.split(heads * dim, dim=-1))
            h = h + linear(self._attend(index, q, k, v, tree_mask, exact), w["o"], w["o_bias"])
            h = h + linear(self._act(linear(w["mlp_norm"](h), w["up"], w["up_bias"])), w["down"], w["down_bias"])
        return self._final_norm(h)
