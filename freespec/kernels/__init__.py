"""Batch-invariant CPU kernels (``csrc/kernels.c``, interface ``csrc/freespec.h``), built on first use.

Two kernels make a token's logits bit-identical whether it is decoded alone or verified inside
a draft tree: a small-M linear layer whose per-output arithmetic does not depend on M, and a
tree attention that reduces over each query's keys in logical order (prefix, ancestors, self).
The linear layer also reads weights in their file's own layout (:class:`GGMLWeight`: GGUF's block
types Q4_0 .. Q6_K, IQ1_S .. IQ4_XS, TQ1_0, TQ2_0, and F16/BF16/F32 from GGUF or safetensors) and exact 4/8-bit blocks
(:class:`PackedWeight`) with the same results as on their fp32 form, and :class:`OneCallDecoder`
runs all layers of a Llama-style model in one call.

The backend is an object, chosen once and passed in: :func:`select` gives :class:`CKernels` for
one build (``avx512`` or ``avx2``, compiled with the system C compiler into the freespec cache,
:mod:`~freespec.kernels.build`) or :class:`Kernels`, torch's ops, without a compiler or AVX2+FMA.
torch's ops are not batch-invariant: verification logits may then differ from decoding logits in
the last bits, and a near-tie may flip a greedy choice.

Modules: ``build`` (compile, load, choose the build), ``abi`` (the ctypes mirror of the header and
the guard every array passes), ``backend`` (the backends and their operations), ``weights`` (the
typed parameters the kernels read), ``formats`` (the ggml types they read: :data:`SUPPORTED_TYPES`,
:func:`ggml_type`, :func:`row_bytes`, :func:`random_blocks`), ``threads`` (handing a thread's
OpenMP workers back: :func:`release_worker_threads`).
"""

from freespec.kernels.backend import (
    Attention,
    CKernels,
    Kernels,
    OneCallDecoder,
    PassSequence,
    Rotation,
    select,
)
from freespec.kernels.build import supported_isas
from freespec.kernels.formats import (
    SUPPORTED_TYPES,
    ggml_type,
    random_blocks,
    row_bytes,
)
from freespec.kernels.threads import check_threads, release_worker_threads
from freespec.kernels.weights import (
    DecoderLayer,
    GGMLWeight,
    Heads,
    LayerNorm,
    Linear,
    Matrix,
    ModelWeights,
    PackedWeight,
    RMSNorm,
    Stacked,
)

__all__ = [
    "SUPPORTED_TYPES", "Attention", "CKernels", "DecoderLayer", "GGMLWeight", "Heads", "Kernels", "LayerNorm",
    "Linear", "Matrix", "ModelWeights", "OneCallDecoder", "PackedWeight", "PassSequence", "RMSNorm", "Rotation",
    "Stacked", "check_threads", "ggml_type", "random_blocks", "release_worker_threads", "row_bytes", "select",
    "supported_isas",
]
