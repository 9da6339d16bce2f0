"""Load and schema fuzzing against the real server on loopback, with the tiny model."""

from __future__ import annotations

from collections import defaultdict

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

import freespec
from freespec import DEFAULT_DRAFTER
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import load_benchmark, metric

pytestmark = pytest.mark.real_model  # the real SmolLM2-135M GGUF: skip with -m 'not real_model'


def load_script():
    return load_benchmark("serve_load")


def test_eight_clients_lose_nothing_and_stream_what_they_would_get_whole(tiny_model_dir):
    serve_load = load_script()
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny")
    prompts = ["w1 w2 w3", "w9 w8 w7", "w5", "w10 w11", "w40 w41 w42 w43", "w7 w7"]
    with BackgroundServer(app) as url:
        report = serve_load.run_load(url, "tiny", clients=8, requests=25, max_tokens=12, prompts=prompts,
                                     time_limit=120)
        assert metric(url, "freespec_requests_total", endpoint="chat", status="success") == 200
    assert len(report.outcomes) == 200
    assert report.failed == []
    assert report.mismatches() == {}
    seen = defaultdict(set)
    for outcome in report.outcomes:
        seen[outcome.key].add((outcome.mode, outcome.drafter))
    combinations = {(mode, drafter) for mode in ("stream", "whole") for drafter in (DEFAULT_DRAFTER, "none")}
    assert seen == {prompt: combinations for prompt in prompts}
    summary = report.summary()
    assert summary["requests"] == 200 and summary["latency_p50_s"] <= summary["latency_p99_s"]


def test_scaling_levels_serve_the_same_prompts_and_count_every_answer(tiny_model_dir):
    """The scaling table: every level serves the same prompts, speculation and plain decoding
    interleaved, each answer equal to the first one its prompt got."""
    serve_load = load_script()
    prompts = ["w1 w2 w3", "w9 w8 w7", "w5", "w10 w11", "w40 w41 w42 w43"]
    modes = {DEFAULT_DRAFTER: {"drafter": DEFAULT_DRAFTER}, "none": {"drafter": "none"}}
    with BackgroundServer(create_app(freespec.load(str(tiny_model_dir)), served_name="tiny")) as url:
        rows = serve_load.scaling(url, "tiny", "freespec", modes, [1, 3], prompts, 10, warm_up=["w2 w3", "w4"])
        assert metric(url, "freespec_requests_total", endpoint="chat", status="success") == 2 * 2 + 4 * 5
    assert [(row["clients"], row["speculation"]) for row in rows] == [(1, DEFAULT_DRAFTER), (1, "none"),
                                                                     (3, DEFAULT_DRAFTER), (3, "none")]
    assert all(row["failed"] == 0 and row["differing"] == 0 and row["tokens_per_second"] > 0 for row in rows)
    assert rows[0]["vs_1_client"] == rows[1]["vs_1_client"] == 1.0
    assert all(row["ttft_p99_later_s"] <= row["ttft_p99_s"] for row in rows)


def test_a_level_marks_each_clients_first_request(tiny_model_dir):
    """The later requests' time to first token leaves out the opening burst: one first request
    per client, every other one later."""
    serve_load = load_script()
    prompts = ["w1 w2 w3", "w9 w8 w7", "w5", "w10 w11", "w40 w41 w42 w43"]
    with BackgroundServer(create_app(freespec.load(str(tiny_model_dir)), served_name="tiny")) as url:
        outcomes, _ = serve_load.run_level(url, "tiny", 3, prompts, 6, {"drafter": "none"})
    assert sorted(outcome.prompt for outcome in outcomes) == sorted(prompts)
    assert sum(outcome.client_first for outcome in outcomes) == 3


def test_the_plain_http_client_reads_what_the_openai_client_reads(tiny_model_dir):
    """The scaling mode's default clients parse the stream themselves: the same answers, token
    counts and first-token times as the official client's, and a refused request counted as failed."""
    serve_load = load_script()
    prompts = ["w1 w2 w3", "w9 w8 w7", "w5"]
    with BackgroundServer(create_app(freespec.load(str(tiny_model_dir)), served_name="tiny")) as url:
        by_client = {client: serve_load.run_level(url, "tiny", 2, prompts, 8, {"drafter": "none"}, client=client)[0]
                     for client in serve_load.CLIENTS}
        refused, _ = serve_load.run_level(url, "tiny", 1, ["w1"], 8, {"drafter": "no-such-drafter"})
    answers = {client: sorted((o.prompt, o.text, o.tokens) for o in outcomes) for client, outcomes in by_client.items()}
    assert answers["http"] == answers["openai"] and all(tokens > 1 for _, _, tokens in answers["http"])
    assert all(o.error is None and o.first_token_seconds is not None and o.gaps for o in by_client["http"])
    assert len(refused) == 1 and refused[0].error.startswith("RuntimeError: HTTP 400")
    with pytest.raises(ValueError, match="client must be one of http, openai"):
        serve_load.run_level(url, "tiny", 1, ["w1"], 8, {}, client="curl")


def test_load_prompts_are_cut_or_filled_to_the_asked_length():
    class Words:  # a tokenizer of whitespace-separated words
        def encode(self, text, add_special_tokens=False):
            return text.split()

        def decode(self, words):
            return " ".join(words)

    prompts = load_script().spec_bench_prompts(6, tokens=40, tokenizer=Words())
    assert len(prompts) == len(set(prompts)) == 6 and all(len(prompt.split()) == 40 for prompt in prompts)


def test_load_script_refuses_other_hosts():
    with pytest.raises(SystemExit, match="loopback"):
        load_script().check_loopback("http://10.0.0.1:8000")


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model_dir):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", max_tokens=8)
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_from_the_schema_gets_a_server_error(case, fuzzed_server):
    """Valid and invalid requests generated from /openapi.json: all answered, none with a 5xx."""
    case.call_and_validate(base_url=fuzzed_server, checks=[not_a_server_error], timeout=60)
