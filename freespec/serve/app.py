"""``freespec serve``: an OpenAI-compatible HTTP server (chat and text completions, SSE streaming).

The event loop (FastAPI on uvicorn) parses and checks requests, encodes prompts and streams
answers; the model runs on one generation thread (:mod:`freespec.serve.scheduler`) that takes requests
in arrival order from a bounded queue. Every client mistake is a 4xx with an OpenAI-style body,
``{"error": {"message", "type", "param", "code"}}``; a fault inside freespec is a 500 for that
request only, and the server keeps serving.

Besides OpenAI's fields, a request may name a ``drafter`` and the sampling options ``top_k``,
``min_p`` and ``repetition_penalty``. Every sampling field, its bounds and its description come
from :class:`freespec.engine.sampling.SamplingParams`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from freespec.api import Model
from freespec.drafters import DRAFTERS, check_name
from freespec.engine.sampling import OPTIONS, SAMPLING_KEYS
from freespec.serve.scheduler import (
    Delta,
    Failed,
    Finished,
    Job,
    QueueFull,
    Scheduler,
    Started,
    accepted_per_position,
)

DEFAULT_HOST = "127.0.0.1"
API_KEY_ENV = "FREESPEC_API_KEY"
CLIENT_CLOSED = 499  # the client left before its answer was ready (nginx's code; nobody reads it)


# ---------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    """Wrong types are errors, not coerced ("5" is not 5); unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None


_Sampling = create_model(
    "_Sampling", __base__=_Strict,
    **{option.name: (option.kind | None, Field(None, description=option.help, **option.bounds)) for option in OPTIONS})
"""The sampling fields, one per field of :class:`freespec.engine.sampling.SamplingParams`, with its bounds."""


class _Options(_Sampling):
    """Fields both endpoints take. ``None`` means "not sent"."""

    model: str | None = Field(None, description="the served model id (GET /v1/models); optional")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (default: the server's "
                                   "--max-tokens, cut to the context left)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first")
    n: int | None = Field(None, ge=1, description="only 1")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="only empty")
    user: str | None = None
    drafter: str | None = Field(None, description=f"freespec extension: {', '.join(DRAFTERS)} "
                                "(default: the server's --drafter)")


class ChatRequest(_Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool | None = Field(None, description="only false")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported")


class CompletionRequest(_Options):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt: text, or token ids (a list of one of either is accepted too)")
    echo: bool | None = Field(None, description="only false")
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported")
    best_of: int | None = Field(None, ge=1, description="only 1")
    suffix: str | None = Field(None, description="not supported")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses: status, message, and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: dict) -> tuple[str, str | None]:
    """One readable line and the field name for pydantic's first complaint about a body."""
    where = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = where[0] if where else None
    field = ".".join(where)
    kind = error.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None
    if kind == "missing":
        return (f"missing required parameter: {field}" if field else "the request needs a JSON body"), param
    if kind == "extra_forbidden":
        return f"unsupported parameter: {field}", param
    if not field:
        return f"the request body must be a JSON object: {error.get('msg')}", None
    return f"{field}: {error.get('msg')}", param


def engine_keywords(model: Model) -> set[str] | None:
    """Keywords ``model.stream`` accepts; None when it takes any (``**kwargs``)."""
    parameters = inspect.signature(model.stream).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


# ---------------------------------------------------------------- the app


