"""Scale-out on Ray Serve (issue 21, item 5): two replicas of the tiny model on a local Ray instance
on loopback, one thread each. Requests spread over both, each conversation stays on the replica
that holds its prefix, and every answer is a single in-process server's."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'freespec[ray]'; CI installs it)")

import freespec  # noqa: E402
from freespec.serve.app import BackgroundServer, create_app  # noqa: E402
from freespec.serve.routing import ReplicaRequest, conversation_of, rank  # noqa: E402
from freespec.serve.schemas import ChatRequest  # noqa: E402
from tests.helpers import metric, open_stream, post, wait_for  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": f"w{10 + i} w5 w6 w{100 + i}"}] for i in range(12)]


@pytest.fixture(scope="module")
def replicas_url(long_model_dir):
    from ray import serve

    from freespec.serve import replicas

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replicas.start_local(2, 1, "127.0.0.1", port)
    try:
        serve.run(replicas.build({"model": str(long_model_dir), "replicas": 2, "threads": 1, "served_name": "tiny",
                                  "max_tokens": 8, "drafters": ["none", "lookup"]}),
                  name="freespec", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        replicas.stop_local()


@pytest.fixture(scope="module")
def single_url(long_model_dir):
    app = create_app(freespec.load(str(long_model_dir)), served_name="tiny", max_tokens=8,
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


def test_a_client_that_hangs_up_frees_its_replica(replicas_url):
    """A stream of 4000 tokens is abandoned after its first chunks: the next turn of the same
    conversation (same replica, one request at a time) is answered in well under the time the
    whole stream takes (measured first)."""
    messages = [{"role": "user", "content": "w5"}]
    long = {"messages": messages, "max_tokens": 4000, "drafter": "none"}
    started = time.monotonic()
    connection, response = open_stream(replicas_url, long)
    assert response.read().decode().endswith("data: [DONE]\n\n")
    connection.close()
    whole = time.monotonic() - started
    connection, response = open_stream(replicas_url, long)
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    hung_up = time.monotonic()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert chat(replicas_url, messages, max_tokens=4)["usage"]["completion_tokens"] == 4
    assert time.monotonic() - hung_up < whole / 2, whole
    wait_for(lambda: metric(replicas_url, "freespec_requests_total", endpoint="chat", status="cancelled") == 1)


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
    for path, body in [("/tokenize", {"messages": messages}), ("/tokenize", {"prompt": "w1 w2"}),
                       ("/detokenize", {"tokens": [5, 6]}), ("/tokenize", {}), ("/detokenize", {"tokens": [-1]})]:
        assert post(replicas_url + path, body)[:2] == post(single_url + path, body)[:2]
    models = post(replicas_url + "/v1/models", b"", method="GET")[1]
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 4096


class _Id:
    def __init__(self, unique_id: str):
        self.unique_id = unique_id


@dataclass
class _Replica:
    replica_id: _Id
    max_ongoing_requests: int = 3


@dataclass
class _Pending:
    args: list
    created_at: float


def test_the_router_keeps_a_conversation_on_its_replica_while_it_has_room():
    """The first replica in the conversation's order is the only one offered for a while (Serve's
    queue probes may be late on a busy machine), all of them in order after that, or at once when
    Serve knows the first one is full; calls that are not requests go anywhere."""
    from freespec.serve.replicas import AFFINITY_WAIT_S, ConversationRouter

    router = ConversationRouter.__new__(ConversationRouter)  # its state is Serve's; choosing needs none
    replicas = [_Replica(_Id(name)) for name in ("r1", "r2", "r3")]
    body = ChatRequest(messages=CONVERSATIONS[0])
    request = ReplicaRequest("chat", body, None, conversation_of(body, None))
    order = rank(request.conversation, ["r1", "r2", "r3"])

    def choose(pending) -> list[list[str]]:
        ranks = asyncio.run(router.choose_replicas(replicas, pending))
        return [[replica.replica_id.unique_id for replica in group] for group in ranks]

    assert choose(_Pending([request], time.time())) == [order[:1]]
    assert choose(_Pending([request], time.time() - AFFINITY_WAIT_S - 1)) == [[name] for name in order]
    first = next(replica for replica in replicas if replica.replica_id.unique_id == order[0])
    router._replica_queue_len_cache = {first.replica_id: 3}
    assert choose(_Pending([request], time.time())) == [[name] for name in order]
    assert choose(_Pending([], time.time())) == [["r1", "r2", "r3"]]
    assert choose(None) == [["r1", "r2", "r3"]]


def test_conversations_are_named_by_tenant_and_opening():
    turn = ChatRequest(messages=CONVERSATIONS[0])
    later = ChatRequest(messages=[*CONVERSATIONS[0], {"role": "assistant", "content": "w1"},
                                  {"role": "user", "content": "w2"}])
    assert conversation_of(turn, "a") == conversation_of(later, "a") != conversation_of(turn, "b")
    assert conversation_of(ChatRequest(messages=CONVERSATIONS[1]), "a") != conversation_of(turn, "a")
    assert len({rank(conversation_of(ChatRequest(messages=m), None), ["r1", "r2"])[0] for m in CONVERSATIONS}) == 2
