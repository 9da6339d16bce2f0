"""The HTTP server, run for real on a loopback port, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import openai
import pytest

import freespec
import freespec.kernels.threads
import freespec.serve
from freespec import DEFAULT_DRAFTER
from freespec.cli import main
from freespec.serve import app as server_module
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import fault_after_first_chunk, metric, open_stream, post, wait_for

CHAT = [{"role": "user", "content": "w1 w2 w3 w4"}]
PROMPT = "w9 w8 w7"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", max_tokens=16)
    with BackgroundServer(app) as url:
        yield url


# ---------------------------------------------------------------- answers through the openai client


@pytest.mark.parametrize("drafter", [DEFAULT_DRAFTER, "none"])
def test_chat_answer_is_plain_greedy_with_usage(client, reference, drafter):
    expected = reference.generate(messages=CHAT, max_new_tokens=24, drafter="none")
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24,
                                           extra_body={"drafter": drafter})
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    usage = reply.usage
    assert usage.prompt_tokens == len(reference.encode(messages=CHAT))
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    speculative = usage.speculative
    assert speculative["drafter"] == drafter
    assert 0 < speculative["forward_passes"] <= usage.completion_tokens
    assert speculative["mean_accepted_length"] == pytest.approx(usage.completion_tokens / speculative["forward_passes"],
                                                                abs=1e-4)
    if drafter == "none":
        assert speculative["draft_tokens"] == 0 and speculative["accepted_per_position"] == []


def test_a_chat_turn_reuses_the_cached_rows_of_the_turns_before(server, client, reference):
    """The second turn's prompt starts with the first turn and its answer: those rows stay cached
    (usage.prompt_tokens_details.cached_tokens), and the answer is still plain greedy's."""
    first = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12)
    history = [*CHAT, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "w9 w8 w7"}]
    expected = reference.generate(messages=history, max_new_tokens=12, drafter="none", reuse_prefix=False)
    cached_before = metric(server, "freespec_prompt_tokens_cached_total", drafter=DEFAULT_DRAFTER)
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=12)
    assert second.choices[0].message.content == expected.text
    assert metric(server, "freespec_prompt_tokens_cached_total", drafter=DEFAULT_DRAFTER) == (
        cached_before + second.usage.prompt_tokens_details.cached_tokens)
    assert len(reference.encode(messages=CHAT)) <= second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_completion_answer_is_plain_greedy(client, reference):
    expected = reference.generate(PROMPT, chat=False, max_new_tokens=20, drafter="none")
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    as_ids = client.completions.create(model="tiny", prompt=reference.encode(PROMPT, chat=False), max_tokens=20)
    assert as_ids.choices[0].text == expected.text


def test_default_max_tokens_is_the_servers(client):
    reply = client.completions.create(model="tiny", prompt="w5", extra_body={"drafter": "none"})
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_equals_the_whole_answer(client, endpoint):
    if endpoint == "chat":
        create, request = client.chat.completions.create, {"messages": CHAT}
        text_of = lambda chunk: chunk.choices[0].delta.content or ""
    else:
        create, request = client.completions.create, {"prompt": PROMPT}
        text_of = lambda chunk: chunk.choices[0].text
    whole = create(model="tiny", max_tokens=30, **request)
    chunks = list(create(model="tiny", max_tokens=30, stream=True, stream_options={"include_usage": True}, **request))
    *content, last, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = "".join(text_of(chunk) for chunk in content)
    assert streamed == (whole.choices[0].message.content if endpoint == "chat" else whole.choices[0].text)
    assert len(content) > 2  # it did stream
    assert len({chunk.id for chunk in chunks}) == 1


def test_fields_clients_send_with_their_defaults_change_nothing(server):
    """response_format text, an empty tools list and tool_choice "none" are what some clients always
    send: accepted, the same answer."""
    request = {"messages": CHAT, "max_tokens": 8}
    plain = post(server + "/v1/chat/completions", request)[1]
    status, same, _ = post(server + "/v1/chat/completions", {**request, "response_format": {"type": "text"},
                                                               "tools": [], "tool_choice": "none"})
    assert status == 200 and same["choices"][0]["message"] == plain["choices"][0]["message"]


