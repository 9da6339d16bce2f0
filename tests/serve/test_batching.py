"""Continuous batching in the server (issue 21): concurrent clients share each forward pass and
every answer is the one the same request gets alone; a client that leaves, a fault, a long prompt
or a full queue disturbs no one else."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import freespec
from freespec import DEFAULT_DRAFTER
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import fault_after_first_chunk, metric, open_stream, os_threads, post, wait_for

DRAFTERS = ("recycling", "none", "lookup", "suffix", "trie", "aded", "jacobi", "layerskip", "recycling+lookup")
LONG_PROMPT = [5 + i % 200 for i in range(3000)]


def _requests(count: int) -> list[dict]:
    """Completions of token-id prompts of 2 to 330 tokens, every drafter, greedy and seeded sampling."""
    requests = []
    for index in range(count):
        prompt = [4 + (index * 37 + 11 * i) % 250 for i in range([2, 9, 30, 330][index % 4] + index)]
        sampling = {"temperature": 0, "seed": index} if index % 3 else {"temperature": 0.8, "top_p": 0.9,
                                                                        "seed": index}
        drafter = DRAFTERS[index % len(DRAFTERS)]
        if drafter == "layerskip" and sampling["temperature"]:  # sampled drafts follow the draft sizes
            sampling["temperature"] = 0
        requests.append({"prompt": prompt, "max_tokens": 20 + index % 7, "drafter": drafter, **sampling})
    return requests


def _concurrently(url: str, requests: list[dict], path: str = "/v1/completions",
                  seconds: float = 180) -> list[tuple[int, dict]]:
    """Every request at once, one client each: (status, body) of each."""
    answers: list = [None] * len(requests)

    def send(index: int) -> None:
        answers[index] = post(url + path, requests[index], timeout=seconds)[:2]

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds)
    return answers


def _text(answer: tuple) -> tuple[int, str]:
    status, body = answer[:2]
    return status, body["choices"][0]["text"] if status == 200 else body


@pytest.mark.parametrize("clients", [2, 16])
def test_concurrent_clients_get_the_answers_they_get_alone(tiny_model_dir, clients):
    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny", drafters=DRAFTERS, max_queue=32)
    requests = _requests(clients)
    with BackgroundServer(app) as url:
        alone = [post(url + "/v1/completions", request)[:2] for request in requests]
        assert [status for status, _ in alone] == [200] * clients
        before = metric(url, "freespec_pass_requests_count")
        together = _concurrently(url, requests)
        assert [status for status, _ in together] == [200] * clients
        assert [body["choices"][0]["text"] for _, body in together] == [body["choices"][0]["text"]
                                                                         for _, body in alone]
        passes = metric(url, "freespec_pass_requests_count") - before
        assert 0 < passes < sum(body["usage"]["completion_tokens"] for _, body in together)  # passes were shared


def test_a_client_that_leaves_frees_its_rows_and_disturbs_no_one(tiny_model_dir):
    model = freespec.load(str(tiny_model_dir))
    requests = _requests(4)
    with BackgroundServer(create_app(model, served_name="tiny", drafters=DRAFTERS)) as url:
        alone = [post(url + "/v1/completions", request)[1]["choices"][0]["text"] for request in requests]
        connection, response = open_stream(url, {"prompt": "w1 w2", "max_tokens": 400, "drafter": "none"},
                                           path="/v1/completions")
        for _ in range(3):  # it runs
            assert response.readline().startswith(b"data: ")
            response.readline()
        others = threading.Thread(target=lambda: results.extend(_concurrently(url, requests)))
        results: list = []
        others.start()
        wait_for(lambda: metric(url, "freespec_requests_running") >= 2, 30)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        wait_for(lambda: metric(url, "freespec_requests_total", endpoint="completions", status="cancelled") == 1, 30)
        others.join(timeout=120)
        assert [body["choices"][0]["text"] for _, body in results] == alone
        wait_for(lambda: metric(url, "freespec_requests_running") == 0, 10)


def test_a_fault_in_one_request_fails_it_and_no_other(tiny_model_dir, monkeypatch, caplog):
    model = freespec.load(str(tiny_model_dir))
    requests = _requests(6)
    real_stream = freespec.Model.stream

    def faulty_stream(self, **options):  # request 2 (its max_tokens) meets a fault after its first chunk
        generation = real_stream(self, **options)
        if options["max_new_tokens"] == requests[2]["max_tokens"]:
            fault_after_first_chunk(generation)
        return generation

    with BackgroundServer(create_app(model, served_name="tiny", drafters=DRAFTERS)) as url:
        alone = [_text(post(url + "/v1/completions", request)) for index, request in enumerate(requests) if index != 2]
        monkeypatch.setattr(freespec.Model, "stream", faulty_stream)
        together = _concurrently(url, requests)
        assert together[2][0] == 500 and "simulated" not in together[2][1]["error"]["message"]
        assert [_text(answer) for index, answer in enumerate(together) if index != 2] == alone
        assert metric(url, "freespec_requests_total", endpoint="completions", status="error") == 1
    assert any("simulated fault" in (record.exc_text or "") for record in caplog.records)


def test_a_long_prompt_is_prefilled_between_the_others_steps(long_model_dir):
    """A 3,000-token prompt arrives while a stream runs: the stream keeps getting tokens during its
    prefill (each pass carries a chunk of it and the stream's next step)."""
    model = freespec.load(str(long_model_dir))
    with BackgroundServer(create_app(model, served_name="tiny", drafter="none")) as url:
        connection, response = open_stream(url, {"prompt": "w1 w2", "max_tokens": 3000}, path="/v1/completions")
        arrivals: list[float] = []

        def read() -> None:
            try:
                while line := response.readline():
                    if line.startswith(b"data: {"):
                        arrivals.append(time.monotonic())
            except (OSError, AttributeError, ValueError):  # the test hung up
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: len(arrivals) >= 3, 30)
        started = time.monotonic()
        status, body, _ = post(url + "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, timeout=120)
        finished = time.monotonic()
        assert status == 200 and body["usage"]["prompt_tokens"] == len(LONG_PROMPT)
        during = [t for t in arrivals if started < t < finished]
        assert len(during) >= len(LONG_PROMPT) // 128 // 2  # about one token per chunk of 128
        connection.sock.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=10)
        connection.close()


