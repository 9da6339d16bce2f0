"""``freespec serve``: an OpenAI-compatible HTTP server (chat and text completions, SSE streaming).

The event loop (FastAPI on uvicorn) checks requests (:mod:`freespec.serve.schemas`), encodes
prompts and streams answers; the model runs on one generation thread
(:mod:`freespec.serve.scheduler`) that takes requests in arrival order from a bounded queue and
runs up to ``max_batch`` of them at once, batched into each forward pass. A
fault inside freespec is a 500 for that request only (its details go to the log, not the client),
and the server keeps serving.

Tenancy: the API key a request presents (``Authorization: Bearer KEY``; none is a tenant of its
own) is its tenant. A request reuses the KV-cache rows of earlier prompts of its own tenant only
(the prefix cache keeps one tree per tenant), so one client cannot read another's prompt from
``cached_tokens`` or prefill time.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Protocol, Sequence

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from freespec import DEFAULT_DRAFTER
from freespec.api import Model
from freespec.drafters import FACTORIES, check_name
from freespec.engine.sampling import SamplingParams
from freespec.engine.textstream import check_stops
from freespec.serve import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_MB, DEFAULT_STATE_INTERVAL
from freespec.serve.metrics import ServerMetrics
from freespec.serve.persistence import StateFile
from freespec.serve.scheduler import (
    Delta,
    Event,
    Failed,
    Finished,
    Job,
    QueueFull,
    Scheduler,
    Started,
    Unavailable,
)
from freespec.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Reply,
    RequestBody,
    TokenizeRequest,
    error_body,
    error_response,
    prompt_param,
    request_sampling,
    requested_logprobs,
    sse,
    validation_message,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
API_KEY_ENV = "FREESPEC_API_KEY"
CLIENT_CLOSED = 499  # the client left before its answer was ready (nginx's code; nobody reads it)
OPEN_PATHS = ("/health", "/metrics")  # answered without a key; every other path needs one when keys are set
# A prompt longer than the context times this (or the vocabulary's longest token, if longer) in
# characters cannot fit the context: it is refused before the tokenizer spends time on it.
MIN_CHARS_PER_TOKEN = 16


def canonical_drafter(name: str) -> str:
    """``name`` with a fused drafter's parts in registry order (``lookup+recycling`` is
    ``recycling+lookup``); ValueError when it names no drafter.

    >>> canonical_drafter("lookup+recycling"), canonical_drafter("none")
    ('recycling+lookup', 'none')
    """
    check_name(name)
    order = list(FACTORIES)
    return "+".join(sorted(name.split("+"), key=order.index)) if "+" in name else name


def tenant_of(authorization: str | None) -> str | None:
    """Who a request is, for prefix reuse: a digest of the key it presents (None: no key)."""
    return None if authorization is None else hashlib.sha256(authorization.encode("latin-1")).hexdigest()


def exposure_warning(host: str, api_keys: Sequence[str]) -> str | None:
    """A one-line warning when ``host`` can be reached from other machines and no key is required."""
    if api_keys:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach it can use the model "
            f"(set --api-key or ${API_KEY_ENV})")


# ---------------------------------------------------------------- transport


class _Guard:
    """ASGI middleware: the API key on every path but /health and /metrics, then the body size
    limit, before any parsing."""

    def __init__(self, app, api_keys: Sequence[str], max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = [f"Bearer {key}".encode() for key in api_keys]

    def _authorized(self, scope) -> bool:
        if not self.expected or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        matches = [hmac.compare_digest(given, expected) for expected in self.expected]  # each, in constant time
        return any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the whole body here, so an endless chunked body stops at the limit
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        """Answer 413 after reading on (up to 4x the limit, then hanging up): a client still sending
        would otherwise see the connection reset instead of the answer."""
        drained = 0
        while drained <= 4 * self.max_body_bytes:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        response = error_response(413, f"the request body exceeds {self.max_body_bytes} bytes")
        await response(scope, receive, send)


# ---------------------------------------------------------------- admission


class Service:
    """What the routes serve from: the model, its scheduler and the server's settings, in this process.

    The routes (:func:`build_app`) use ``served_name``, ``created``, ``context``, ``metrics``,
    :meth:`admit`, :meth:`health`, :meth:`start`, :meth:`stop` and :meth:`close`; the Ray Serve
    ingress (:mod:`freespec.serve.replicas`) offers the same over replicas of this one.
    """

    def __init__(self, model: Model, served_name: str, drafter: str, drafters: Sequence[str], max_tokens: int,
                 max_queue: int, prefix_reuse: bool, request_timeout: float | None, prefix_cache_mb: float,
                 max_batch: int = DEFAULT_MAX_BATCH, state: Path | None = None,
                 state_interval: float = DEFAULT_STATE_INTERVAL):
        self.model, self.served_name, self.max_tokens = model, served_name, max_tokens
        self.drafter = canonical_drafter(drafter)
        self.drafters = tuple(dict.fromkeys([self.drafter, *map(canonical_drafter, drafters)]))
        self.context = model.runner.max_positions
        self.vocab_size = model.runner.vocab_size
        longest_token = max(map(len, model.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.context * max(MIN_CHARS_PER_TOKEN, longest_token)
        self.created = int(time.time())
        self._encoding = threading.Lock()  # a fast tokenizer must not encode twice at once
        decoder = copy.deepcopy(model.tokenizer)  # the generation thread's own: encoding never holds it up
        self.state = None if state is None else StateFile(model, state, state_interval)
        self.scheduler = Scheduler(model, max_queue, decoder, prefix_reuse, request_timeout, prefix_cache_mb, max_batch,
                                   after_request=None if self.state is None else self.state.request_ended)
        self.metrics = self.scheduler.metrics
        if self.state is not None:
            self.state.counted = lambda outcome: self.metrics.state_saves.inc(outcome=outcome)

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)
        if self.state is not None:  # what the drafters learned, once no request runs
            await asyncio.to_thread(self.state.close)

    def close(self) -> None:
        """End every open answer now (the server is stopping)."""
        self.scheduler.close()

    async def health(self) -> tuple[bool, dict]:
        """Whether a request can be served, and what /health says."""
        if self.scheduler.alive:
            return True, {"status": "ok", "queue_depth": self.scheduler.depth}
        return False, {"status": "unavailable", "queue_depth": self.scheduler.depth,
                       "reason": "the generation thread is not running"}

    async def admit(self, endpoint: str, body: RequestBody, tenant: str | None) -> Job:
        """Check a request, encode its prompt and queue it; raise ApiError if it cannot run.

        Checks that need no tokenizer come first; the tokenizer runs off the event loop, while
        the request holds a queue slot, so a flood of prompts gets 429s instead of a backlog.
        """
        self._check_model(body.model)
        _refuse_unsupported(body)
        self._check_bias(body)
        drafter = self._drafter(body.drafter)
        try:
            stops = check_stops(body.stop)
            if len(stops) > 4:
                raise ValueError
        except ValueError:
            raise ApiError(400, "stop: give at most 4 non-empty strings", "stop") from None
        self._check_prompt_size(body)
        try:
            self.scheduler.reserve()
        except QueueFull as error:
            raise ApiError(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after)})
        except Unavailable as error:
            raise ApiError(503, str(error), code="unavailable") from None
        try:
            prompt_ids = await asyncio.to_thread(self._prompt_ids, body)
            echo = None
            if isinstance(body, CompletionRequest):
                echo = await asyncio.to_thread(self._echo, body, prompt_ids)
            job = Job(uuid.uuid4().hex, endpoint, prompt_ids, self._max_tokens(body, len(prompt_ids)), drafter,
                      stops, request_sampling(body), tenant, requested_logprobs(body), echo)
            self.scheduler.submit(job)
        except Unavailable as error:
            self.scheduler.release()
            raise ApiError(503, str(error), code="unavailable") from None
        except BaseException:
            self.scheduler.release()
            raise
        return job

    async def tokenize(self, body: TokenizeRequest) -> list[int]:
        """The token ids of a tokenize request's prompt, as the completion routes would encode it."""
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give one of prompt (text) or messages (a chat)", "prompt")
        request = (ChatRequest.model_construct(messages=body.messages) if body.messages is not None
                   else CompletionRequest.model_construct(prompt=body.prompt))
        self._check_prompt_size(request)
        return await asyncio.to_thread(self._prompt_ids, request)

    async def detokenize(self, body: DetokenizeRequest) -> str:
        """The text of a detokenize request's token ids, special tokens included."""
        self._check_model(body.model)
        if not all(0 <= token < self.vocab_size for token in body.tokens):
            raise ApiError(400, f"tokens: token ids must be integers in [0, {self.vocab_size})", "tokens")

        def decode() -> str:
            with self._encoding:
                return self.model.tokenizer.decode(body.tokens)

        return await asyncio.to_thread(decode)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {self.served_name!r}",
                           "model", "model_not_found")

    def _check_bias(self, body: RequestBody) -> None:
        """A logit_bias the engine would refuse, refused now: its values, its size, its token ids."""
        if not body.logit_bias:
            return
        try:
            SamplingParams(logit_bias=request_sampling(body)["logit_bias"]).check_token_ids(self.vocab_size)
        except ValueError as error:
            raise ApiError(400, str(error), "logit_bias") from None

    def _drafter(self, asked: str | None) -> str:
        if asked is None:
            return self.drafter
        try:
            name = canonical_drafter(asked)
        except ValueError:
            name = None
        if name not in self.drafters:
            raise ApiError(400, f"drafter {asked!r} is not available; this server offers "
                           f"{', '.join(self.drafters)} (its --drafters)", "drafter")
        return name

    def _check_prompt_size(self, body: RequestBody) -> None:
        """Refuse a text prompt too long for the context before the tokenizer spends time on it."""
        if isinstance(body, ChatRequest):
            size = sum(len(message.text) for message in body.messages)
        else:
            prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
            size = sum(len(prompt) for prompt in prompts if isinstance(prompt, str))
        if size > self.max_prompt_chars:
            raise ApiError(400, f"the prompt has {size} characters; the model's context of {self.context} tokens "
                           f"holds at most {self.max_prompt_chars}", prompt_param(body), "context_length_exceeded")

    def _prompt_ids(self, body: RequestBody) -> list[int]:
        try:
            if isinstance(body, ChatRequest):
                if not self.model.has_chat_template:  # a base model (Model.encode's hint is the CLI's --no-chat)
                    raise ApiError(400, f"{self.model.name} has no chat template: send a plain prompt to "
                                   "/v1/completions", "messages")
                messages = [{"role": message.role, "content": message.text} for message in body.messages]
                with self._encoding:
                    return self.model.encode(messages=messages)
            prompt = _one_prompt(body)
            if isinstance(prompt, str):
                with self._encoding:
                    return self.model.encode(prompt=prompt, chat=False)
            vocab = self.vocab_size
            if not prompt or not all(0 <= token < vocab for token in prompt):
                raise ApiError(400, f"prompt: token ids must be a non-empty list of integers in [0, {vocab})",
                               "prompt")
            return list(prompt)
        except (ValueError, jinja2.TemplateError) as error:
            param = prompt_param(body)
            raise ApiError(400, f"{param}: {error}", param) from None

    def _echo(self, body: CompletionRequest, prompt_ids: list[int]) -> str | None:
        """The text a completion with ``echo`` starts with: its prompt (token ids decoded)."""
        if not body.echo:
            return None
        prompt = _one_prompt(body)
        if isinstance(prompt, str):
            return prompt
        with self._encoding:
            return self.model.decode(prompt_ids)

    def _max_tokens(self, body: RequestBody, prompt_tokens: int) -> int:
        if prompt_tokens >= self.context:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {self.context}",
                           prompt_param(body), "context_length_exceeded")
        asked = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            asked = body.max_completion_tokens
        if asked is None:
            return min(self.max_tokens, self.context - prompt_tokens)
        if asked == 0 and not (isinstance(body, CompletionRequest) and body.echo):
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                           "max_tokens")
        if prompt_tokens + asked > self.context:
            raise ApiError(400, f"max_tokens {asked} + the prompt's {prompt_tokens} tokens exceed the model's "
                           f"context of {self.context}", "max_tokens", "context_length_exceeded")
        return asked


