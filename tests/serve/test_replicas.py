"""Scale-out on Ray Serve (issue 21, item 5): two replicas of the tiny model on a local Ray instance
on loopback, one thread each. Requests spread over both, each conversation stays on the replica
that holds its prefix, and every answer is a single in-process server's."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'freespec[ray]'; CI installs it)")

import freespec  # noqa: E402
from freespec.serve.app import BackgroundServer, create_app  # noqa: E402
from tests.helpers import metric, open_stream, post  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": f"w{10 + i} w5 w6 w{100 + i}"}] for i in range(12)]


@pytest.fixture(scope="module")
def replicas_url(tiny_model_dir):
    from ray import serve

    from freespec.serve import replicas

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replicas.start_local(2, 1, "127.0.0.1", port)
    try:
        serve.run(replicas.build({"model": str(tiny_model_dir), "replicas": 2, "threads": 1, "served_name": "tiny",
                                  "max_tokens": 8, "drafters": ["none", "lookup"]}),
                  name="freespec", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        replicas.stop_local()


@pytest.fixture(scope="module")
def single_url(tiny_model_dir):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", max_tokens=8,
                     drafters=("none", "lookup"))
    with BackgroundServer(app) as url:
        yield url


def chat(url: str, messages: list[dict], **fields) -> dict:
    status, body, _ = post(url + "/v1/chat/completions", {"messages": messages, **fields})
    assert status == 200, body
    return body


def text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def test_conversations_spread_over_both_replicas_and_keep_their_prefix(replicas_url, single_url):
    """Twelve two-turn conversations: each answer equals the single server's; each second turn
    lands on the replica of its first (its prompt's first turn comes from the prefix cache)."""
    hits = 0
    for messages in CONVERSATIONS:
        first = chat(replicas_url, messages)
        assert text(first) == text(chat(single_url, messages))
        history = [*messages, {"role": "assistant", "content": text(first)}, {"role": "user", "content": "w7 w8"}]
        second = chat(replicas_url, history)
        assert text(second) == text(chat(single_url, history))
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
        hits += sum(1 for body in (first, second) if body["usage"]["prompt_tokens_details"]["cached_tokens"])
    lines = post(replicas_url + "/metrics", b"", method="GET")[1].splitlines()
    served = [float(line.split()[-1]) for line in lines if line.startswith("freespec_replica_requests_total{")]
    assert len(served) == 2 and all(count > 0 for count in served) and sum(served) == 2 * len(CONVERSATIONS)
    assert metric(replicas_url, "freespec_requests_total", endpoint="chat", status="success") == 2 * len(CONVERSATIONS)
    assert metric(replicas_url, "freespec_prefix_cache_hits_total") == hits


def test_streams_drafters_and_errors_are_the_single_servers(replicas_url, single_url):
    messages = CONVERSATIONS[0]
    for url in (replicas_url, single_url):
        connection, response = open_stream(url, {"messages": messages, "drafter": "lookup"})
        events = [event for event in response.read().decode().split("\n\n") if event]
        connection.close()
        assert events[-1] == "data: [DONE]"
    whole = chat(replicas_url, messages, drafter="lookup")
    assert text(whole) == text(chat(single_url, messages, drafter="none"))
    for body in [{"messages": messages, "drafter": "recycling+lookup"}, {"messages": messages, "max_tokens": 10**6},
                 {"messages": messages, "model": "other"}]:
        status, error, _ = post(replicas_url + "/v1/chat/completions", body)
        assert (status, error) == post(single_url + "/v1/chat/completions", body)[:2]
        assert 400 <= status < 500
    assert post(replicas_url + "/health", b"", method="GET")[0] == 200
    models = post(replicas_url + "/v1/models", b"", method="GET")[1]
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
