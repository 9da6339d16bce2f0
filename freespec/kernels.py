"""Batch-invariant CPU kernels (``csrc/kernels.c``), built on first use.

Two kernels make a token's logits bit-identical whether it is decoded alone or verified inside
a draft tree: a small-M linear layer whose per-output arithmetic does not depend on M, and a
tree attention that reduces over each query's keys in logical order (prefix, ancestors, self).

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
from functools import cache
from pathlib import Path

import torch

from freespec.paths import cache_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
BLAS_ROWS = 64
"""From this many rows up, non-invariant calls (prefill) use BLAS, which is faster there."""


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FREESPEC_NO_KERNEL") or not _cpu_has_avx2_fma():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: using slower, non batch-invariant torch kernels")
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"kernels-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
            )
            if result.returncode != 0:
                log.warning("building the kernels failed, using torch instead:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
    library = ctypes.CDLL(str(target))
    library.freespec_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    library.freespec_linear.restype = None
    library.freespec_tree_attention.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5
        + [ctypes.c_float] + [ctypes.c_void_p] * 3
    )
    library.freespec_tree_attention.restype = None
    library.freespec_rope_store.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    library.freespec_rope_store.restype = None
    return library


def kernel_available() -> bool:
    return _library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           invariant: bool = True) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [M, K] and weight [N, K] (contiguous fp32) → [M, N].

    ``invariant``: every row's result must not depend on M (decoding and verification). Otherwise
    (prefill) BLAS takes large M, where it is faster.
    """
    rows = x.shape[0]
    library = _library()
    if library is not None and (invariant or rows < BLAS_ROWS):
        x = x.contiguous()
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        library.freespec_linear(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], x.shape[1])
    elif rows < BLAS_ROWS:
        out = torch.mm(weight, x.t()).t()  # far faster than F.linear's kernel choice for few rows
    else:
        out = torch.mm(x, weight.t())
    return out if bias is None else out + bias


class TreeAttention:
    """Batch-invariant attention of n new tokens over the KV cache (needs the built kernels).

    Built once per forward pass: the tree layout, rotary tables and scratch buffers are shared
    by all layers. Each call rotates the layer's fresh queries and keys, writes keys and values
    to the cache after the ``past`` committed rows, and attends.
    """

    def __init__(self, past: int, tree_mask: torch.Tensor, heads: int, kv_heads: int, dim: int, scale: float,
                 cos: torch.Tensor | None, sin: torch.Tensor | None):
        self._library = _library()
        if self._library is None:
            raise RuntimeError("the freespec kernels are not available on this machine")
        n = tree_mask.shape[0]
        self.past, self.n, self.heads, self.kv_heads, self.dim, self.scale = past, n, heads, kv_heads, dim, scale
        # cos, sin: [n, dim] or None (no rotary)
        self._cos = None if cos is None else cos.contiguous()
        self._sin = None if sin is None else sin.contiguous()
        # each row's visible tree nodes in ascending (= depth) order
        self._count = tree_mask.sum(dim=1)
        self._nodes = torch.where(tree_mask, torch.arange(n), n).sort(dim=1).values  # [n, n]
        self._queries = torch.empty(kv_heads, n * (heads // kv_heads), dim)
        self._scores = torch.empty(heads * n, past + n)
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
            self._count.data_ptr(), self.past, n, heads, kv_heads, dim, self.scale, out.data_ptr(),
            self._scores.data_ptr(), self._probs.data_ptr())
        return out