def _one_prompt(body: CompletionRequest) -> str | list[int]:
    """A completion's prompt, text or token ids (a list of one of either is accepted too)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request", "prompt")
        prompt = prompt[0]
    return prompt


def _cancel(jobs: list[Job], reason: str = "client") -> None:
    for job in jobs:
        job.cancel(reason)


def _refuse_unsupported(body: RequestBody) -> None:
    checks = []
    if isinstance(body, ChatRequest):
        checks += [("top_logprobs", body.top_logprobs is None or body.logprobs, "top_logprobs needs logprobs: true"),
                   ("response_format", body.response_format is None or body.response_format.type == "text",
                    'response_format: only {"type": "text"} is supported (decoding is not constrained to JSON)'),
                   ("tools", not body.tools, "tools: function calling is not supported"),
                   ("tool_choice", body.tool_choice in (None, "none"), "tool_choice: function calling is not "
                    "supported (only \"none\")")]
    else:
        checks += [("best_of", body.best_of in (None, 1), "only best_of=1 is supported"),
                   ("suffix", body.suffix is None, "suffix is not supported")]
    for param, fine, message in checks:
        if not fine:
            raise ApiError(400, message, param)


# ---------------------------------------------------------------- routes


async def _watch_disconnect(request: Request, jobs: list[Job]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    _cancel(jobs)


async def _end_of(job: Job, event: Event) -> Finished | Failed:
    """A job's end, from its event ``event`` on."""
    while isinstance(event, (Started, Delta)):
        event = await job.events.get()
    return event


