"""The server's generation thread: one bounded FIFO queue, one request on the model at a time.

A :class:`~freespec.api.Model` owns one KV cache, so requests run one after another on a single
thread, off the event loop. Each :class:`Job` carries an asyncio queue that receives its events
(``Started``, text ``Delta``s, then exactly one ``Finished`` or ``Failed``), posted thread-safely
to the loop that submitted it.

Admission takes a queue slot (:meth:`Scheduler.reserve`) before the prompt is tokenized, so
requests being tokenized count against ``max_queue`` too. A job stops at the next prefill chunk or
decoded chunk once its client leaves, its deadline passes or the server closes; one that has not
started is skipped. A request reuses the cache rows of earlier prompts of its own tenant (API key)
only: the rows the previous request left when it came from the same tenant, and the prefixes
its tenant's earlier requests filed in the :class:`~freespec.model.prefix_cache.PrefixCache`, so
nothing of one client's prompt shows in another's ``cached_tokens`` or prefill time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from freespec.api import Model
from freespec.engine.loop import GenerationStats
from freespec.model.prefix_cache import PrefixCache
from freespec.model.runner import PrefillCancelled
from freespec.serve import DEFAULT_PREFIX_CACHE_MB
from freespec.serve.metrics import ServerMetrics
from freespec.serve.textstream import TextStream

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"
_NOBODY = object()  # the tenant of an empty cache


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
    status: int  # 400: the engine refused the request; 500: a fault in freespec; 503: stopping; 504: too late
    message: str
    stats: GenerationStats | None = None  # of the tokens generated before it stopped, if any
    drafter: str = ""


Event = Started | Delta | Finished | Failed


def outcome(end: Finished | Failed) -> str:
    """The ``status`` label /metrics counts a request's end under."""
    if isinstance(end, Failed):
        return {503: "cancelled", 504: "timeout"}.get(end.status, "invalid" if end.status < 500 else "error")
    return "cancelled" if end.finish_reason == "cancelled" else "success"


@dataclass
class Job:
    """One admitted request. ``sampling`` holds the engine's sampling keywords, already checked;
    ``tenant`` names whose prompt rows it may reuse; ``deadline`` is a ``time.perf_counter()`` time."""

    id: str
    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    drafter: str
    stops: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    tenant: str | None = None
    deadline: float | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    arrived: float = field(default_factory=time.perf_counter)
    stop_reason: str | None = None  # why it was cancelled: "client" (left) or "shutdown"
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str = "client") -> None:
        if not self._cancelled.is_set():
            self.stop_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def should_stop(self) -> bool:
        return self.cancelled or self.expired

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


class Unavailable(Exception):
    """The server takes no more requests: it is shutting down, or its generation thread has died."""