class _Guard:
    """ASGI middleware: the API key on /v1 routes, then the body size limit, before any parsing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
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


class _Service:
    """State shared by the routes: the model, the scheduler and the server's defaults."""

    def __init__(self, model: Model, served_name: str, drafter: str, max_tokens: int, max_queue: int):
        self.model, self.served_name, self.drafter, self.max_tokens = model, served_name, drafter, max_tokens
        self.context = model.runner.max_positions
        self.created = int(time.time())
        self._tokenizer = threading.Lock()  # a fast tokenizer must not encode and decode at once
        self.scheduler = Scheduler(model, max_queue, self._decode)
        self.keywords = engine_keywords(model)

    def _decode(self, token_ids: list[int]) -> str:
        with self._tokenizer:
            return self.model.decode(token_ids)

    def _encode(self, **kwargs) -> list[int]:
        with self._tokenizer:
            return self.model.encode(**kwargs)

    # -------------------------------------------------------- checking a request

    async def admit(self, endpoint: str, body: ChatRequest | CompletionRequest) -> Job:
        """Check a request, encode its prompt and queue it; raise ApiError if it cannot run."""
        if body.model is not None and body.model != self.served_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {self.served_name!r}",
                           "model", "model_not_found")
        self._refuse_unsupported(body)
        drafter = self.drafter if body.drafter is None else body.drafter
        try:
            check_name(drafter)
        except ValueError as error:
            raise ApiError(400, str(error), "drafter") from None
        sampling = {name: value for name in SAMPLING_KEYS if (value := getattr(body, name)) is not None}
        if self.keywords is not None and (missing := [name for name in sampling if name not in self.keywords]):
            given = ", ".join(f"{name}={sampling[name]}" for name in missing)
            raise ApiError(400, f"sampling is not supported by this freespec version ({given}); "
                           "send temperature 0 or leave it out for greedy decoding", missing[0])
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings", "stop")
        prompt_ids = await asyncio.to_thread(self._prompt_ids, body)
        max_tokens = self._max_tokens(body, len(prompt_ids))
        job = Job(endpoint, prompt_ids, max_tokens, drafter, stops, sampling)
        try:
            self.scheduler.submit(job)
        except QueueFull as error:
            raise ApiError(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after)})
        return job

    @staticmethod
    def _refuse_unsupported(body: ChatRequest | CompletionRequest) -> None:
        checks = [("n", body.n in (None, 1), "only n=1 is supported"),
                  ("presence_penalty", not body.presence_penalty, "presence_penalty is not supported (only 0)"),
                  ("frequency_penalty", not body.frequency_penalty, "frequency_penalty is not supported (only 0)"),
                  ("logit_bias", not body.logit_bias, "logit_bias is not supported")]
        if isinstance(body, ChatRequest):
            checks += [("logprobs", not body.logprobs, "logprobs are not supported"),
                       ("top_logprobs", not body.top_logprobs, "top_logprobs are not supported")]
        else:
            checks += [("logprobs", body.logprobs is None, "logprobs are not supported"),
                       ("echo", not body.echo, "echo is not supported"),
                       ("best_of", body.best_of in (None, 1), "only best_of=1 is supported"),
                       ("suffix", body.suffix is None, "suffix is not supported")]
        for param, fine, message in checks:
            if not fine:
                raise ApiError(400, message, param)

    def _prompt_ids(self, body: ChatRequest | CompletionRequest) -> list[int]:
        try:
            if isinstance(body, ChatRequest):
                messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                             else "\n".join(part.text for part in m.content)} for m in body.messages]
                return self._encode(messages=messages)
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise ApiError(400, "one prompt per request", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, str):
                return self._encode(prompt=prompt, chat=False)
            vocab = self.model.runner.vocab_size
            if not prompt or not all(0 <= token < vocab for token in prompt):
                raise ApiError(400, f"prompt: token ids must be a non-empty list of integers in [0, {vocab})",
                               "prompt")
            return list(prompt)
        except (ValueError, jinja2.TemplateError) as error:
            param = "messages" if isinstance(body, ChatRequest) else "prompt"
            raise ApiError(400, f"{param}: {error}", param) from None

    def _max_tokens(self, body: ChatRequest | CompletionRequest, prompt_tokens: int) -> int:
        if prompt_tokens >= self.context:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {self.context}",
                           "messages" if isinstance(body, ChatRequest) else "prompt", "context_length_exceeded")
        asked = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            asked = body.max_completion_tokens
        if asked is None:
            return min(self.max_tokens, self.context - prompt_tokens)
        if prompt_tokens + asked > self.context:
            raise ApiError(400, f"max_tokens {asked} + the prompt's {prompt_tokens} tokens exceed the model's "
                           f"context of {self.context}", "max_tokens", "context_length_exceeded")
        return asked