def create_app(model: Model, *, served_name: str | None = None, drafter: str = DEFAULT_DRAFTER,
               drafters: Sequence[str] = ("none",), max_tokens: int = 256, max_queue: int = 64,
               api_keys: Sequence[str] = (), max_body_bytes: int = 1 << 20, prefix_reuse: bool = True,
               request_timeout: float | None = None, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
               max_batch: int = DEFAULT_MAX_BATCH, state: str | os.PathLike | None = None,
               state_interval: float = DEFAULT_STATE_INTERVAL) -> FastAPI:
    """The ASGI app serving ``model``; its generation thread runs while the app's lifespan does.

    ``drafters``: the drafters a request may name besides ``drafter`` (each is built once and kept).
    ``api_keys``: any of them opens the API; each key is a tenant of its own. ``prefix_reuse``:
    let a request reuse the prompt rows of its tenant's earlier requests; ``prefix_cache_mb``: the
    memory those rows may take (0: only the previous request's). ``request_timeout``: seconds from
    arrival after which a request is stopped (504), queueing and prefill included. ``max_batch``:
    requests generating at once, each forward pass carrying a step of each (their answers are the
    same as alone: the kernels are batch-invariant). ``state``: a file the drafters' learned state
    (:meth:`freespec.api.Model.save_state`) is saved to every ``state_interval`` seconds while
    requests end and when the server stops (load it into ``model`` first to start warm).
    """
    return build_app(create_service(model, served_name=served_name, drafter=drafter, drafters=drafters,
                                    max_tokens=max_tokens, max_queue=max_queue, prefix_reuse=prefix_reuse,
                                    request_timeout=request_timeout, prefix_cache_mb=prefix_cache_mb,
                                    max_batch=max_batch, state=state, state_interval=state_interval),
                     api_keys=api_keys, max_body_bytes=max_body_bytes)


