"""The ggml weight types the kernels read in their own layout (``csrc/formats.h``): their names,
their row sizes, and random valid blocks of each for tests and benchmarks.

A matrix in one of these types is a :class:`freespec.kernels.weights.GGMLWeight`: the bytes of a
GGUF tensor as the file stores them, or of a bf16/f16/f32 safetensors tensor (the same layout).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"))
_NAMES = ", ".join(kind.name for kind in SUPPORTED_TYPES)


def ggml_type(kind: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """The supported ggml type named by ``kind`` (a name such as ``"Q4_K"``, any case, or a ggml type id)."""
    try:
        if isinstance(kind, str):
            resolved = GGMLQuantizationType[kind.upper()]
        else:
            resolved = GGMLQuantizationType(int(kind))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown GGUF tensor type {kind!r}; supported: {_NAMES}") from None
    if resolved not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor type {resolved.name} is not supported; supported: {_NAMES}")
    return resolved


def row_bytes(kind: GGMLQuantizationType, columns: int) -> int:
    """Bytes of one row of ``columns`` weights of type ``kind`` (``columns`` a multiple of its block)."""
    block_size, block_bytes = GGML_QUANT_SIZES[kind]
    if columns % block_size:
        raise ValueError(f"a {kind.name} row holds whole blocks of {block_size} weights; {columns} is not a multiple")
    return columns // block_size * block_bytes


_HALF_FIELDS = {  # byte offsets of the fp16 scale fields in one block
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
    "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,), "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": (),  # IQ1_M: see _IQ1_M_SCALES
    "TQ1_0": (52,), "TQ2_0": (64,),
}
_IQ1_M_SCALES = 48  # IQ1_M's f16 d lies in bits 12-15 of the four 16-bit scale words from this byte


def _random_halves(count: int, generator: np.random.Generator, largest: float, brain: bool) -> np.ndarray:
    """``count`` random 16-bit floats (fp16, or bf16 if ``brain``) as uint16 bits: every sign and
    exponent, subnormals and zeros included, all finite and at most ``largest`` in magnitude."""
    bits = np.empty(count, dtype=np.uint16)
    todo = np.arange(count)
    while todo.size:
        drawn = generator.integers(0, 1 << 16, size=todo.size, dtype=np.uint16)
        values = (drawn.astype(np.uint32) << 16).view(np.float32) if brain else drawn.view(np.float16)
        good = np.isfinite(values) & (np.abs(values.astype(np.float32)) <= largest)
        bits[todo[good]] = drawn[good]
        todo = todo[~good]
    return bits


def _normal_halves(count: int, generator: np.random.Generator, typical: float, brain: bool) -> np.ndarray:
    """``count`` normal 16-bit floats of standard deviation ``typical`` as uint16 bits."""
    values = generator.standard_normal(count, dtype=np.float32) * np.float32(typical)
    if brain:  # round to nearest even, as torch does
        bits = values.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(np.float16).view(np.uint16)


def random_blocks(kind: str | int | GGMLQuantizationType, shape: tuple[int, int], generator: np.random.Generator,
                  largest: float = 65504.0, code_byte: int | None = None, typical: float | None = None) -> np.ndarray:
    """Valid random bytes of a matrix of type ``kind`` [N, row_bytes] (tests and benchmarks).

    Codes (and K-quant sub-block scales) are uniform random bytes, every value included, or all
    ``code_byte`` if given (0xFF: the largest codes); fp16 scale fields and 16-bit weights are
    random finite values up to ``largest`` in magnitude, of either sign, subnormals and zeros
    included (every exponent alike: most are tiny). F32 weights are standard normal times
    ``largest``. With ``typical``, scale fields and 16-bit and F32 weights are normal of that
    standard deviation instead: magnitudes like a real model's.
    """
    kind = ggml_type(kind)
    rows, columns = shape
    brain = kind == GGMLQuantizationType.BF16

    def halves(count: int) -> np.ndarray:
        if typical is None:
            return _random_halves(count, generator, largest, brain)
        return _normal_halves(count, generator, typical, brain)

    if kind == GGMLQuantizationType.F32:
        std = np.float32(largest if typical is None else typical)
        return (generator.standard_normal((rows, columns), dtype=np.float32) * std).view(np.uint8)
    if kind in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return halves(rows * columns).view(np.uint8).reshape(rows, columns * 2)
    block_size, block_bytes = GGML_QUANT_SIZES[kind]
    blocks = generator.integers(0, 256, size=(rows * columns // block_size, block_bytes), dtype=np.uint8)
    if code_byte is not None:
        blocks[:] = code_byte
    for offset in _HALF_FIELDS[kind.name]:
        blocks[:, offset:offset + 2] = halves(len(blocks)).view(np.uint8).reshape(-1, 2)
    if kind == GGMLQuantizationType.IQ1_M:  # its d's four nibbles, first to last, atop the scale words
        d = halves(len(blocks)).astype(np.uint16)[:, None]  # [blocks, 1]
        words = blocks[:, _IQ1_M_SCALES:_IQ1_M_SCALES + 8].copy().view(np.uint16) & np.uint16(0x0FFF)  # [blocks, 4]
        words |= ((d >> np.array([0, 4, 8, 12], dtype=np.uint16)) & np.uint16(15)) << np.uint16(12)
        blocks[:, _IQ1_M_SCALES:_IQ1_M_SCALES + 8] = words.view(np.uint8)
    return blocks.reshape(rows, row_bytes(kind, columns))
