"""The kernel backends: one object that every forward pass computes with, chosen once.

:func:`select` returns :class:`CKernels` (the C library of one build) or :class:`Kernels`
(torch's ops, the fallback); a :class:`freespec.model.runner.ModelRunner` takes one as an
argument. Both offer the same operations: ``linear`` (over any :data:`~freespec.kernels.Matrix`),
``embed`` (rows of one), ``top_k``, ``argmax``, ``attention`` (the tree attention of one layer) and
``decoder`` (all layers of a Llama-style model in one C call, None where not available).
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from freespec.kernels import abi
from freespec.kernels.build import (
    ISAS,
    TORCH,
    digest,
    load,
    requested_isa,
    supported_isas,
)
from freespec.kernels.weights import (
    DecoderLayer,
    GGMLWeight,
    Heads,
    Linear,
    Matrix,
    ModelWeights,
    PackedWeight,
    RMSNorm,
    Stacked,
    dense,
    map_matrices,
    repack,
    rotate_half_rows,
)

SKINNY_ROWS = 64  # torch: below this many rows, ``W @ x.T`` beats ``F.linear``


class PassSequence(NamedTuple):
    """One sequence of a decoder pass (a request of a batch): its own KV cache, keys and values
    [layers, kv_heads, capacity, head_dim] with ``past`` committed rows, and the tree mask [n, n]
    (bool) of its n new tokens."""

    keys: torch.Tensor
    values: torch.Tensor
    past: int
    tree_mask: torch.Tensor


Rotation = tuple[torch.Tensor, torch.Tensor]
"""The rotary embedding of one pass's tokens: cos and sin [n, head_dim], token i by row i."""


class Attention(Protocol):
    """One pass's attention (:class:`TreeAttention`, :class:`TorchAttention`), called for each layer."""

    n: int  # the new tokens it attends for

    def __call__(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rotation: Rotation | None = None,
                 window: int | None = None) -> torch.Tensor:
        """qkv [n, (heads + 2 kv_heads) dim], keys and values [kv_heads, capacity, dim] → [n, heads * dim]:
        rotates the fresh queries and keys by ``rotation`` (None: no rotary embedding), writes keys
        and values to the cache after the committed rows, and attends within ``window`` (the
        layer's sliding window; None: none)."""


def select(isa: str | None = None, *, one_call_decoder: bool = True) -> Kernels:
    """The kernels to compute with: the C build ``isa`` ("avx512" or "avx2"), torch's ops
    ("torch"), or by default the build the environment asks for (:func:`requested_isa`, read
    once). A build that cannot be compiled falls back to torch with a warning.

    ``one_call_decoder=False`` keeps Llama-style models on the per-operation C kernels (what
    other architectures use). One object per choice, built on first use.
    """
    return _select(_default_isa() if isa is None else isa, one_call_decoder)


@cache
def _default_isa() -> str:
    return requested_isa()


@cache
def _select(isa: str, one_call_decoder: bool) -> Kernels:
    if isa == TORCH:
        return Kernels()
    if isa not in ISAS:
        raise ValueError(f"unknown kernel build {isa!r}: expected one of {', '.join((*ISAS, TORCH))}")
    if isa not in supported_isas():
        raise ValueError(f"this CPU cannot run the {isa} kernels (it runs: {', '.join((*supported_isas(), TORCH))})")
    library = load(isa)
    return Kernels() if library is None else CKernels(library, isa, one_call_decoder)