def test_a_full_queue_still_answers_429_with_retry_after(long_model_dir):
    model = freespec.load(str(long_model_dir))
    with BackgroundServer(create_app(model, served_name="tiny", drafter="none", max_batch=2, max_queue=1)) as url:
        streams = [open_stream(url, {"prompt": "w1 w2", "max_tokens": 3000}, path="/v1/completions")
                   for _ in range(2)]
        wait_for(lambda: metric(url, "freespec_requests_running") == 2, 30)
        queued = threading.Thread(target=lambda: post(url + "/v1/completions", {"prompt": "w3", "max_tokens": 2}),
                                  daemon=True)
        queued.start()
        wait_for(lambda: metric(url, "freespec_queue_depth") == 1, 30)
        status, body, headers = post(url + "/v1/completions", {"prompt": "w4", "max_tokens": 2})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "queue_full"
        for connection, _ in streams:
            connection.close()
        queued.join(timeout=60)


@pytest.mark.real_model
def test_the_real_model_answers_concurrent_clients_as_it_answers_each_alone():
    model = freespec.load()
    prompts = ["Name three primes.", "Write one sentence about copper.", "List the days of the week.",
               "Say hello in French."]
    requests = [{"messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
                 "drafter": (DEFAULT_DRAFTER, "none")[index % 2],
                 **({"temperature": 0} if index < 2 else {"temperature": 0.7, "seed": index})}
                for index, prompt in enumerate(prompts)]
    model.drafter(DEFAULT_DRAFTER)  # as `freespec serve` does: its costs are measured before serving
    with BackgroundServer(create_app(model, served_name="smol", drafters=("none",))) as url:
        alone = [post(url + "/v1/chat/completions", request, timeout=300)[:2] for request in requests]
        together = _concurrently(url, requests, "/v1/chat/completions", 300)
    texts = lambda answers: [(status, body["choices"][0]["message"]["content"]) for status, body in answers]  # noqa: E731
    assert texts(together) == texts(alone)
    assert all(status == 200 for status, _ in alone)


@pytest.fixture
def two_threads():
    """Two OpenMP threads a team, whatever the suite set: a computing thread then holds a worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _compute_here(model: freespec.Model) -> None:
    """Generate on this thread: it then holds a team of OpenMP workers."""
    model.generate(prompt_ids=[5, 6, 7], max_new_tokens=4, drafter="none")


def test_building_a_server_hands_back_the_builders_openmp_workers(tiny_model_dir, two_threads):
    """The generation thread computes from then on; workers the building thread kept from its
    own computing (a calibration, a generation) would make libgomp stop every team's spinning
    (4x slower decoding on two cores, freespec.kernels.threads)."""
    model = freespec.load(tiny_model_dir)
    _compute_here(model)
    before = os_threads()
    create_app(model)  # its generation thread starts with the server, not here
    wait_for(lambda: os_threads() == before - 1, seconds=5)


def test_starting_a_server_hands_back_the_starters_openmp_workers(tiny_model_dir, two_threads):
    """`freespec serve` and a replica build their drafters (which may measure costs, computing on
    the thread) after creating the scheduler and before starting it: the start hands that
    thread's workers back too."""
    model = freespec.load(tiny_model_dir)
    scheduler = create_app(model).state.service.scheduler
    _compute_here(model)
    before = os_threads()
    scheduler.start()  # one thread more (generation), one worker less
    try:
        wait_for(lambda: os_threads() == before, seconds=5)
    finally:
        scheduler.stop()
