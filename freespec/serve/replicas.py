"""Scale-out on Ray Serve: replicas of the model behind the same OpenAI routes (``freespec serve --replicas N``).

Two deployments, laid out as Ray Serve's own LLM apps are:

- ``FreespecIngress`` (one replica, no CPU of its own) holds the HTTP routes of
  :func:`freespec.serve.app.build_app` with the API keys and the body limit; it parses each
  request and hands it on through a deployment handle, then streams back what comes.
- ``FreespecReplica`` (N replicas, each a process with its own threads) is a
  :class:`freespec.serve.app.Service`: the model, its generation thread and its prefix cache. It
  checks and tokenizes the request, queues it (429 past its queue) and streams its events.

:class:`ConversationRouter` (Ray Serve's request router API) sends every turn of a conversation
to the same replica, whose prefix cache holds the earlier turns: each replica ranks by a hash of
the conversation's opening (its tenant and the messages up to the first user message, or the
start of a prompt) and of the replica's id (rendezvous hashing, so adding or losing a replica moves
only the conversations it held). A conversation moves to the next replica in its order only while
its own has no room (``max_queue`` requests on it). Answers do not depend on the replica: greedy
output is the same bits on any replica of the same machine type, and a seeded sample too.

``freespec serve --replicas N`` starts a local Ray instance; on a cluster, ``serve run`` takes
:func:`build` as the import path (docs/serving.md has a config). Needs ``pip install freespec[ray]``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

import freespec
from freespec.engine.loop import GenerationStats
from freespec.serve.app import API_KEY_ENV, build_app, create_service
from freespec.serve.metrics import ServerMetrics
from freespec.serve.routing import (
    Admitted,
    Rejected,
    ReplicaRequest,
    conversation_of,
    rank,
)
from freespec.serve.scheduler import (
    SHUTTING_DOWN,
    Delta,
    Failed,
    Finished,
    Started,
    outcome,
)
from freespec.serve.schemas import ApiError, DetokenizeRequest, RequestBody, TokenizeRequest

log = logging.getLogger(__name__)

LOAD_OPTIONS = ("model", "threads", "tree_shape", "datastore", "draft_model")  # freespec.load's
SERVICE_OPTIONS = ("served_name", "drafter", "drafters", "max_tokens", "max_queue", "prefix_reuse",
                   "request_timeout", "prefix_cache_mb", "max_batch")  # freespec.serve.app.create_service's
APP_OPTIONS = ("replicas", "api_keys", "max_body_bytes")
AFFINITY_WAIT_S = 2.0  # how long a request waits for its conversation's replica to answer Serve's probe


# ---------------------------------------------------------------- routing


class ConversationRouter(RequestRouter):
    """Ray Serve request router: a conversation's turns to the replica it ranks first.

    Serve asks a replica for its queue length before sending (within 0.1 s at first) and moves to
    the next rank when the answer is late, which a busy machine makes common; so for up to
    ``AFFINITY_WAIT_S`` the first replica is the only rank offered (Serve retries with longer
    deadlines) unless Serve knows its queue is full; after that, the others follow in the
    conversation's order. Calls that are not requests (describe, health) go to the least loaded.
    """

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        conversation = getattr(request, "conversation", None)  # by name: Serve may hold its own copy of the class
        if not isinstance(conversation, str):
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[replica] for replica in rank(conversation, list(by_id))]
        waited = time.time() - pending_request.created_at
        if waited < AFFINITY_WAIT_S and not self._full(ranked[0]):
            return [ranked[:1]]
        return [[replica] for replica in ranked]

    def _full(self, replica: RunningReplica) -> bool:
        """Whether Serve's cache of queue lengths says ``replica`` takes no more requests now."""
        cache = getattr(self, "_replica_queue_len_cache", None)
        queue = cache.get(replica.replica_id) if cache is not None else None
        return queue is not None and queue >= replica.max_ongoing_requests


# ---------------------------------------------------------------- the replicas


@serve.deployment(request_router_config=RequestRouterConfig(request_router_class=ConversationRouter),
                  health_check_period_s=10)
