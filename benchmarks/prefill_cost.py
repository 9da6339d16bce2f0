"""Prefill cost: one prompt of n tokens through the runner, with freespec's linear kernels or BLAS.

Prefill need not be batch-invariant, so each kernel build hands its large calls to BLAS from
``kernels.BLAS_ROWS`` rows up, where BLAS is the faster choice. This measures both choices for
the loaded build in one process. Prints a Markdown table of medians in milliseconds.

    python benchmarks/prefill_cost.py [--model PATH] [--repeats 5]   # FREESPEC_KERNEL_ISA=avx2 for that build
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import freespec
from freespec import kernels

LENGTHS = (100, 400, 1500)


def median_ms(runner, prompt: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        runner.reset(len(prompt))
        start = time.perf_counter()
        runner.prefill(prompt)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runner = freespec.load(args.model).runner
    build = kernels.kernel_isa()
    if build is None:
        raise SystemExit("the freespec kernels are not available here: nothing to compare")
    choices = {"freespec kernels": {}, "BLAS from 64 rows": {build: 64}}
    default = kernels.BLAS_ROWS
    costs = {}
    for name, blas_rows in choices.items():
        kernels.BLAS_ROWS = blas_rows
        costs[name] = [median_ms(runner, torch.randint(1000, (n,)), args.repeats) for n in LENGTHS]
    kernels.BLAS_ROWS = default
    chosen = "BLAS from 64 rows" if build in default else "freespec kernels"
    print(f"{build} build, {torch.get_num_threads()} threads, median of {args.repeats}, ms; "
          f"this build's choice: {chosen}\n")
    print("| prompt tokens | " + " | ".join(str(n) for n in LENGTHS) + " |")
    print("|---" * (len(LENGTHS) + 1) + "|")
    for name, row in costs.items():
        print(f"| {name} | " + " | ".join(f"{ms:.0f}" for ms in row) + " |")


if __name__ == "__main__":
    main()
