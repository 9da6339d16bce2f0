"""The ctypes side of ``csrc/freespec.h``, declared once, and the one guard every array passes
on its way to C.

C reads arrays by address with no idea of their dtype or size: a wrong width or dtype reads
past a buffer or misreads its bytes. :func:`address` is the only way a tensor's address reaches
a kernel here (:func:`array_address` a numpy array's), and it checks dtype, shape and contiguity
first (a few attribute reads).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

OK, OUT_OF_MEMORY, BAD_MATRIX, NOT_BOUNDED = 0, 1, 2, 3  # the FREESPEC_* status codes
PACKED_Q4, PACKED_Q8, STACKED = 1004, 1008, 1100  # Matrix kinds besides the ggml type ids

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Matrix(ctypes.Structure):
    pass


Matrix._fields_ = [("kind", _I), ("N", _I), ("K", _I), ("data", _P), ("scales", _P), ("bias", _P),
                   ("parts", ctypes.POINTER(Matrix)), ("num_parts", _I)]


SILU, GELU_TANH = 0, 1  # the decoder's activations (freespec.h)


class DecoderLayer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P), ("attn_eps", _F),
                ("mlp_eps", _F), ("q_eps", _F), ("k_eps", _F), ("qkv", Matrix), ("o", Matrix), ("gate_up", Matrix),
                ("down", Matrix), ("post_attn_norm", _P), ("post_mlp_norm", _P), ("post_attn_eps", _F),
                ("post_mlp_eps", _F), ("window", _I), ("rotary", _I), ("interleaved_qk", _I)]


class DecoderSequence(ctypes.Structure):
    _fields_ = [("keys", _P), ("values", _P), ("capacity", _I), ("past", _I), ("n", _I), ("tree_mask", _P)]


class DecoderPass(ctypes.Structure):
    _fields_ = [("layers", _P), ("num_layers", _I), ("hidden", _I), ("intermediate", _I), ("embed", Matrix),
                ("final_norm", _P), ("final_eps", _F), ("scale", _F), ("H", _I), ("KV", _I), ("D", _I),
                ("embed_scale", _F), ("softcap", _F), ("activation", _I),
                ("tokens", _P), ("n", _I), ("positions", _P), ("cos_tables", _P * 2), ("sin_tables", _P * 2),
                ("rope_rows", _P * 2),
                ("sequences", ctypes.POINTER(DecoderSequence)), ("num_sequences", _I), ("skip", _P), ("out", _P)]


SIGNATURES: dict[str, tuple[type | None, list]] = {
    "freespec_linear": (ctypes.c_int, [ctypes.POINTER(Matrix), _P, _P, _I]),
    "freespec_head_bounds": (ctypes.c_int, [ctypes.POINTER(Matrix), _P]),
    "freespec_head_codes": (ctypes.c_int, [ctypes.POINTER(Matrix), _P, _P, _P, _P]),
    "freespec_head_argmax": (ctypes.c_int, [ctypes.POINTER(Matrix), _P, _P, _I, _P, ctypes.POINTER(Matrix), _P, _I, _P,
                                            _P, _P]),
    "freespec_rows": (ctypes.c_int, [ctypes.POINTER(Matrix), _P, _I, _P]),
    "freespec_tree_layout": (_I, [_P, _I, _P, _P]),
    "freespec_tree_attention": (None, [_P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _P]),
    "freespec_window_attention": (None, [_P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _I, _F, _P, _P]),
    "freespec_rope_store": (None, [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P]),
    "freespec_forward_llama": (ctypes.c_int, [ctypes.POINTER(DecoderPass)]),
    "freespec_top_k": (None, [_P, _I, _I, _I, _P, _P, _P]),
}
"""Each exported function's (return type, argument types), in the header's order."""


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give every exported function of ``library`` its C signature."""
    for name, (result, arguments) in SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


def address(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The address of ``tensor``'s data, once it is known to be a contiguous ``dtype`` array of
    exactly ``shape``; else a ValueError naming the argument."""
    if tensor.dtype != dtype or tensor.shape != shape or not tensor.is_contiguous():
        layout = "" if tensor.is_contiguous() else "non-contiguous "
        raise ValueError(f"{name}: the kernel needs a contiguous {dtype} tensor of shape {list(shape)}, "
                         f"got a {layout}{tensor.dtype} tensor of shape {list(tensor.shape)}")
    return tensor.data_ptr()


def array_address(name: str, array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> int:
    """:func:`address` for a numpy array (what a decoding step hands the kernels, touching no torch)."""
    if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        raise ValueError(f"{name}: the kernel needs a contiguous {np.dtype(dtype)} array of shape {list(shape)}, "
                         f"got {array.dtype} of shape {list(array.shape)}")
    return array.ctypes.data


def check_status(status: int, what: str) -> None:
    """Raise for a failed call's status code."""
    if status == OUT_OF_MEMORY:
        raise MemoryError(f"{what}: the kernel could not allocate its scratch memory")
    if status == BAD_MATRIX:
        raise RuntimeError(f"{what}: the kernel does not read this weight matrix (a stale kernel build?)")
    if status != OK:
        raise RuntimeError(f"{what}: the kernel failed with status {status}")
