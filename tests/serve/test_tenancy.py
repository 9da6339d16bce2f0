"""Prefix reuse never crosses tenants (issue 18, item 4; issue 21, item 4): a request reuses the
cache rows of earlier prompts only when they presented the same API key, so another client's
prompt cannot be probed through ``cached_tokens`` (or prefill time)."""

from __future__ import annotations

import pytest

import freespec
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import post

SECRET = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16 w17 w18"}]
PROBE = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16 w17 w99"}]  # guesses all but the last word


def ask(url: str, messages: list[dict], key: str | None) -> tuple[str, int]:
    """(answer, cached_tokens) of a chat request sent with ``key`` (None: no Authorization header)."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    status, body, _ = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 6}, headers)
    assert status == 200, body
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("prefix_cache_mb", [0, 64])
@pytest.mark.parametrize("api_keys", [(), ("alice", "mallory")])
def test_a_probe_from_another_tenant_sees_no_cached_tokens(tiny_model_dir, reference, api_keys, prefix_cache_mb):
    """With keys configured or not (then whatever key a client sends, or none, is its tenant), with
    the prefix cache or only the last request's rows."""
    expected = reference.generate(messages=PROBE, max_new_tokens=6, drafter="none", reuse_prefix=False).text
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", api_keys=api_keys,
                     prefix_cache_mb=prefix_cache_mb)
    filed = prefix_cache_mb > 0  # a tenant's rows outlast another tenant's request
    with BackgroundServer(app) as url:
        ask(url, SECRET, "alice")
        assert ask(url, PROBE, "mallory") == (expected, 0)
        if not api_keys:
            assert ask(url, PROBE, None) == (expected, 0)
            answer, cached = ask(url, PROBE, "mallory")
            assert answer == expected and (cached > 0) == filed
        answer, cached = ask(url, PROBE, "mallory")  # its own rows: reuse within a tenant goes on
        assert answer == expected and cached > 0
        assert (ask(url, SECRET, "alice")[1] > 0) == filed


def test_no_prefix_reuse_prefills_every_prompt_whole(tiny_model_dir, reference):
    expected = reference.generate(messages=PROBE, max_new_tokens=6, drafter="none", reuse_prefix=False).text
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", prefix_reuse=False)
    with BackgroundServer(app) as url:
        for _ in range(2):
            assert ask(url, PROBE, "alice") == (expected, 0)
