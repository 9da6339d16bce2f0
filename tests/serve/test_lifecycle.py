"""How requests and the server end (issue 18, items 6 and 7): a prefill stops when its client leaves
or its deadline passes, a shutdown ends every open answer at once, a dead generation thread shows
in /health, and exposing the server without a key is warned about."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

import freespec
from freespec.cli import main
from freespec.model.runner import PrefillCancelled
from freespec.serve import app as server_module
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import metric, open_stream, post, serve_process, wait_for

LONG_PROMPT = [5 + i % 200 for i in range(3900)]  # token ids: 8 prefill chunks of at most 512
CHUNKS = 8


def slow_prefill(model: freespec.Model, seconds: float) -> list[float]:
    """Make each prefill chunk take ``seconds`` longer: the server's ``should_stop``, asked before
    each chunk, answers that much later. Returns the times it was asked (one per chunk started or refused)."""
    asked: list[float] = []
    real_stream = model.stream

    def stream(**options):
        should_stop = options["should_stop"]

        def slow_should_stop() -> bool:
            asked.append(time.monotonic())
            time.sleep(seconds)
            return should_stop()

        return real_stream(**{**options, "should_stop": slow_should_stop})

    model.stream = stream
    return asked


def test_the_prefill_hook_stops_between_chunks(long_model_dir):
    """``should_stop`` is asked before each chunk; the rows of the chunks that ran stay committed."""
    model = freespec.load(str(long_model_dir))
    asked = []
    prompt = LONG_PROMPT[:1100]  # 3 chunks
    generation = model.stream(prompt_ids=prompt, max_new_tokens=4, drafter="none",
                              should_stop=lambda: asked.append(1) or len(asked) > 1)
    with pytest.raises(PrefillCancelled):
        next(iter(generation))
    rows = model.runner.length
    assert len(asked) == 2 and 0 < rows < len(prompt) - 1
    again = model.generate(prompt_ids=prompt, max_new_tokens=4, drafter="none")  # reuses those rows
    assert again.stats.cached_tokens == rows
    fresh = model.generate(prompt_ids=prompt, max_new_tokens=4, drafter="none", reuse_prefix=False)
    assert again.token_ids == fresh.token_ids


def test_a_client_leaving_stops_its_prefill(long_model_dir):
    """An 8-chunk prefill (~2.4 s here) stops within a chunk or two of the client hanging up, and
    the request queued behind it starts."""
    model = freespec.load(str(long_model_dir))
    asked = slow_prefill(model, 0.3)
    with BackgroundServer(create_app(model, served_name="tiny", drafter="none")) as url:
        connection, response = open_stream(url, {"prompt": LONG_PROMPT, "max_tokens": 4}, path="/v1/completions")
        assert response.status == 200  # the headers come as the prefill starts
        wait_for(lambda: len(asked) >= 2, 10)  # a chunk is done
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        hung_up = time.monotonic()
        wait_for(lambda: metric(url, "freespec_requests_total", endpoint="completions", status="cancelled") == 1, 10)
        assert len([t for t in asked if t > hung_up]) <= 2
        assert len(asked) < CHUNKS  # the last one said stop
        assert post(url + "/v1/completions", {"prompt": "w1 w2", "max_tokens": 3})[0] == 200


def test_a_request_past_its_deadline_stops_in_prefill_with_504(long_model_dir):
    model = freespec.load(str(long_model_dir))
    asked = slow_prefill(model, 0.3)
    app = create_app(model, served_name="tiny", drafter="none", request_timeout=0.5)
    with BackgroundServer(app) as url:
        started = time.monotonic()
        status, body, _ = post(url + "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4})
        assert status == 504 and "request timeout of 0.5 s" in body["error"]["message"], body
        assert time.monotonic() - started < 2.0 and len(asked) <= 3
        assert metric(url, "freespec_requests_total", endpoint="completions", status="timeout") == 1


def read_events(response, seconds: float) -> list[str]:
    """The server-sent events of a stream until it ends (or ``seconds`` pass: then the test fails)."""
    deadline, events = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        line = response.readline()
        if not line:
            return events
        if line.strip():
            events.append(line.decode().strip())
    pytest.fail(f"the stream did not end within {seconds} s")


def test_stopping_the_server_ends_open_answers_at_once(long_model_dir, caplog):
    """A stream gets an error event and [DONE], a waiting request a 503, and the server is down in
    well under the 5 s graceful timeout (which it used to wait out, then cut the stream mid-send)."""
    server = BackgroundServer(create_app(freespec.load(str(long_model_dir)), served_name="tiny", drafter="none",
                                         max_batch=1))  # the second request waits in the queue
    url = server.__enter__()
    connection, response = open_stream(url, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 4000},
                                       timeout=10)
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    waiting: dict = {}
    thread = threading.Thread(target=lambda: waiting.update(
        result=post(url + "/v1/completions", {"prompt": "w1", "max_tokens": 4}, timeout=10)))
    thread.start()
    wait_for(lambda: metric(url, "freespec_queue_depth") == 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    events = read_events(response, 5)
    connection.close()
    thread.join(timeout=10)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == "the server is shutting down" and error["type"] == "server_error"
    status, body, _ = waiting["result"]
    assert status == 503 and body["error"]["message"] == "the server is shutting down"
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


def test_ctrl_c_during_a_stream_ends_it_cleanly(long_model_dir):
    """``freespec serve`` interrupted mid-stream: at once the client gets an error event and [DONE];
    the process exits with 130 and one line, no traceback (it used to wait out the 5 s graceful
    timeout, cut the stream mid-send and print uvicorn's traceback of the cancelled task)."""
    with serve_process("--model", str(long_model_dir), "--drafter", "none", "--quiet") as (process, url):
        connection, response = open_stream(url, {"messages": [{"role": "user", "content": "w5"}],
                                                 "max_tokens": 4000}, timeout=10)
        for _ in range(3):
            assert response.readline().startswith(b"data: ")
            response.readline()
        process.send_signal(signal.SIGINT)
        events = read_events(response, 3)
        connection.close()
        _, stderr = process.communicate(timeout=60)  # the interpreter's exit (torch's teardown) takes seconds
    assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2]
    assert process.returncode == 130
    assert "Traceback" not in stderr.decode() and stderr.decode().strip().endswith("freespec: interrupted")


