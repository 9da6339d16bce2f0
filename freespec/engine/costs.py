"""Measure t(q): the cost of one forward pass over q new tokens, on this machine, for this model.

The budget policy divides expected accepted tokens by these costs, so what matters is the curve's
*shape*, t(q) / t(1): a machine that is uniformly slow while it measures picks the same sizes.
What a busy machine does get wrong is a burst of load while a few sizes are timed: they look far
too expensive, and speculation at those sizes never seems to pay. So the sizes are timed in
interleaved rounds (a burst hits every size of one round, and the median over the rounds drops
it); a curve of impossible shape (:func:`implausible`) is measured again, and after a few tries
smoothed (:func:`repair`); a cache file that is damaged or of impossible shape is measured again
with a one-line warning. Results are cached per model, CPU and thread count, since the best tree
size depends on the hardware; the budget policy refines them from the steps it times and marks
the cache stale (:meth:`CostCurve.mark_stale`) when a step shows the calibration ran slow. On a
large model the sizes past a few seconds of warm-up are priced from the largest one timed
(:data:`WARM_UP_SECONDS`, :func:`extrapolate`), so a first run waits seconds, not minutes.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from freespec.paths import cache_dir, write_atomically

if TYPE_CHECKING:
    from freespec.model.runner import ModelRunner

log = logging.getLogger(__name__)

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 81)
"""Forward sizes measured: root + draft nodes. The largest holds the paper's 80-node tree."""

MAX_GROWTH = 2.0
"""t(q) may be at most ``MAX_GROWTH * q`` times t(1). A pass over q tokens streams the same
weights as a pass over one and does q times its arithmetic (matmuls and attention alike), so its
cost grows at most about linearly; measured curves stay below 0.7 q (README: 1.33x at q = 2 and
11.6x at q = 32 in the 8-lane build)."""

MAX_DROP = 2 / 3
"""t(q) must be at least ``MAX_DROP`` times the largest t of a smaller size: a pass over more
tokens does more work, never less; the margin is timing noise."""

ATTEMPTS = 3
"""Measurements of an implausible curve before it is smoothed instead."""

WARM_UP_SECONDS = 3.0
"""Warm-up seconds after which the larger sizes are extrapolated instead of timed. A round over
every size takes ~0.5 s on SmolLM2-135M (all timed), but ~25 s on a 7B file, whose calibration
took ~100 s before the first token; trees of 12 or more nodes cost several passes there, so
their share of the curve only has to be no cheaper than the truth (:func:`extrapolate`)."""

MIN_TIMED = 4
"""Sizes always timed (1, 2, 3 and 4 tokens), whatever a pass costs."""

CONTEXT_SECONDS = 2.0
"""Seconds of prefill after which the cached context the sizes are timed after stops growing (in
chunks of :data:`CONTEXT_CHUNK` tokens, at least one): 256 tokens take ~0.3 s on SmolLM2-135M but
~20 s on a 7B file, whose attention over them is ~2% of a pass."""

CONTEXT_CHUNK = 32


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """``np.interp`` on plain lists, for one point: linear between the knots ``xs`` (ascending),
    constant beyond them. Called several times a step, where numpy's per-call overhead shows.

    >>> interpolate([1, 2, 4], [1.0, 1.5, 2.5], 3), interpolate([1, 2, 4], [1.0, 1.5, 2.5], 9)
    (2.0, 2.5)
    """
    right = bisect.bisect_left(xs, x)
    if right == len(xs):
        return ys[-1]
    if right == 0 or xs[right] == x:
        return ys[right]
    share = (x - xs[right - 1]) / (xs[right] - xs[right - 1])
    return ys[right - 1] + share * (ys[right] - ys[right - 1])


