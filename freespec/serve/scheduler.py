"""The server's generation thread: one bounded FIFO queue, continuous batching on the model.

Up to ``max_batch`` requests run at once, each on a :class:`Slot` of its own (a fork of the model:
its own KV cache and drafters, :meth:`freespec.api.Model.fork`); every forward pass carries the
next step of each of them (:class:`freespec.engine.batch.Batch`). Requests join and leave between
passes, long prompts are prefilled in chunks between the others' decoding steps, and since the
kernels are batch-invariant a request's answer is the same bits whatever runs beside it. A model
on transformers' forward (not batch-invariant, no fork) runs one request at a time. Each
:class:`Job` carries an asyncio queue that receives its events (``Started``, text ``Delta``s, then
exactly one ``Finished`` or ``Failed``), posted thread-safely to the loop that submitted it.

Admission takes a queue slot (:meth:`Scheduler.reserve`) before the prompt is tokenized, so
requests being tokenized count against ``max_queue`` too. Before every pass a job whose client
left, whose deadline passed or whose server is closing is ended and its slot freed; one that has
not started is skipped. A fault in one request fails that request only: the others' passes go on.
A request reuses the cache rows of earlier prompts of its own tenant (API key) only: the rows the
previous request on its slot left when it came from the same tenant, the prefixes its tenant's
earlier requests filed in the :class:`~freespec.model.prefix_cache.PrefixCache`, and the rows its
tenant's running requests hold (copied from their caches), so nothing of one client's prompt shows
in another's ``cached_tokens`` or prefill time. A request whose prompt starts as one being
prefilled for its tenant (a burst with one system prompt, the choices of ``n`` > 1) waits for
those rows instead of prefilling them a second time.
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
from freespec.engine.batch import Batch, Running, waits_for
from freespec.engine.loop import Generation, GenerationStats
from freespec.engine.textstream import TextStream
from freespec.kernels import release_worker_threads
from freespec.model.prefix_cache import PrefixCache
from freespec.model.runner import ModelRunner, PrefillCancelled
from freespec.serve import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_MB
from freespec.serve.logprobs import LoggedToken, TokenPieces
from freespec.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"
_NOBODY = object()  # the tenant of an empty cache


@dataclass
class Started:
    queued_seconds: float


@dataclass
class Delta:
    text: str
    logprobs: list[LoggedToken] | None = None  # of the tokens since the last delta, if the request asked


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (a stop token or string), "length", or "cancelled" (the client left)
    stats: GenerationStats
    drafter: str
    logprobs: list[LoggedToken] | None = None  # one per token id, if the request asked


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
    logprobs: int | None = None  # alternatives per token with the tokens' log-probabilities (None: not asked)
    echo: str | None = None  # the prompt's text, to come before the answer (with logprobs: the prompt's too)
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

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's log-probabilities are asked (an echo with logprobs): its rows are
        then all prefilled, none reused."""
        return self.echo is not None and self.logprobs is not None

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


class Slot:
    """A copy of the model one request runs on at a time: its own KV cache and drafters, and
    the tenant whose rows its cache holds."""

    def __init__(self, model: Model):
        self.model = model
        self.tenant: object = _NOBODY

    def drop_rows(self, tenant: object) -> None:
        """Empty its caches, which then belong to ``tenant``."""
        for runner in (self.model.runner, self.model.draft_runner):
            if runner is not None:
                runner.reset(0)
        self.tenant = tenant


@dataclass(eq=False)
class Active:
    """A job on the model: its slot, generation and text so far."""

    job: Job
    slot: Slot
    generation: Generation
    text: TextStream
    request: Running
    answered: bool = False  # whether text has been sent
    logged: int = 0  # tokens whose log-probabilities have been sent
    echoed: bool = False  # whether the prompt's text (an echo) has been sent


