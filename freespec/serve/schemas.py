"""What crosses the wire: request bodies (checked strictly), OpenAI-shaped answers and errors.

Every client mistake is a 4xx with OpenAI's error body, ``{"error": {"message", "type", "param",
"code"}}``. Besides OpenAI's fields, a request may name a ``drafter`` and the sampling options
``top_k``, ``min_p`` and ``repetition_penalty``. Every sampling field, its bounds and its
description come from :class:`freespec.engine.sampling.SamplingParams`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from freespec.engine.sampling import OPTIONS, SAMPLING_KEYS, bias_from_json
from freespec.serve.logprobs import LoggedToken, Logprobs
from freespec.serve.metrics import accepted_per_position
from freespec.serve.scheduler import Finished

# ---------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    """Wrong types are errors, not coerced ("5" is not 5); unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words.

    >>> _json_type(None), _json_type(5), _json_type([1]), _json_type(True)
    ('null', 'a number', 'an array', 'a boolean')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """Say what is wrong with content that is not text, rather than pydantic's complaint
        about the union's first branch ("content.str: Input should be a valid string")."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"a string or a list of text parts is needed, got {_json_type(content)}")
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f'part {index} is {_json_type(part)}, not an object {{"type": "text", "text": ...}}')
            if "type" not in part:
                raise ValueError(f'part {index} has no type (text parts are {{"type": "text", "text": ...}})')
            if part["type"] != "text":
                raise ValueError(f"part {index} has type {part['type']!r}: this model takes text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {index} needs a string text, got {_json_type(part.get('text'))}")
            if extra := sorted(set(part) - {"type", "text"}):
                raise ValueError(f"part {index} has unsupported fields: {', '.join(extra)}")
        return content

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


_Sampling = create_model(
    "_Sampling", __base__=_Strict,
    **{option.name: (option.kind | None, Field(None, description=option.help, **option.bounds)) for option in OPTIONS})
"""The sampling fields, one per field of :class:`freespec.engine.sampling.SamplingParams`, with its bounds."""


class _Options(_Sampling):
    """Fields both endpoints take. ``None`` means "not sent"."""

    model: str | None = Field(None, description="the served model id (GET /v1/models); optional")
    max_tokens: int | None = Field(None, ge=0, description="most tokens to generate (default: the server's "
                                   "--max-tokens, cut to the context left)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first")
    n: int | None = Field(None, ge=1, le=16, description="choices to generate (at temperature 0 they are one "
                          "answer; sampled, choice i takes seed + i when a seed is given)")
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string of digits) to a bias in "
                                                "[-100, 100] added to its logit, greedy decoding included")
    user: str | None = None
    drafter: str | None = Field(None, description="freespec extension: one of the server's --drafters "
                                "(default: its --drafter)")

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        bias_from_json(bias or {})
        return bias


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(_Options):
    messages: list[Message] = Field(min_length=1)
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}: decoding is not '
                                                   "constrained to JSON")
    tools: list[dict[str, Any]] | None = Field(None, description="only an empty list: no function calling")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none": no function calling')
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool | None = Field(None, description="each answer token's log-probability under the model "
                                  "(its log-softmax, before the bias, penalties and temperature)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: that many likeliest tokens "
                                     "at each position")


class CompletionRequest(_Options):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt: text, or token ids (a list of one of either is accepted too)")
    echo: bool | None = Field(None, description="the prompt before the answer (with logprobs: the prompt's tokens' "
                              "log-probabilities too; max_tokens 0 scores the prompt alone)")
    logprobs: int | None = Field(None, ge=0, le=5, description="each answer token's log-probability under the "
                                 "model and that many likeliest tokens at each position")
    best_of: int | None = Field(None, ge=1, description="only 1")
    suffix: str | None = Field(None, description="not supported")


RequestBody = ChatRequest | CompletionRequest


class TokenizeRequest(_Strict):
    """freespec extension, as vLLM's and llama.cpp's servers have it: the token ids a prompt
    becomes, encoded exactly as the completion routes encode it (so ``count`` is what must fit
    the context with ``max_tokens``)."""

    model: str | None = Field(None, description="the served model id; optional")
    prompt: str | None = Field(None, description="text, encoded as /v1/completions encodes it")
    messages: list[Message] | None = Field(None, min_length=1, description="a chat, encoded as "
                                           "/v1/chat/completions encodes it (the chat template, then the "
                                           "assistant's turn)")


class DetokenizeRequest(_Strict):
    """freespec extension: the text of token ids (special tokens included)."""

    model: str | None = Field(None, description="the served model id; optional")
    tokens: list[int] = Field(description="token ids of this model's vocabulary")


def prompt_param(body: RequestBody) -> str:
    """The field that holds a request's prompt, for errors about it."""
    return "messages" if isinstance(body, ChatRequest) else "prompt"


