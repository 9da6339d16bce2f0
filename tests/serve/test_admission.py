"""What the server lets in: a fixed set of drafters, prompts it can hold, and a queue that counts
requests still being tokenized (issue 18, items 3 and 6)."""

from __future__ import annotations

import itertools
import socket
import threading

import pytest

import freespec
from freespec.serve.app import BackgroundServer, canonical_drafter, create_app
from tests.helpers import metric, open_stream, post, wait_for

MESSAGE = {"role": "user", "content": "w1 w2 w3"}


def test_only_the_drafters_fixed_at_start_are_built(tiny_model_dir):
    """A request may name the server's drafter or one of its --drafters (a fused name in any order);
    any other name is a 400 listing them, so distinct names cannot pile up drafters in memory."""
    model = freespec.load(str(tiny_model_dir))
    built = []
    real_drafter = model.drafter
    model.drafter = lambda name: built.append(name) or real_drafter(name)
    app = create_app(model, served_name="tiny", drafter="recycling", drafters=["lookup+recycling"], max_tokens=2)
    with BackgroundServer(app) as url:
        for asked in ("lookup+recycling", "recycling+lookup", "recycling", None):
            status, body, _ = post(url + "/v1/chat/completions",
                                   {"messages": [MESSAGE], **({"drafter": asked} if asked else {})})
            assert status == 200, body
            assert body["usage"]["speculative"]["drafter"] == canonical_drafter(asked or "recycling")
        orderings = ["+".join(names) for names in itertools.permutations(["lookup", "trie", "jacobi", "aded"], 3)]
        for asked in ["none", "lookup", "eagle", *orderings]:
            status, body, _ = post(url + "/v1/chat/completions", {"messages": [MESSAGE], "drafter": asked})
            assert status == 400 and body["error"]["param"] == "drafter", body
            assert "this server offers recycling, recycling+lookup" in body["error"]["message"]
    assert set(built) == {"recycling", "recycling+lookup"}


def test_canonical_drafter_names():
    assert canonical_drafter("trie+lookup+recycling") == "recycling+lookup+trie"
    with pytest.raises(ValueError, match="unknown drafter"):
        canonical_drafter("recycling+recycling")


TOO_LONG = "w1 " * 3000  # 9,000 characters cannot fit 512 tokens of a vocabulary whose longest token has 13


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(tiny_model_dir):
    model = freespec.load(str(tiny_model_dir))
    encoded = []
    real_encode = model.encode
    model.encode = lambda *args, **kwargs: encoded.append(1) or real_encode(*args, **kwargs)
    requests = [("chat/completions", "messages", {"messages": [MESSAGE, {"role": "user", "content": TOO_LONG}]}),
                ("completions", "prompt", {"prompt": TOO_LONG}),
                ("completions", "prompt", {"prompt": [TOO_LONG]})]
    with BackgroundServer(create_app(model, served_name="tiny", max_tokens=2, drafter="none")) as url:
        for endpoint, param, body in requests:
            status, reply, _ = post(url + "/v1/" + endpoint, body)
            assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
            assert "characters" in reply["error"]["message"] and "context of 512 tokens" in reply["error"]["message"]
            assert reply["error"]["param"] == param
        assert encoded == []
        assert post(url + "/v1/completions", {"prompt": "w1 w2"})[0] == 200
        assert encoded == [1]


def test_requests_being_tokenized_take_queue_slots_and_never_stall_a_stream(long_model_dir):
    """One answer streams while the next request's prompt is still being tokenized (held here): that
    request holds the only queue slot, so a third gets 429 at once, and the stream keeps flowing."""
    model = freespec.load(str(long_model_dir))
    app = create_app(model, served_name="tiny", max_queue=1)
    entered, release = threading.Event(), threading.Event()
    real_encode = model.encode

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    with BackgroundServer(app) as url:
        connection, stream = open_stream(url, {"messages": [MESSAGE], "max_tokens": 4000, "drafter": "none"},
                                         timeout=10)
        for _ in range(4):
            assert stream.readline().startswith(b"data: ")
            stream.readline()
        model.encode = slow_encode
        held: dict = {}
        waiting = threading.Thread(target=lambda: held.update(
            result=post(url + "/v1/chat/completions", {"messages": [MESSAGE], "max_tokens": 4, "drafter": "none"})))
        waiting.start()
        try:
            assert entered.wait(10)
            wait_for(lambda: metric(url, "freespec_queue_depth") == 1)
            for _ in range(20):  # the generation thread decodes while the tokenizer is busy
                assert stream.readline().startswith(b"data: ")
                stream.readline()
            status, body, headers = post(url + "/v1/chat/completions", {"messages": [MESSAGE]}, timeout=10)
            assert status == 429 and body["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
        finally:
            release.set()
            connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
            waiting.join(timeout=30)
        status, body, _ = held["result"]
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert metric(url, "freespec_requests_total", endpoint="chat", status="rejected") == 1
