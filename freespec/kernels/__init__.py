"""Batch-invariant CPU kernels (``csrc/kernels.c``), built on first use.

Two kernels make a token's logits bit-identical whether it is decoded alone or verified inside
a draft tree: a small-M linear layer whose per-output arithmetic does not depend on M, and a
tree attention that reduces over each query's keys in logical order (prefix, ancestors, self).
The linear layer also reads weights stored as exact 4/8-bit blocks (:mod:`freespec.model.quant`) with
the same results, and :class:`FusedDecoder` runs all layers of a Llama-style model in one call.

The C source is compiled with the system C compiler into the freespec cache and loaded with
ctypes; it links against the OpenMP runtime torch already loaded, so both share one thread pool.
Without a compiler or without AVX2+FMA, both fall back to torch (``(W @ x.T).T`` and SDPA),
which is not batch-invariant: verification logits may then differ from decoding logits in the
last bits, and a near-tie may flip a greedy choice.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from freespec.model.quant import PackedWeight
from freespec.paths import cache_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_AVX512_FLAGS = ["-mavx512f", "-DFREESPEC_AVX512"]
SKINNY_ROWS = 64  # without the kernels: below this many rows, ``W @ x.T`` beats ``F.linear``


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@cache
def _isa() -> str | None:
    """The instruction set the kernels are built for: ``avx512`` (16-lane sums), ``avx2`` (8-lane)
    or None (no kernels). ``FREESPEC_KERNEL_ISA=avx2`` forces the 8-lane build on an AVX-512 CPU.

    The two builds round differently in the last bits, so greedy outputs are reproducible per
    build, not across them; plain and speculative decoding in one process always share a build.
    """
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return None
    wanted = os.environ.get("FREESPEC_KERNEL_ISA", "").lower()
    if wanted not in ("", "avx2", "avx512"):
        raise ValueError(f"FREESPEC_KERNEL_ISA must be avx2 or avx512, not {wanted!r}")
    if wanted == "avx512" and "avx512f" not in flags:
        raise ValueError("FREESPEC_KERNEL_ISA=avx512, but this CPU has no AVX-512")
    return "avx512" if "avx512f" in flags and wanted != "avx2" else "avx2"


def _flags() -> list[str]:
    return _FLAGS + (_AVX512_FLAGS if _isa() == "avx512" else [])


@cache
def _source_digest() -> str:
    return hashlib.sha256(_SOURCE.read_bytes() + " ".join(_flags()).encode()).hexdigest()[:16]


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FREESPEC_NO_KERNEL") or _isa() is None:
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: using slower, non batch-invariant torch kernels")
        return None
    target = cache_dir() / "kernels" / f"kernels-{_source_digest()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *_flags(), str(_SOURCE), "-o", str(built)], capture_output=True, text=True
            )
            if result.returncode != 0:
                log.warning("building the kernels failed, using torch instead:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
    library = ctypes.CDLL(str(target))
    library.freespec_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    library.freespec_linear.restype = None
    for name in ("freespec_linear_q4", "freespec_linear_q8"):
        getattr(library, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        getattr(library, name).restype = None
    library.freespec_tree_attention.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5
        + [ctypes.c_float, ctypes.c_int64] + [ctypes.c_void_p] * 2
    )
    library.freespec_tree_attention.restype = None
    library.freespec_rope_store.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    library.freespec_rope_store.restype = None
    library.freespec_forward_llama.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5
        + [ctypes.c_int64] * 2 + [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 2
        + [ctypes.c_float, ctypes.c_void_p]
    )
    library.freespec_forward_llama.restype = None
    library.freespec_top_k.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
    library.freespec_top_k.restype = None
    return library


def _required_library() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("the freespec kernels are not available on this machine")
    return library


def kernel_available() -> bool:
    return _library() is not None


def kernel_isa() -> str | None:
    """The instruction set the loaded kernels were built for (``avx512``, ``avx2``), or None."""
    return _isa() if _library() is not None else None


def kernel_version() -> str | None:
    """A digest of the kernel source and flags, or None when torch's kernels are used."""
    return _source_digest() if _library() is not None else None


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [M, K] and weight [N, K] (contiguous fp32 or exact blocks) → [M, N].

    With the kernels, every row's result is the same whatever M is. Block weights give
    bit-identical results to their fp32 form (see :mod:`freespec.model.quant`), reading 4-6x fewer bytes.
    """
    rows = x.shape[0]
    library = _library()
    if library is not None and rows > 0:  # the kernels assume at least one row
        x = x.contiguous()
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        if isinstance(weight, PackedWeight):
            kernel = library.freespec_linear_q4 if weight.kind == "q4" else library.freespec_linear_q8
            kernel(x.data_ptr(), weight.codes.data_ptr(), weight.scales.data_ptr(), out.data_ptr(), rows,
                   weight.shape[0], x.shape[1])
        else:
            library.freespec_linear(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0],
                                    x.shape[1])
        return out if bias is None else out + bias
    if isinstance(weight, PackedWeight):
        weight = weight.dense
    if rows < SKINNY_ROWS:
        out = torch.mm(weight, x.t()).t()  # far faster than F.linear's kernel choice for few rows
    else:
        out = torch.mm(x, weight.t())
    return out if bias is None else out + bias


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [n, k] descending, ids [n, k], logsumexp [n]) of logits [n, V] in one pass.

    ``ids[:, 0]`` is the first maximum of each row, as ``torch.argmax`` gives it.
    """
    if _library() is None or k > logits.shape[1]:
        values, ids = torch.topk(logits, k, dim=-1)
        return values, ids, torch.logsumexp(logits, dim=-1)
    values, ids, normalizer = _top_k(logits, k, normalize=True)
    return torch.from_numpy(values), torch.from_numpy(ids), torch.from_numpy(normalizer)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[n, V] → [n] first index of each row's maximum (like ``torch.argmax``), in one pass."""
    if _library() is None:
        return torch.argmax(logits, dim=-1)
    return torch.from_numpy(_top_k(logits, 1, normalize=False)[1].reshape(-1))