# ---------------------------------------------------------------- sampling options

def requested_logprobs(body: RequestBody) -> int | None:
    """How many alternatives a request wants per token with its tokens' log-probabilities (None:
    none wanted): chat's ``logprobs: true`` with ``top_logprobs``, completions' ``logprobs``."""
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def request_sampling(body: RequestBody) -> dict[str, Any]:
    """The sampling fields a request sent, as keywords of :class:`freespec.engine.sampling.SamplingParams`."""
    options = {name: value for name in SAMPLING_KEYS if (value := getattr(body, name)) is not None}
    if body.logit_bias:
        options["logit_bias"] = bias_from_json(body.logit_bias)
    return options


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses: status, message, and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(error: dict) -> tuple[str, str | None]:
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
    message = error.get("msg", "")
    if kind == "value_error":  # a validator's own ValueError: its text alone
        message = str(error.get("ctx", {}).get("error", message))
    return f"{field}: {message}", param


# ---------------------------------------------------------------- answers


def usage(choices: list[Finished]) -> dict:
    """A request's usage: its prompt once, every choice's tokens; the speculative counters over its
    generations (one answered several choices where they are the same: the same object), their
    times the longest's (they run side by side)."""
    stats = choices[0].stats
    completion = sum(choice.stats.new_tokens for choice in choices)
    runs = [choice.stats for choice in {id(choice): choice for choice in choices}.values()]
    tokens, passes = sum(run.new_tokens for run in runs), sum(run.forward_passes for run in runs)
    accepted = [length for run in runs for length in run.accepted_lengths]
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": stats.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        "speculative": {
            "drafter": choices[0].drafter,
            "forward_passes": passes,
            "mean_accepted_length": round(tokens / passes if passes else 0.0, 4),
            "draft_tokens": sum(sum(run.draft_sizes) for run in runs),
            "accepted_per_position": accepted_per_position(accepted),
            "prefill_seconds": round(max(run.prefill_seconds for run in runs), 4),
            "decode_seconds": round(max(run.decode_seconds for run in runs), 4),
        },
    }


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """Shapes one request's answer as OpenAI does, for either endpoint, whole or in chunks."""

    def __init__(self, endpoint: str, request_id: str, model: str, logprobs: bool = False, choices: int = 1):
        self.chat = endpoint == "chat"
        self.choices = choices
        self.logprobs = [Logprobs(self.chat) for _ in range(choices)] if logprobs else None  # per choice
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, tokens: list[LoggedToken] | None, index: int) -> dict | None:
        return None if self.logprobs is None or tokens is None else self.logprobs[index].shape(tokens)

    def whole(self, choices: list[Finished]) -> dict:
        """The answer: one Finished per choice, in order."""
        shaped = []
        for index, finished in enumerate(choices):
            logprobs = self._logprobs(finished.logprobs, index)
            if self.chat:
                shaped.append({"index": index, "message": {"role": "assistant", "content": finished.text},
                               "logprobs": logprobs, "finish_reason": finished.finish_reason})
            else:
                shaped.append({"index": index, "text": finished.text, "logprobs": logprobs,
                               "finish_reason": finished.finish_reason})
        return {**self._envelope(shaped, chunk=False), "usage": usage(choices)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              logprobs: list[LoggedToken] | None = None, index: int = 0) -> str:
        """One streamed chunk of choice ``index``: the role, a text delta and its tokens'
        log-probabilities, or the end."""
        shaped = self._logprobs(logprobs, index)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": finish_reason}
        return sse(self._envelope([choice], chunk=True))

    def usage_chunk(self, choices: list[Finished]) -> str:
        return sse({**self._envelope([], chunk=True), "usage": usage(choices)})
