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
MAX_KERNEL_ROWS = 64
"""Above this many rows (prefill chunks) BLAS is faster; both decoding modes share those calls."""


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
    return library


def kernel_available() -> bool:
    return _library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [M, K] and weight [N, K] (contiguous fp32) → [M, N]."""
    rows = x.shape[0]
    library = _library()
    if library is None or rows > MAX_KERNEL_ROWS:
        out = torch.mm(weight, x.t()).t() if rows <= MAX_KERNEL_ROWS else torch.mm(x, weight.t())
    else:
        x = x.contiguous()
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        library.freespec_linear(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], x.shape[1])
    return out if bias is None else out + bias


def tree_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                   tree_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of n new tokens over a layer's cache, batch-invariant (needs the built kernels).

    q: [n, heads, dim]; keys, values: [kv_heads, capacity, dim] with the new tokens already
    written at rows past..past+n; tree_mask: [n, n] bool (ancestor-or-self). Returns [n, heads, dim].
    """
    n, heads, dim = q.shape
    kv_heads, capacity, _ = keys.shape
    library = _library()
    if library is None:
        raise RuntimeError("the freespec kernels are not available on this machine")
    # each row's visible tree nodes in ascending (= depth) order
    count = tree_mask.sum(dim=1)
    nodes = torch.where(tree_mask, torch.arange(n), n).sort(dim=1).values  # [n, n]
    grouped = q.view(n, kv_heads, heads // kv_heads, dim).transpose(0, 1).contiguous()  # [kv_heads, n * group, dim]
    out = torch.empty(n, heads, dim)
    scores = torch.empty(heads * n, past + n)
    probs = torch.empty(heads * n, past + n)
    library.freespec_tree_attention(
        grouped.data_ptr(), keys.data_ptr(), values.data_ptr(), capacity, nodes.data_ptr(), count.data_ptr(),
        past, n, heads, kv_heads, dim, scale, out.data_ptr(), scores.data_ptr(), probs.data_ptr())
    return out
