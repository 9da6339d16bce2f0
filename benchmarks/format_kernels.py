"""Speed of the linear kernels per weight format: GB/s of weights streamed, against the machine's
read bandwidth.

Two tables:

- ``packed``: the native Q4_1 and Q8_0 kernels (a GGUF tensor's blocks read where they lie,
  :class:`~freespec.kernels.GGMLWeight`) against the packed q4/q8 kernels (the same blocks
  re-packed into separate code and scale arrays, :class:`~freespec.kernels.PackedWeight`), per
  matrix shape (SmolLM2-135M's and a 1B model's) and number of input rows M; time per call in
  microseconds and the packed/native ratio (above 1: native faster).
- ``formats``: every format at M = 1 and 4 (``--rows``) over a set of shapes, GB/s of weight
  bytes and the share of the measured read bandwidth (a vector sum over a 128 MB array, best of
  several, as ``benchmarks/roofline.py`` measures it).
- ``resident``: the work of decoding alone: one 120 x 2048 matrix per format, which stays in the
  L2 cache, on one thread, best of many short calls (which a busy machine rarely interrupts):
  billions of weights per second at M = 1 and 4. Where this rate times the format's bytes per
  weight times the threads is below the read bandwidth, the kernel is bound by its arithmetic,
  not by memory.

Each shape gets enough random matrices to stream ``--stream-mb`` per pass, far more than the
last-level cache holds (like a model's consecutive layers, each comes from memory). Each call is
timed on its own, best of ``--repeats`` (a busy machine's interruptions drop out), and a pass is
the sum of those times. The weights are random blocks with a real model's magnitudes (speed does
not depend on their values).

    PYTHONPATH=. python benchmarks/format_kernels.py [--table packed formats resident] [--repeats 20]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from roofline import build_probe  # noqa: E402

from freespec import kernels  # noqa: E402
from freespec.kernels.backend import MatrixStruct  # noqa: E402
from freespec.kernels.weights import repack  # noqa: E402

SMOLLM2_SHAPES = [(576, 576), (192, 576), (3072, 576), (576, 1536), (49152, 576)]  # (N, K)
ONE_B_SHAPES = [(2048, 2048), (16384, 2048), (2048, 8192)]
PACKED_ROWS = (1, 2, 3, 4, 8)
FORMATS = [kind.name for kind in kernels.SUPPORTED_TYPES]


def random_weight(name: str, shape: tuple[int, int], generator: np.random.Generator) -> kernels.GGMLWeight:
    return kernels.GGMLWeight(name, kernels.random_blocks(name, shape, generator, typical=0.01), shape)


def random_weights(name: str, shape: tuple[int, int], stream_mb: float,
                   generator: np.random.Generator) -> list[kernels.GGMLWeight]:
    """Enough matrices of ``shape`` to hold ``stream_mb``: consecutive rows of one random matrix."""
    rows, columns = shape
    count = max(2, round(stream_mb * 1e6 / (rows * kernels.row_bytes(kernels.ggml_type(name), columns))))
    whole = random_weight(name, (count * rows, columns), generator)
    return [kernels.GGMLWeight(name, whole.data[index * rows:(index + 1) * rows], shape) for index in range(count)]


def split_packed(whole: kernels.PackedWeight, count: int) -> list[kernels.PackedWeight]:
    rows = whole.shape[0] // count
    return [kernels.PackedWeight(whole.kind, whole.codes[index * rows:(index + 1) * rows],
                                 whole.scales[index * rows:(index + 1) * rows]) for index in range(count)]


class Calls:
    """One linear call per matrix, straight through ctypes, with its best time."""

    def __init__(self, library: ctypes.CDLL, matrices: list, rows: int):
        n, k = matrices[0].shape
        self.x, self.out = torch.randn(rows, k), torch.empty(rows, n)
        self.structs = [MatrixStruct("weight", matrix) for matrix in matrices]
        self.function, self.rows = library.freespec_linear, rows
        self.best = [float("inf")] * len(self.structs)

    def run(self) -> None:
        x, out, rows, function = self.x.data_ptr(), self.out.data_ptr(), self.rows, self.function
        for index, struct in enumerate(self.structs):
            start = time.perf_counter()
            function(struct.pointer, x, out, rows)
            self.best[index] = min(self.best[index], time.perf_counter() - start)

    @property
    def pass_seconds(self) -> float:
        """Sum over the matrices of each call's best time."""
        return sum(self.best)


def interleaved(groups: list[Calls], repeats: int) -> list[float]:
    """Each group's pass time, the groups run in turn in every round (so they share the noise)."""
    for _ in range(repeats + 1):  # the first round warms pages and threads
        for group in groups:
            group.run()
    return [group.pass_seconds for group in groups]


