"""GGUF files read in place: the header parsed, each tensor a view of the memory-mapped file.

A GGUF file (llama.cpp's format) is a header - magic, version, key/value metadata, one record per
tensor - followed by the aligned tensor data. Only the header is parsed here; the metadata's
arrays (the tokenizer's vocabulary) are skipped, transformers reads those. Each weight matrix is
handed to the kernels in its own block format (:class:`freespec.kernels.GGMLWeight`) over the
mapped bytes: nothing is dequantized or copied, so a model costs its file's size in memory and
loads in the time the header takes to parse. Every offset and size is checked against the
file, so a damaged file is a one-line error naming it (and the tensor), never a crash.

:class:`GGUFTensors` names the tensors as transformers does (``model.layers.0.self_attn.q_proj.weight``
for ``blk.0.attn_q.weight``) and undoes llama.cpp's reordering of the query and key rows, so the
weights are the ones transformers' own GGUF loading gives, only not dequantized.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, quants

from freespec.kernels import SUPPORTED_TYPES, GGMLWeight
from freespec.model.errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023) counted in 32 bits; llama.cpp writes 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_TYPE_NAMES = ", ".join(kind.name for kind in SUPPORTED_TYPES)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # a ggml type id (known: checked when the header is read; read by the kernels: when used)
    dims: tuple[int, ...]  # ggml order: dims[0] is the length of a row
    offset: int  # of its first byte, from the start of the file


class GGUFFile:
    """One GGUF file: its scalar metadata (arrays are skipped: None), its tensors' records, its bytes mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r")  # [file size]
        except ValueError:  # numpy cannot map an empty file
            raise ModelLoadError(f"cannot load GGUF file {self.path}: it is empty") from None
        except OSError as error:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {error.strerror or error}") from None
        self._header = memoryview(self._bytes)  # what the parser reads: far faster than the array for struct
        self._end = len(self._bytes)
        self._position = 0
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.data_start = 0  # the offset of the first tensor's data: the header ends before it
        self._parse()

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def header_digest(self) -> str:
        """SHA-256 of the header (metadata and tensor records: all a config and tokenizer come
        from), hex: the same for a copy of the file anywhere, another for an edited header."""
        return hashlib.sha256(self._header[:self.data_start]).hexdigest()

    def tensor_bytes(self) -> int:
        """Bytes of all tensor data: what the weights occupy in memory once read."""
        return sum(self._size(info, self._known_type(info)) for info in self.tensors.values())

    def matrix(self, name: str) -> GGMLWeight:
        """Tensor ``name`` as a matrix [N, K] (K = its row length; higher dimensions fold into N), not copied."""
        info = self.tensors[name]
        kind = self._type(info)
        rows = math.prod(info.dims[1:])
        return GGMLWeight(kind, self._data(info, kind).reshape(rows, -1), (rows, info.dims[0]))

    def vector(self, name: str) -> torch.Tensor:
        """Tensor ``name`` flattened, as an fp32 copy (norm weights and biases: small)."""
        info = self.tensors[name]
        kind = self._type(info)
        values = quants.dequantize(self._data(info, kind).reshape(1, -1), kind)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1))

    # -- reading the header ----------------------------------------------------------------------

    def _damaged(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"cannot load GGUF file {self.path}: it is cut short or damaged ({what})")

    def _parse(self) -> None:
        if bytes(self._bytes[:4]) != MAGIC:
            raise ModelLoadError(f"cannot load GGUF file {self.path}: it is not a GGUF file (no GGUF magic)")
        self._position = 4
        version = self._read("<I")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "a big-endian GGUF file" if swapped in VERSIONS else f"GGUF version {version}"
            raise ModelLoadError(f"cannot load GGUF file {self.path}: {kind} is not supported (little-endian "
                                 f"versions {' and '.join(map(str, VERSIONS))} are)")
        tensor_count, value_count = self._read("<Q"), self._read("<Q")
        for _ in range(value_count):
            key = self._string("a metadata key")
            self.metadata[key] = self._value(self._read("<I"), key)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._damaged(f"general.alignment is {alignment!r}, not a power of two")
        records: dict[str, tuple[int, tuple[int, ...], int]] = {}  # name → (type id, dims, offset in the data)
        for _ in range(tensor_count):
            name = self._string("a tensor name")
            count = self._read("<I")
            if not 1 <= count <= MAX_DIMS:
                raise self._damaged(f"tensor {name} has {count} dimensions")
            dims = tuple(self._read("<Q") for _ in range(count))
            if name in records or 0 in dims:
                raise self._damaged(f"tensor {name} is listed twice" if name in records
                                    else f"tensor {name} has shape {list(dims)}")
            records[name] = (self._read("<I"), dims, self._read("<Q"))
        start = -(-self._position // alignment) * alignment  # the data begins at the next aligned byte
        self.data_start = start
        self.tensors = {name: TensorInfo(name, type_id, dims, start + offset)
                        for name, (type_id, dims, offset) in records.items()}
        for info in self.tensors.values():  # a file cut short is refused here, naming its first missing tensor
            self._data(info, self._known_type(info))

    def _read(self, fmt: str):
        end = self._position + struct.calcsize(fmt)
        if end > self._end:
            raise self._damaged(f"the header runs past the end of the file at byte {self._end}")
        (value,) = struct.unpack_from(fmt, self._header, self._position)
        self._position = end
        return value

    def _skip(self, size: int, what: str) -> None:
        if size > self._end - self._position:
            raise self._damaged(f"{what} runs past the end of the file")
        self._position += size

    def _string(self, what: str) -> str:
        length = self._read("<Q")
        start = self._position
        self._skip(length, what)
        return bytes(self._header[start:self._position]).decode("utf-8", errors="replace")

    def _value(self, type_id: int, key: str):
        """A metadata value: scalars and strings read, arrays skipped (None)."""
        if type_id == GGUFValueType.STRING:
            return self._string(f"the value of {key}")
        if type_id == GGUFValueType.ARRAY:
            self._skip_array(self._read("<I"), self._read("<Q"), key)
            return None
        if type_id not in _SCALARS:
            raise self._damaged(f"metadata {key} has an unknown value type {type_id}")
        return self._read(_SCALARS[type_id])

    def _skip_array(self, item_type: int, count: int, key: str) -> None:
        if item_type in _SCALARS:
            self._skip(count * struct.calcsize(_SCALARS[item_type]), f"the array {key}")
        elif item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            if count * 8 > self._end - self._position:  # each item takes at least 8 bytes
                raise self._damaged(f"the array {key} runs past the end of the file")
            if item_type == GGUFValueType.STRING:  # a vocabulary: ~100,000 strings, skipped in a tight loop
                header, position, end, length = self._header, self._position, self._end, struct.Struct("<Q")
                for _ in range(count):
                    if position + 8 > end:
                        break
                    position += 8 + length.unpack_from(header, position)[0]
                else:
                    if position <= end:
                        self._position = position
                        return
                raise self._damaged(f"the array {key} runs past the end of the file")
            for _ in range(count):
                self._value(item_type, key)
        else:
            raise self._damaged(f"metadata {key} is an array of an unknown value type {item_type}")

    # -- tensor data -----------------------------------------------------------------------------

    def _known_type(self, info: TensorInfo) -> GGMLQuantizationType:
        if info.type_id not in GGML_QUANT_SIZES:
            raise ModelLoadError(f"cannot load GGUF file {self.path}: tensor {info.name} has an unknown type "
                                 f"(id {info.type_id}); freespec reads {_TYPE_NAMES}")
        return GGMLQuantizationType(info.type_id)

    def _type(self, info: TensorInfo) -> GGMLQuantizationType:
        """The tensor's type, if the kernels read it."""
        kind = self._known_type(info)
        if kind not in SUPPORTED_TYPES:
            raise ModelLoadError(f"cannot load GGUF file {self.path}: tensor {info.name} is {kind.name}, a type "
                                 f"freespec does not read; it reads {_TYPE_NAMES}")
        return kind

    def _size(self, info: TensorInfo, kind: GGMLQuantizationType) -> int:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if info.dims[0] % block:
            raise self._damaged(f"tensor {info.name}: rows of {info.dims[0]} weights are not whole {kind.name} blocks")
        return math.prod(info.dims) // block * block_bytes

    def _data(self, info: TensorInfo, kind: GGMLQuantizationType) -> np.ndarray:
        """The tensor's bytes, a view of the mapped file [bytes]."""
        end = info.offset + self._size(info, kind)
        if end > len(self._bytes):
            raise self._damaged(f"tensor {info.name} ends at byte {end}, the file at byte {len(self._bytes)}")
        return self._bytes[info.offset:end]


# -- GGUF names as transformers names them ------------------------------------------------------

_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {  # a transformers decoder layer's modules → their GGUF names (gguf-py's tensor_mapping.py)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GEMMA_POST_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm"}
_ARCHITECTURE_NAMES = {  # where an architecture names a module otherwise, or has modules Llama has not
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},  # fused: ffn_up holds gate and up
    "gemma2": _GEMMA_POST_NORMS,
    "gemma3": _GEMMA_POST_NORMS,
}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

PERMUTED_ARCHITECTURES = ("llama",)
"""GGUF architectures whose query and key rows llama.cpp's converter reorders (``permute`` in
convert_hf_to_gguf.py, for the rotary embedding's interleaved layout): the ones transformers
reorders back (``TENSOR_PROCESSORS`` in modeling_gguf_pytorch_utils.py). Mistral files are
``llama``; Gemma's and Phi-3's rows are written as they are."""
SHIFTED_NORM_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
"""GGUF architectures whose norm weights llama.cpp's converter stores as ``1 + w`` (Gemma's
RMSNorm multiplies by 1 + w; the converter adds the 1, transformers' GGUF loading subtracts it)."""


def gguf_name(name: str, architecture: str = "llama") -> str | None:
    """The GGUF name of the transformers tensor ``name`` in a file of ``architecture`` (None if it has none).

    >>> gguf_name("model.layers.3.self_attn.k_proj.bias"), gguf_name("lm_head.weight")
    ('blk.3.attn_k.bias', 'output.weight')
    >>> gguf_name("model.layers.0.pre_feedforward_layernorm.weight", "gemma3"), gguf_name("x", "gemma3")
    ('blk.0.ffn_norm.weight', None)
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    names = {**_LAYER_NAMES, **_ARCHITECTURE_NAMES.get(architecture, {})}
    if match is None or match[2] not in names:
        return None
    return f"blk.{match[1]}.{names[match[2]]}.{match[3]}"


ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
"""Phi-3's LongRoPE factors: llama.cpp's converter stores them as tensors; they belong to the config."""


def longrope_parameters(file: GGUFFile) -> dict | None:
    """Phi-3's LongRoPE parameters as transformers' config holds them (``rope_parameters``), from
    the file: llama.cpp's converter stores the factors as tensors and the original context as
    ``<arch>.rope.scaling.original_context_length``, and transformers' GGUF reading leaves both
    out (a Phi-3-128k file would run without its scaling). None for a file without them.
    """
    if not all(name in file.tensors for name in ROPE_FACTOR_TENSORS):
        return None
    architecture = file.architecture
    original = file.metadata.get(f"{architecture}.rope.scaling.original_context_length")
    base = file.metadata.get(f"{architecture}.rope.freq_base", 10000.0)
    if not isinstance(original, int) or original <= 0:
        raise ModelLoadError(f"cannot load GGUF file {file.path}: it has LongRoPE factors but no valid "
                             f"{architecture}.rope.scaling.original_context_length ({original!r})")
    long, short = (file.vector(name).tolist() for name in ROPE_FACTOR_TENSORS)
    return {"rope_type": "longrope", "rope_theta": float(base), "long_factor": long, "short_factor": short,
            "original_max_position_embeddings": original}


class GGUFTensors:
    """A GGUF file's tensors under transformers' names (a :class:`freespec.model.weights.TensorSource`).

    Matrices are views of the mapped file, the query and key matrices of the architectures in
    :data:`PERMUTED_ARCHITECTURES` included: their rows stay in llama.cpp's order
    (``rope_interleaved``) and the layers put the projection's outputs back in transformers' order
    (:func:`freespec.kernels.weights.rotate_half_order`), a copy of a few activations instead of the
    matrices.
    """

    def __init__(self, file: GGUFFile):
        self.file = file
        self.norm_shift = 1.0 if file.architecture in SHIFTED_NORM_ARCHITECTURES else 0.0
        self.rope_interleaved = file.architecture in PERMUTED_ARCHITECTURES

    def has(self, name: str) -> bool:
        return self._gguf_name(name) in self.file.tensors

    def where(self, name: str) -> str:
        return f"GGUF file {self.file.path}: tensor {self._gguf_name(name) or name}"

    def matrix(self, name: str) -> GGMLWeight:
        return self.file.matrix(self._name(name))

    def vector(self, name: str) -> torch.Tensor:
        return self.file.vector(self._name(name))

    def unused(self, names: set[str]) -> list[str]:
        """The file's tensors that none of the transformers ``names`` maps to."""
        used = {self._gguf_name(name) for name in names} | set(ROPE_FACTOR_TENSORS)  # read into the config
        return sorted(set(self.file.tensors) - used)

    def _gguf_name(self, name: str) -> str | None:
        return gguf_name(name, self.file.architecture)

    def _name(self, name: str) -> str:
        found = self._gguf_name(name)
        if found not in self.file.tensors:
            raise ModelLoadError(f"cannot load {self.where(name)} is missing")
        return found