class FreespecReplica:
    """One copy of the model with its scheduler (a :class:`freespec.serve.app.Service`)."""

    def __init__(self, load: dict[str, Any], options: dict[str, Any]):
        model = freespec.load(**load)
        self.service = create_service(model, **options)
        for name in self.service.drafters:  # built now, so no request waits for a cost measurement
            model.drafter(name)
        self.service.start()
        self.name = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict[str, Any]:
        service = self.service
        return {"served_name": service.served_name, "created": service.created, "context": service.context}

    async def health(self) -> tuple[bool, dict]:
        return await self.service.health()

    async def tokenize(self, body: TokenizeRequest) -> list[int] | Rejected:
        try:
            return await self.service.tokenize(body)
        except ApiError as error:
            return _rejected(error)

    async def detokenize(self, body: DetokenizeRequest) -> str | Rejected:
        try:
            return await self.service.detokenize(body)
        except ApiError as error:
            return _rejected(error)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose generation thread died is replaced."""
        if not self.service.scheduler.alive:
            raise RuntimeError("the generation thread is not running")

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[Admitted | Rejected | Any]:
        """Admit ``request``, then stream its events; the caller hanging up stops its generation."""
        try:
            job = await self.service.admit(request.endpoint, request.body, request.tenant)
        except ApiError as error:
            yield _rejected(error)
            return
        try:
            yield Admitted(job.id, self.name)
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            job.cancel()  # a no-op once it ended

    def __del__(self):
        self.service.close()


# ---------------------------------------------------------------- the ingress


class RemoteJob:
    """A request running on a replica, as the routes see a local :class:`~freespec.serve.scheduler.Job`:
    ``id``, ``events`` and ``cancel()``. Its events are counted in the ingress's metrics on the way."""

    def __init__(self, pool: ReplicaPool, admitted: Admitted, endpoint: str, stream, arrived: float):
        self.id, self.endpoint, self.arrived = admitted.id, endpoint, arrived
        self.events: asyncio.Queue = asyncio.Queue()
        self._pool, self._stream, self._over = pool, stream, False
        pool.waiting += 1
        self._running = False
        self._pump = asyncio.create_task(self._relay())

    async def _relay(self) -> None:
        metrics, first = self._pool.metrics, True
        try:
            async for event in self._stream:
                if isinstance(event, Started):
                    self._pool.waiting, self._pool.running = self._pool.waiting - 1, self._pool.running + 1
                    self._running = True
                    metrics.queue_wait.observe(event.queued_seconds)
                elif isinstance(event, Delta) and first:
                    metrics.first_token.observe(time.perf_counter() - self.arrived)
                    first = False
                elif isinstance(event, (Finished, Failed)):
                    self._end(event)
                    return
                self.events.put_nowait(event)
        except Exception:  # the replica died or Ray failed: this request only
            log.exception("request %s: its replica failed", self.id)
            self._end(Failed(502, f"internal error (request {self.id}): its replica failed; the server log has "
                                  f"the details"))
            return
        self._end(Failed(502, f"internal error (request {self.id}): its replica ended it without an answer"))

    def _end(self, event: Finished | Failed) -> None:
        """Count the end, free the request's place, then hand the client its end."""
        if self._over:
            return
        self._over = True
        pool = self._pool
        if self._running:
            pool.running -= 1
        else:
            pool.waiting -= 1
        if event.stats is not None:
            pool.metrics.record(event.drafter, event.stats)
        pool.metrics.count_end(self.endpoint, outcome(event), time.perf_counter() - self.arrived)
        pool.jobs.discard(self)
        self.events.put_nowait(event)

    def cancel(self, reason: str = "client") -> None:
        """Stop it on its replica (the client left, or the server stops)."""
        if self._over:
            return
        self._pump.cancel()
        self._stream.cancel()
        if reason == "shutdown":
            self._end(Failed(503, SHUTTING_DOWN))
        else:
            self._end(Finished("", "cancelled", GenerationStats(), ""))