def create_service(model: Model, *, served_name: str | None = None, drafter: str = DEFAULT_DRAFTER,
                   drafters: Sequence[str] = ("none",), max_tokens: int = 256, max_queue: int = 64,
                   prefix_reuse: bool = True, request_timeout: float | None = None,
                   prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, max_batch: int = DEFAULT_MAX_BATCH,
                   state: str | os.PathLike | None = None, state_interval: float = DEFAULT_STATE_INTERVAL) -> Service:
    """The :class:`Service` of :func:`create_app` (its options), checked; not started."""
    for name, value in (("max_tokens", max_tokens), ("max_queue", max_queue), ("request_timeout", request_timeout),
                        ("max_batch", max_batch), ("state_interval", state_interval)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return Service(model, served_name or model.name, drafter, drafters, max_tokens, max_queue, prefix_reuse,
                   request_timeout, prefix_cache_mb, max_batch, None if state is None else Path(state), state_interval)


class Serving(Protocol):
    """What the routes need of whatever runs the requests: a :class:`Service` here, or the Ray
    Serve ingress's pool of replicas (:class:`freespec.serve.replicas.ReplicaPool`). ``admit``
    returns a job with ``id``, ``events`` (an asyncio queue of scheduler events) and ``cancel()``."""

    served_name: str
    created: int
    context: int
    metrics: ServerMetrics

    async def admit(self, endpoint: str, body: RequestBody, tenant: str | None) -> Job: ...
    async def tokenize(self, body: TokenizeRequest) -> list[int]: ...
    async def detokenize(self, body: DetokenizeRequest) -> str: ...
    async def health(self) -> tuple[bool, dict]: ...
    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def close(self) -> None: ...


def build_app(service: Serving, *, api_keys: Sequence[str] = (), max_body_bytes: int = 1 << 20) -> FastAPI:
    """The OpenAI routes over ``service`` (a :class:`Service`, or the Ray Serve ingress's), started
    and stopped with the app's lifespan, behind the API key and body size guard."""
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        yield
        await service.stop()

    app = FastAPI(title="freespec", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions with lossless speculative decoding.")
    app.state.service = service
    metrics = service.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        message, param = validation_message(error.errors()[0])
        kind = request.headers.get("content-type", "")
        if param is None and "json" not in kind:  # FastAPI reads a body as JSON only when it says so
            message = f"send the body as JSON with Content-Type: application/json (this one's: {kind or 'none'})"
        if request.url.path.endswith("completions"):  # the answer routes' requests are counted
            endpoint = "chat" if request.url.path.endswith("chat/completions") else "completions"
            metrics.requests.inc(endpoint=endpoint, status="invalid")
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def fault(request: Request, error: Exception):
        request_id = uuid.uuid4().hex
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path,
                  exc_info=(type(error), error, error.__traceback__))
        return error_response(500, f"internal error (request {request_id}); the server log has the details")

    async def admit_choices(endpoint: str, body: RequestBody, tenant: str | None) -> list[tuple[Job, list[int]]]:
        """The jobs of a request's ``n`` choices, each with the choice indices it answers: one job
        for all of them when decoding is greedy (they are the same answer), else one a choice,
        choice i seeded with ``seed`` + i when the request gives a seed."""
        choices = body.n or 1
        if choices == 1 or not body.temperature:
            return [(await service.admit(endpoint, body, tenant), list(range(choices)))]
        runs: list[tuple[Job, list[int]]] = []
        try:
            for index in range(choices):
                seed = None if body.seed is None else (body.seed + index) % 2**64
                one = body.model_copy(update={"n": 1, "seed": seed})
                runs.append((await service.admit(endpoint, one, tenant), [index]))
        except BaseException:
            _cancel([job for job, _ in runs])
            raise
        return runs

    async def answer(endpoint: str, body: RequestBody, request: Request) -> Response:
        try:
            runs = await admit_choices(endpoint, body, tenant_of(request.headers.get("authorization")))
        except ApiError as error:
            metrics.requests.inc(endpoint=endpoint, status="rejected" if error.status in (429, 503) else "invalid")
            return error.response()
        jobs = [job for job, _ in runs]
        reply = Reply(endpoint, jobs[0].id, service.served_name, requested_logprobs(body) is not None, body.n or 1)
        watcher = asyncio.create_task(_watch_disconnect(request, jobs))
        try:
            firsts = await asyncio.gather(*(job.events.get() for job in jobs))
            if body.stream and all(isinstance(event, Started) for event in firsts):
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_stream(runs, reply, include_usage), media_type="text/event-stream",
                                         background=BackgroundTask(_cancel, jobs))
            ends = await asyncio.gather(*(_end_of(job, event) for job, event in zip(jobs, firsts)))
        except asyncio.CancelledError:  # the server is stopping
            _cancel(jobs, "shutdown")
            raise
        finally:
            watcher.cancel()
        _cancel(jobs)  # a no-op for those that ended
        if failed := next((end for end in ends if isinstance(end, Failed)), None):
            return error_response(failed.status, failed.message)
        if any(end.finish_reason == "cancelled" for end in ends):
            return error_response(CLIENT_CLOSED, "the client closed the connection")
        return JSONResponse(reply.whole([end for end, (_, indices) in zip(ends, runs) for _ in indices]))

    async def _stream(runs: list[tuple[Job, list[int]]], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()  # (choice indices, event) from every job, as they come

        async def relay(job: Job, indices: list[int]) -> None:
            while True:
                event = await job.events.get()
                merged.put_nowait((indices, event))
                if isinstance(event, (Finished, Failed)):
                    return

        relays = [asyncio.create_task(relay(job, indices)) for job, indices in runs]
        try:
            if reply.chat:
                for index in range(reply.choices):
                    yield reply.chunk(role=True, index=index)
            ends: dict[int, Finished] = {}
            while len(ends) < reply.choices:
                indices, event = await merged.get()
                if isinstance(event, Failed):
                    yield sse(error_body(event.status, event.message))
                    break
                for index in indices:
                    if isinstance(event, Delta):
                        yield reply.chunk(event.text, logprobs=event.logprobs, index=index)
                    elif isinstance(event, Finished):
                        yield reply.chunk(finish_reason=event.finish_reason, index=index)
                        ends[index] = event
            else:
                if include_usage:
                    yield reply.usage_chunk([ends[index] for index in range(reply.choices)])
            yield sse("[DONE]")
        finally:
            for task in relays:
                task.cancel()
            _cancel([job for job, _ in runs])  # the client left (or we are done): stop generating for them

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await answer("chat", body, request)

    @app.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer("completions", body, request)

    @app.post("/tokenize", summary="A prompt's token ids, as the completion routes encode it (freespec "
                                    "extension, as vLLM's)")
    async def tokenize(body: TokenizeRequest) -> Response:
        try:
            tokens = await service.tokenize(body)
        except ApiError as error:
            return error.response()
        return JSONResponse({"count": len(tokens), "max_model_len": service.context, "tokens": tokens})

    @app.post("/detokenize", summary="The text of token ids (freespec extension, as vLLM's)")
    async def detokenize(body: DetokenizeRequest) -> Response:
        try:
            return JSONResponse({"prompt": await service.detokenize(body)})
        except ApiError as error:
            return error.response()

    def model_card() -> dict:
        return {"id": service.served_name, "object": "model", "created": service.created, "owned_by": "freespec",
                "max_model_len": service.context}

    @app.get("/v1/models", summary="The served model")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="One model")
    async def one_model(model_id: str) -> Response:
        if model_id != service.served_name:
            return error_response(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return JSONResponse(model_card())

    @app.get("/health", summary="Liveness: 503 when no request can be served")
    async def health() -> JSONResponse:
        healthy, body = await service.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.registry.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_Guard, api_keys=tuple(api_keys), max_body_bytes=max_body_bytes)
    return app


