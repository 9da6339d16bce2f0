"""Measure t(q): the cost of one forward pass over q new tokens, on this machine, for this model.

The budget policy divides expected accepted tokens by these costs. Results are cached per model,
CPU and thread count, since the best tree size depends on the hardware.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from freespec.model.runner import ModelRunner
from freespec.paths import cache_dir

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 81)
"""Forward sizes measured: root + draft nodes. The largest holds the paper's 80-node tree."""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(runner: ModelRunner) -> str:
    """Identifies model shape, weights sample, CPU, threads and kernel: what t(q) depends on."""
    probe = runner.embedding_probe()
    text = json.dumps([runner.config.to_json_string(use_diff=False), probe, _cpu_name(), torch.get_num_threads(),
                       runner.kernels.version, runner.weight_formats, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def measure(runner: ModelRunner, sizes=SIZES, context: int = 256, repeats: int = 3) -> dict[int, float]:
    """Median seconds of ``forward + logits`` over q tokens after ``context`` cached tokens."""
    context = min(context, runner.max_positions - max(sizes) - 1)
    generator = torch.Generator().manual_seed(0)
    runner.reset(context + max(sizes))
    runner.prefill(torch.randint(runner.vocab_size, (context,), generator=generator))
    costs = {}
    for q in sizes:
        tokens = torch.randint(runner.vocab_size, (q,), generator=generator)
        positions = torch.arange(context, context + q)
        mask = torch.ones(q, q, dtype=torch.bool).tril_()
        runner.logits(runner.forward(tokens, positions, mask))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.logits(runner.forward(tokens, positions, mask))
            times.append(time.perf_counter() - start)
        costs[q] = statistics.median(times)
    runner.reset(1)
    return costs


def _path(runner: ModelRunner) -> Path:
    return cache_dir() / "calibration" / f"{calibration_key(runner)}.json"


def load_or_measure(runner: ModelRunner, force: bool = False, repeats: int = 3) -> dict[int, float]:
    """Cached costs for this model and machine, measured now if missing (a few seconds)."""
    path = _path(runner)
    if path.exists() and not force:
        cached = {int(q): t for q, t in json.loads(path.read_text())["seconds"].items()}
        if set(cached) == set(SIZES):  # else measured for another size list: measure again
            return cached
    costs = measure(runner, repeats=repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                                "seconds": {str(q): t for q, t in costs.items()}}, indent=1))
    return costs