def test_health_reports_a_dead_generation_thread(tiny_model_dir, caplog):
    """Something no request handler catches ends the generation thread: its request fails, /health
    says 503 and later requests get 503 at once instead of waiting forever."""
    model = freespec.load(str(tiny_model_dir))

    def fatal(**_):
        raise SystemExit("simulated fatal error")

    model.stream = fatal
    with BackgroundServer(create_app(model, served_name="tiny")) as url:
        status, body, _ = post(url + "/health", b"", method="GET")
        assert status == 200 and body["status"] == "ok"
        status, body, _ = post(url + "/v1/completions", {"prompt": "w1"}, timeout=10)
        assert status == 500 and "simulated" not in body["error"]["message"]
        status, body, _ = post(url + "/health", b"", method="GET")
        assert status == 503 and body["status"] == "unavailable"
        status, body, _ = post(url + "/v1/completions", {"prompt": "w1"}, timeout=10)
        assert status == 503 and "generation thread has stopped" in body["error"]["message"]
    assert any("generation thread stopped" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("host, keys, warned", [
    ("0.0.0.0", (), True), ("::", (), True), ("192.168.1.20", (), True), ("myhost.example", (), True),
    ("0.0.0.0", ("k",), False), ("127.0.0.1", (), False), ("127.0.0.2", (), False), ("::1", (), False),
    ("localhost", (), False),
])
def test_exposure_warning(host, keys, warned):
    assert (server_module.exposure_warning(host, keys) is not None) == warned


def test_serving_beyond_loopback_without_a_key_warns(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(server_module, "serve", lambda model, **options: None)  # nothing is bound
    monkeypatch.delenv("FREESPEC_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_model_dir), "--quiet", "--host", "0.0.0.0"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "without an API key" in line]
    assert lines == ["[freespec] warning: serving on 0.0.0.0 without an API key: anyone who can reach it can "
                     "use the model (set --api-key or $FREESPEC_API_KEY)"]