class ReplicaPool:
    """What the ingress's routes serve from (a :class:`freespec.serve.app.Serving`): requests go to
    the replicas through ``handle`` (routed by :class:`ConversationRouter`); ``card`` is a
    replica's description."""

    def __init__(self, handle: DeploymentHandle, card: dict[str, Any]):
        self._handle = handle
        self._stream = handle.options(stream=True)
        self.served_name, self.created, self.context = card["served_name"], card["created"], card["context"]
        self.waiting = self.running = 0
        self.jobs: set[RemoteJob] = set()
        self.metrics = ServerMetrics(lambda: self.waiting, lambda: self.running)
        self.by_replica = self.metrics.registry.counter(
            "freespec_replica_requests_total", "Requests each replica admitted (replica: its Ray Serve id).",
            ("replica",))

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        for job in list(self.jobs):
            job.cancel("shutdown")

    async def health(self) -> tuple[bool, dict]:
        """A replica's answer (any one: the router picks), within 10 s."""
        try:
            return await asyncio.wait_for(self._handle.health.remote(), timeout=10)
        except Exception as error:  # noqa: BLE001 -- any failure to answer is "unavailable"
            return False, {"status": "unavailable", "reason": f"no replica answered: {type(error).__name__}"}

    async def tokenize(self, body: TokenizeRequest) -> list[int]:
        return _accepted(await self._handle.tokenize.remote(body))

    async def detokenize(self, body: DetokenizeRequest) -> str:
        return _accepted(await self._handle.detokenize.remote(body))

    async def admit(self, endpoint: str, body: RequestBody, tenant: str | None) -> RemoteJob:
        """Hand the request to its replica; raise ApiError when it refuses or none has room."""
        arrived = time.perf_counter()
        stream = self._stream.generate.remote(ReplicaRequest(endpoint, body, tenant, conversation_of(body, tenant)))
        try:
            first = await stream.__anext__()
        except BackPressureError:
            raise ApiError(429, "the server is busy; retry after 1 s", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except asyncio.CancelledError:
            stream.cancel()
            raise
        first = _accepted(first)
        self.by_replica.inc(replica=first.replica)
        job = RemoteJob(self, first, endpoint, stream, arrived)
        self.jobs.add(job)
        return job


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class FreespecIngress:
    """The HTTP routes, in front of the replicas."""

    async def __init__(self, replica: DeploymentHandle, api_keys: Sequence[str], max_body_bytes: int):
        self.pool = ReplicaPool(replica, await replica.describe.remote())
        self.api_keys, self.max_body_bytes = tuple(api_keys), max_body_bytes

    def __serve_build_asgi_app__(self):
        return build_app(self.pool, api_keys=self.api_keys, max_body_bytes=self.max_body_bytes)


def _rejected(error: ApiError) -> Rejected:
    return Rejected(error.status, error.message, error.param, error.code, error.headers)


def _accepted(answer):
    """A replica's answer, or the ApiError it refused with."""
    if isinstance(answer, Rejected):
        raise ApiError(answer.status, answer.message, answer.param, answer.code, answer.headers)
    return answer


# ---------------------------------------------------------------- building and running it


def build(args: dict[str, Any]):
    """The Ray Serve application for ``args``: ``replicas`` (default 2), ``threads`` per replica
    (default 1), ``api_keys`` (default: $FREESPEC_API_KEY), ``max_body_bytes``, and the keywords
    of :func:`freespec.load` and :func:`freespec.serve.app.create_service`. ``serve run`` calls it
    with its config's ``args``; ValueError names an unknown or bad one."""
    unknown = sorted(set(args) - set(LOAD_OPTIONS + SERVICE_OPTIONS + APP_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(LOAD_OPTIONS + SERVICE_OPTIONS + APP_OPTIONS)}")
    replicas = int(args.get("replicas", 2))
    threads = int(args.get("threads") or 1)
    if replicas < 1 or threads < 1:
        raise ValueError(f"replicas and threads must be positive, got {replicas} and {threads}")
    load = {key: args[key] for key in LOAD_OPTIONS if args.get(key) is not None}
    load["threads"] = threads
    for key in ("model", "datastore", "draft_model"):
        if key in load:
            load[key] = str(load[key])
    options = {key: args[key] for key in SERVICE_OPTIONS if args.get(key) is not None}
    max_queue = int(options.setdefault("max_queue", 64))
    api_keys = args.get("api_keys")
    if api_keys is None:
        api_keys = [key for key in [os.environ.get(API_KEY_ENV)] if key]
    replica = FreespecReplica.options(
        num_replicas=replicas, max_ongoing_requests=max_queue + 1, max_queued_requests=max_queue,
        ray_actor_options={"num_cpus": threads}).bind(load, options)
    return FreespecIngress.bind(replica, list(api_keys), int(args.get("max_body_bytes", 1 << 20)))


def start_local(replicas: int, threads: int, host: str, port: int) -> None:
    """Start a Ray instance on this machine sized for ``replicas`` x ``threads`` CPUs, with Serve's
    HTTP proxy on ``host:port``; its workers import this very freespec."""
    import ray

    source = str(Path(freespec.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in [source, os.environ.get("PYTHONPATH")] if p)
    ray.init(num_cpus=replicas * threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})


def stop_local() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


def serve_replicas(args: dict[str, Any], host: str, port: int) -> None:
    """``freespec serve --replicas N``: run the application on a local Ray instance until interrupted."""
    application = build(args)
    start_local(int(args.get("replicas", 2)), int(args.get("threads") or 1), host, port)
    try:
        serve.run(application, name="freespec", route_prefix="/", blocking=True)
    finally:
        stop_local()
