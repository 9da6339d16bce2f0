"""A model's parameters as the kernels read them: one typed carrier per concept.

A weight matrix (:data:`Matrix`) is an fp32 tensor, a :class:`GGMLWeight` (a GGUF tensor's or a
16-bit safetensors tensor's bytes as the file holds them), a :class:`PackedWeight` (exact 4/8-bit
blocks; the kernels' block format is defined here: :func:`pack_nibbles`) or a :class:`Stacked`
(the rows of several of these, e.g. q, k and v of different types). :class:`Linear`,
:class:`RMSNorm`, :class:`LayerNorm` and :class:`DecoderLayer` describe one decoder layer,
:class:`Heads` the attention geometry and :class:`ModelWeights` a whole model. The model layer
(:mod:`freespec.model`) fills them; the C decoder and the runner's per-operation pass read them.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from freespec.kernels.formats import ggml_type, row_bytes

BLOCK = 32  # weights per quantization block (GGUF Q4_1 and Q8_0)


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix [N, K] stored as exact blocks for the C linear kernels.

    ``kind`` "q4": ``codes`` uint8 [N, K/2] (two 4-bit codes a byte, see :func:`pack_nibbles`),
    ``scales`` fp32 [N, K/32, 2] = (d, m). ``kind`` "q8": ``codes`` int8 [N, K], ``scales`` fp32
    [N, K/32] = d. Only the blocks are stored: :attr:`dense` decodes the fp32 matrix on first
    use, for torch where the C kernels are not built (keeping it would double the memory).
    The C code reads the blocks by pointer, so a PackedWeight that does not hold exactly this
    layout cannot be made (a damaged cache file is refused here, not read out of bounds).
    """

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self):
        codes_dtype, scale_tail = {"q4": (torch.uint8, (2,)), "q8": (torch.int8, ())}.get(self.kind, (None, None))
        if codes_dtype is None:
            raise ValueError(f"unknown block kind {self.kind!r}: expected q4 or q8")
        if self.codes.dtype != codes_dtype or self.scales.dtype != torch.float32:
            raise ValueError(f"{self.kind} blocks need {codes_dtype} codes and float32 scales, "
                             f"got {self.codes.dtype} and {self.scales.dtype}")
        if self.codes.dim() != 2 or not (self.codes.is_contiguous() and self.scales.is_contiguous()):
            raise ValueError(f"{self.kind} codes must be one contiguous matrix, got {list(self.codes.shape)}")
        rows, columns = self.shape
        if columns % BLOCK or self.scales.shape != (rows, columns // BLOCK, *scale_tail):
            raise ValueError(f"{self.kind} scales {list(self.scales.shape)} do not fit a [{rows}, {columns}] matrix")

    @property
    def shape(self) -> torch.Size:
        rows, columns = self.codes.shape
        return torch.Size([rows, columns * 2 if self.kind == "q4" else columns])

    @property
    def nbytes(self) -> int:
        """The bytes a pass streams: codes and scales."""
        return self.codes.nbytes + self.scales.nbytes

    @cached_property
    def dense(self) -> torch.Tensor:
        """The fp32 matrix [N, K], the same bits as the weight that was packed."""
        rows, columns = self.shape
        scales = self.scales.numpy()
        if self.kind == "q4":
            codes = unpack_nibbles(self.codes.numpy()).reshape(rows, columns // BLOCK, BLOCK)
            weight = scales[..., 0:1] * codes.astype(np.float32) + scales[..., 1:2]  # as encode_q4_1 checks
        else:
            weight = scales[..., None] * self.codes.numpy().reshape(rows, columns // BLOCK, BLOCK).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(weight.reshape(rows, columns)))


class GGMLWeight:
    """A weight matrix [N, K] stored in a ggml type (:data:`~freespec.kernels.formats.SUPPORTED_TYPES`):
    block-quantized (Q4_0 .. Q6_K, IQ1_S .. IQ4_XS, TQ1_0, TQ2_0) or F16/BF16/F32, its bytes exactly as
    a GGUF file stores them.
    A safetensors bf16/f16/f32 tensor has the same layout, so it is a GGMLWeight of that type.

    ``data``: the bytes, a C-contiguous numpy array (a read-only memmap is fine) or CPU tensor of
    any dtype, ``N * row_bytes`` bytes in all; kept as a uint8 view [N, row_bytes] of the same
    memory, never copied, so a memory-mapped file is multiplied where it lies. The kernels give
    the same bits as the fp32 kernel on :meth:`dequantize`'s matrix.
    """

    def __init__(self, kind: str | int | GGMLQuantizationType, data: np.ndarray | torch.Tensor,
                 shape: tuple[int, int]):
        self.type = ggml_type(kind)
        try:
            rows, columns = (int(size) for size in shape)
        except (TypeError, ValueError):
            rows = columns = 0
        if rows <= 0 or columns <= 0:
            raise ValueError(f"a weight matrix has a shape (N, K) of positive sizes, not {shape!r}")
        self.shape = (rows, columns)
        self.row_bytes = row_bytes(self.type, columns)
        if isinstance(data, torch.Tensor):
            if data.device.type != "cpu" or not data.is_contiguous():
                raise ValueError("weight data must be a contiguous CPU tensor")
            data = data.detach().view(torch.uint8).numpy()
        if not isinstance(data, np.ndarray):
            raise ValueError(f"weight data must be a numpy array or torch tensor, not {type(data).__name__}")
        if not data.flags.c_contiguous:
            raise ValueError("weight data must be C-contiguous (it is read in place)")
        expected = rows * self.row_bytes
        if data.nbytes != expected:
            raise ValueError(f"a {self.type.name} matrix of shape {self.shape} takes {expected} bytes, "
                             f"the data holds {data.nbytes}")
        self.data = data.reshape(-1).view(np.uint8).reshape(rows, self.row_bytes)  # [N, row_bytes]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        return f"GGMLWeight({self.type.name}, shape={self.shape})"

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix [N, K] ggml's formulas give (``gguf.quants.dequantize``); F32 data may be shared."""
        array = quants.dequantize(self.data, self.type).reshape(self.shape)
        if not array.flags.writeable:  # a read-only memmap's F32 view: torch wants writable memory
            array = array.copy()
        return torch.from_numpy(array)

    @cached_property
    def dense(self) -> torch.Tensor:
        """:meth:`dequantize`'s matrix, kept: for torch where the C kernels are not built."""
        return self.dequantize()


@dataclass(frozen=True, eq=False)
class Stacked:
    """The rows of several matrices with the same K stacked into one [sum N, K] matrix, each part
    in its own format: a GGUF stores q, k and v (or gate and up) as separate tensors, often of
    different types (Q4_K_M mixes Q4_K and Q6_K), and one fused projection reads them all where
    they lie. A linear layer over it gives the parts' outputs side by side, the same bits as one
    matrix of all the rows. Parts are fp32 tensors, :class:`PackedWeight` or :class:`GGMLWeight`.
    """

    parts: tuple[Matrix, ...]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("a stacked matrix needs at least one part")
        for part in self.parts:
            if not isinstance(part, (torch.Tensor, PackedWeight, GGMLWeight)):
                raise ValueError(f"a stacked matrix's parts are fp32 tensors, PackedWeight or GGMLWeight, "
                                 f"not {type(part).__name__}")
            if len(part.shape) != 2:
                raise ValueError(f"a stacked matrix's parts are matrices, not of shape {list(part.shape)}")
        columns = {part.shape[1] for part in self.parts}
        if len(columns) > 1:
            raise ValueError(f"stacked matrices need the same number of columns, got {sorted(columns)}")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(part.shape[0] for part in self.parts), self.parts[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __repr__(self) -> str:
        return f"Stacked({', '.join(map(repr, self.parts))})"

    @cached_property
    def dense(self) -> torch.Tensor:
        """The fp32 matrix [sum N, K], kept: for torch where the C kernels are not built."""
        # the parts' fp32 forms are not kept as well
        return torch.cat([part.dequantize() if isinstance(part, GGMLWeight) else dense(part) for part in self.parts])


Matrix = torch.Tensor | PackedWeight | GGMLWeight | Stacked
"""A weight matrix [out, in]: contiguous fp32, its exact 4/8-bit blocks, a ggml type's bytes, or
the rows of several of these stacked."""


def dense(matrix: Matrix) -> torch.Tensor:
    """The fp32 form [N, K] of any matrix (kept by a carrier once made: torch's fallback reads it)."""
    return matrix if isinstance(matrix, torch.Tensor) else matrix.dense


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [N, K] → bytes [N, K/2] in the kernel's order, which is GGUF Q4_0/Q4_1's: per
    block of 32, byte j holds code j (low nibble) and code 16 + j (high nibble).

    >>> pack_nibbles(np.arange(32, dtype=np.uint8).reshape(1, 32) % 16)[0, :2].tolist()
    [0, 17]
    """
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // BLOCK, 2, 16)  # [.., low/high, 16]
    return np.ascontiguousarray((blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, cols // 2))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: bytes [N, K/2] → 4-bit codes [N, K].

    >>> codes = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    >>> np.array_equal(unpack_nibbles(pack_nibbles(codes)), codes)
    True
    """
    rows, half = packed.shape
    bytes_ = packed.reshape(rows, half // 16, 1, 16)  # [.., 1, 16]
    return np.concatenate([bytes_ & 15, bytes_ >> 4], axis=2).reshape(rows, half * 2)


@dataclass
class Linear:
    """``x @ weight.T + bias``: weight [out, in], bias [out] fp32 or None."""

    weight: Matrix
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class RMSNorm:
    weight: torch.Tensor  # [n] fp32
    eps: float


@dataclass(frozen=True)
class LayerNorm:
    weight: torch.Tensor  # [n] fp32
    bias: torch.Tensor  # [n] fp32
    eps: float


@dataclass
class DecoderLayer:
    """One pre-norm decoder layer: ``h += o(attention(qkv(attn_norm(h))))``, then
    ``h += down(act(up(mlp_norm(h))))``.

    ``qkv`` is the fused query, key and value projection [(heads + 2 kv_heads) head_dim, hidden].
    ``gated`` MLPs (Llama-style) compute ``act(gate) * up`` from ``up`` [2 intermediate, hidden]
    with rows [gate | up]; others (GPT-2) ``act(up)`` from ``up`` [intermediate, hidden].
    ``q_norm``, ``k_norm``: per-head RMSNorms of queries and keys before the rotary embedding
    (Qwen3, Gemma 3), else None. ``post_attn_norm``, ``post_mlp_norm``: norms of the attention's
    and the MLP's outputs before each residual add (Gemma 2 and 3), else None. ``window``: the
    layer's sliding window (a key at position p is visible to a query at position q iff
    q - p < window), None for global attention. ``rotary``: which of the model's rotary tables
    the layer rotates with (Gemma 3's layer type, "sliding_attention" or "full_attention"), None
    where the model has one. ``interleaved_qk``: the query and key rows of each head are in
    llama.cpp's interleaved rotary order (a GGUF ``llama`` file, read in place): the projection's
    outputs are put back in transformers' order before anything reads them.
    """

    attn_norm: RMSNorm | LayerNorm
    qkv: Linear
    o: Linear
    mlp_norm: RMSNorm | LayerNorm
    up: Linear
    down: Linear
    gated: bool
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None
    post_attn_norm: RMSNorm | None = None
    post_mlp_norm: RMSNorm | None = None
    window: int | None = None
    rotary: str | None = None
    interleaved_qk: bool = False


@dataclass(frozen=True)
class Heads:
    """The attention geometry: query heads, key/value heads (grouped-query attention when fewer),
    the head size, the factor the scores are scaled by and their soft cap (Gemma 2: a scaled score
    s becomes ``softcap * tanh(s / softcap)``; None: no cap)."""

    heads: int
    kv_heads: int
    dim: int
    scale: float
    softcap: float | None = None


@dataclass
class ModelWeights:
    """Everything a forward pass reads: token embeddings [vocab, hidden], learned position
    embeddings [positions, hidden] (GPT-2; None with rotary embeddings), the decoder layers, the
    final norm, the output projection [vocab, hidden], the attention geometry and the MLP's
    activation (its transformers name, e.g. "silu"). ``embed_scale``: the factor embedded tokens
    are multiplied by (Gemma: sqrt(hidden) in the model's dtype), None for 1. ``final_softcap``:
    the logits' soft cap (Gemma 2: ``cap * tanh(logits / cap)``), None for none.

    ``embed`` is any :data:`Matrix` (a GGUF's token_embd is often Q4_K, Q6_K or Q8_0): a pass
    reads the rows of its tokens (``Kernels.embed``), never the whole table in fp32. A model
    with tied embeddings has the same object as ``embed`` and ``lm_head.weight``."""

    embed: Matrix
    positions: torch.Tensor | None
    layers: list[DecoderLayer]
    final_norm: RMSNorm | LayerNorm
    lm_head: Linear
    heads: Heads
    activation: str
    embed_scale: float | None = None
    final_softcap: float | None = None



def repack(matrix: Matrix) -> Matrix:
    """``matrix`` in the layout the C kernels decode fastest, with the same fp32 weights.

    GGUF Q4_1 and Q8_0 blocks become a :class:`PackedWeight` (their codes, as they lie, in one
    array, the block scales as fp32 in another: 0.75 and 1.125 bytes a weight instead of 0.625
    and 1.0625; a copy of the codes, no arithmetic). On this project's AVX2 machine a decoding
    step is bound by the arithmetic of decoding weights, not by memory, and the packed kernels
    load fp32 scales instead of converting fp16 ones (docs/kernels.md); the AVX-512 build does not
    re-pack (:meth:`CKernels.prepare <freespec.kernels.backend.CKernels.prepare>`). Every other
    matrix is returned as it is; a :class:`Stacked` one part by part.
    """
    if isinstance(matrix, Stacked):
        parts = [repack(part) for part in matrix.parts]
        return matrix if all(new is old for new, old in zip(parts, matrix.parts)) else Stacked(parts)
    if not isinstance(matrix, GGMLWeight) or matrix.type not in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        return matrix
    rows, columns = matrix.shape
    q4 = matrix.type == GGMLQuantizationType.Q4_1
    blocks = matrix.data.reshape(rows, columns // BLOCK, 20 if q4 else 34)  # [N, K/32, block bytes]
    if q4:  # f16 d, f16 m, 16 bytes of codes in pack_nibbles' order
        scales = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)  # [N, K/32, 2] = (d, m)
        codes = np.ascontiguousarray(blocks[:, :, 4:]).reshape(rows, columns // 2)
        packed = PackedWeight("q4", torch.from_numpy(codes), torch.from_numpy(scales))
    else:  # f16 d, 32 int8 codes
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32).reshape(rows, columns // BLOCK)
        codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, columns)
        packed = PackedWeight("q8", torch.from_numpy(codes), torch.from_numpy(scales))
    _release_file_pages(matrix.data)
    return packed


def _release_file_pages(array: np.ndarray) -> None:
    """Lets the kernel drop the pages of a memory-mapped file region that was copied out (they
    would count as resident until evicted); re-reading them faults them in from the file again.
    Only read-only file mappings: on anonymous memory MADV_DONTNEED would erase the data."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    if base is None or base.mode != "r" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-array.ctypes.data // page) * page
    end = (array.ctypes.data + array.nbytes) // page * page
    if end > start:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                  mmap.MADV_DONTNEED)


def map_matrices(weights: ModelWeights, change) -> ModelWeights:
    """``weights`` with every weight matrix replaced by ``change(matrix)`` (a matrix that is used
    twice, like a tied embedding and output head, is changed once and stays one object)."""
    done: dict[int, Matrix] = {}

    def matrix(old: Matrix) -> Matrix:
        if id(old) not in done:
            done[id(old)] = change(old)
        return done[id(old)]

    def linear(old: Linear) -> Linear:
        return replace(old, weight=matrix(old.weight))

    layers = [replace(layer, qkv=linear(layer.qkv), o=linear(layer.o), up=linear(layer.up), down=linear(layer.down))
              for layer in weights.layers]
    return replace(weights, embed=matrix(weights.embed), layers=layers, lm_head=linear(weights.lm_head))


def rotate_half_order(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's ``permute`` of a [rows, K] query or key matrix of
    ``heads`` heads (transformers' ``_reverse_permute_weights``): row i of the result is row
    ``order[i]`` of the file's. The same order takes the projection's outputs from llama.cpp's
    interleaved rotary layout to transformers' rotate-half layout (``DecoderLayer.interleaved_qk``).

    >>> rotate_half_order(8, 1).tolist()  # a head's rows (0, 4), (1, 5), ... were interleaved
    [0, 2, 4, 6, 1, 3, 5, 7]
    """
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def qkv_rotate_half_order(heads: Heads) -> torch.Tensor:
    """[(heads + 2 kv_heads) dim] int64: :func:`rotate_half_order` over the query and key rows of
    a fused qkv projection, its value rows in place. Indexes the rows of an ``interleaved_qk``
    layer's matrix or the columns of its outputs alike."""
    qk_heads = heads.heads + heads.kv_heads
    width = qk_heads * heads.dim
    return torch.from_numpy(np.concatenate([rotate_half_order(width, qk_heads),
                                            np.arange(width, width + heads.kv_heads * heads.dim)]))


def rotate_half_rows(weights: ModelWeights) -> ModelWeights:
    """``weights`` with every ``interleaved_qk`` layer's query and key rows put back in
    transformers' order, as fp32 copies: for backends that compute on fp32 copies anyway and
    whose matmul may give a row other bits at another position (torch's)."""
    order = qkv_rotate_half_order(weights.heads)

    def layer(old: DecoderLayer) -> DecoderLayer:
        if not old.interleaved_qk:
            return old
        bias = None if old.qkv.bias is None else old.qkv.bias[order]
        return replace(old, qkv=Linear(dense(old.qkv.weight)[order], bias), interleaved_qk=False)

    return replace(weights, layers=[layer(old) for old in weights.layers])

