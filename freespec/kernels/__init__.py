"""Batch-invariant CPU kernels (``csrc/kernels.c``, interface ``csrc/freespec.h``), built on first use.

Two kernels make a token's logits bit-identical whether it is decoded alone or verified inside
a draft tree: a small-M linear layer whose per-output arithmetic does not depend on M, and a
tree attention that reduces over each query's keys in logical order (prefix, ancestors, self).
The linear layer also reads weights stored as exact 4/8-bit blocks (:class:`PackedWeight`) with
the same results, and :class:`OneCallDecoder` runs all layers of a Llama-style model in one call.

The backend is an object, chosen once and passed in: :func:`select` gives :class:`CKernels` for
one build (``avx512`` or ``avx2``, compiled with the system C compiler into the freespec cache,
:mod:`~freespec.kernels.build`) or :class:`Kernels`, torch's ops, without a compiler or AVX2+FMA.
torch's ops are not batch-invariant: verification logits may then differ from decoding logits in
the last bits, and a near-tie may flip a greedy choice.

Modules: ``build`` (compile, load, choose the build), ``abi`` (the ctypes mirror of the header and
the guard every array passes), ``backend`` (the backends and their operations), ``weights`` (the
typed parameters the kernels read).
"""

from freespec.kernels.backend import (
    Attention,
    CKernels,
    Kernels,
    OneCallDecoder,
    Rotation,
    select,
)
from freespec.kernels.build import supported_isas
from freespec.kernels.weights import (
    DecoderLayer,
    Heads,
    LayerNorm,
    Linear,
    Matrix,
    ModelWeights,
    PackedWeight,
    RMSNorm,
)

__all__ = [
    "Attention", "CKernels", "DecoderLayer", "Heads", "Kernels", "LayerNorm", "Linear", "Matrix", "ModelWeights",
    "OneCallDecoder", "PackedWeight", "RMSNorm", "Rotation", "select", "supported_isas",
]
