"""What ``GET /metrics`` shows (:class:`ServerMetrics`), and the Prometheus counters, gauges and
histograms it is made of, in the text exposition format.

Hand-written rather than a dependency: the server needs three metric kinds, thread-safe updates
(the generation thread and the event loop both write) and one ``render()``.

>>> registry = Registry()
>>> hits = registry.counter("demo_hits_total", "Hits.", ("path",))
>>> hits.inc(path="/a"); hits.inc(2, path="/a")
>>> print(registry.render().strip())
# HELP demo_hits_total Hits.
# TYPE demo_hits_total counter
demo_hits_total{path="/a"} 3.0
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable

from freespec.engine.loop import GenerationStats
from freespec.model.prefix_cache import PrefixCache

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    """``{a="x",b="y"}`` with Prometheus escaping; empty when there are no labels.

    >>> _labels(("a", "b"), ("x", 'say "hi"'))
    '{a="x",b="say \\\\"hi\\\\""}'
    >>> _labels((), ())
    ''
    """
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """Prometheus spelling of a sample value.

    >>> _number(2), _number(math.inf), _number(0.5)
    ('2.0', '+Inf', '0.5')
    """
    return "+Inf" if value == math.inf else repr(float(value))


class _Family:
    kind = ""

    def __init__(self, lock: threading.Lock, name: str, help: str, labels: tuple[str, ...]):
        self._lock, self.name, self.help, self.label_names = lock, name, help, labels

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {_number(value)}"
                for key, value in sorted(self._values.items(), key=lambda item: _natural(item[0]))]


class Gauge(_Family):
    """A value read when rendered (``source``), so it can never go stale."""

    kind = "gauge"

    def __init__(self, lock, name, help, labels, source: Callable[[], dict[tuple[str, ...], float]]):
        super().__init__(lock, name, help, labels)
        self._source = source

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {_number(value)}"
                for key, value in sorted(self._source().items())]


class Histogram(_Family):
    """Cumulative buckets, sum and count per label set.

    >>> registry = Registry()
    >>> latency = registry.histogram("demo_seconds", "Latency.", buckets=(0.1, 1.0))
    >>> latency.observe(0.05); latency.observe(0.5)
    >>> print("\\n".join(latency.lines()))
    demo_seconds_bucket{le="0.1"} 1.0
    demo_seconds_bucket{le="1.0"} 2.0
    demo_seconds_bucket{le="+Inf"} 2.0
    demo_seconds_sum 0.55
    demo_seconds_count 2.0
    """

    kind = "histogram"

    def __init__(self, lock, name, help, labels, buckets: tuple[float, ...]):
        super().__init__(lock, name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts (not cumulative), sum

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 1))
            series[bisect.bisect_left(self.buckets, value)] += 1
            series[-1] += value

    def count(self, **labels: object) -> int:
        with self._lock:
            return int(sum(self._series.get(self._key(labels), [0.0])[:-1]))

    def lines(self) -> list[str]:
        lines = []
        for key, series in sorted(self._series.items()):
            cumulative = 0.0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(round(series[-1], 9))}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(cumulative)}")
        return lines


def _natural(key: tuple[str, ...]) -> tuple:
    """Sort label values that are numbers as numbers (position 10 after 9)."""
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in key)


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._families: list[_Family] = []

    def _add(self, family: _Family):
        self._families.append(family)
        return family

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(self._lock, name, help, labels))

    def gauge(self, name: str, help: str, source: Callable[[], dict[tuple[str, ...], float]],
              labels: tuple[str, ...] = ()) -> Gauge:
        return self._add(Gauge(self._lock, name, help, labels, source))

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(self._lock, name, help, labels, buckets))

    def render(self) -> str:
        lines = []
        for family in self._families:
            if isinstance(family, Gauge):
                body = family.lines()  # its source may take the lock itself
            else:
                with self._lock:
                    body = family.lines()
            lines += family.header() + body
        return "\n".join(lines) + "\n"


def accepted_per_position(accepted_lengths: list[int]) -> list[int]:
    """How many passes accepted a draft token at depth 1, 2, ... (the bonus token is not a draft).

    >>> accepted_per_position([1, 3, 2, 1])
    [2, 1]
    """
    depth = max(accepted_lengths, default=1) - 1
    return [sum(1 for length in accepted_lengths if length - 1 >= d) for d in range(1, depth + 1)]


class ServerMetrics:
    """The server's metrics. Token and pass counters are labelled by drafter (a set fixed at start).
    ``prefixes``: the prefix cache whose size is shown (None: the server keeps none)."""

    def __init__(self, depth: Callable[[], int], running: Callable[[], int], prefixes: PrefixCache | None = None):
        self.registry = registry = Registry()
        self.requests = registry.counter(
            "freespec_requests_total", "Requests by endpoint and outcome: success, cancelled (the client "
            "left, or the server stopped), timeout (past --request-timeout), invalid (4xx), rejected (429: "
            "queue full; 503: not serving), error (5xx).", ("endpoint", "status"))
        self.prompt_tokens = registry.counter("freespec_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                              ("drafter",))
        self.cached_tokens = registry.counter("freespec_prompt_tokens_cached_total", "Prompt tokens whose cache "
                                              "rows an earlier request left (not prefilled).", ("drafter",))
        self.prefix_hits = registry.counter("freespec_prefix_cache_hits_total", "Requests that reused the cache "
                                            "rows of at least one prompt token.")
        self.prefix_evicted = registry.counter("freespec_prefix_cache_evicted_tokens_total", "Cached prompt "
                                               "rows dropped to stay within --prefix-cache-mb.")
        registry.gauge("freespec_prefix_cache_bytes", "Memory the rows of earlier prompts take (every tenant).",
                       lambda: {(): prefixes.bytes if prefixes else 0})
        registry.gauge("freespec_prefix_cache_budget_bytes", "The most memory they may take (--prefix-cache-mb).",
                       lambda: {(): prefixes.budget_bytes if prefixes else 0})
        self.generated = registry.counter("freespec_generation_tokens_total", "Tokens generated.", ("drafter",))
        self.passes = registry.counter("freespec_forward_passes_total",
                                       "Verification forward passes (prefill excluded).", ("drafter",))
        self.drafted = registry.counter("freespec_draft_tokens_total", "Draft tokens verified.", ("drafter",))
        self.accepted = registry.counter(
            "freespec_accepted_tokens_total", "Draft tokens accepted at each depth of the draft "
            "(position 1 is the first token after the verified root).", ("drafter", "position"))
        registry.gauge("freespec_mean_accepted_length", "Tokens per forward pass since start, bonus "
                       "token included (plain decoding: 1).", self._mean_accepted, ("drafter",))
        registry.gauge("freespec_queue_depth", "Requests admitted and waiting for the model (being tokenized "
                       "or queued).", lambda: {(): depth()})
        registry.gauge("freespec_requests_running", "Requests on the model (up to --max-batch, their steps "
                       "batched into each forward pass).", lambda: {(): running()})
        self.pass_requests = registry.histogram("freespec_pass_requests", "Requests whose steps a forward pass "
                                                "carried (continuous batching).", buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue_wait = registry.histogram("freespec_queue_wait_seconds", "Time from arrival to the start of "
                                             "generation.")
        self.first_token = registry.histogram("freespec_time_to_first_token_seconds",
                                              "Time from arrival to the first generated text.")
        self.latency = registry.histogram("freespec_request_duration_seconds",
                                          "Time from arrival to the last token, by endpoint.", ("endpoint",))
        self.state_saves = registry.counter("freespec_state_saves_total", "Saves of the drafters' state to "
                                            "--state, by outcome: ok, failed (the server log says why).", ("outcome",))
        self._drafters: set[str] = set()

    def _mean_accepted(self) -> dict[tuple[str, ...], float]:
        means = {}
        for drafter in sorted(self._drafters):
            passes = self.passes.value(drafter=drafter)
            if passes:
                means[(drafter,)] = self.generated.value(drafter=drafter) / passes
        return means

    def count_end(self, endpoint: str, status: str, elapsed: float) -> str:
        """Count a request's end (``status`` as :func:`freespec.serve.scheduler.outcome` says) and
        a success's time from arrival; return ``status``."""
        self.requests.inc(endpoint=endpoint, status=status)
        if status == "success":
            self.latency.observe(elapsed, endpoint=endpoint)
        return status

    def record(self, drafter: str, stats: GenerationStats) -> None:
        self._drafters.add(drafter)
        self.prompt_tokens.inc(stats.prompt_tokens, drafter=drafter)
        self.cached_tokens.inc(stats.cached_tokens, drafter=drafter)
        if stats.cached_tokens:
            self.prefix_hits.inc()
        self.generated.inc(stats.new_tokens, drafter=drafter)
        self.passes.inc(stats.forward_passes, drafter=drafter)
        self.drafted.inc(sum(stats.draft_sizes), drafter=drafter)
        for position, count in enumerate(accepted_per_position(stats.accepted_lengths), 1):
            self.accepted.inc(count, drafter=drafter, position=position)
