"""The machine's limits for one forward pass: how fast t(q) could possibly be.

Measures, with all threads, the fused multiply-add throughput (independent FMA chains in
registers, the widest vectors the CPU has) and the memory read bandwidth (a vector sum over a
1 GiB array), then prints for the loaded model the two floors of a pass over q tokens:

- memory: the bytes of weights one pass streams (4/8-bit blocks as the runner packs them) over
  the read bandwidth; the same for any q;
- arithmetic: 2 FLOP per weight per token (q times the matmul work) over the FMA peak.

A pass cannot beat the larger of the two (attention, norms and the 4-bit decoding come on top).

    python benchmarks/roofline.py [--model PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import torch

import freespec
from freespec.kernels import PackedWeight

PROBE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#ifdef __AVX512F__
typedef __m512 v;
#define LANES 16
#define FMA _mm512_fmadd_ps
#define SET _mm512_set1_ps
#define LOAD _mm512_loadu_ps
#define ADD _mm512_add_ps
#define ZERO _mm512_setzero_ps
#else
typedef __m256 v;
#define LANES 8
#define FMA _mm256_fmadd_ps
#define SET _mm256_set1_ps
#define LOAD _mm256_loadu_ps
#define ADD _mm256_add_ps
#define ZERO _mm256_setzero_ps
#endif
/* FLOP/s of FMAs on 12 independent register chains per thread. */
double fma_flops(long steps) {
    double start = now(), sink = 0;
    #pragma omp parallel reduction(+ : sink)
    {
        v b = SET(0.9999f), c = SET(1e-4f);
        v a0 = SET(0), a1 = SET(1), a2 = SET(2), a3 = SET(3), a4 = SET(4), a5 = SET(5);
        v a6 = SET(6), a7 = SET(7), a8 = SET(8), a9 = SET(9), a10 = SET(10), a11 = SET(11);
        for (long k = 0; k < steps; k++) {
            a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c);
            a4 = FMA(a4, b, c); a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c);
            a8 = FMA(a8, b, c); a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c);
            __asm__ volatile("" ::: "memory");
        }
        float out[LANES];
        v total = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
        total = ADD(total, ADD(ADD(a8, a9), ADD(a10, a11)));
        __builtin_memcpy(out, &total, sizeof(out));
        sink += out[0];
    }
    double seconds = now() - start;
    return sink == 12345.0 ? 0 : 12.0 * 2 * LANES * steps * omp_get_max_threads() / seconds;
}
/* Bytes/s read by a vector sum over n floats, split over the threads (best of the repeats). */
double read_bandwidth(const float *x, long n, int repeats) {
    double best = 0, sink = 0;
    for (int r = 0; r < repeats; r++) {
        double start = now();
        #pragma omp parallel reduction(+ : sink)
        {
            v s0 = ZERO(), s1 = ZERO(), s2 = ZERO(), s3 = ZERO();
            #pragma omp for schedule(static)
            for (long block = 0; block < n / (4 * LANES); block++) {
                const float *p = x + block * 4 * LANES;
                s0 = ADD(s0, LOAD(p)); s1 = ADD(s1, LOAD(p + LANES));
                s2 = ADD(s2, LOAD(p + 2 * LANES)); s3 = ADD(s3, LOAD(p + 3 * LANES));
            }
            float out[LANES];
            v total = ADD(ADD(s0, s1), ADD(s2, s3));
            __builtin_memcpy(out, &total, sizeof(out));
            sink += out[0];
        }
        double rate = 4.0 * n / (now() - start);
        best = rate > best && sink != 12345.0 ? rate : best;
    }
    return best;
}
"""


def build_probe() -> ctypes.CDLL:
    directory = Path(tempfile.mkdtemp())
    source, library = directory / "roofline.c", directory / "roofline.so"
    source.write_text(PROBE)
    flags = ["-O2", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    subprocess.run(["gcc", *flags, str(source), "-o", str(library)], check=True)
    probe = ctypes.CDLL(str(library))
    probe.fma_flops.restype = probe.read_bandwidth.restype = ctypes.c_double
    probe.fma_flops.argtypes = [ctypes.c_long]
    probe.read_bandwidth.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    return probe


def streamed_bytes(runner) -> tuple[int, int]:
    """(bytes of weights one pass reads, weights multiplied per token) for the runner's matmuls."""
    layers = runner.weights.layers
    matrices = [linear.weight for layer in layers for linear in (layer.qkv, layer.o, layer.up, layer.down)]
    matrices.append(runner.weights.lm_head.weight)
    total = weights = 0
    for matrix in matrices:
        if isinstance(matrix, PackedWeight):
            total += matrix.codes.nbytes + matrix.scales.nbytes
        else:
            total += matrix.nbytes
        weights += matrix.shape[0] * matrix.shape[1]
    return total, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    probe = build_probe()
    peak = max(probe.fma_flops(100_000_000) for _ in range(3))
    array = torch.ones(1 << 28)  # 1 GiB, far beyond the caches
    bandwidth = probe.read_bandwidth(array.data_ptr(), array.numel(), 5)
    runner = freespec.load(args.model).runner
    total, weights = streamed_bytes(runner)
    memory_ms = 1000 * total / bandwidth
    print(f"{threads} threads: FMA peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"weights streamed per pass: {total / 1e6:.0f} MB; matmul work: {2 * weights / 1e9:.2f} GFLOP per token\n")
    print("| q | 1 | 2 | 4 | 8 | 16 |\n|---|---|---|---|---|---|")
    arithmetic = {q: 1000 * 2 * weights * q / peak for q in (1, 2, 4, 8, 16)}
    print("| memory floor, ms | " + " | ".join(f"{memory_ms:.2f}" for _ in arithmetic) + " |")
    print("| arithmetic floor, ms | " + " | ".join(f"{t:.2f}" for t in arithmetic.values()) + " |")
    print("| t(q) ≥ (larger), ms | " + " | ".join(f"{max(t, memory_ms):.2f}" for t in arithmetic.values()) + " |")


if __name__ == "__main__":
    main()
