"""What drafters learn across requests, in one file that warms a later process.

A state file is an ``.npz`` archive (whatever its name) of named arrays: Token Recycling's tables
(:meth:`freespec.drafters.recycling.RecyclingTables.arrays`) and the suffix drafter's per-tenant
stores of earlier requests (:meth:`freespec.drafters.suffix.TenantStores.arrays`), each part
present when that drafter has run. Every array is checked before any is used: token ids are
drafted straight into the model, so a file cut short, corrupted or edited must be refused, never
half taken.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from freespec.paths import AtomicFile

VOCAB_KEY = "vocab_size"  # the vocabulary the file's ids belong to (a 0-d integer array)


@runtime_checkable
class Learned(Protocol):
    """Drafter state kept across requests that a state file holds: Token Recycling's tables, the
    suffix drafter's stores."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Its named arrays for a state file (copies)."""
        ...

    def prepare(self, check: StateCheck) -> Callable[[], None] | None:
        """Check what the file holds of it; return what takes it over, None when it holds none.
        Raises DamagedStateError (or ValueError) and changes nothing when the file will not do."""
        ...


class DamagedStateError(ValueError):
    """A state file cut short, corrupted, or holding values no run writes: ignore it and start cold."""


def read_state(path: Path) -> dict[str, np.ndarray]:
    """Every array of the state file at ``path``, unchecked.

    Raises ValueError for a file that is not a state file, :class:`DamagedStateError` for one that
    cannot be read whole, OSError when it cannot be opened.
    """
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic and magic != b"PK\x03\x04":  # every .npz is a zip archive; an empty file was cut short
        raise ValueError(f"{path} is not a drafter state file (one written by --state or save_state)")
    try:
        with np.load(path) as archive:  # no pickles: every array is plain numbers or strings
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise DamagedStateError(f"{path} is damaged ({type(error).__name__}: {error})") from None


def write_state(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to exactly ``path``, atomically: a crash while writing leaves the previous
    file as it was, never a damaged one."""
    with AtomicFile(path, binary=True) as file:
        np.savez_compressed(file.stream, **arrays)
        file.commit()


class StateCheck:
    """The arrays of a state file, each checked for its shape, kind and range before use."""

    def __init__(self, state: dict[str, np.ndarray], path: Path, vocab_size: int):
        self.state, self.path, self.vocab_size = state, path, vocab_size
        saved = state.get(VOCAB_KEY)
        if saved is not None and saved.shape == () and np.issubdtype(saved.dtype, np.integer) and saved != vocab_size:
            raise ValueError(f"{path} was saved for a vocabulary of {int(saved)} tokens, not {vocab_size}: "
                             "another model's state")

    def damaged(self, why: str) -> DamagedStateError:
        return DamagedStateError(f"{self.path} is damaged: {why}")

    def array(self, name: str, shape: tuple[int | None, ...], integer: bool, low: float, high: float) -> np.ndarray:
        """``name``, of ``shape`` (None: any length) and kind, its values within [low, high]."""
        value = self.state.get(name)
        if value is None:
            raise self.damaged(f"it holds no {name}")
        kind = np.integer if integer else np.number
        fits = len(value.shape) == len(shape) and all(want in (None, got) for want, got in zip(shape, value.shape))
        if not fits or not np.issubdtype(value.dtype, kind) or value.dtype == bool:
            expected = ["n" if length is None else length for length in shape]
            raise self.damaged(f"{name} is {value.dtype} {list(value.shape)}, "
                               f"expected {'integers' if integer else 'numbers'} {expected}")
        if value.size and not (np.isfinite(value).all() and value.min() >= low and value.max() <= high):
            raise self.damaged(f"{name} holds values outside [{low}, {high}]")
        return value

    def ids(self, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
        """Token ids, drafted into the model as they are: within the vocabulary."""
        return self.array(name, shape, True, 0, self.vocab_size - 1)

    def keys(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A pair table's keys: a * vocab + b, or -1 for an empty slot."""
        return self.array(name, shape, True, -1, self.vocab_size**2 - 1)

    def probs(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.array(name, shape, False, 0.0, 1.0)

    def counts(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Smoothed counts, positive."""
        value = self.array(name, shape, False, 0.0, math.inf)
        if value.size and value.min() <= 0:
            raise self.damaged(f"{name} holds counts <= 0")
        return value

    def calibration(self, prefix: str, like) -> tuple[np.ndarray, np.ndarray]:
        """(hits, tries) of a calibration shaped as ``like`` (its ``hits`` and ``tries``): 0 <= hits <= tries."""
        tries = self.counts(f"{prefix}_tries", like.tries.shape)
        hits = self.array(f"{prefix}_hits", like.hits.shape, False, 0.0, math.inf)
        if (hits > tries).any():
            raise self.damaged(f"{prefix}_hits exceed {prefix}_tries")
        return hits.astype(np.float64), tries.astype(np.float64)

    def strings(self, name: str) -> list[str]:
        """A 1-d array of strings."""
        value = self.state.get(name)
        if value is None:
            raise self.damaged(f"it holds no {name}")
        if value.ndim != 1 or value.dtype.kind != "U" and value.size:
            raise self.damaged(f"{name} is {value.dtype} {list(value.shape)}, expected strings [n]")
        return value.tolist()