class Scheduler:
    """Runs jobs FIFO on one thread; at most ``max_queue`` wait (tokenizing or queued) behind the running one.

    ``prefix_reuse``: let a request reuse cache rows of its tenant's earlier prompts (off: every
    request prefills its whole prompt); ``prefix_cache_mb``: memory for the rows of earlier
    requests' prompts (0: only the previous request's rows are reused). Reuse needs batch-invariant
    kernels (see :meth:`freespec.model.runner.ModelRunner.reuse`): with torch's it stays off.
    ``request_timeout``: seconds from arrival after which a job is stopped and fails with 504
    (None: no deadline).
    """

    def __init__(self, model: Model, max_queue: int, decode: Callable[[list[int]], str],
                 prefix_reuse: bool = True, request_timeout: float | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB):
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        self.model = model
        self._decode = decode
        self.max_queue = max_queue
        self.prefix_reuse = prefix_reuse and model.runner.kernels.batch_invariant
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20)) if self.prefix_reuse and prefix_cache_mb else None
        self.request_timeout = request_timeout
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by the slots
        self._lock = threading.Lock()
        self._waiting = 0  # slots taken: jobs being tokenized or queued
        self._closed: str | None = None  # why no more requests are taken
        self._running = 0
        self._current: Job | None = None
        self._cache_tenant: object = _NOBODY  # whose prompt rows the model's cache holds
        self._recent_seconds = 1.0  # moving mean of request time, for Retry-After
        self.metrics = ServerMetrics(lambda: self.depth, lambda: self._running, self.prefixes)
        self._thread = threading.Thread(target=self._loop, name="freespec-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the generation thread runs (False before start, after stop, or if it died)."""
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._waiting

    # -------------------------------------------------------- admission

    def reserve(self) -> None:
        """Take a queue slot for a request about to be tokenized; raise QueueFull or Unavailable."""
        with self._lock:
            if self._closed is not None or not self.alive:
                raise Unavailable(self._closed or "the generation thread is not running")
            if self._waiting >= self.max_queue:
                depth = self._waiting + self._running
                raise QueueFull(max(1, min(60, math.ceil(depth * self._recent_seconds))))
            self._waiting += 1

    def release(self) -> None:
        """Give back a slot whose request will not be submitted."""
        with self._lock:
            self._waiting -= 1

    def submit(self, job: Job) -> None:
        """Queue a job whose slot :meth:`reserve` took (it is freed when the job starts)."""
        job.loop = asyncio.get_running_loop()
        if self.request_timeout is not None:
            job.deadline = job.arrived + self.request_timeout
        with self._lock:
            if self._closed is not None:
                raise Unavailable(self._closed)
            self._queue.put(job)

    # -------------------------------------------------------- stopping

    def close(self, reason: str = SHUTTING_DOWN) -> None:
        """Take no more requests and end every waiting and running one now with a 503 (a stream
        gets an error event), so that connections finish instead of holding up a shutdown."""
        with self._lock:
            self._closed = self._closed or reason
            if (current := self._current) is not None:
                current.cancel("shutdown")  # the thread ends it at its next chunk
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.release()
                job.cancel("shutdown")
                self._end(job, Failed(503, self._closed))

    def stop(self) -> None:
        """Close, then end the thread."""
        self.close()
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -------------------------------------------------------- the generation thread

    def _loop(self) -> None:
        job = None
        try:
            while (job := self._queue.get()) is not None:
                self.release()
                self._end(job, self._serve(job))
        except BaseException:  # not a request's fault (those end in _serve): the thread cannot go on
            log.critical("the generation thread stopped", exc_info=True)
            if job is not None:
                self._end(job, _internal_error(job))
            self.close("the generation thread has stopped; restart the server (its log says why)")

    def _serve(self, job: Job) -> Finished | Failed:
        """Run one job unless it is already over; return the event that ends it."""
        with self._lock:
            if self._closed is not None:
                job.cancel("shutdown")
            elif not job.should_stop():
                self._running, self._current = 1, job
        if self._current is not job:
            skipped = GenerationStats(prompt_tokens=len(job.prompt_ids))
            return self._stopped(job) or Finished("", [], "cancelled", skipped, job.drafter)
        try:
            end = self._run(job)
            self._file_rows()
            return end
        except Exception:  # a fault in freespec: report it, keep serving
            log.exception("request %s failed", job.id)
            self._drop_rows(_NOBODY)  # whatever the fault left in the cache is not filed away
            return _internal_error(job)
        finally:
            with self._lock:
                self._running, self._current = 0, None

    def _stopped(self, job: Job) -> Failed | None:
        """The failure that ends a job stopped by the server, None when it ended otherwise."""
        if job.stop_reason == "shutdown":
            return Failed(503, self._closed or SHUTTING_DOWN)
        if not job.cancelled and job.expired:
            return Failed(504, f"the request took longer than the server's request timeout of "
                               f"{self.request_timeout:g} s")
        return None

    def _end(self, job: Job, end: Finished | Failed) -> None:
        """Count a job's outcome, then tell its client (last, so a client that has its answer sees it counted)."""
        elapsed = time.perf_counter() - job.arrived
        if self.metrics.count_end(job.endpoint, outcome(end), elapsed) == "success":
            self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * elapsed
        job.post(end)

    def _drop_rows(self, tenant: object) -> None:
        """Empty the models' caches, which then belong to ``tenant``."""
        for runner in (self.model.runner, self.model.draft_runner):
            if runner is not None:
                runner.reset(0)
        self._cache_tenant = tenant

    def _prepare_cache(self, job: Job) -> None:
        """Drop the rows the previous request left unless ``job`` comes from the same tenant
        (cached_tokens and prefill time then say nothing of another client's prompt), then load
        the longest prefix of ``job``'s prompt its tenant has filed, if longer than what is left."""
        if job.tenant != self._cache_tenant:
            self._drop_rows(job.tenant)
        if self.prefixes is not None:
            self.prefixes.load(self.model.runner.cache, job.prompt_ids, job.tenant)

    def _file_rows(self) -> None:
        """File the rows a request left (its prompt and answer) under its tenant, before its client
        hears the end, so /metrics already counts them."""
        if self.prefixes is not None and self._cache_tenant is not _NOBODY:
            self.metrics.prefix_evicted.inc(self.prefixes.save(self.model.runner.cache, self._cache_tenant))

    def _run(self, job: Job) -> Finished | Failed:
        """Generate one job, posting its progress; return the event that ends it."""
        self._prepare_cache(job)
        try:
            generation = self.model.stream(prompt_ids=job.prompt_ids, max_new_tokens=job.max_tokens,
                                           drafter=job.drafter, reuse_prefix=self.prefix_reuse,
                                           should_stop=job.should_stop, tenant=job.tenant, **job.sampling)
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
                if text.stopped or job.should_stop():
                    break
        except PrefillCancelled:
            pass  # job.should_stop() said so
        except ValueError as error:  # the request's own values, e.g. a temperature that overflows the logits
            if not first:
                raise
            return Failed(400, str(error))
        finally:
            chunks.close()  # ends the generation where it is
        self.metrics.record(job.drafter, generation.stats)
        if stopped := self._stopped(job):
            return dataclasses.replace(stopped, stats=generation.stats, drafter=job.drafter)
        if not text.stopped and (delta := text.finish()):
            job.post(Delta(delta))
        reason = "cancelled" if job.cancelled else "stop" if text.stopped else generation.finish_reason
        return Finished(text.text, generation.token_ids, reason, generation.stats, job.drafter)


def _internal_error(job: Job) -> Failed:
    """What a client learns of a fault: the request id to find it in the log, never the exception."""
    return Failed(500, f"internal error (request {job.id}); the server log has the details")