class Scheduler:
    """Runs up to ``max_batch`` jobs at once, batched; at most ``max_queue`` wait (tokenizing or queued).

    ``prefix_reuse``: let a request reuse cache rows of its tenant's earlier prompts (off: every
    request prefills its whole prompt); ``prefix_cache_mb``: memory for the rows of earlier
    requests' prompts (0: only the rows the previous request on the same slot left are reused).
    Reuse needs batch-invariant kernels (see :meth:`freespec.model.runner.ModelRunner.reuse`): with
    torch's it stays off, and so does batching. ``request_timeout``: seconds from arrival after
    which a job is stopped and fails with 504 (None: no deadline). ``share_budget``: let the
    batch choose each request's draft size (:mod:`freespec.engine.batch`). ``tokenizer``: the
    generation thread's own, which turns tokens into text. ``after_request``: called on the
    generation thread after each request on the model ends, between passes (a state file's save).
    """

    def __init__(self, model: Model, max_queue: int, tokenizer,
                 prefix_reuse: bool = True, request_timeout: float | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, max_batch: int = DEFAULT_MAX_BATCH,
                 share_budget: bool = True, after_request: Callable[[], None] | None = None):
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.model = model
        self._decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self._pieces = TokenPieces(tokenizer)
        self.max_queue = max_queue
        batchable = isinstance(model.runner, ModelRunner) and model.runner.kernels.batch_invariant
        self.max_batch = max_batch if batchable else 1
        self.prefix_reuse = prefix_reuse and model.runner.kernels.batch_invariant
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20)) if self.prefix_reuse and prefix_cache_mb else None
        self.request_timeout = request_timeout
        self.after_request = after_request
        self.batch = Batch(share=share_budget)
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by the slots
        self._lock = threading.Lock()
        self._waiting = 0  # slots taken: jobs being tokenized or queued
        self._closed: str | None = None  # why no more requests are taken
        self._active: list[Active] = []  # the jobs on the model (the generation thread's; read under the lock)
        self._held: list[Job] = []  # jobs waiting for a prompt prefix an active job prefills (see _leader)
        self._slots = [Slot(model)]  # the model itself first: one client runs as it always has
        self._idle = list(self._slots)
        self._recent_seconds = 1.0  # moving mean of request time, for Retry-After
        self.metrics = ServerMetrics(lambda: self.depth, lambda: len(self._active), self.prefixes)
        self._thread = threading.Thread(target=self._loop, name="freespec-generation", daemon=True)
        # the generation thread does the computing from now on; the team of OpenMP workers this
        # thread may hold (a calibration, a generation) would stop every team's spinning
        release_worker_threads()

    def start(self) -> None:
        """Start the generation thread. The thread that starts it hands back its OpenMP workers
        too: `freespec serve` and a replica build their drafters (measuring costs) between
        creating the scheduler and starting it."""
        release_worker_threads()
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
                ahead = self._waiting + len(self._active)
                raise QueueFull(max(1, min(60, math.ceil(ahead / self.max_batch * self._recent_seconds))))
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
            for active in self._active:
                active.job.cancel("shutdown")  # the thread ends it before its next pass
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.release()
                job.cancel("shutdown")
                self._end(job, Failed(503, self._closed))
        self._queue.put(None)  # wakes the thread if it waits for work

    def stop(self) -> None:
        """Close, then end the thread."""
        self.close()
        self._thread.join(timeout=30)

    # -------------------------------------------------------- the generation thread

    def _loop(self) -> None:
        job = None
        try:
            while True:
                self._start_held()
                while len(self._active) + len(self._held) < self.max_batch:  # join between passes
                    try:
                        job = self._queue.get(block=not self._active)
                    except queue.Empty:
                        break
                    if job is None:
                        if self._closed is not None:
                            self._stop_all()
                            return
                        continue
                    if self._leader(job) is not None:
                        self._held.append(job)  # it waits for the rows another request is prefilling
                    else:
                        self.release()
                        self._start(job)
                    job = None
                for active in [active for active in self._active if active.job.should_stop()]:
                    self._finish(active)  # leave between passes: the client left, too late, or closing
                if self._active:
                    self._step()
        except BaseException:  # not a request's fault (those end in _deliver): the thread cannot go on
            log.critical("the generation thread stopped", exc_info=True)
            if job is not None:
                self._end(job, _internal_error(job))
            for held in self._held:
                self._end(held, _internal_error(held))
            for active in list(self._active):
                self._leave(active, _internal_error(active.job), keep_rows=False)
            self.close("the generation thread has stopped; restart the server (its log says why)")

    def _step(self) -> None:
        """One pass for every active job, then what it brought them. The batch sets each request's
        own faults on it; anything else that goes wrong in it fails the jobs of that pass only."""
        self.metrics.pass_requests.observe(len(self._active))
        try:
            self.batch.step([active.request for active in self._active])
        except Exception as error:
            for active in self._active:
                active.request.error = error
        for active in list(self._active):
            self._deliver(active)

    def _stop_all(self) -> None:
        for job in self._held:
            job.cancel("shutdown")
        self._start_held()  # ends them
        for active in list(self._active):
            active.job.cancel("shutdown")
            self._finish(active)

    def _start(self, job: Job) -> None:
        """Put a job on the model unless it is already over (then end it)."""
        if self._closed is not None:
            job.cancel("shutdown")
        if job.should_stop():
            skipped = GenerationStats(prompt_tokens=len(job.prompt_ids))
            self._end(job, self._stopped(job) or Finished("", "cancelled", skipped, job.drafter))
            return
        slot = self._slot_for(job)
        try:
            generation = slot.model.stream(prompt_ids=job.prompt_ids, max_new_tokens=job.max_tokens,
                                           drafter=job.drafter, reuse_prefix=self.prefix_reuse,
                                           should_stop=job.should_stop, tenant=job.tenant, logprobs=job.logprobs,
                                           prompt_logprobs=job.logprobs if job.scores_prompt else None,
                                           **job.sampling)
        except ValueError as error:
            self._idle.append(slot)
            self._end(job, Failed(400, str(error)))
            return
        except Exception:
            log.exception("request %s failed", job.id)
            slot.drop_rows(_NOBODY)
            self._idle.append(slot)
            self._end(job, _internal_error(job))
            return
        waited = time.perf_counter() - job.arrived
        self.metrics.queue_wait.observe(waited)
        job.post(Started(waited))
        active = Active(job, slot, generation, TextStream(self._decode, job.stops), Running(generation))
        with self._lock:
            self._active.append(active)
            if self._closed is not None:
                job.cancel("shutdown")

    def _leader(self, job: Job) -> Active | None:
        """A running request of ``job``'s tenant still prefilling at least MIN_SHARED_ROWS rows of
        the prompt's start that ``job``'s prompt shares (:func:`~freespec.engine.batch.waits_for`):
        ``job`` waits for it (a burst of requests with one system prompt, the choices of an ``n`` > 1
        request), then copies those rows instead of prefilling them again (see :meth:`_slot_for`).
        None when there is none."""
        if not self.prefix_reuse or job.scores_prompt:  # a scored prompt is prefilled whole
            return None
        return next((active for active in self._active
                     if active.job.tenant == job.tenant and waits_for(job.prompt_ids, active.generation)), None)

    def _start_held(self) -> None:
        """Start the held jobs that no longer wait for another's rows (or should stop), in order."""
        for job in list(self._held):
            if job.should_stop() or self._leader(job) is None:
                self._held.remove(job)
                self.release()
                self._start(job)

    def _slot_for(self, job: Job) -> Slot:
        """An idle slot for ``job``, best one whose cache holds its tenant's rows (a new fork when
        none is idle), its cache emptied unless it does, then given the longest prefix of the
        prompt whose rows its tenant has filed or a running request of its tenant holds, if longer
        than what is left."""
        if not self._idle:
            self._idle.append(self._new_slot())
        slot = next((slot for slot in self._idle if slot.tenant == job.tenant), self._idle[0])
        self._idle.remove(slot)
        if slot.tenant != job.tenant:
            slot.drop_rows(job.tenant)
        cache = slot.model.runner.cache
        if self.prefixes is not None:
            self.prefixes.load(cache, job.prompt_ids, job.tenant)
        if self.prefix_reuse:
            for active in self._active:
                if active.job.tenant == job.tenant:
                    cache.copy_prefix(active.slot.model.runner.cache, job.prompt_ids)
        return slot

    def _new_slot(self) -> Slot:
        slot = Slot(self.model.fork())
        self._slots.append(slot)
        return slot

    def _deliver(self, active: Active) -> None:
        """Pass on what the last pass brought a job; end it if it is done or failed."""
        job, request, text = active.job, active.request, active.text
        if request.error is not None:
            self._fail(active, request.error)
            return
        if request.emitted:
            delta = text.push(request.emitted)
            if text.stopped:  # tokens a step accepted past the stop string are not the answer's
                active.generation.end_at(text.answer_tokens)
            if delta:
                if not active.answered:
                    self.metrics.first_token.observe(time.perf_counter() - job.arrived)
                    active.answered = True
                self._post_delta(active, delta)
        if text.stopped or active.generation.done:
            self._finish(active)

    def _post_delta(self, active: Active, text: str) -> None:
        """Send ``text`` with the log-probabilities of the tokens generated since the last delta, if
        asked; the first delta of an echo starts with the prompt (its text, then its tokens')."""
        job = active.job
        start, active.logged = active.logged, len(active.generation.logprobs or ())
        echo = job.echo is not None and not active.echoed
        if echo:
            active.echoed, text = True, job.echo + text
        job.post(Delta(text, self._logged(active, start, echo)))

    def _logged(self, active: Active, start: int, prompt: bool) -> list[LoggedToken] | None:
        """The log-probabilities of the tokens generated from ``start`` on (None if not asked),
        after the prompt's if ``prompt`` and the request has them (an echo)."""
        generation = active.generation
        if generation.logprobs is None:
            return None
        logged = self._pieces.logged(generation.token_ids[start:], generation.logprobs[start:])
        if prompt and generation.prompt_logprobs is not None:
            logged = self._pieces.logged(active.job.prompt_ids, generation.prompt_logprobs) + logged
        return logged

    def _fail(self, active: Active, error: Exception) -> None:
        job = active.job
        if isinstance(error, PrefillCancelled):  # job.should_stop() said so
            self._finish(active)
        elif isinstance(error, ValueError) and not active.answered:  # its own values, e.g. an overflowing temperature
            self._leave(active, Failed(400, str(error)), keep_rows=False)
        else:  # a fault in freespec: report it, keep serving the others
            log.error("request %s failed", job.id, exc_info=(type(error), error, error.__traceback__))
            self._leave(active, _internal_error(job), keep_rows=False)

    def _finish(self, active: Active) -> None:
        """End a job that finished or was stopped, with what it generated."""
        job, generation, text = active.job, active.generation, active.text
        if stopped := self._stopped(job):
            end = dataclasses.replace(stopped, stats=generation.stats, drafter=job.drafter)
        else:
            delta = "" if text.stopped else text.finish()
            if text.stopped:  # maybe in the last characters, which finish() released
                generation.end_at(text.answer_tokens)
            unsent = active.logged < len(generation.logprobs or ()) or (job.echo is not None and not active.echoed)
            if delta or unsent:
                self._post_delta(active, delta)  # the last text, or tokens without any, or the echo alone
            reason = "cancelled" if job.cancelled else generation.finish_reason  # "stop" at a stop string (end_at)
            end = Finished((job.echo or "") + text.text, reason, generation.stats, job.drafter,
                           self._logged(active, 0, prompt=True))
        self.metrics.record(job.drafter, generation.stats)
        self._leave(active, end, keep_rows=True)

    def _leave(self, active: Active, end: Finished | Failed, keep_rows: bool) -> None:
        """Take a job off the model, file its rows (its prompt and answer) under its tenant before
        its client hears the end (so /metrics already counts them), free its slot, tell its client.
        A fault's rows are dropped: whatever it left in the cache is not filed away."""
        with self._lock:
            self._active.remove(active)
        slot = active.slot
        if not keep_rows:
            slot.drop_rows(_NOBODY)
        elif self.prefixes is not None and slot.tenant is not _NOBODY:
            self.metrics.prefix_evicted.inc(self.prefixes.save(slot.model.runner.cache, slot.tenant))
        self._idle.insert(0, slot)  # warmest first
        self._end(active.job, end)
        if self.after_request is not None:
            self.after_request()

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


def _internal_error(job: Job) -> Failed:
    """What a client learns of a fault: the request id to find it in the log, never the exception."""
    return Failed(500, f"internal error (request {job.id}); the server log has the details")
