"""Exact block encodings of fp32 weights that came from 4-bit or 8-bit quantized files.

A model shipped as GGUF Q4_1 or Q8_0 and dequantized to fp32 has weights that are, per block of
32 consecutive inputs, exactly ``d * q + m`` (Q4_1: q in 0..15, d and m fp16) or ``d * q``
(Q8_0: q in -128..127, d fp16). Recovering (d, m, q) from the fp32 values lets the linear kernel
stream 0.75 or 1.125 bytes per weight instead of 4 while every weight it multiplies stays the
same fp32 number: the model, and so every output token, is unchanged.

Nothing here trusts file metadata: an encoding is accepted only if decoding it reproduces every
fp32 weight bit for bit; otherwise the matrix stays fp32.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from freespec.kernels.weights import BLOCK, PackedWeight, pack_nibbles

log = logging.getLogger(__name__)

PROBE_ROWS = 16  # rows tried first, so plain fp32 matrices are rejected cheaply
_SCALE_STEPS = (0, -1, 1, -2, 2)  # fp16 neighbours of the estimated scale worth trying


def _fp16_candidates(estimate: np.ndarray):
    """fp16 values at and around ``estimate`` (fp32), as fp32 arrays, nearest first."""
    bits = estimate.astype(np.float16).view(np.uint16).astype(np.int32)
    for step in _SCALE_STEPS:
        yield np.clip(bits + step, 0, 0x7BFF).astype(np.uint16).view(np.float16).astype(np.float32)


def encode_q4_1(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q uint8 [N, K], d [N, K/32], m [N, K/32]) with ``d * q + m == weight`` exactly, or None.

    >>> d, m = np.float32(0.5), np.float32(-1.0)
    >>> w = (d * (np.arange(32) % 16).astype(np.float32) + m).reshape(1, 32)
    >>> q, scale, low = encode_q4_1(w)
    >>> q[0, :5].tolist(), float(scale[0, 0]), float(low[0, 0])
    ([0, 1, 2, 3, 4], 0.5, -1.0)
    >>> encode_q4_1(np.linspace(0, 1, 32, dtype=np.float32).reshape(1, 32)) is None  # 32 levels
    True
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        return None
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    if not np.array_equal(low.astype(np.float16).astype(np.float32), low):
        return None
    codes = np.zeros(blocks.shape, dtype=np.uint8)
    scales = np.zeros(low.shape, dtype=np.float32)
    found = high == low  # constant blocks: d = 0, q = 0
    for scale in _fp16_candidates((high - low) / np.float32(15)):
        todo = ~found
        if not todo.any():
            break
        b, s, lo = blocks[todo], scale[todo][:, None], low[todo][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.nan_to_num(np.rint((b - lo) / s)).clip(0, 15).astype(np.uint8)
        exact = (s * q.astype(np.float32) + lo == b).all(axis=-1)
        index = tuple(i[exact] for i in np.nonzero(todo))
        codes[index], scales[index] = q[exact], s[exact, 0]
        found[index] = True
    if not found.all():
        return None
    return codes.reshape(rows, cols), scales, low


def encode_q8_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8 [N, K], d [N, K/32]) with ``d * q == weight`` exactly, or None.

    >>> w = (np.float32(0.25) * (np.arange(32) * 8 - 127).astype(np.float32)).reshape(1, 32)
    >>> q, scale = encode_q8_0(w)
    >>> q[0, :3].tolist(), float(scale[0, 0])
    ([-127, -119, -111], 0.25)
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        return None
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    largest = np.abs(blocks).max(axis=-1)
    codes = np.zeros(blocks.shape, dtype=np.int8)
    scales = np.zeros(largest.shape, dtype=np.float32)
    found = largest == 0
    for scale in _fp16_candidates(largest / np.float32(127)):
        todo = ~found
        if not todo.any():
            break
        b, s = blocks[todo], scale[todo][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.nan_to_num(np.rint(b / s)).clip(-128, 127).astype(np.int8)
        exact = (s * q.astype(np.float32) == b).all(axis=-1)
        index = tuple(i[exact] for i in np.nonzero(todo))
        codes[index], scales[index] = q[exact], s[exact, 0]
        found[index] = True
    if not found.all():
        return None
    return codes.reshape(rows, cols), scales


def pack(weight: torch.Tensor) -> PackedWeight | None:
    """The exact block form of ``weight`` [N, K] (fp32), trying Q4_1 then Q8_0; None if neither."""
    array = weight.detach().to(torch.float32).contiguous().numpy()
    if array.ndim != 2 or array.shape[1] % BLOCK:
        return None
    probe = array[:PROBE_ROWS]
    if encode_q4_1(probe) is not None:
        encoded = encode_q4_1(array)
        if encoded is not None:
            codes, d, m = encoded
            scales = np.stack([d, m], axis=-1)
            return PackedWeight("q4", torch.from_numpy(pack_nibbles(codes)), torch.from_numpy(scales))
    if encode_q8_0(probe) is not None:
        encoded = encode_q8_0(array)
        if encoded is not None:
            codes, d = encoded
            return PackedWeight("q8", torch.from_numpy(codes), torch.from_numpy(d))
    return None


def pack_all(weights: dict[str, torch.Tensor], cache: Path | None = None) -> dict[str, torch.Tensor | PackedWeight]:
    """Each weight in its exact block form where it has one, else unchanged.

    Finding the blocks reads every weight a few times (~30 s for a 135M model), so the result
    is kept in ``cache`` (a safetensors file) when given and read from there next time. A cache
    that cannot be read or does not fit these weights (kind, dtype or shape) is packed afresh.
    """
    if cache is not None and cache.exists():
        try:
            return _load_packed(cache, weights)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            log.warning("packing the weights afresh: the packed-weight cache %s is unusable (%s)", cache, error)
    packed = {name: pack(weight) or weight for name, weight in weights.items()}
    if cache is not None:
        _save_packed(cache, packed)
    return packed


def _save_packed(path: Path, packed: dict[str, torch.Tensor | PackedWeight]) -> None:
    tensors, kinds = {}, {}
    for name, weight in packed.items():
        if isinstance(weight, PackedWeight):
            tensors[f"{name}.codes"], tensors[f"{name}.scales"] = weight.codes, weight.scales
            kinds[name] = weight.kind
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staging = Path(tmp) / path.name
        save_file(tensors, str(staging), metadata={"kinds": json.dumps(kinds)})
        os.replace(staging, path)  # atomic: readers never see a partial file


def _load_packed(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | PackedWeight]:
    """The weights with the cached blocks in place; a ValueError (or the reader's own error) if
    the file does not hold exactly what :func:`_save_packed` writes for these weights. The
    blocks are read by pointer in C, so each one's kind, dtypes and shapes are checked
    (:class:`PackedWeight` refuses any other layout)."""
    with safe_open(str(path), framework="pt") as stored:
        kinds = json.loads((stored.metadata() or {}).get("kinds", "null"))
        if not isinstance(kinds, dict) or not set(kinds) <= set(weights) or not all(
                isinstance(kind, str) for kind in kinds.values()):
            raise ValueError("its block kinds do not name these weights")
        result: dict[str, torch.Tensor | PackedWeight] = {}
        for name, weight in weights.items():
            if name not in kinds:
                result[name] = weight
                continue
            packed = PackedWeight(kinds[name], stored.get_tensor(f"{name}.codes"), stored.get_tensor(f"{name}.scales"))
            if packed.shape != weight.shape:
                raise ValueError(f"{name}: cached blocks of shape {list(packed.shape)} do not match the weight's "
                                 f"{list(weight.shape)}")
            result[name] = packed
    return result
