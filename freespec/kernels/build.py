"""Compiling and loading the C kernels (``csrc/``): one shared library per instruction set,
built once per machine into the freespec cache and named by a digest of its sources and flags.

The library links against the OpenMP runtime torch already loaded, so both share one thread
pool. :func:`requested_isa` is the one place that reads the environment.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Mapping

from freespec.kernels import abi
from freespec.paths import RECENT_SECONDS, cache_dir, touch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "freespec.h", _CSRC / "iq_grids.h", _CSRC / "formats.h", _CSRC / "kernels.c")
"""Every file of the build (the digest covers them all): the header, then what kernels.c includes, then kernels.c."""
_MAIN = SOURCES[-1]
ISAS = ("avx512", "avx2")
"""The builds: 16-lane sums with AVX-512, 8-lane with AVX2 (both with FMA)."""
_NAMES = {"avx512": "AVX-512", "avx2": "AVX2"}
TORCH = "torch"
"""Not a build: torch's own ops (no compiler, no AVX2, or asked for)."""
_COMMON_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_FLAGS = {"avx2": _COMMON_FLAGS, "avx512": [*_COMMON_FLAGS, "-mavx512f", "-mavx512bw", "-DFREESPEC_AVX512"]}


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split())


def supported_isas() -> list[str]:
    """The builds this CPU runs, widest first (empty without AVX2, FMA and F16C: every AVX2 CPU
    has F16C, which converts the fp16 scales and weights). The AVX-512 build needs AVX-512F and
    BW (every AVX-512 CPU since Skylake-SP; BW's byte operations sign the IQ grid codes)."""
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return []
    return ["avx512", "avx2"] if {"avx512f", "avx512bw"} <= flags else ["avx2"]


def requested_isa(environ: Mapping[str, str] = os.environ) -> str:
    """The build to use unless a caller picks one: ``FREESPEC_NO_KERNEL`` (any value) asks for
    torch's ops, ``FREESPEC_KERNEL_ISA=avx2`` for the 8-lane build on an AVX-512 CPU; by default
    the widest build this CPU runs, or torch where it runs none.

    The two builds round differently in the last bits, so greedy outputs are reproducible per
    build, not across them; plain and speculative decoding in one process always share a build.
    """
    if environ.get("FREESPEC_NO_KERNEL"):
        return TORCH
    wanted = environ.get("FREESPEC_KERNEL_ISA", "").lower()
    if wanted not in ("", *ISAS):
        raise ValueError(f"FREESPEC_KERNEL_ISA must be avx2 or avx512, not {wanted!r}")
    supported = supported_isas()
    if not supported:
        return TORCH
    if wanted and wanted not in supported:
        raise ValueError(f"FREESPEC_KERNEL_ISA={wanted}, but this CPU has no {_NAMES[wanted]}")
    return wanted or supported[0]


def digest(isa: str) -> str:
    """Names a build: its sources and flags."""
    text = b"".join(source.read_bytes() for source in SOURCES) + " ".join(_FLAGS[isa]).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def compiler() -> str | None:
    """The C compiler: $CC, else gcc or cc on the PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def compile_library(main: Path, isa: str, output: Path) -> subprocess.CompletedProcess:
    """Compile ``main`` (a kernels.c beside the headers it includes) for ``isa`` into ``output``."""
    return subprocess.run([compiler(), *_FLAGS[isa], str(main), "-o", str(output)], capture_output=True, text=True)


KEPT_BUILDS = 8
"""Builds kept in the cache, the most recently used first: each upgrade of freespec (or each
checkout of another commit) compiles a new one, and nothing else removes the old ones."""

def prune(folder: Path, keep: int = KEPT_BUILDS) -> None:
    """Delete all but the ``keep`` most recently used builds in ``folder`` (their modification
    times, which :func:`load` touches), sparing those used in the last :data:`RECENT_SECONDS`."""
    builds = []
    for build in folder.glob("kernels-*.so"):
        try:
            builds.append((build.stat().st_mtime, build))
        except OSError:  # removed by another process meanwhile
            continue
    now = time.time()
    for used, build in sorted(builds, reverse=True)[keep:]:
        if now - used >= RECENT_SECONDS:
            build.unlink(missing_ok=True)


@cache
def load(isa: str) -> ctypes.CDLL | None:
    """The library built for ``isa`` (compiled on first use) with its functions declared, or
    None where it cannot be built."""
    if compiler() is None:
        log.warning("no C compiler found: using slower, non batch-invariant torch kernels")
        return None
    target = cache_dir() / "kernels" / f"kernels-{digest(isa)}.so"
    if not target.exists():
        log.warning("building the kernels for this machine (once, about 10 s)...")  # else a silent pause
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = compile_library(_MAIN, isa, built)
            if result.returncode != 0:
                log.warning("building the kernels failed, using torch instead:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
        prune(target.parent)
    else:
        touch(target)  # used now: what :func:`prune` keeps
    return abi.declare(ctypes.CDLL(str(target)))
