"""What the Ray Serve ingress and replicas (:mod:`freespec.serve.replicas`) pass each other, and
how a conversation picks its replica. Apart from that module, so that it needs no Ray."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from freespec.serve.schemas import ChatRequest, RequestBody

OPENING_CHARS = 512  # of a text prompt: what names its conversation
OPENING_TOKENS = 64  # of a prompt of token ids


@dataclass
class ReplicaRequest:
    """A parsed request on its way to a replica; ``conversation`` is what the router ranks replicas by."""

    endpoint: str
    body: RequestBody
    tenant: str | None
    conversation: str


@dataclass
class Admitted:
    """A replica's first answer: it queued the request under ``id``."""

    id: str
    replica: str


@dataclass
class Rejected:
    """A replica's first answer: it refused the request (an :class:`ApiError`'s fields)."""

    status: int
    message: str
    param: str | None
    code: str | None
    headers: dict[str, str] | None


def conversation_of(body: RequestBody, tenant: str | None) -> str:
    """A digest of the tenant and the opening of the conversation: the same for every turn of it.

    >>> first = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    >>> later = ChatRequest(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
    ...                              {"role": "user", "content": "and?"}])
    >>> conversation_of(first, "t") == conversation_of(later, "t") != conversation_of(first, None)
    True
    """
    if isinstance(body, ChatRequest):
        opening = []
        for message in body.messages:
            opening.append([message.role, message.text])
            if message.role == "user":
                break
    else:
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and not isinstance(
            body.prompt[0], int) else body.prompt
        opening = prompt[:OPENING_CHARS] if isinstance(prompt, str) else list(prompt[:OPENING_TOKENS])
    return hashlib.sha256(json.dumps([tenant, opening]).encode()).hexdigest()




def rank(conversation: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` in ``conversation``'s order of preference (rendezvous hashing).

    >>> order = rank("c", ["a", "b", "x"])
    >>> sorted(order), rank("c", ["x", "b", "a"]) == order, [r for r in rank("c", ["a", "b"])] == [
    ...     r for r in order if r != "x"]
    (['a', 'b', 'x'], True, True)
    """
    def weight(replica: str) -> bytes:
        return hashlib.sha256(f"{conversation}/{replica}".encode()).digest()

    return sorted(replica_ids, key=weight, reverse=True)