async def _watch_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _usage(finished: Finished) -> dict:
    stats = finished.stats
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        "speculative": {
            "drafter": finished.drafter,
            "forward_passes": stats.forward_passes,
            "mean_accepted_length": round(stats.mean_accepted, 4),
            "draft_tokens": sum(stats.draft_sizes),
            "accepted_per_position": accepted_per_position(stats.accepted_lengths),
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_seconds": round(stats.decode_seconds, 4),
        },
    }


class _Reply:
    """Shapes one request's answer as OpenAI does, for either endpoint, whole or in chunks."""

    def __init__(self, endpoint: str, model: str):
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, finished: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "logprobs": None,
                      "finish_reason": finished.finish_reason}
        else:
            choice = {"index": 0, "text": finished.text, "logprobs": None, "finish_reason": finished.finish_reason}
        return {**self._envelope([choice], chunk=False), "usage": _usage(finished)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _sse(self._envelope([choice], chunk=True))

    def usage_chunk(self, finished: Finished) -> str:
        return _sse({**self._envelope([], chunk=True), "usage": _usage(finished)})


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model: Model, *, served_name: str | None = None, drafter: str = "recycling", max_tokens: int = 256,
               max_queue: int = 64, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app serving ``model``; its generation thread runs while the app's lifespan does."""
    check_name(drafter)
    for name, value in (("max_tokens", max_tokens), ("max_queue", max_queue), ("max_body_bytes", max_body_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    service = _Service(model, served_name or model.name, drafter, max_tokens, max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(title="freespec", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions with lossless speculative decoding.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors()[0])
        endpoint = "chat" if request.url.path.endswith("chat/completions") else "completions"
        service.scheduler.metrics.requests.inc(endpoint=endpoint, status="invalid")
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def fault(_request: Request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    async def answer(endpoint: str, body: ChatRequest | CompletionRequest, request: Request) -> Response:
        metrics = service.scheduler.metrics
        try:
            job = await service.admit(endpoint, body)
        except ApiError as error:
            metrics.requests.inc(endpoint=endpoint, status="rejected" if error.status == 429 else "invalid")
            return error_response(error.status, error.message, error.param, error.code, error.headers)
        reply = _Reply(endpoint, service.served_name)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            event = await job.events.get()
            if isinstance(event, Started) and body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_stream(job, reply, include_usage), media_type="text/event-stream",
                                         background=BackgroundTask(job.cancel))
            while isinstance(event, (Started, Delta)):
                event = await job.events.get()
        except asyncio.CancelledError:  # the server is stopping
            job.cancel()
            raise
        finally:
            watcher.cancel()
        if isinstance(event, Failed):
            return error_response(event.status, event.message)
        if event.finish_reason == "cancelled":
            return error_response(CLIENT_CLOSED, "the client closed the connection")
        return JSONResponse(reply.whole(event))

    async def _stream(job: Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
        try:
            if reply.chat:
                yield reply.chunk(role=True)
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    yield reply.chunk(event.text)
                elif isinstance(event, Finished):
                    yield reply.chunk(finish_reason=event.finish_reason)
                    if include_usage:
                        yield reply.usage_chunk(event)
                    break
                elif isinstance(event, Failed):
                    yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                          "code": None}})
                    break
            yield _sse("[DONE]")
        finally:
            job.cancel()  # the client left (or we are done): stop generating for it

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await answer("chat", body, request)

    @app.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer("completions", body, request)

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

    @app.get("/health", summary="Liveness")
    async def health() -> dict:
        return {"status": "ok", "queue_depth": service.scheduler.depth}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.scheduler.metrics.registry.render(),
                                 media_type="text/plain; version=0.0.4")

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


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
    """Warm the default drafter (its costs are measured once per machine), then serve until interrupted.

    Raises OSError when ``host:port`` cannot be bound.
    """
    import uvicorn

    app = create_app(model, **options)
    sock = bind(host, port)
    model.drafter(app.state.service.drafter)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """Serve ``app`` from a thread of this process on a loopback port (tests, benchmarks, notebooks).

    >>> with BackgroundServer(create_app(model)) as url:   # doctest: +SKIP
    ...     print(url)                                       # http://127.0.0.1:PORT
    """

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0):
        import uvicorn

        self._socket = bind(host, port)
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
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

    def __exit__(self, *exc_info) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