def _top_k(logits: torch.Tensor, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The kernel's top k of each row, and each row's logsumexp if asked (numpy outputs: cheaper
    to make than tensors, and this runs once or twice every step)."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    values, ids = np.empty((rows, k), dtype=np.float32), np.empty((rows, k), dtype=np.int64)
    normalizer = np.empty(rows, dtype=np.float32) if normalize else None
    _library().freespec_top_k(logits.data_ptr(), rows, vocab, k, values.ctypes.data, ids.ctypes.data,
                              None if normalizer is None else normalizer.ctypes.data)
    return values, ids, normalizer


def tree_layout(tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes [n, n], count [n]): each row's visible tree nodes in ascending (= depth) order,
    padded with n, and how many there are; the form the attention kernel reads."""
    n = tree_mask.shape[0]
    return torch.where(tree_mask, torch.arange(n), n).sort(dim=1).values, tree_mask.sum(dim=1)


class TreeAttention:
    """Batch-invariant attention of n new tokens over the KV cache (needs the built kernels).

    Built once per forward pass: the tree layout, rotary tables and scratch buffers are shared
    by all layers. Each call rotates the layer's fresh queries and keys, writes keys and values
    to the cache after the ``past`` committed rows, and attends.
    """

    def __init__(self, past: int, tree_mask: torch.Tensor, heads: int, kv_heads: int, dim: int, scale: float,
                 cos: torch.Tensor | None, sin: torch.Tensor | None):
        self._library = _required_library()
        n = tree_mask.shape[0]
        self.past, self.n, self.heads, self.kv_heads, self.dim, self.scale = past, n, heads, kv_heads, dim, scale
        # cos, sin: [n, dim] or None (no rotary)
        self._cos = None if cos is None else cos.contiguous()
        self._sin = None if sin is None else sin.contiguous()
        self._nodes, self._count = tree_layout(tree_mask)
        # a causal chain (a prefill chunk): the kernel may let its rows join the shared prefix
        self._causal = torch.equal(tree_mask, torch.ones(n, n, dtype=torch.bool).tril())
        self._queries = torch.empty(kv_heads, n * (heads // kv_heads), dim)
        self._probs = torch.empty(heads * n, past + n)

    def __call__(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """qkv: [n, (heads + 2 kv_heads) dim]; keys, values: [kv_heads, capacity, dim]. → [n, heads * dim]."""
        n, heads, kv_heads, dim = self.n, self.heads, self.kv_heads, self.dim
        qkv = qkv.contiguous()
        cos = 0 if self._cos is None else self._cos.data_ptr()
        sin = 0 if self._sin is None else self._sin.data_ptr()
        self._library.freespec_rope_store(qkv.data_ptr(), cos, sin, keys.data_ptr(), values.data_ptr(), keys.shape[1],
                                          self.past, n, heads, kv_heads, dim, self._queries.data_ptr())
        out = torch.empty(n, heads * dim)
        self._library.freespec_tree_attention(
            self._queries.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[1], self._nodes.data_ptr(),
            self._count.data_ptr(), self.past, n, heads, kv_heads, dim, self.scale, int(self._causal), out.data_ptr(),
            self._probs.data_ptr())
        return out


class _Matrix(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int64), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64)]


class _DecoderLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("attn_eps", ctypes.c_float), ("mlp_eps", ctypes.c_float),
                ("q_eps", ctypes.c_float), ("k_eps", ctypes.c_float), ("qkv", _Matrix), ("o", _Matrix),
                ("gate_up", _Matrix), ("down", _Matrix)]


@dataclass
class RMSNorm:
    weight: torch.Tensor  # [n] fp32
    eps: float


@dataclass
class LlamaLayer:
    """One Llama-style decoder layer's parameters, as :class:`FusedDecoder` reads them."""

    attn_norm: RMSNorm
    mlp_norm: RMSNorm
    q_norm: RMSNorm | None  # per-head norms of queries and keys (Qwen3)
    k_norm: RMSNorm | None
    qkv: torch.Tensor | PackedWeight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | PackedWeight
    gate_up: torch.Tensor | PackedWeight
    down: torch.Tensor | PackedWeight


class FusedDecoder:
    """All decoder layers of a Llama-style model (RMSNorm, SiLU-gated MLP) in one kernel call.

    Same arithmetic for every row whatever the number of rows, like the other kernels, and
    with no per-operation call overhead: the embedding lookup, norms, rotary, cache writes,
    attention, residuals, the activation and the final norm all run in C between the matmuls
    (a torch call between two passes costs several times its warm price: the pass has just
    streamed the weights through the caches).
    """

    def __init__(self, layers: list[LlamaLayer], embed: torch.Tensor, final_norm: RMSNorm, heads: int,
                 kv_heads: int, head_dim: int, scale: float):
        self._library = _required_library()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.hidden = layers[0].o.shape[0]
        self.intermediate = layers[0].down.shape[1]
        self._keep = []  # tensors the C structs point into
        self._layers = (_DecoderLayer * len(layers))(*(self._layer(layer) for layer in layers))
        self._embed = self._pointer(embed)  # [vocab, hidden]
        self._final_norm, self._final_eps = self._pointer(final_norm.weight), final_norm.eps

    def _pointer(self, tensor: torch.Tensor | None) -> int | None:
        if tensor is None:
            return None
        tensor = tensor.detach().to(torch.float32).contiguous()
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _matrix(self, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> _Matrix:
        rows, cols = weight.shape
        if isinstance(weight, PackedWeight):
            self._keep += [weight.codes, weight.scales]
            kind = 4 if weight.kind == "q4" else 8
            return _Matrix(weight.codes.data_ptr(), weight.scales.data_ptr(), self._pointer(bias), kind, rows, cols)
        return _Matrix(self._pointer(weight), None, self._pointer(bias), 0, rows, cols)

    def _layer(self, layer: LlamaLayer) -> _DecoderLayer:
        q_norm, k_norm = layer.q_norm, layer.k_norm
        return _DecoderLayer(
            self._pointer(layer.attn_norm.weight), self._pointer(layer.mlp_norm.weight),
            self._pointer(q_norm.weight if q_norm else None), self._pointer(k_norm.weight if k_norm else None),
            layer.attn_norm.eps, layer.mlp_norm.eps, q_norm.eps if q_norm else 0.0, k_norm.eps if k_norm else 0.0,
            self._matrix(layer.qkv, layer.qkv_bias), self._matrix(layer.o), self._matrix(layer.gate_up),
            self._matrix(layer.down),
        )

    def __call__(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                 tree_mask: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, rope_rows: torch.Tensor,
                 skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """tokens [n] int64 → final hidden states [n, hidden] (after the final norm).

        keys, values: [layers, kv_heads, capacity, head_dim], written after row ``past``;
        tree_mask [n, n] bool; token i is rotated by row ``rope_rows[i]`` (int64) of the
        contiguous tables ``cos_table``, ``sin_table`` [*, head_dim]. The C code reads these
        by pointer: the dtypes are the caller's to guarantee (:meth:`ModelRunner._run` does).
        Layers in ``skip`` are left out: the hidden state passes them unchanged and their cache
        rows are not written (self-speculation drafts).
        """
        n = tokens.shape[0]
        tokens, rope_rows, tree_mask = tokens.contiguous(), rope_rows.contiguous(), tree_mask.contiguous()
        out = torch.empty(n, self.hidden)
        mask = None
        if skip:
            mask = torch.zeros(len(self._layers), dtype=torch.uint8)  # [layers] 1 = skipped
            mask[list(skip)] = 1
        self._library.freespec_forward_llama(
            self._layers, len(self._layers), self._embed, tokens.data_ptr(), n, self.hidden, self.intermediate,
            cos_table.data_ptr(), sin_table.data_ptr(), rope_rows.data_ptr(), keys.data_ptr(), values.data_ptr(),
            keys.shape[2], past, tree_mask.data_ptr(), self.heads, self.kv_heads, self.head_dim, self.scale,
            None if mask is None else mask.data_ptr(), self._final_norm, self._final_eps, out.data_ptr())
        return out