class Kernels:
    """torch's ops: the fallback without a C compiler or AVX2+FMA, or when asked for.

    Not batch-invariant: verification logits may then differ from decoding logits in the last
    bits, and a near-tie may flip a greedy choice.
    """

    isa = TORCH
    version: str | None = None  # digest of the C sources and flags; None for torch
    batch_invariant = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.isa})"

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        """``weights`` in the layout this backend computes with (the same model): here the
        query and key rows of a GGUF llama file in transformers' order (torch's matmul computes
        on fp32 copies anyway, and may give a row other bits at another position)."""
        return rotate_half_rows(weights)

    def linear(self, x: torch.Tensor, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for x [M, K] and weight [N, K] (any :data:`Matrix`) → [M, N].

        Here on the weight's fp32 form, which a quantized weight keeps once made."""
        weight = dense(weight)
        if x.shape[0] < SKINNY_ROWS:
            out = torch.mm(weight, x.t()).t()  # far faster than F.linear's kernel choice for few rows
        else:
            out = torch.mm(x, weight.t())
        return out if bias is None else out + bias

    def embed(self, matrix: Matrix, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``tokens`` (int64 [n]) of ``matrix`` [vocab, hidden] in fp32 → [n, hidden]: an
        embedding lookup, with the values ggml's formulas give for a quantized table."""
        _check_rows(matrix, tokens)
        return dense(matrix)[tokens]

    def top_k(self, logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values [n, k] descending, ids [n, k], logsumexp [n]) of logits [n, V], as numpy arrays
        (their readers, the engine's steps, work in numpy).

        ``ids[:, 0]`` is the first maximum of each row, as ``torch.argmax`` gives it.
        """
        values, ids = torch.topk(logits, k, dim=-1)
        return values.numpy(), ids.numpy(), torch.logsumexp(logits, dim=-1).numpy()

    def argmax(self, logits: torch.Tensor) -> np.ndarray:
        """[n, V] → [n] int64 first index of each row's maximum (numpy)."""
        return torch.argmax(logits, dim=-1).numpy()

    def attention(self, past: int, tree_mask: torch.Tensor, heads: Heads,
                  positions: torch.Tensor | None = None) -> Attention:
        """The attention of the n new tokens of one pass, for every layer of it: they see the
        ``past`` committed rows and the new tokens ``tree_mask`` [n, n] (bool) allows, within a
        layer's sliding window of their ``positions`` [n] (int64; committed row t holds position t)."""
        return TorchAttention(past, tree_mask, heads, positions)

    def decoder(self, weights: ModelWeights) -> OneCallDecoder | None:
        """All layers of ``weights`` in one C call, or None (torch has none)."""
        return None


class CKernels(Kernels):
    """The C kernels of one build (see :mod:`freespec.kernels`): batch-invariant."""

    batch_invariant = True

    def __init__(self, library: ctypes.CDLL, isa: str, one_call_decoder: bool = True):
        self.library, self.isa, self.version = library, isa, digest(isa)
        self.one_call_decoder = one_call_decoder

    def __repr__(self) -> str:
        return f"CKernels({self.isa}{'' if self.one_call_decoder else ', per operation'})"

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        """AVX2: Q4_1 and Q8_0 matrices re-packed for faster decoding
        (:func:`~freespec.kernels.weights.repack`). AVX-512 reads them where they lie: there the
        kernels on GGUF's own blocks are as fast or faster (streaming, one thread on Zen 5:
        Q4_1 1.11x, Q8_0 1.03x the packed ones over SmolLM2's and a 1B model's shapes,
        ``benchmarks/format_kernels.py --table packed``), and the model takes no copy (+6% of a
        Q8_0 file's bytes) nor the time to make it."""
        return weights if self.isa == "avx512" else map_matrices(weights, repack)

    def linear(self, x: torch.Tensor, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
        """With any M, every row's result is the same bits, and every kind of weight gives the
        bits of the fp32 kernel on its dequantized form while reading only its own bytes."""
        x = x.contiguous()
        rows, (outputs, inputs) = x.shape[0], weight.shape
        x_address = abi.address("linear input", x, torch.float32, (rows, inputs))
        matrix = MatrixStruct("weight", weight, bias)
        out = torch.empty(rows, outputs)
        status = self.library.freespec_linear(matrix.pointer, x_address,
                                              abi.address("linear output", out, torch.float32, (rows, outputs)), rows)
        abi.check_status(status, "linear layer")
        return out

    def embed(self, matrix: Matrix, tokens: torch.Tensor) -> torch.Tensor:
        """Decodes only the rows asked for (a block-quantized table is never dequantized whole)."""
        _check_rows(matrix, tokens)
        tokens = tokens.contiguous()
        n, (_, hidden) = tokens.shape[0], matrix.shape
        out = torch.empty(n, hidden)
        status = self.library.freespec_rows(MatrixStruct("embedding", matrix).pointer,
                                            abi.address("tokens", tokens, torch.int64, (n,)), n,
                                            abi.address("embeddings", out, torch.float32, (n, hidden)))
        abi.check_status(status, "embedding lookup")
        return out

    def top_k(self, logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """In one pass over each row."""
        if k > logits.shape[-1]:
            return super().top_k(logits, k)  # torch names the error
        return self._top_k(logits, k, normalize=True)

    def argmax(self, logits: torch.Tensor) -> np.ndarray:
        return self._top_k(logits, 1, normalize=False)[1].reshape(-1)

    def _top_k(self, logits: torch.Tensor | np.ndarray, k: int, normalize: bool):
        """Outputs in numpy arrays made here (so of the right type and shape): every decoding step
        calls this after a pass, when each torch call costs ~10-25 µs. ``logits`` may be a numpy
        array (the one-call decoder's, :meth:`OneCallDecoder.head_logits`)."""
        rows, vocab = logits.shape
        if isinstance(logits, np.ndarray):
            address = abi.array_address("logits", logits, np.float32, (rows, vocab))
        else:
            address = abi.address("logits", logits.contiguous(), torch.float32, (rows, vocab))
        values, ids = np.empty((rows, k), dtype=np.float32), np.empty((rows, k), dtype=np.int64)
        normalizer = np.empty(rows, dtype=np.float32) if normalize else None
        self.library.freespec_top_k(address, rows, vocab, k, values.ctypes.data, ids.ctypes.data,
                                    None if normalizer is None else normalizer.ctypes.data)
        return values, ids, normalizer

    def attention(self, past: int, tree_mask: torch.Tensor, heads: Heads,
                  positions: torch.Tensor | None = None) -> Attention:
        """Batch-invariant: each query reduces over its keys in logical order (prefix, ancestors, self)."""
        return TreeAttention(self.library, past, tree_mask, heads, positions)

    def decoder(self, weights: ModelWeights) -> OneCallDecoder | None:
        """For Llama- and Gemma-style models (:meth:`OneCallDecoder.runs`), unless this backend was
        selected without the one-call decoder."""
        if not self.one_call_decoder or not OneCallDecoder.runs(weights):
            return None
        return OneCallDecoder(self.library, weights, self.isa)


def _check_rows(matrix: Matrix, tokens: torch.Tensor) -> None:
    """Token ids index the rows of ``matrix``: an id outside them is refused, not read."""
    if tokens.dtype != torch.int64 or tokens.dim() != 1:
        raise ValueError(f"token ids must be int64 [n], got {tokens.dtype} of shape {list(tokens.shape)}")
    vocab = matrix.shape[0]
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab):
        raise ValueError(f"token ids must lie in 0 .. {vocab - 1}, got {int(tokens.min())} .. {int(tokens.max())}")


class MatrixStruct:
    """The C description (``abi.Matrix``) of a weight matrix and its bias, built after the guard
    has checked every array it points to; it keeps what it points to alive while it lives."""

    def __init__(self, name: str, weight: Matrix, bias: torch.Tensor | None = None):
        rows, columns = weight.shape
        self.struct = abi.Matrix(N=rows, K=columns)
        self._keep: list = [weight, bias]
        if bias is not None:
            self.struct.bias = abi.address(f"{name} bias", bias, torch.float32, (rows,))
        if isinstance(weight, Stacked):
            parts = [MatrixStruct(f"{name} part {index}", part) for index, part in enumerate(weight.parts)]
            array = (abi.Matrix * len(parts))(*(part.struct for part in parts))
            self._keep += [parts, array]
            self.struct.kind, self.struct.parts, self.struct.num_parts = abi.STACKED, array, len(parts)
        elif isinstance(weight, GGMLWeight):  # checked when made: its bytes hold exactly its rows
            self.struct.kind, self.struct.data = int(weight.type), weight.data.ctypes.data
        elif isinstance(weight, PackedWeight):
            q4 = weight.kind == "q4"
            self.struct.kind = abi.PACKED_Q4 if q4 else abi.PACKED_Q8
            self.struct.data = abi.address(f"{name} {weight.kind} codes", weight.codes,
                                           torch.uint8 if q4 else torch.int8, (rows, columns // 2 if q4 else columns))
            self.struct.scales = abi.address(f"{name} {weight.kind} scales", weight.scales, torch.float32,
                                             (rows, columns // 32, 2) if q4 else (rows, columns // 32))
        else:
            self.struct.kind, self.struct.data = 0, abi.address(name, weight, torch.float32, (rows, columns))

    @property
    def pointer(self):
        return ctypes.byref(self.struct)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchAttention:
    """torch's rotary, cache writes and scaled-dot-product attention (not batch-invariant)."""

    def __init__(self, past: int, tree_mask: torch.Tensor, heads: Heads, positions: torch.Tensor | None = None):
        n = tree_mask.shape[0]
        self.past, self.n, self.heads, self.positions = past, n, heads, positions
        self._masks = {None: torch.cat([torch.ones(n, past, dtype=torch.bool), tree_mask], dim=1)}  # [n, past + n]

    def _mask(self, window: int | None) -> torch.Tensor:
        """[n, past + n] True where a new token sees a key: the tree's mask, within ``window``."""
        if window not in self._masks:
            if self.positions is None:
                raise ValueError("a sliding window needs the tokens' positions")
            keys = torch.cat([torch.arange(self.past), self.positions])  # [past + n] each key's position
            self._masks[window] = self._masks[None] & (self.positions[:, None] - keys[None, :] < window)
        return self._masks[window]

    def __call__(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 rotation: Rotation | None = None, window: int | None = None) -> torch.Tensor:
        n, start, h = self.n, self.past, self.heads
        qk, v = qkv.view(n, h.heads + 2 * h.kv_heads, h.dim).split([h.heads + h.kv_heads, h.kv_heads], dim=1)
        if rotation is not None:
            cos, sin = (part.unsqueeze(1) for part in rotation)  # [n, 1, dim]: broadcast over heads
            qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk.split([h.heads, h.kv_heads], dim=1)
        keys[:, start : start + n] = k.transpose(0, 1)
        values[:, start : start + n] = v.transpose(0, 1)
        q, mask = q.transpose(0, 1), self._mask(window)  # [heads, n, dim]
        seen_keys, seen_values = keys[:, : start + n], values[:, : start + n]  # [kv_heads, past + n, dim]
        if h.softcap is None:
            out = F.scaled_dot_product_attention(q.unsqueeze(0), seen_keys.unsqueeze(0), seen_values.unsqueeze(0),
                                                 attn_mask=mask, scale=h.scale, enable_gqa=h.kv_heads != h.heads)[0]
        else:  # SDPA cannot cap scores
            group = h.heads // h.kv_heads
            scores = q @ seen_keys.repeat_interleave(group, dim=0).transpose(1, 2) * h.scale  # [heads, n, past + n]
            scores = torch.tanh(scores / h.softcap) * h.softcap
            out = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ seen_values.repeat_interleave(group, 0)
        return out.transpose(0, 1).reshape(n, h.heads * h.dim)  # out: [heads, n, dim]


class TreeAttention:
    """Batch-invariant attention of n new tokens over the KV cache, in C.

    Built once per forward pass: the tree layout (computed in C: :c:func:`freespec_tree_layout`),
    the positions and the scratch buffers are shared by all layers; each layer brings its own
    rotation and window.
    """

    def __init__(self, library: ctypes.CDLL, past: int, tree_mask: torch.Tensor, heads: Heads,
                 positions: torch.Tensor | None = None):
        self._library = library
        n = tree_mask.shape[0]
        self.past, self.n, self.heads = past, n, heads
        h = heads
        mask = tree_mask.contiguous()
        # buffers and tables the C code reads for every layer, kept alive with their addresses
        self._nodes, self._count = torch.empty(n, n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        self._nodes_address = abi.address("key nodes", self._nodes, torch.int64, (n, n))
        self._count_address = abi.address("key counts", self._count, torch.int64, (n,))
        # a causal chain (a prefill chunk): the kernel may let its rows join the shared prefix
        self._causal = library.freespec_tree_layout(abi.address("tree mask", mask, torch.bool, (n, n)), n,
                                                    self._nodes_address, self._count_address)
        self._positions = None if positions is None else positions.contiguous()
        self._positions_address = (None if positions is None
                                    else abi.address("positions", self._positions, torch.int64, (n,)))
        group_rows = n * (h.heads // h.kv_heads)
        self._queries, self._probs = torch.empty(h.kv_heads, group_rows, h.dim), torch.empty(h.heads * n, past + n)
        self._queries_address = abi.address("queries", self._queries, torch.float32, (h.kv_heads, group_rows, h.dim))
        self._probs_address = abi.address("scores", self._probs, torch.float32, (h.heads * n, past + n))

    def __call__(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 rotation: Rotation | None = None, window: int | None = None) -> torch.Tensor:
        """qkv: [n, (heads + 2 kv_heads) dim]; keys, values: [kv_heads, capacity, dim]. → [n, heads * dim]."""
        n, h, past = self.n, self.heads, self.past
        if window is not None and self._positions_address is None:
            raise ValueError("a sliding window needs the tokens' positions")
        qkv = qkv.contiguous()
        capacity = keys.shape[1]
        if past + n > capacity:
            raise ValueError(f"cache overflow: {past + n} rows needed, capacity {capacity}")
        cache_shape = (h.kv_heads, capacity, h.dim)
        keys_address = abi.address("keys", keys, torch.float32, cache_shape)
        values_address = abi.address("values", values, torch.float32, cache_shape)
        cos, sin = (None, None) if rotation is None else rotation
        self._library.freespec_rope_store(
            abi.address("qkv", qkv, torch.float32, (n, (h.heads + 2 * h.kv_heads) * h.dim)),
            None if cos is None else abi.address("cos", cos, torch.float32, (n, h.dim)),
            None if sin is None else abi.address("sin", sin, torch.float32, (n, h.dim)),
            keys_address, values_address, capacity, past, n, h.heads, h.kv_heads, h.dim, self._queries_address)
        out = torch.empty(n, h.heads * h.dim)
        self._library.freespec_window_attention(
            self._queries_address, keys_address, values_address, capacity, self._nodes_address,
            self._count_address, past, n, h.heads, h.kv_heads, h.dim, h.scale, self._causal,
            self._positions_address, window or 0, h.softcap or 0.0,
            abi.address("attention output", out, torch.float32, (n, h.heads * h.dim)), self._probs_address)
        return out


CODED_HEAD_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
"""Heads whose own values the greedy head does not read: it makes int8 codes of them at first use
(``freespec_head_codes``: 1.125 bytes a weight, under HEAD_CODES_MAX_BYTES)."""

HEAD_CODES_MAX_BYTES = 320 << 20
"""The most memory a head's int8 codes may take (a 128,256 x 2048 head's: 296 MB); a larger 16- or
32-bit head runs whole."""

Q8_HEAD_ROWS = 16
"""The most rows a pass may have for the greedy head over a Q8_0 head (GGUF blocks or packed):
measured in :func:`greedy_head_rows`."""

CODED_HEAD_ROWS = 16
"""The most rows a pass may have for the greedy head over a head's int8 codes: it still wins at 16
(Zen 4 VM, BF16 heads, whole / greedy ms at 16 rows: 49,152 x 576 8.0-9.2 / 5.7-6.2, AVX2 build
8.6-8.8 / 5.4; 128,256 x 2048 63.8-64.2 / 47.8-48.5)."""


def coded_head(head: Matrix) -> bool:
    """Whether the greedy head reads ``head`` through int8 codes made of it (fp32, F16, BF16)."""
    if isinstance(head, GGMLWeight):
        coded = head.type in CODED_HEAD_TYPES
    else:
        coded = isinstance(head, torch.Tensor)
    rows, columns = head.shape
    return coded and columns % 32 == 0 and rows * columns * 9 // 8 <= HEAD_CODES_MAX_BYTES


def greedy_head_rows(head: Matrix, isa: str) -> int:
    """The most rows a pass may have for the exact greedy head (``freespec_head_argmax``) to
    replace the whole head over ``head``; 0 where it does not read such a head (Q8_0 GGUF blocks or
    packed, Q6_K blocks, and the int8 codes it makes of 16- and 32-bit heads: :func:`coded_head`).

    Both heads cost more with every row (the greedy head's integer products, the whole head's FMAs
    on each decoded weight), and the whole head's tiles share each decoded weight among several
    rows. Zen 4 VM, real hidden states (benchmarks/head_speed.py), whole / greedy ms, AVX-512
    build: Gemma-3-270M's Q8_0 head 10.0 / 6.3 at one row, 10.8 / 9.7 at four, 38.4 / 33.6 at
    sixteen, 51.4 / 51.9 at 24; SmolLM2-135M's 1.20 / 0.82, 1.65 / 1.57, 6.58 / 5.87, 8.72 / 8.90
    (the AVX2 build's packed heads gain more: 19.0 / 9.1 at four rows on Gemma's). A Q6_K head
    (49,152 x 1536, a 1.5B Q4_K_M file's): 2.8-3.1 / 2.3-2.4 at one row, even at four, 8.6 / 10.8
    at eight in the AVX-512 build, whose fp32 decoding of Q6_K is the faster; AVX2 build 3.6-4.1 /
    2.3-2.5, 6.3 / 4.0-4.6 at four, 13.8-14.5 / 9.4-11.0 at eight. Coded heads: CODED_HEAD_ROWS."""
    if isinstance(head, PackedWeight):
        return Q8_HEAD_ROWS if head.kind == "q8" else 0
    if coded_head(head):
        return CODED_HEAD_ROWS
    if not isinstance(head, GGMLWeight):
        return 0
    if head.type == GGMLQuantizationType.Q8_0:
        return Q8_HEAD_ROWS
    if head.type == GGMLQuantizationType.Q6_K:
        return 4 if isa == "avx512" else 16
    return 0


class OneCallDecoder:
    """All decoder layers of a Llama- or Gemma-style model (RMSNorms, gated MLP) in one C call.

    Same arithmetic for every row whatever the number of rows, like the other kernels, and
    with no per-operation call overhead: the embedding lookup, norms, rotary, cache writes,
    attention, residuals, the activation and the final norm all run in C between the matmuls
    (a torch call between two passes costs several times its warm price: the pass has just
    streamed the weights through the caches). Every matrix may be of any kind (:data:`Matrix`),
    the embedding table included. Every weight's dtype and shape is checked once here; each call
    checks the pass's own arrays.
    """

    ACTIVATIONS = {"silu": abi.SILU, "gelu_pytorch_tanh": abi.GELU_TANH}  # transformers' name → the C decoder's

    @staticmethod
    def runs(weights: ModelWeights) -> bool:
        """Whether the C decoder computes this model: rotary positions (at most two tables),
        RMSNorms, SiLU- or GELU(tanh)-gated MLPs, no biases except on the QKV projection (Qwen2);
        Gemma's and Mistral's additions too (embedding scale, post-norms, QK-norm, per-layer
        sliding windows and rotary tables, score soft-capping; the logits' cap is applied outside)."""
        return (weights.positions is None and weights.activation in OneCallDecoder.ACTIVATIONS
                and isinstance(weights.final_norm, RMSNorm)
                and len({layer.rotary for layer in weights.layers}) <= 2
                and all(layer.gated and isinstance(layer.attn_norm, RMSNorm) and isinstance(layer.mlp_norm, RMSNorm)
                        and layer.o.bias is None and layer.up.bias is None and layer.down.bias is None
                        for layer in weights.layers))

    def __init__(self, library: ctypes.CDLL, weights: ModelWeights, isa: str):
        if not self.runs(weights):
            raise ValueError("the one-call decoder runs Llama- and Gemma-style models only (RMSNorm, rotary, "
                             "gated MLP)")
        self._library, self._weights = library, weights  # the weights: what the C structs point into
        self._matrices: list[MatrixStruct] = []  # and the C descriptions of stacked parts
        h = self.heads = weights.heads
        self.hidden = weights.embed.shape[1]
        self.num_layers = len(weights.layers)
        self.intermediate = weights.layers[0].down.weight.shape[1]
        # the rotary tables a pass hands over, in this order (layer.rotary: which one a layer uses)
        self.rotary_kinds: list[str | None] = sorted({layer.rotary for layer in weights.layers}, key=str)
        self._layers = (abi.DecoderLayer * self.num_layers)(*(self._layer(layer) for layer in weights.layers))
        self._pass = abi.DecoderPass(
            layers=ctypes.addressof(self._layers), num_layers=self.num_layers, hidden=self.hidden,
            intermediate=self.intermediate, embed=self._struct("embedding", weights.embed),
            final_norm=self._norm("final norm", weights.final_norm, self.hidden), final_eps=weights.final_norm.eps,
            scale=h.scale, H=h.heads, KV=h.kv_heads, D=h.dim,
            embed_scale=1.0 if weights.embed_scale is None else weights.embed_scale,
            softcap=0.0 if h.softcap is None else h.softcap, activation=self.ACTIVATIONS[weights.activation])
        # tree_hidden's and the head's: the lm_head's description, the one sequence, the output buffers
        self._lm_head = MatrixStruct("lm_head", weights.lm_head.weight, weights.lm_head.bias)
        # whether head_argmax may skip rows, and in passes of how many rows: a Q8_0 head (GGUF
        # blocks, or packed as the AVX2 build packs them), a Q6_K one (Q4_K_M files' output
        # heads) or a 16- or 32-bit one (through int8 codes), without bias (tests turn it off);
        # its [vocab] row bounds (and codes) are made on first use (reading the head then, not at load)
        head = weights.lm_head
        self.greedy_head_rows = 0 if head.bias is not None else greedy_head_rows(head.weight, isa)
        self.greedy_head = self.greedy_head_rows > 0
        self._head_l1: np.ndarray | None = None
        # a 16- or 32-bit head's int8 codes and each row's error bound, made on first use
        self._head_codes: MatrixStruct | None = None
        self._head_error: np.ndarray | None = None
        self.vocab = weights.lm_head.weight.shape[0]
        self._one = (abi.DecoderSequence * 1)()
        self._hidden = np.empty((0, self.hidden), dtype=np.float32)  # [rows, hidden]
        self._logits = np.empty((0, self.vocab), dtype=np.float32)  # [rows, vocab]

    def _norm(self, name: str, norm: RMSNorm | None, width: int) -> int | None:
        return None if norm is None else abi.address(name, norm.weight, torch.float32, (width,))

    def _struct(self, name: str, weight: Matrix, bias: torch.Tensor | None = None) -> abi.Matrix:
        matrix = MatrixStruct(name, weight, bias)
        self._matrices.append(matrix)
        return matrix.struct

    def _matrix(self, name: str, linear: Linear, shape: tuple[int, int]) -> abi.Matrix:
        if tuple(linear.weight.shape) != shape:
            raise ValueError(f"{name}: expected a {list(shape)} matrix, got {list(linear.weight.shape)}")
        return self._struct(name, linear.weight, linear.bias)

    def _layer(self, layer: DecoderLayer) -> abi.DecoderLayer:
        h, hidden = self.heads, self.hidden
        q_norm, k_norm = layer.q_norm, layer.k_norm
        return abi.DecoderLayer(
            self._norm("attention norm", layer.attn_norm, hidden), self._norm("MLP norm", layer.mlp_norm, hidden),
            self._norm("query norm", q_norm, h.dim), self._norm("key norm", k_norm, h.dim),
            layer.attn_norm.eps, layer.mlp_norm.eps, q_norm.eps if q_norm else 0.0, k_norm.eps if k_norm else 0.0,
            self._matrix("qkv", layer.qkv, ((h.heads + 2 * h.kv_heads) * h.dim, hidden)),
            self._matrix("o", layer.o, (hidden, h.heads * h.dim)),
            self._matrix("gate_up", layer.up, (2 * self.intermediate, hidden)),
            self._matrix("down", layer.down, (hidden, self.intermediate)),
            self._norm("post-attention norm", layer.post_attn_norm, hidden),
            self._norm("post-MLP norm", layer.post_mlp_norm, hidden),
            layer.post_attn_norm.eps if layer.post_attn_norm else 0.0,
            layer.post_mlp_norm.eps if layer.post_mlp_norm else 0.0,
            layer.window or 0, self.rotary_kinds.index(layer.rotary), int(layer.interleaved_qk),
        )

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, sequences: Sequence[PassSequence],
                 rotary: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """tokens [n] int64 → final hidden states [n, hidden] (after the final norm).

        The rows belong to ``sequences`` in order (sequence s has ``len(s.tree_mask)`` of them):
        the matmuls run over all rows at once, attention per sequence over its own cache, whose
        rows after ``past`` are written. One sequence is a single request's pass, several a batch
        of requests; a row's result is the same bits either way. ``positions`` [n] int64: each
        token's position (sliding windows). ``rotary``: per kind in :attr:`rotary_kinds`, the
        tables (cos, sin) [*, head_dim] and ``rope_rows`` [n] int64: token i is rotated by row
        ``rope_rows[i]``. The values of ``tokens`` and ``rope_rows`` index tables: they are the caller's to check
        (:class:`ModelRunner` does). Layers in ``skip`` are left out: the hidden state passes them
        unchanged and their cache rows are not written (self-speculation drafts).
        """
        h, n = self.heads, tokens.shape[0]
        if sum(sequence.tree_mask.shape[0] for sequence in sequences) != n:
            raise ValueError(f"the sequences' tree masks cover {sum(len(s.tree_mask) for s in sequences)} rows, "
                             f"the pass has {n} tokens")
        structs = (abi.DecoderSequence * len(sequences))()
        masks = []  # contiguous copies (if any) stay referenced until the call returns
        for index, sequence in enumerate(sequences):
            keys, rows = sequence.keys, sequence.tree_mask.shape[0]
            capacity = keys.shape[2]
            if sequence.past + rows > capacity:
                raise ValueError(f"cache overflow: {sequence.past + rows} rows needed, capacity {capacity}")
            cache_shape = (self.num_layers, h.kv_heads, capacity, h.dim)
            masks.append(sequence.tree_mask.contiguous())
            structs[index] = abi.DecoderSequence(
                abi.address("keys", keys, torch.float32, cache_shape),
                abi.address("values", sequence.values, torch.float32, cache_shape), capacity, sequence.past, rows,
                abi.address("tree mask", masks[-1], torch.bool, (rows, rows)))
        out = torch.empty(n, self.hidden)
        skipped = None
        if skip:
            skipped = torch.zeros(self.num_layers, dtype=torch.uint8)  # [layers] 1 = skipped
            skipped[list(skip)] = 1
        if len(rotary) != len(self.rotary_kinds):
            raise ValueError(f"the layers rotate with {len(self.rotary_kinds)} tables, {len(rotary)} given")
        tokens, positions = tokens.contiguous(), positions.contiguous()
        rotary = [(cos, sin, rows.contiguous()) for cos, sin, rows in rotary]  # kept alive until the call returns
        tables = [(abi.address("cos table", cos, torch.float32, (cos.shape[0], h.dim)),
                   abi.address("sin table", sin, torch.float32, (sin.shape[0], h.dim)),
                   abi.address("rotary rows", rows, torch.int64, (n,))) for cos, sin, rows in rotary]
        skip_address = None if skipped is None else abi.address("skipped layers", skipped, torch.uint8,
                                                                (self.num_layers,))
        self._launch(abi.address("tokens", tokens, torch.int64, (n,)), n,
                     abi.address("positions", positions, torch.int64, (n,)), tables, structs, len(sequences),
                     skip_address, abi.address("output", out, torch.float32, (n, self.hidden)))
        return out

    def _launch(self, tokens: int, n: int, positions: int, tables: Sequence[tuple[int, int, int]], sequences,
                count: int, skip: int | None, out: int) -> None:
        """The C pass over checked addresses: ``tables`` per rotary kind (cos, sin, rows), ``sequences``
        the DecoderSequence array of ``count`` entries."""
        call = self._pass
        call.tokens, call.n, call.positions = tokens, n, positions
        for index in range(2):
            call.cos_tables[index], call.sin_tables[index], call.rope_rows[index] = (
                tables[index] if index < len(tables) else (None, None, None))
        call.sequences, call.num_sequences, call.skip, call.out = sequences, count, skip, out
        abi.check_status(self._library.freespec_forward_llama(ctypes.byref(call)), "the decoder pass")

    def tree_hidden(self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, keys: int, values: int,
                    capacity: int, past: int, rotary: Sequence[tuple[int, int]]) -> np.ndarray:
        """One request's pass: tokens [q] int64 at positions [q] int64, each seeing the ``past``
        committed cache rows and the new tokens ``tree_mask`` [q, q] (bool) allows → final hidden
        states [q, hidden] in a buffer the next call overwrites (:meth:`head_logits` and
        :meth:`head_argmax` read them).

        What :meth:`__call__` computes, the same bits, from numpy arrays and C
        structs made once. A decoding step runs right after the pass has streamed the weights
        through every cache, so each piece of code it runs is read from memory again: the torch
        calls of a step's wrappers took ~0.4 ms there against ~50 µs warm, and without them
        SmolLM2-135M decodes 1.02-1.09x as fast, 1.01-1.06x with suffix drafting. ``keys``,
        ``values``: the cache's addresses ([layers, kv_heads, capacity, head_dim] fp32 each);
        ``rotary``: per kind in :attr:`rotary_kinds`, the addresses of the (cos, sin) tables,
        row = position. The caller checks that ids and positions lie within the model's tables
        and the cache.
        """
        n = tokens.shape[0]
        if (positions.shape != (n,) or tree_mask.shape != (n, n) or past + n > capacity
                or len(rotary) != len(self.rotary_kinds)):
            raise ValueError(f"a tree pass needs tokens [q], positions [q], a tree mask [q, q] and room for q rows, "
                             f"got {list(tokens.shape)}, {list(positions.shape)}, {list(tree_mask.shape)}, "
                             f"{past} + {n} rows in {capacity}")
        if self._hidden.shape[0] < n:  # one buffer of the most rows yet (not one per size: 80 rows are 16 MB)
            self._hidden = np.empty((n, self.hidden), dtype=np.float32)
            self._logits = np.empty((n, self.vocab), dtype=np.float32)
        hidden = self._hidden[:n]
        sequence = self._one[0]
        sequence.keys, sequence.values, sequence.capacity, sequence.past, sequence.n = keys, values, capacity, past, n
        sequence.tree_mask = abi.array_address("tree mask", tree_mask, np.bool_, (n, n))
        rows = abi.array_address("positions", positions, np.int64, (n,))  # a position is its rotary row
        self._launch(abi.array_address("tokens", tokens, np.int64, (n,)), n, rows,
                     [(cos, sin, rows) for cos, sin in rotary], self._one, 1, None, hidden.ctypes.data)
        return hidden

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The lm_head of :meth:`tree_hidden`'s states [q, hidden] → logits [q, vocab] in a buffer
        the next call overwrites."""
        n = hidden.shape[0]
        if self._logits.shape[0] < n:  # states not from tree_hidden, which sizes the buffer
            self._logits = np.empty((n, self.vocab), dtype=np.float32)
        logits = self._logits[:n]
        status = self._library.freespec_linear(self._lm_head.pointer, abi.array_address(
            "hidden states", hidden, np.float32, (n, self.hidden)), logits.ctypes.data, n)
        abi.check_status(status, "the lm_head")
        return logits

    def head_argmax(self, hidden: np.ndarray) -> np.ndarray | None:
        """Each row's first maximum of :meth:`head_logits` [q] int64, computing only the logits an
        integer bound cannot rule out (``freespec_head_argmax``, an exact greedy head: measured 1-5
        rows of 262,144 on Gemma-3-270M); None where it does not apply (see ``greedy_head``, passes
        of more than ``greedy_head_rows`` rows, inputs that are not finite): then the caller
        computes the whole head."""
        result = self._greedy_head(hidden, 0)
        return None if result is None else result[0]

    def head_argmax_top_k(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """:meth:`head_argmax` and, from the same integer pass, each row's k best tokens by their
        approximate logits with probabilities under the approximation's softmax: (argmax [q],
        ids [q, k] int64, probs [q, k] float32; k = 0: empty), or None where :meth:`head_argmax`
        gives None. Approximate (within the bound of a logit, far below the gaps drafts care
        about), so for drafters only; a row's result depends on that row alone."""
        return self._greedy_head(hidden, k)

    def _greedy_head(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``freespec_head_argmax`` over ``hidden`` [q, hidden] (what both public calls run)."""
        if self.greedy_head and self._head_l1 is None:
            self._head_l1 = self._head_bounds()
            self.greedy_head = self._head_l1 is not None
        n = hidden.shape[0]
        if not self.greedy_head or n > self.greedy_head_rows:
            return None
        out = np.empty(n, dtype=np.int64)
        values = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        log_normalizer = np.empty(n, dtype=np.float32)
        coded = self._head_codes is not None
        status = self._library.freespec_head_argmax(
            (self._head_codes if coded else self._lm_head).pointer, self._head_l1.ctypes.data,
            abi.array_address("hidden states", hidden, np.float32, (n, self.hidden)), n, out.ctypes.data,
            self._lm_head.pointer if coded else None, self._head_error.ctypes.data if coded else None,
            k, values.ctypes.data if k else None, ids.ctypes.data if k else None,
            log_normalizer.ctypes.data if k else None)
        if status == abi.NOT_BOUNDED:
            return None
        abi.check_status(status, "the greedy lm_head")
        return out, ids, np.exp(values - log_normalizer[:, None]) if k else values

    def _head_bounds(self) -> np.ndarray | None:
        """[vocab] float32 upper bounds of each head row's L1 norm for the exact greedy head, or None
        where a row's is not finite (the bound then covers nothing). A 16- or 32-bit head gets its
        int8 codes here too (``freespec_head_codes``)."""
        bounds = np.empty(self.vocab, dtype=np.float32)
        if not coded_head(self._weights.lm_head.weight):
            status = self._library.freespec_head_bounds(self._lm_head.pointer, bounds.ctypes.data)
            return bounds if status == abi.OK and np.isfinite(bounds).all() else None
        codes = torch.empty(self.vocab, self.hidden, dtype=torch.int8)  # [vocab, hidden]
        scales = torch.empty(self.vocab, self.hidden // 32, dtype=torch.float32)  # [vocab, hidden / 32]
        error = np.empty(self.vocab, dtype=np.float32)
        status = self._library.freespec_head_codes(self._lm_head.pointer, codes.data_ptr(), scales.data_ptr(),
                                                   bounds.ctypes.data, error.ctypes.data)
        if status != abi.OK or not (np.isfinite(bounds).all() and np.isfinite(error).all()):
            return None
        self._head_codes, self._head_error = MatrixStruct("lm_head codes", PackedWeight("q8", codes, scales)), error
        return bounds