# ---------------------------------------------------------------- running it


class _Server(uvicorn.Server):
    """uvicorn, ending every open answer at once when it stops (a stream gets an error event and
    ``[DONE]``), instead of waiting out the graceful timeout and then cancelling them mid-send."""

    def __init__(self, app: FastAPI, **config):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))
        self._service = app.state.service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._service.close()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, so a taken port is an OSError here rather than a log line in uvicorn."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(model: Model, *, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info", **options) -> None:
    """Build every allowed drafter (the costs are measured once per machine), then serve until interrupted.

    Raises ValueError when a drafter cannot be built, OSError when ``host:port`` cannot be bound.
    """
    app = create_app(model, **options)
    for name in app.state.service.drafters:
        model.drafter(name)
    sock = bind(host, port)
    _Server(app, log_level=log_level).run(sockets=[sock])


class BackgroundServer:
    """Serve ``app`` from a thread of this process on a loopback port (tests, benchmarks, notebooks).

    >>> with BackgroundServer(create_app(model)) as url:   # doctest: +SKIP
    ...     print(url)                                       # http://127.0.0.1:PORT
    """

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0):
        self._socket = bind(host, port)
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self._server = _Server(app, log_level="warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="freespec-server", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop as Ctrl-C stops ``freespec serve``: open answers end at once, then the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __exit__(self, *exc_info) -> None:
        self.stop()
