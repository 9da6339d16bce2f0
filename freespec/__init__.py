"""freespec: lossless, training-free speculative decoding for Hugging Face causal LMs.

The public names load on first use (``freespec.load``, ``freespec.Model``...), so importing a part
that needs no torch, such as the command line's argument parser, stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

if "torch" not in sys.modules:
    # A forward pass makes ~150 short parallel kernel calls separated by small single-threaded
    # torch ops; with libgomp's default spin count the worker thread falls asleep in between and
    # every call pays a wake-up (measured: 35 → 29 ms per decode step on 2 cores). The variable
    # is read when torch loads its OpenMP runtime, so it must be set before torch is imported:
    # here, since every freespec module is imported after its package.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000000")

if TYPE_CHECKING:
    from freespec.api import GenerationResult, Model, load
    from freespec.engine.loop import GenerationStats

__version__ = "0.1.0"

DEFAULT_DRAFTER = "suffix"
"""What generation, the command line and the server draft with unless told otherwise: SuffixDecoding
over the request and the tenant's earlier requests (docs/drafters.md: level with prompt lookup on
fresh Spec-Bench questions, 2.2x plain decoding on questions asked again; Token Recycling, the
default before, measured 1.12x against its 1.19x)."""

_HOMES = {"GenerationResult": "freespec.api", "Model": "freespec.api", "load": "freespec.api",
          "GenerationStats": "freespec.engine.loop"}
__all__ = ["GenerationResult", "GenerationStats", "Model", "load"]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'freespec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