def packed_table(library: ctypes.CDLL, args: argparse.Namespace) -> None:
    print("\nNative GGML kernels vs packed q4/q8 (microseconds per call, best of repeats; ratio = packed / native)\n")
    print("| shape N x K | format | " + " | ".join(f"M={m} native / packed (ratio)" for m in PACKED_ROWS) + " |")
    print("|---|---|" + "---|" * len(PACKED_ROWS))
    generator = np.random.default_rng(0)
    totals = {name: [0.0, 0.0] for name in ("Q4_1", "Q8_0")}
    for shape in SMOLLM2_SHAPES + ONE_B_SHAPES:
        for name in ("Q4_1", "Q8_0"):
            natives = random_weights(name, shape, args.stream_mb, generator)
            whole = kernels.GGMLWeight(name, np.concatenate([weight.data for weight in natives]),
                                       (len(natives) * shape[0], shape[1]))
            packed = split_packed(repack(whole), len(natives))
            x = torch.randn(3, shape[1])
            backend = kernels.select()
            assert torch.equal(backend.linear(x, natives[0]), backend.linear(x, packed[0])), "not the same weights"
            cells = []
            for rows in PACKED_ROWS:
                native_s, packed_s = (seconds / len(natives) for seconds in interleaved(
                    [Calls(library, natives, rows), Calls(library, packed, rows)], args.repeats))
                cells.append(f"{native_s * 1e6:.0f} / {packed_s * 1e6:.0f} ({packed_s / native_s:.2f})")
                totals[name][0] += native_s
                totals[name][1] += packed_s
            print(f"| {shape[0]} x {shape[1]} | {name} | " + " | ".join(cells) + " |", flush=True)
            del natives, packed
    for name, (native_s, packed_s) in totals.items():
        print(f"\n{name}: all shapes and M together, packed / native = {packed_s / native_s:.2f}")


def formats_table(library: ctypes.CDLL, args: argparse.Namespace, bandwidth: float) -> None:
    shapes = ONE_B_SHAPES
    print(f"\nEvery format over the shapes {', '.join(f'{n} x {k}' for n, k in shapes)} "
          f"(GB/s of weights, % of the read bandwidth)\n")
    print("| format | bytes/weight | " + " | ".join(f"M={m}" for m in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    generator = np.random.default_rng(1)
    for name in args.formats:
        seconds, streamed, per_weight = [0.0] * len(args.rows), 0, 0.0
        for shape in shapes:
            matrices = random_weights(name, shape, args.stream_mb, generator)
            for index, rows in enumerate(args.rows):
                seconds[index] += interleaved([Calls(library, matrices, rows)], args.repeats)[0]
            streamed += sum(matrix.nbytes for matrix in matrices)
            per_weight = matrices[0].nbytes / (shape[0] * shape[1])
            del matrices
        cells = [f"{streamed / s / 1e9:.1f} ({100 * streamed / s / bandwidth:.0f}%)" for s in seconds]
        print(f"| {name} | {per_weight:.4g} | " + " | ".join(cells) + " |", flush=True)


def resident_table(library: ctypes.CDLL, args: argparse.Namespace) -> None:
    shape, threads = (120, 2048), torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nDecoding alone: one {shape[0]} x {shape[1]} matrix in L2, one thread, best of "
          f"{15 * args.repeats} calls (billions of weights per second, GB/s)\n")
    print("| format | " + " | ".join(f"M={m}" for m in args.rows) + " |")
    print("|---|" + "---|" * len(args.rows))
    generator = np.random.default_rng(2)
    for name in args.formats:
        native = random_weight(name, shape, generator)
        rows = [(name, native)] + ([(f"{name} packed", repack(native))] if name in ("Q4_1", "Q8_0") else [])
        for label, matrix in rows:
            cells = []
            for m in args.rows:
                seconds = interleaved([Calls(library, [matrix], m)], 15 * args.repeats)[0]
                cells.append(f"{shape[0] * shape[1] / seconds / 1e9:.1f} ({matrix.nbytes / seconds / 1e9:.1f} GB/s)")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="+", choices=("packed", "formats", "resident"),
                        default=["packed", "formats", "resident"])
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="input rows M of the formats table")
    parser.add_argument("--stream-mb", type=float, default=100.0,
                        help="weight bytes per shape and pass (several times the last-level cache)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the kernels share torch's OpenMP pool
    backend = kernels.select()
    if not backend.batch_invariant:
        sys.exit("the freespec C kernels are not built on this machine")
    probe = build_probe()
    array = torch.ones(1 << 25)  # 128 MB, four times the last-level cache of most CPUs
    bandwidth = max(probe.read_bandwidth(array.data_ptr(), array.numel(), 10) for _ in range(4))
    del array
    print(f"{torch.get_num_threads()} threads, {backend.isa} build; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    if "packed" in args.table:
        packed_table(backend.library, args)
    if "formats" in args.table:
        formats_table(backend.library, args, bandwidth)
    if "resident" in args.table:
        resident_table(backend.library, args)


if __name__ == "__main__":
    main()