def test_stream_without_usage_option_sends_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices for chunk in chunks) and chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer_and_ends_generation(client, reference, stream):
    full = reference.generate(PROMPT, chat=False, max_new_tokens=40, drafter="none")
    words = full.text.split()
    stop = " " + words[6]  # a string that begins at a word boundary inside the answer
    expected = full.text[: full.text.index(stop)]
    request = dict(model="tiny", prompt=PROMPT, max_tokens=40, stop=["w999", stop])
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **request))
        text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1]
        usage = chunks[-1].usage
    else:
        reply = client.completions.create(**request)
        text, finish, usage = reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
    assert text == expected and finish == "stop"
    assert usage.completion_tokens < len(full.token_ids)  # generation ended early


def test_tokenize_gives_the_ids_the_completion_routes_feed_the_model(server, reference):
    """/tokenize (chat or text) encodes as the answer routes do: its count is their usage's
    prompt_tokens; /detokenize gives the text back, special tokens included."""
    chat = post(server + "/tokenize", {"messages": CHAT})[1]
    assert chat["tokens"] == reference.encode(messages=CHAT) and chat["count"] == len(chat["tokens"])
    assert chat["max_model_len"] == 512
    answered = post(server + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})[1]
    assert answered["usage"]["prompt_tokens"] == chat["count"]
    text = post(server + "/tokenize", {"prompt": PROMPT, "model": "tiny"})[1]
    assert text["tokens"] == reference.encode(PROMPT, chat=False)
    status, back, _ = post(server + "/detokenize", {"tokens": chat["tokens"]})
    assert status == 200 and back["prompt"] == reference.tokenizer.decode(chat["tokens"])
    assert post(server + "/tokenize", {"messages": CHAT, "prompt": PROMPT})[:2] == (
        400, {"error": {"message": "give one of prompt (text) or messages (a chat)", "type": "invalid_request_error",
                        "param": "prompt", "code": None}})
    for path, body, status, message in [
        ("/tokenize", {}, 400, "give one of prompt"),
        ("/tokenize", {"prompt": PROMPT, "model": "other"}, 404, "does not exist"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/detokenize", {"tokens": [5, 10**9]}, 400, "token ids must be integers in [0, "),
        ("/detokenize", {"tokens": "w1"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "does not exist"),
    ]:
        got, error, _ = post(server + path, body)
        assert got == status and message in error["error"]["message"], (path, body, error)


def test_models_health_and_metrics(client, server):
    assert [model.id for model in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status, body, _ = post(server + "/health", b"", method="GET")
    assert status == 200 and body["status"] == "ok"
    before = metric(server, "freespec_requests_total", endpoint="chat", status="success")
    passes = metric(server, "freespec_forward_passes_total", drafter=DEFAULT_DRAFTER)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12)
    assert metric(server, "freespec_requests_total", endpoint="chat", status="success") == before + 1
    assert metric(server, "freespec_forward_passes_total", drafter=DEFAULT_DRAFTER) == (
        passes + reply.usage.speculative["forward_passes"])
    text = urllib.request.urlopen(server + "/metrics").read().decode()
    for name in ("freespec_prompt_tokens_total", "freespec_generation_tokens_total", "freespec_draft_tokens_total",
                 "freespec_mean_accepted_length", "freespec_queue_depth 0.0", "freespec_requests_running",
                 "freespec_queue_wait_seconds_bucket", "freespec_time_to_first_token_seconds_count",
                 'freespec_request_duration_seconds_bucket{endpoint="chat",le="+Inf"}'):
        assert name in text


def test_accepted_tokens_per_position_add_up(server, client):
    """Counters per draft depth must agree with the per-request usage the server reports."""
    def accepted():
        return [metric(server, "freespec_accepted_tokens_total", drafter=DEFAULT_DRAFTER, position=str(p))
                for p in range(1, 40)]
    before = accepted()
    reply = client.completions.create(model="tiny", prompt="w5", max_tokens=60)  # repetitive: drafts get accepted
    per_position = reply.usage.speculative["accepted_per_position"]
    assert per_position and sum(per_position) > 0
    after = accepted()
    assert [a - b for a, b in zip(after, before)][: len(per_position)] == per_position
    assert sum(per_position) + reply.usage.speculative["forward_passes"] >= reply.usage.completion_tokens


# ---------------------------------------------------------------- client mistakes: 4xx, never 5xx

MESSAGE = {"role": "user", "content": "w1"}
CHAT_ERRORS = [
    ("{bad json", 400, None, "malformed JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ({}, 400, "messages", "missing required parameter: messages"),
    ({"messages": []}, 400, "messages", "at least 1 item"),
    ({"messages": "hi"}, 400, "messages", "messages"),
    ({"messages": [{"role": "robot", "content": "w1"}]}, 400, "messages", "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "w1"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "messages.0.content: part 1 has type 'image_url': this model takes text parts only"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages",
     "messages.0.content: a string or a list of text parts is needed, got null"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages", "list of text parts is needed, got a number"),
    ({"messages": [{"role": "user", "content": ["w1"]}]}, 400, "messages", "part 0 is a string, not an object"),
    ({"messages": [{"role": "user", "content": [{"text": "w1"}]}]}, 400, "messages", "part 0 has no type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages",
     "part 0 needs a string text, got a number"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "w1", "cache_control": {}}]}]}, 400,
     "messages", "part 0 has unsupported fields: cache_control"),
    ({"messages": [{"role": "user", "content": "w1 \ud800"}]}, 400, "messages",  # a lone surrogate: a 500 before
     "message 0's content is not valid Unicode text: character 3 is a lone surrogate"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "missing required parameter: messages.0.content"),
    ({"messages": [MESSAGE], "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"messages": [MESSAGE], "max_tokens": -3}, 400, "max_tokens", "max_tokens"),
    ({"messages": [MESSAGE], "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"messages": [MESSAGE], "max_tokens": 5.5}, 400, "max_tokens", "valid integer"),
    ({"messages": [MESSAGE], "max_tokens": 100000}, 400, "max_tokens", "context of 512"),
    ({"messages": [{"role": "user", "content": " ".join(["w7"] * 600)}]}, 400, "messages", "context is 512"),
    ({"messages": [MESSAGE], "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"messages": [MESSAGE], "drafter": "eagle"}, 400, "drafter", "'eagle' is not available; this server offers "
     f"{DEFAULT_DRAFTER}, none"),
    ({"messages": [MESSAGE], "drafter": "lookup"}, 400, "drafter", f"offers {DEFAULT_DRAFTER}, none"),  # not in --drafters
    ({"messages": [MESSAGE], "n": 17}, 400, "n", "less than or equal to 16"),
    ({"messages": [MESSAGE], "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"messages": [MESSAGE], "temperature": -0.5}, 400, "temperature", "temperature"),
    ({"messages": [MESSAGE], "temperature": 1e400}, 400, "temperature", "finite"),
    ({"messages": [MESSAGE], "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"messages": [MESSAGE], "seed": 1 << 64}, 400, "seed", "seed"),
    ({"messages": [MESSAGE], "seed": -(1 << 63) - 1}, 400, "seed", "seed"),
    ({"messages": [MESSAGE], "top_p": 0}, 400, "top_p", "top_p"),
    ({"messages": [MESSAGE], "top_p": 1.5}, 400, "top_p", "top_p"),
    ({"messages": [MESSAGE], "top_k": -1}, 400, "top_k", "top_k"),
    ({"messages": [MESSAGE], "min_p": 2}, 400, "min_p", "min_p"),
    ({"messages": [MESSAGE], "repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty"),
    ({"messages": [MESSAGE], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": [MESSAGE], "stop": [""]}, 400, "stop", "non-empty"),
    ({"messages": [MESSAGE], "stop": 5}, 400, "stop", "stop"),
    ({"messages": [MESSAGE], "top_logprobs": 2}, 400, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"messages": [MESSAGE], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "top_logprobs"),
    ({"messages": [MESSAGE], "presence_penalty": 2.5}, 400, "presence_penalty", "presence_penalty"),
    ({"messages": [MESSAGE], "logit_bias": {"w5": 1}}, 400, "logit_bias", "keys must be token ids"),
    ({"messages": [MESSAGE], "logit_bias": {"5": 101}}, 400, "logit_bias", "must be a number in [-100, 100]"),
    ({"messages": [MESSAGE], "logit_bias": {"9999": 1}}, 400, "logit_bias", "token id 9999 is outside the vocabulary"),
    ({"messages": [MESSAGE], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "function calling is not supported"),
    ({"messages": [MESSAGE], "tool_choice": "auto"}, 400, "tool_choice", "function calling is not supported"),
    ({"messages": [MESSAGE], "response_format": {"type": "json_object"}}, 400, "response_format",
     'only {"type": "text"}'),
    ({"messages": [MESSAGE], "response_format": {"type": "yaml"}}, 400, "response_format", "response_format"),
    ({"messages": [MESSAGE], "functions": []}, 400, "functions", "unsupported parameter: functions"),
]
COMPLETION_ERRORS = [
    ({}, 400, "prompt", "missing required parameter: prompt"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": ["w1", "w2"]}, 400, "prompt", "one prompt per request"),
    ({"prompt": []}, 400, "prompt", "non-empty"),
    ({"prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ({"prompt": "w1", "max_tokens": 0}, 400, "max_tokens", "0 only with echo: true"),
    ({"prompt": "w1", "best_of": 3}, 400, "best_of", "best_of=1"),
    ({"prompt": "w1", "logprobs": 6}, 400, "logprobs", "logprobs"),
    ({"prompt": "w1", "suffix": "w2"}, 400, "suffix", "not supported"),
    ({"prompt": "w1", "max_tokens": 600}, 400, "max_tokens", "context"),
    ({"prompt": "w1\udcff"}, 400, "prompt", "the prompt is not valid Unicode text: character 2 is a lone surrogate"),
]


def check_error(status, body, expected_status, param, fragment):
    assert status == expected_status, body
    error = body["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("body, status, param, fragment", CHAT_ERRORS)
def test_chat_client_mistakes_are_4xx(server, body, status, param, fragment):
    check_error(*post(server + "/v1/chat/completions", body)[:2], status, param, fragment)


@pytest.mark.parametrize("body, status, param, fragment", COMPLETION_ERRORS)
def test_completion_client_mistakes_are_4xx(server, body, status, param, fragment):
    check_error(*post(server + "/v1/completions", body)[:2], status, param, fragment)


def test_a_json_body_sent_as_another_content_type_is_told_which_header_to_send(server):
    """curl -d sends form encoding: the body's JSON object was reported as not one."""
    for kind in ("application/x-www-form-urlencoded", "text/plain"):
        status, body, _ = post(server + "/v1/chat/completions", {"messages": [MESSAGE]}, headers={"Content-Type": kind})
        check_error(status, body, 400, None,
                    f"send the body as JSON with Content-Type: application/json (this one's: {kind})")


def test_a_base_model_without_a_chat_template_points_chat_requests_to_completions(tiny_model_no_chat_dir):
    """The message named the command line's --no-chat, which an HTTP client has no use for."""
    with BackgroundServer(create_app(freespec.load(str(tiny_model_no_chat_dir)), served_name="base")) as url:
        status, body, _ = post(url + "/v1/chat/completions", {"messages": [MESSAGE], "max_tokens": 2})
        check_error(status, body, 400, "messages", "has no chat template: send a plain prompt to /v1/completions")
        status, body, _ = post(url + "/v1/completions", {"prompt": "w1 w2", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_text_parts_are_the_text_they_join(server):
    parts = [{"type": "text", "text": "w1 w2"}, {"type": "text", "text": "w3"}]
    answers = [post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                       "max_tokens": 6})[1] for content in (parts, "w1 w2\nw3")]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    assert answers[0]["usage"]["prompt_tokens"] == answers[1]["usage"]["prompt_tokens"]


def test_sampling_is_passed_on(server):
    greedy = {"messages": [MESSAGE], "max_tokens": 4}
    # Filters that keep the most likely token cannot change greedy output: accepted without sampling.
    status, body, _ = post(server + "/v1/chat/completions", {**greedy, "temperature": 0, "top_p": 0.5, "seed": 1})
    assert status == 200, body
    status, body, _ = post(server + "/v1/chat/completions", {**greedy, "temperature": 0.7, "top_k": 5})
    assert status == 200, body


def test_openais_penalties_reach_the_engine(client, reference):
    """frequency_penalty and presence_penalty, as OpenAI's clients send them, change greedy text."""
    penalties = {"frequency_penalty": 1.0, "presence_penalty": 0.5}
    expected = reference.generate(PROMPT, chat=False, max_new_tokens=16, drafter="none", **penalties)
    assert expected.token_ids != reference.generate(PROMPT, chat=False, max_new_tokens=16, drafter="none").token_ids
    for drafter in ("none", DEFAULT_DRAFTER):
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"drafter": drafter},
                                          **penalties)
        assert reply.choices[0].text == expected.text


def test_a_logit_bias_reaches_the_engine(client, reference):
    unbiased = reference.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none")
    bias = {unbiased.token_ids[0]: -100, 9: 5.5}
    expected = reference.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none", logit_bias=bias)
    assert expected.token_ids != unbiased.token_ids
    for drafter in ("none", DEFAULT_DRAFTER):
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, extra_body={"drafter": drafter},
                                          logit_bias={str(token): value for token, value in bias.items()})
        assert reply.choices[0].text == expected.text


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="best_of=1"):
        client.completions.create(model="tiny", prompt=PROMPT, best_of=2)


def test_transport_level_mistakes(server):
    status, body, _ = post(server + "/v1/chat/completions", b"x" * (2 << 20))
    assert status == 413 and "exceeds" in body["error"]["message"]
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)  # no Content-Length: chunked
    connection.request("POST", "/v1/completions", (b"y" * 65536 for _ in range(24)),
                       {"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]["message"]
    connection.close()
    status, body, _ = post(server + "/v1/chat/completions", b"", method="GET")
    assert status == 405 and "error" in body
    status, body, _ = post(server + "/v1/nothing", {"messages": [MESSAGE]})
    assert status == 404 and "error" in body
    assert post(server + "/health", b"", method="GET")[0] == 200  # still serving


# ---------------------------------------------------------------- queueing, disconnects, auth


def test_full_queue_429_and_a_disconnect_frees_the_model(long_model_dir):
    """One request runs (4000 tokens: ~15 s if left alone), one waits, the next is turned away; the
    running client hangs up after its first chunks, and the waiting request is served at once."""
    long = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 4000, "drafter": "none"}
    app = create_app(freespec.load(str(long_model_dir)), served_name="tiny", max_queue=1,
                     max_batch=1)  # one on the model: the next waits (batched: tests/serve/test_batching.py)
    with BackgroundServer(app) as url:
        connection, response = open_stream(url, long)
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        for _ in range(3):
            assert response.readline().startswith(b"data: ")
            response.readline()
        waiting: dict = {}
        thread = threading.Thread(target=lambda: waiting.update(
            result=post(url + "/v1/chat/completions", {**long, "max_tokens": 8})))
        thread.start()
        wait_for(lambda: metric(url, "freespec_queue_depth") == 1)
        status, body, headers = post(url + "/v1/chat/completions", long)
        assert status == 429 and body["error"]["code"] == "queue_full"
        assert int(headers["Retry-After"]) >= 1
        hung_up = time.monotonic()
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        thread.join(timeout=30)
        assert time.monotonic() - hung_up < 5  # not the ~15 s the abandoned answer would have taken
        status, body, _ = waiting["result"]
        assert status == 200 and body["usage"]["completion_tokens"] == 8
        assert metric(url, "freespec_requests_total", endpoint="chat", status="cancelled") == 1
        assert metric(url, "freespec_requests_total", endpoint="chat", status="rejected") == 1
        assert metric(url, "freespec_generation_tokens_total", drafter="none") < 4000


def test_a_client_that_leaves_stops_every_choice(long_model_dir):
    """Three sampled choices of 3000 tokens each (seconds of work; the end-of-text token is banned,
    since a sampled choice of this model drew it within 30-700 tokens and a choice that ended before
    the client left would not count as cancelled): the client reads two chunks and hangs up; all
    three stop, and the next request is answered at once."""
    app = create_app(freespec.load(str(long_model_dir)), served_name="tiny", max_tokens=3000)
    with BackgroundServer(app) as url:
        connection, response = open_stream(url, {"prompt": "w1 w2", "n": 3, "temperature": 0.9, "max_tokens": 3000,
                                                 "drafter": "none", "logit_bias": {"0": -100}}, "/v1/completions")
        for _ in range(2):
            assert response.readline().startswith(b"data: ")
            response.readline()
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        wait_for(lambda: metric(url, "freespec_requests_total", endpoint="completions", status="cancelled") == 3)
        assert metric(url, "freespec_requests_running") == 0
        status, body, _ = post(url + "/v1/completions",
                               {"prompt": "w1 w2", "max_tokens": 5, "n": 2, "temperature": 0.5})
        assert status == 200 and [choice["index"] for choice in body["choices"]] == [0, 1]
        assert metric(url, "freespec_generation_tokens_total", drafter="none") < 3 * 3000


def test_api_key_required_when_set(tiny_model_dir):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", api_keys=["s3cret", "other"],
                     max_tokens=4)
    with BackgroundServer(app) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=CHAT)
        status, body, _ = post(url + "/v1/chat/completions", "{bad json")  # no key: 401 before parsing
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        for key in ("s3cret", "other"):
            right = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert right.chat.completions.create(model="tiny", messages=CHAT).usage.completion_tokens == 4
        for path in ("/docs", "/openapi.json", "/redoc"):  # the schema follows the key too
            assert post(url + path, b"", method="GET")[0] == 401
            assert post(url + path, b"", {"Authorization": "Bearer s3cret"}, method="GET")[0] == 200
        assert post(url + "/health", b"", method="GET")[0] == 200  # health and metrics stay open
        assert post(url + "/metrics", b"", method="GET")[0] == 200


def test_serve_command_passes_its_options(tiny_model_dir, monkeypatch):
    """The command's defaults: loopback only, the key from the environment."""
    calls = []
    monkeypatch.setattr(server_module, "serve", lambda model, **options: calls.append((model, options)))
    monkeypatch.setenv("FREESPEC_API_KEY", "from-env")
    assert main(["serve", "--model", str(tiny_model_dir), "--quiet", "--max-queue", "3"]) == 0
    model, options = calls[0]
    assert isinstance(model, freespec.Model)
    assert options == {"host": "127.0.0.1", "port": 8000, "log_level": "warning", "served_name": None,
                       "drafter": DEFAULT_DRAFTER, "drafters": ["none"], "max_tokens": 256, "max_queue": 3,
                       "api_keys": ["from-env"], "max_body_bytes": 1 << 20, "prefix_reuse": True,
                       "request_timeout": None, "prefix_cache_mb": 512, "max_batch": 16, "state": None,
                       "state_interval": 300.0}
    assert main(["serve", "--model", str(tiny_model_dir), "--quiet", "--drafters", "lookup+recycling,none",
                 "--api-key", "a", "--api-key", "b", "--no-prefix-reuse", "--request-timeout", "2.5",
                 "--prefix-cache-mb", "0.5", "--max-batch", "4"]) == 0
    options = calls[1][1]
    assert options["drafters"] == ["lookup+recycling", "none"] and options["api_keys"] == ["a", "b"]
    assert options["prefix_reuse"] is False and options["request_timeout"] == 2.5
    assert options["prefix_cache_mb"] == 0.5 and options["max_batch"] == 4


def test_serve_replicas_passes_its_options_without_loading_here(tiny_model_dir, monkeypatch, capsys):
    """``--replicas``: the replicas load the model (nothing is loaded here); threads are shared out;
    without Ray installed it is a one-line usage error."""
    calls = []
    module = types.ModuleType("freespec.serve.replicas")
    module.serve_replicas = lambda options, host, port: calls.append((options, host, port))
    monkeypatch.setitem(sys.modules, "freespec.serve.replicas", module)
    monkeypatch.setattr(freespec.serve, "replicas", module, raising=False)
    monkeypatch.setattr(freespec.kernels.threads, "usable_cpus", lambda: 4)
    monkeypatch.delenv("FREESPEC_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_model_dir), "--quiet", "--replicas", "2", "--port", "9000",
                 "--prefix-cache-mb", "64"]) == 0
    options, host, port = calls[0]
    assert (host, port) == ("127.0.0.1", 9000)
    assert options == {"model": str(tiny_model_dir), "threads": 2, "tree_shape": "dynamic", "datastore": None,
                       "draft_model": None, "served_name": None, "drafter": DEFAULT_DRAFTER, "drafters": ["none"],
                       "max_tokens": 256, "max_queue": 64, "prefix_reuse": True, "request_timeout": None,
                       "prefix_cache_mb": 64.0, "replicas": 2, "api_keys": [], "max_body_bytes": 1 << 20,
                       "max_batch": 16}
    assert main(["serve", "--model", "/no/such/model", "--replicas", "2"]) == 2
    assert "freespec: error:" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "freespec.serve.replicas", None)  # as if Ray were not installed
    monkeypatch.delattr(freespec.serve, "replicas", raising=False)
    assert main(["serve", "--model", str(tiny_model_dir), "--replicas", "2"]) == 2
    assert "--replicas needs Ray Serve: pip install 'freespec[ray]'" in capsys.readouterr().err


def test_serve_reports_a_taken_port(tiny_model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(tiny_model_dir), "--port", str(taken.getsockname()[1]), "--quiet"]) == 2
    assert "freespec: error: cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_a_fault_in_the_engine_fails_that_request_only(tiny_model_dir, caplog):
    """A 500 (or an error event mid-stream) for the request that met the fault; the next one is served.
    The client learns a request id, never the exception's text: that goes to the server's log."""
    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny", max_tokens=6)
    real_stream = model.stream

    def faulty_stream(**kwargs):
        generation = real_stream(**kwargs)
        if kwargs["max_new_tokens"] != 13:
            return generation
        return fault_after_first_chunk(generation)  # one chunk, then the fault

    model.stream = faulty_stream
    with BackgroundServer(app) as url:
        status, body, _ = post(url + "/v1/completions", {"prompt": "w1", "max_tokens": 13})
        assert status == 500 and body["error"]["type"] == "server_error"
        message = body["error"]["message"]
        assert "simulated fault" not in message and "RuntimeError" not in message
        request_id = message.split("request ")[1].split(")")[0]
        assert any(request_id in record.getMessage() and "simulated fault" in record.exc_text
                   for record in caplog.records if record.exc_text)
        connection, response = open_stream(url, {"messages": CHAT, "max_tokens": 13})
        events = [line for line in response.read().decode().split("\n\n") if line]
        connection.close()
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "internal error (request" in error["message"] and error["type"] == "server_error"
        assert "simulated fault" not in events[-2] and events[-1] == "data: [DONE]"
        assert post(url + "/v1/completions", {"prompt": "w1", "max_tokens": 5})[0] == 200
        assert metric(url, "freespec_requests_total", endpoint="completions", status="error") == 1


def test_n_choices_are_sampled_with_successive_seeds_and_greedy_ones_generated_once(client, reference):
    sampled = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, n=3, temperature=0.9,
                                             seed=7)
    assert [choice.index for choice in sampled.choices] == [0, 1, 2]
    for choice in sampled.choices:
        expected = reference.generate(messages=CHAT, max_new_tokens=12, drafter="none", temperature=0.9,
                                      seed=7 + choice.index)
        assert choice.message.content == expected.text
    assert len({choice.message.content for choice in sampled.choices}) > 1
    plain = {"drafter": "none"}  # passes that depend on nothing learnt before
    greedy = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, n=3, extra_body=plain)
    one = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, extra_body=plain)
    assert [choice.message.content for choice in greedy.choices] == [one.choices[0].message.content] * 3
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert greedy.usage.speculative["forward_passes"] == one.usage.speculative["forward_passes"]  # generated once
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="tiny", messages=CHAT, n=17)


@pytest.mark.parametrize("temperature", [0, 0.9])
def test_streamed_choices_are_the_whole_ones(client, temperature):
    request = dict(model="tiny", prompt=PROMPT, max_tokens=10, n=2, temperature=temperature, seed=3, logprobs=1)
    whole = client.completions.create(**request)
    texts, logprobs, finished, usage = {0: "", 1: ""}, {0: [], 1: []}, set(), None
    for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs:
                logprobs[choice.index] += choice.logprobs.token_logprobs
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or usage
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [choice.text for choice in whole.choices]
    assert [logprobs[0], logprobs[1]] == [choice.logprobs.token_logprobs for choice in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