class CostCurve(dict[int, float]):
    """t(q) in seconds for the measured sizes q, and the cache file it was read from or written to.

    A plain mapping for whoever only reads it; the budget policy, which times real steps, calls
    :meth:`mark_stale` when one was much faster than the curve allows, so the next process
    measures again instead of trusting a calibration that ran on a busy machine.
    """

    def __init__(self, seconds: Mapping[int, float], cache: Path | None = None, timed: Sequence[int] | None = None):
        super().__init__(seconds)
        self.cache = cache
        self.timed = sorted(seconds if timed is None else timed)  # the sizes measured; the rest extrapolated

    def mark_stale(self, reason: str) -> None:
        """Flag the cache file (if any) so that the next :func:`load_or_measure` measures again."""
        if self.cache is None:
            return
        try:
            data = json.loads(self.cache.read_text())
            if not isinstance(data, dict) or data.get("stale"):
                return
            data["stale"] = reason
            write_atomically(self.cache, json.dumps(data, indent=1))
        except (OSError, ValueError):
            return  # gone, replaced or unwritable: the next process decides afresh
        log.info("calibration cache %s marked stale: %s", self.cache, reason)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
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
    text = json.dumps([runner.config.to_json_string(use_diff=False), probe, cpu_name(), torch.get_num_threads(),
                       runner.kernels.version, runner.weight_formats, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def fitting(sizes: Sequence[int], runner: ModelRunner) -> list[int]:
    """The ``sizes`` whose passes fit the runner's context after at least one cached token."""
    return [q for q in sizes if q + 1 < runner.max_positions] or [1]


def extrapolate(costs: Mapping[int, float], sizes: Sequence[int]) -> dict[int, float]:
    """``costs`` (the smaller sizes, timed) with each larger size of ``sizes`` priced as the
    largest timed one's cost per token: t(q) = t(last) q / last. A pass's cost is a fixed part
    plus a part per token, so this is never below the truth beyond ``last`` (a tree looks no
    cheaper than it is); the last two sizes' slope would be, where passes still wait on memory.

    >>> extrapolate({1: 1.0, 2: 1.2, 4: 2.0}, [1, 2, 4, 8, 16])
    {1: 1.0, 2: 1.2, 4: 2.0, 8: 4.0, 16: 8.0}
    """
    last = max(costs)
    return {q: costs[q] if q in costs else costs[last] * q / last for q in sizes}


def measure(runner: ModelRunner, sizes=SIZES, context: int = 256, repeats: int = 3,
            announce: Callable[[float], None] | None = None, warm_up_seconds: float = WARM_UP_SECONDS,
            context_seconds: float | None = CONTEXT_SECONDS) -> CostCurve:
    """Median seconds of ``forward + logits`` over q tokens after ``context`` cached tokens (fewer
    where their prefill outlasts ``context_seconds``; None: all of them, however long).

    One warm-up pass per size, smallest first, until the next would take the warm-up past
    ``warm_up_seconds`` (by the last one's cost per token; the first :data:`MIN_TIMED` sizes are
    always timed); then ``repeats`` rounds that each time every warmed size once; the rest are
    extrapolated (:func:`extrapolate`). After the warm-up, ``announce`` is told about how many
    seconds the rounds will take. A model whose context is shorter than the largest size gets the
    sizes that fit after at least one cached token.
    """
    sizes = fitting(sizes, runner)
    context = max(1, min(context, runner.max_positions - max(sizes) - 1))
    generator = torch.Generator().manual_seed(0)
    runner.reset(context + max(sizes))
    prompt, filled, started = torch.randint(runner.vocab_size, (context,), generator=generator), 0, time.perf_counter()
    while filled < context and (not filled or context_seconds is None
                                or time.perf_counter() - started < context_seconds):
        runner.prefill(prompt[filled : filled + CONTEXT_CHUNK])
        filled = min(filled + CONTEXT_CHUNK, context)
    context = filled
    passes = {}
    for q in sizes:
        passes[q] = (torch.randint(runner.vocab_size, (q,), generator=generator),  # [q]
                     torch.arange(context, context + q),  # [q]
                     torch.ones(q, q, dtype=torch.bool).tril_())  # [q, q]

    def timed(q: int) -> float:
        start = time.perf_counter()
        runner.logits(runner.forward(*passes[q]))
        return time.perf_counter() - start

    warm_up, last_seconds, timed_sizes = 0.0, 0.0, []
    for q in sizes:
        if len(timed_sizes) >= MIN_TIMED:
            last = timed_sizes[-1]
            if warm_up + last_seconds * q / last > warm_up_seconds:
                break
        last_seconds = timed(q)
        warm_up += last_seconds
        timed_sizes.append(q)
    if announce is not None:
        announce(repeats * warm_up)
    times: dict[int, list[float]] = {q: [] for q in timed_sizes}
    for _ in range(repeats):
        for q in timed_sizes:
            times[q].append(timed(q))
    runner.reset(1)
    return CostCurve(extrapolate({q: statistics.median(samples) for q, samples in times.items()}, sizes),
                     timed=timed_sizes)


def implausible(costs: Mapping[int, float]) -> str | None:
    """Why the curve ``costs`` (seconds by size) cannot be this machine's, or None if it can.

    >>> implausible({1: 0.013, 2: 0.014, 6: 1.36, 8: 1.34, 12: 0.03})  # a burst of load while 6 and 8 were timed
    't(6) is 105x t(1): more than 2x the work of 6 tokens'
    >>> implausible({1: 0.013, 2: 0.014, 6: 0.02, 8: 0.001})
    't(8) = 1.0 ms is less than 67% of t(6) = 20.0 ms'
    >>> implausible({1: 0.013, 2: 0.014, 6: 0.02, 8: 0.022}) is None
    True
    """
    sizes = sorted(costs)
    if any(not (math.isfinite(costs[q]) and costs[q] > 0) for q in sizes):
        return "a time that is not a positive number"
    first = sizes[0]
    for q in sizes[1:]:
        if costs[q] > MAX_GROWTH * q / first * costs[first]:
            return f"t({q}) is {costs[q] / costs[first]:.0f}x t({first}): more than {MAX_GROWTH:g}x the work of {q} tokens"
    slowest = first
    for q in sizes[1:]:
        if costs[q] < MAX_DROP * costs[slowest]:
            return (f"t({q}) = {costs[q] * 1000:.1f} ms is less than {MAX_DROP:.0%} of t({slowest}) = "
                    f"{costs[slowest] * 1000:.1f} ms")
        if costs[q] > costs[slowest]:
            slowest = q
    return None


def repair(measurements: list[dict[int, float]]) -> dict[int, float]:
    """One plausible curve from measurements that were not: load only ever adds time, so take
    each size's fastest time, then make the curve non-decreasing (a size costs at most what any
    larger one did) and cap its growth at :data:`MAX_GROWTH`.

    >>> repair([{1: 1.0, 2: 9.0, 4: 2.0}, {1: 1.2, 2: 8.0, 4: 1.5}])
    {1: 1.0, 2: 1.5, 4: 1.5}
    """
    sizes = sorted(measurements[0])
    fastest = {q: min(m[q] for m in measurements) for q in sizes}
    costs, ceiling = {}, math.inf
    for q in reversed(sizes):
        ceiling = min(ceiling, fastest[q])
        costs[q] = ceiling
    first = sizes[0]
    return {q: min(costs[q], MAX_GROWTH * q / first * costs[first]) for q in sizes}


def _path(runner: ModelRunner) -> Path:
    return cache_dir() / "calibration" / f"{calibration_key(runner)}.json"


def _read_cache(path: Path, sizes: list[int]) -> CostCurve | None:
    """The curve cached in ``path``, or None if there is none worth using (said in one line)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        costs = {int(q): float(t) for q, t in data["seconds"].items()}
        timed = [int(q) for q in data.get("timed", costs)]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("calibration cache %s is damaged (%s: %s); measuring again", path, type(error).__name__, error)
        return None
    if set(costs) != set(sizes):  # measured for another size list
        return None
    if data.get("stale"):
        log.warning("calibration cache %s is stale (%s); measuring again", path, data["stale"])
        return None
    if reason := implausible(costs):
        log.warning("calibration cache %s is implausible (%s); measuring again", path, reason)
        return None
    return CostCurve(costs, path, timed)


def load_or_measure(runner: ModelRunner, force: bool = False, repeats: int = 3) -> CostCurve:
    """Cached costs for this model and machine, measured now if missing, damaged, implausible or
    stale (a few seconds, said in one line)."""
    path = _path(runner)
    cached = None if force else _read_cache(path, fitting(SIZES, runner))
    if cached is not None:
        return cached

    def announce(seconds: float) -> None:
        once = "" if force else "once, "
        log.warning("calibrating verification cost on this machine (%s~%d s)...", once, max(1, round(seconds)))

    measurements = []
    for attempt in range(ATTEMPTS):
        costs = measure(runner, repeats=repeats, announce=None if attempt else announce)
        if (reason := implausible(costs)) is None:
            break
        log.info("measured costs are implausible (%s); measuring again", reason)
        measurements.append(costs)
    else:
        # the fewest sizes any attempt timed: a burst may have cut one attempt's warm-up short
        costs = CostCurve(repair(measurements), timed=min((m.timed for m in measurements), key=len))
        log.warning("the machine was too busy to measure verification costs cleanly; using a smoothed "
                    "curve (freespec calibrate measures again)")
    record = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "seconds": {str(q): t for q, t in costs.items()},
              "timed": costs.timed}
    try:
        write_atomically(path, json.dumps(record, indent=1))
    except OSError as error:
        log.warning("cannot write the calibration cache %s (%s); it is measured again next time", path,
                    error.strerror or error)
    return CostCurve(costs, path, costs.timed)
