"""safetensors checkpoints read in place: each header parsed, each weight matrix a view of the mapped file.

A safetensors file is an 8-byte header length, a JSON header (per tensor: dtype, shape, byte
range) and the data. A model directory holds one file or several shards. BF16, F16 and F32
matrices are handed to the kernels as :class:`freespec.kernels.GGMLWeight` of that type over the
mapped bytes (the kernels widen 16-bit weights to fp32 exactly), so a bf16 checkpoint costs 2
bytes a weight in memory and nothing is converted at load. Norm weights and biases are small fp32
copies. Every offset and size is checked against the file: a damaged file is a one-line error
naming it and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freespec.kernels import GGMLWeight
from freespec.model.errors import ModelLoadError

DTYPES = {"BF16": (2, "BF16"), "F16": (2, "F16"), "F32": (4, "F32")}  # safetensors dtype → (bytes, ggml type)
MAX_HEADER = 100 << 20  # bytes of JSON header a file may have (safetensors' own limit)


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # its bytes, a view of the mapped file [bytes]


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, by name, its bytes mapped (not read)."""
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")  # [file size]
    except ValueError:  # numpy cannot map an empty file
        raise ModelLoadError(f"cannot load safetensors file {path}: it is empty") from None
    except OSError as error:
        raise ModelLoadError(f"cannot read safetensors file {path}: {error.strerror or error}") from None

    def damaged(what: str) -> ModelLoadError:
        return ModelLoadError(f"cannot load safetensors file {path}: it is cut short or damaged ({what})")

    if len(mapped) < 8:
        raise damaged("no header")
    (length,) = struct.unpack("<Q", bytes(mapped[:8]))
    if length > min(MAX_HEADER, len(mapped) - 8):
        raise damaged(f"a header of {length} bytes in a file of {len(mapped)}")
    try:
        header = json.loads(bytes(mapped[8:8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(f"its header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    start, tensors = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise damaged(f"tensor {name} has no valid dtype, shape and data_offsets") from None
        itemsize = DTYPES.get(dtype, (None,))[0]
        if itemsize is not None and (min(shape, default=1) < 0 or end - begin != math.prod(shape) * itemsize):
            raise damaged(f"tensor {name}: {end - begin} bytes for a {dtype} tensor of shape {list(shape)}")
        if not 0 <= begin <= end <= len(mapped) - start:
            raise damaged(f"tensor {name} ends at byte {start + end}, the file at byte {len(mapped)}")
        tensors[name] = StoredTensor(path, dtype, shape, mapped[start + begin:start + end])
    return tensors


class SafetensorsTensors:
    """The tensors of a model directory's safetensors files, by their names (a
    :class:`freespec.model.weights.TensorSource`)."""

    norm_shift = 0.0  # checkpoints hold Gemma's norm weights as the model has them
    rope_interleaved = False  # query and key rows in transformers' order

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = sorted(directory.glob("*.safetensors"))
        self.tensors: dict[str, StoredTensor] = {}
        for path in self.files:
            for name, tensor in read_header(path).items():
                if name in self.tensors:
                    raise ModelLoadError(f"cannot load {directory}: tensor {name} is in both "
                                         f"{self.tensors[name].path.name} and {path.name}")
                self.tensors[name] = tensor

    def tensor_bytes(self) -> int:
        return sum(tensor.data.nbytes for tensor in self.tensors.values())

    def has(self, name: str) -> bool:
        return name in self.tensors

    def where(self, name: str) -> str:
        tensor = self.tensors.get(name)
        return f"safetensors file {tensor.path if tensor else self.directory}: tensor {name}"

    def matrix(self, name: str) -> GGMLWeight:
        tensor = self._tensor(name)
        if len(tensor.shape) != 2:
            raise ModelLoadError(f"cannot load {self.where(name)}: a weight matrix has 2 dimensions, "
                                 f"not {list(tensor.shape)}")
        return GGMLWeight(DTYPES[tensor.dtype][1], tensor.data.reshape(tensor.shape[0], -1), tensor.shape)

    def vector(self, name: str) -> torch.Tensor:
        """fp32 copy of a norm weight or bias: 16-bit floats widen exactly."""
        tensor = self._tensor(name)
        data = tensor.data
        if tensor.dtype == "BF16":
            values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = data.view(np.float16 if tensor.dtype == "F16" else np.float32).astype(np.float32)
        return torch.from_numpy(values.reshape(-1))

    def unused(self, names: set[str]) -> list[str]:
        return sorted(set(self.tensors) - names)

    def _tensor(self, name: str) -> StoredTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"cannot load {self.where(name)} is missing")
        if tensor.dtype not in DTYPES:
            raise ModelLoadError(f"cannot load {self.where(name)} is {tensor.dtype}; freespec reads "
                                 f"{', '.join(DTYPES)} safetensors")
        return tensor
