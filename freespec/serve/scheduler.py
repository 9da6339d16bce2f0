"""The server's generation thread: one bounded FIFO queue, one request on the model at a time.

A :class:`~freespec.api.Model` owns one KV cache, so requests run one after another on a single
thread, off the event loop. Each :class:`Job` carries an asyncio queue that receives its events
(``Started``, text ``Delta``s, then exactly one ``Finished`` or ``Failed``), posted thread-safely
to the loop that submitted it. A job whose client went away is cancelled: the thread stops its
generation at the next chunk, or skips it if it has not started.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from freespec.api import Model
from freespec.engine.loop import GenerationStats
from freespec.serve.metrics import Registry
from freespec.serve.textstream import TextStream

log = logging.getLogger(__name__)


@dataclass
class Started:
    queued_seconds: float


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string), "length", or "cancelled" (the client left)
    stats: GenerationStats
    drafter: str


@dataclass
class Failed:
    status: int  # 400: the engine refused the request; 500: a fault in freespec
    message: str


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    """One admitted request. ``sampling`` holds the engine's sampling keywords, already checked."""

    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    drafter: str
    stops: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    arrived: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass


class QueueFull(Exception):
    """Every queue slot is taken; ``retry_after`` is a guess, in whole seconds, of when one frees."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class ServerMetrics:
    """What ``GET /metrics`` shows. Token and pass counters are labelled by drafter."""

    def __init__(self, depth: Callable[[], int], running: Callable[[], int]):
        self.registry = registry = Registry()
        self.requests = registry.counter(
            "freespec_requests_total", "Requests by endpoint and outcome: success, cancelled (the client "
            "left), invalid (4xx), rejected (429, queue full), error (5xx).", ("endpoint", "status"))
        self.prompt_tokens = registry.counter("freespec_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                              ("drafter",))
        self.cached_tokens = registry.counter("freespec_prompt_tokens_cached_total", "Prompt tokens whose cache "
                                              "rows an earlier request left (not prefilled).", ("drafter",))
        self.generated = registry.counter("freespec_generation_tokens_total", "Tokens generated.", ("drafter",))
        self.passes = registry.counter("freespec_forward_passes_total",
                                       "Verification forward passes (prefill excluded).", ("drafter",))
        self.drafted = registry.counter("freespec_draft_tokens_total", "Draft tokens verified.", ("drafter",))
        self.accepted = registry.counter(
            "freespec_accepted_tokens_total", "Draft tokens accepted at each depth of the draft "
            "(position 1 is the first token after the verified root).", ("drafter", "position"))
        registry.gauge("freespec_mean_accepted_length", "Tokens per forward pass since start, bonus "
                       "token included (plain decoding: 1).", self._mean_accepted, ("drafter",))
        registry.gauge("freespec_queue_depth", "Requests waiting for the model.", lambda: {(): depth()})
        registry.gauge("freespec_requests_running", "Requests on the model (0 or 1).", lambda: {(): running()})
        self.queue_wait = registry.histogram("freespec_queue_wait_seconds", "Time from arrival to the start of "
                                             "generation.")
        self.first_token = registry.histogram("freespec_time_to_first_token_seconds",
                                              "Time from arrival to the first generated text.")
        self.latency = registry.histogram("freespec_request_duration_seconds",
                                          "Time from arrival to the last token, by endpoint.", ("endpoint",))
        self._drafters: set[str] = set()

    def _mean_accepted(self) -> dict[tuple[str, ...], float]:
        means = {}
        for drafter in sorted(self._drafters):
            passes = self.passes.value(drafter=drafter)
            if passes:
                means[(drafter,)] = self.generated.value(drafter=drafter) / passes
        return means

    def record(self, drafter: str, stats: GenerationStats) -> None:
        self._drafters.add(drafter)
        self.prompt_tokens.inc(stats.prompt_tokens, drafter=drafter)
        self.cached_tokens.inc(stats.cached_tokens, drafter=drafter)
        self.generated.inc(stats.new_tokens, drafter=drafter)
        self.passes.inc(stats.forward_passes, drafter=drafter)
        self.drafted.inc(sum(stats.draft_sizes), drafter=drafter)
        for position, count in enumerate(accepted_per_position(stats.accepted_lengths), 1):
            self.accepted.inc(count, drafter=drafter, position=position)


def accepted_per_position(accepted_lengths: list[int]) -> list[int]:
    """How many passes accepted a draft token at depth 1, 2, ... (the bonus token is not a draft).

    >>> accepted_per_position([1, 3, 2, 1])
    [2, 1]
    """
    depth = max(accepted_lengths, default=1) - 1
    return [sum(1 for length in accepted_lengths if length - 1 >= d) for d in range(1, depth + 1)]


class Scheduler:
    """Runs jobs FIFO on one thread; at most ``max_queue`` wait behind the running one."""

    def __init__(self, model: Model, max_queue: int, decode: Callable[[list[int]], str]):
        self.model = model
        self._decode = decode
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._running = 0
        self._current: Job | None = None
        self._recent_seconds = 1.0  # moving mean of request time, for Retry-After
        self.metrics = ServerMetrics(self._queue.qsize, lambda: self._running)
        self._thread = threading.Thread(target=self._loop, name="freespec-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what waits, let the running job see its cancellation, and end the thread."""
        if (current := self._current) is not None:
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post(Failed(503, "the server is shutting down"))
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        job.loop = asyncio.get_running_loop()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            depth = self._queue.qsize() + self._running
            raise QueueFull(max(1, min(60, math.ceil(depth * self._recent_seconds)))) from None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                end = Finished("", [], "cancelled", GenerationStats(prompt_tokens=len(job.prompt_ids)), job.drafter)
            else:
                self._running, self._current = 1, job
                try:
                    end = self._run(job)
                except Exception as error:  # a fault in freespec: report it, keep serving
                    log.exception("generation failed")
                    end = Failed(500, f"internal error: {type(error).__name__}: {error}")
                finally:
                    self._running, self._current = 0, None
            self._count(job, end)
            job.post(end)  # last, so a client that has its answer sees it counted

    def _count(self, job: Job, end: Finished | Failed) -> None:
        if isinstance(end, Failed):
            status = "invalid" if end.status < 500 else "error"
        else:
            status = "cancelled" if end.finish_reason == "cancelled" else "success"
        self.metrics.requests.inc(endpoint=job.endpoint, status=status)
        if status == "success":
            elapsed = time.perf_counter() - job.arrived
            self.metrics.latency.observe(elapsed, endpoint=job.endpoint)
            self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * elapsed

    def _run(self, job: Job) -> Finished | Failed:
        """Generate one job, posting its progress; return the event that ends it."""
        try:
            generation = self.model.stream(prompt_ids=job.prompt_ids, max_new_tokens=job.max_tokens,
                                           drafter=job.drafter, **job.sampling)
        except ValueError as error:
            return Failed(400, str(error))
        waited = time.perf_counter() - job.arrived
        self.metrics.queue_wait.observe(waited)
        job.post(Started(waited))
        text = TextStream(self._decode, job.stops)
        chunks = iter(generation)
        first = True
        try:
            for chunk in chunks:
                delta = text.push(chunk)
                if delta:
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - job.arrived)
                        first = False
                    job.post(Delta(delta))
                if text.stopped or job.cancelled:
                    break
        finally:
            chunks.close()  # ends the generation where it is
        if not text.stopped and (delta := text.finish()):
            job.post(Delta(delta))
        self.metrics.record(job.drafter, generation.stats)
        reason = "cancelled" if job.cancelled else "stop" if text.stopped else generation.finish_reason
        return Finished(text.text, generation.token_ids, reason, generation.stats, job.drafter)
