"""The server's prefix cache (issue 21, item 4): interleaved conversations each reuse their own
earlier turns, answers stay those of a cold server, the memory budget holds, tenants stay apart,
and hits show in ``usage`` and ``/metrics``."""

from __future__ import annotations

import threading

import pytest

import freespec
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import fault_after_first_chunk, metric, post, wait_for

ROW_BYTES = 2 * 2 * 2 * 16 * 4  # the tiny Llama: keys and values, 2 layers x 2 kv heads x 16 dims, fp32
A = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"}]
B = [{"role": "user", "content": "w31 w32 w33 w34 w35 w36 w37 w38 w39 w40"}]


def chat(url: str, messages: list[dict], key: str | None = None, max_tokens: int = 8) -> dict:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    status, body, _ = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens}, headers)
    assert status == 200, body
    return body


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def next_turn(messages: list[dict], answer: dict, words: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
            {"role": "user", "content": words}]


def cold(reference, messages: list[dict]) -> str:
    return reference.generate(messages=messages, max_new_tokens=8, drafter="none", reuse_prefix=False).text


@pytest.mark.parametrize("drafter", ["recycling", "none"])
def test_interleaved_conversations_each_reuse_their_own_turns(tiny_model_dir, reference, drafter):
    """A, B, A, B: the second turn of each starts from its own first turn's rows, filed away while
    the other conversation ran; every answer is a cold server's; hits are counted."""
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", drafter=drafter)
    with BackgroundServer(app) as url:
        a1, b1 = chat(url, A), chat(url, B)
        a_history, b_history = next_turn(A, a1, "w50 w51"), next_turn(B, b1, "w60 w61")
        a2, b2 = chat(url, a_history), chat(url, b_history)
        for messages, answer in [(A, a1), (B, b1), (a_history, a2), (b_history, b2)]:
            assert answer["choices"][0]["message"]["content"] == cold(reference, messages)
        for first, second in [(A, a2), (B, b2)]:  # at least the first turn's prompt, never the whole prompt
            assert len(reference.encode(messages=first)) <= cached(second) < second["usage"]["prompt_tokens"]
        answers = [a1, b1, a2, b2]
        assert metric(url, "freespec_prefix_cache_hits_total") == sum(1 for body in answers if cached(body))
        assert metric(url, "freespec_prompt_tokens_cached_total", drafter=drafter) == sum(map(cached, answers))
        assert 0 < metric(url, "freespec_prefix_cache_bytes") <= metric(url, "freespec_prefix_cache_budget_bytes")


def test_without_the_prefix_cache_only_the_last_request_is_reused(tiny_model_dir, reference):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", prefix_cache_mb=0)
    with BackgroundServer(app) as url:
        a1 = chat(url, A)
        chat(url, B)
        a_history = next_turn(A, a1, "w50 w51")
        a2 = chat(url, a_history)
        assert a2["choices"][0]["message"]["content"] == cold(reference, a_history)
        assert cached(a2) < len(reference.encode(messages=A))  # only the chat template's start is shared with B
        assert metric(url, "freespec_prefix_cache_bytes") == metric(url, "freespec_prefix_cache_budget_bytes") == 0


def test_the_budget_holds_and_evicts_the_least_recently_used(tiny_model_dir, reference):
    """A budget of 60 rows holds about three first turns (19 rows each): after B, C and D, A's rows
    are gone (its answer unchanged); A's second turn then pushes out B and C, not the newer D; the
    memory never passes the budget."""
    budget = 60 * ROW_BYTES
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", prefix_cache_mb=budget / 2**20)
    conversations = [A, B, [{"role": "user", "content": "w71 w72 w73 w74 w75 w76 w77 w78 w79 w80"}],
                     [{"role": "user", "content": "w81 w82 w83 w84 w85 w86 w87 w88 w89 w90"}]]
    with BackgroundServer(app) as url:
        first_turns = [chat(url, messages) for messages in conversations]
        assert metric(url, "freespec_prefix_cache_bytes") <= budget
        assert metric(url, "freespec_prefix_cache_evicted_tokens_total") > 0
        a_history = next_turn(A, first_turns[0], "w50 w51")
        a2 = chat(url, a_history)
        assert a2["choices"][0]["message"]["content"] == cold(reference, a_history)
        assert cached(a2) < len(reference.encode(messages=A))  # evicted: only what D shares (the template)
        d_history = next_turn(conversations[3], first_turns[3], "w52")
        assert cached(chat(url, d_history)) >= len(reference.encode(messages=conversations[3]))  # the newest stays
        assert metric(url, "freespec_prefix_cache_bytes") <= budget


def test_tenants_reuse_only_their_own_filed_prefixes(tiny_model_dir, reference):
    """alice and mallory both file A's first turn; eve, sending the same prompt, reuses nothing; each
    tenant's second turn reuses its own rows, with mallory's request in between."""
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", api_keys=("alice", "mallory", "eve"))
    with BackgroundServer(app) as url:
        alice = chat(url, A, "alice")
        assert cached(chat(url, A, "mallory")) == 0
        assert cached(chat(url, B, "mallory")) > 0  # its own: the chat template's start
        assert cached(chat(url, A, "eve")) == 0
        history = next_turn(A, alice, "w50 w51")
        second = chat(url, history, "alice")
        assert cached(second) >= len(reference.encode(messages=A))
        assert second["choices"][0]["message"]["content"] == cold(reference, history)


def test_a_fault_leaves_nothing_behind_for_the_next_request(tiny_model_dir, reference):
    """A request that fails mid-answer (500) files none of its rows: the same conversation asked
    again is answered as a cold server would."""
    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny")
    real_stream = model.stream
    faults = []

    def faulty_stream(**kwargs):
        generation = real_stream(**kwargs)
        if kwargs["max_new_tokens"] != 13:
            return generation
        return fault_after_first_chunk(generation, faults)  # one chunk, then the fault

    model.stream = faulty_stream
    with BackgroundServer(app) as url:
        status, _, _ = post(url + "/v1/chat/completions", {"messages": A, "max_tokens": 13})
        assert status == 500 and faults
        assert chat(url, A)["choices"][0]["message"]["content"] == cold(reference, A)
        assert metric(url, "freespec_requests_total", endpoint="chat", status="error") == 1


def test_serve_refuses_a_negative_budget(capsys):
    from freespec.cli import main

    assert main(["serve", "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb: must be a number of megabytes >= 0, got -1" in capsys.readouterr().err



SYSTEM = [5 + (7 * i) % 190 for i in range(60)]  # a long start that every prompt of a burst shares
BURST = [SYSTEM + [200 + k, 150 + k, 9] for k in range(4)]


def _burst(app, monkeypatch, prompts: list[list[int]], keys: list[str | None] | None = None) -> list[dict]:
    """Completions of ``prompts`` (sent with ``keys``), the first one on the model and the others
    queued behind it before its first pass (the generation thread is held in the first one's
    start until they are): they find its prompt still to be prefilled."""
    keys = keys or [None] * len(prompts)
    scheduler = app.state.service.scheduler
    entered, go = threading.Event(), threading.Event()
    real_stream = freespec.Model.stream

    def held_first(self, *args, **kwargs):  # the model's forks run it too
        if not entered.is_set():
            entered.set()
            go.wait(30)
        return real_stream(self, *args, **kwargs)

    monkeypatch.setattr(freespec.Model, "stream", held_first)
    answers: list = [None] * len(prompts)
    with BackgroundServer(app) as url:
        def send(index: int) -> None:
            headers = {} if keys[index] is None else {"Authorization": f"Bearer {keys[index]}"}
            answers[index] = post(url + "/v1/completions", {"prompt": prompts[index], "max_tokens": 6}, headers)[:2]

        threads = [threading.Thread(target=send, args=(index,)) for index in range(len(prompts))]
        threads[0].start()
        assert entered.wait(30)
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: scheduler._queue.qsize() == len(prompts) - 1)
        go.set()
        for thread in threads:
            thread.join(timeout=60)
    assert [status for status, _ in answers] == [200] * len(prompts), answers
    return [body for _, body in answers]


def _cold_text(reference, prompt: list[int]) -> str:
    return reference.generate(prompt_ids=prompt, max_new_tokens=6, drafter="none", reuse_prefix=False).text


@pytest.mark.parametrize("prefix_cache_mb", [0, 64])
def test_a_burst_with_one_system_prompt_prefills_it_once(tiny_model_dir, reference, prefix_cache_mb, monkeypatch):
    """Four requests that start with the same 60 tokens arrive together: the first prefills them,
    the others wait for its rows and copy them (cached), and every answer is a cold server's."""
    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny", drafter="none", prefix_cache_mb=prefix_cache_mb)
    answers = _burst(app, monkeypatch, BURST)
    assert [cached(body) for body in answers] == [0] + [len(SYSTEM)] * 3
    assert [body["choices"][0]["text"] for body in answers] == [_cold_text(reference, p) for p in BURST]


def test_a_burst_shares_rows_within_a_tenant_only(tiny_model_dir, reference, monkeypatch):
    """The same burst from two API keys: alice's second request copies her first one's rows;
    mallory's requests copy only each other's (the one that came first prefills them)."""
    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny", drafter="none", api_keys=("alice", "mallory"))
    answers = _burst(app, monkeypatch, BURST, ["alice", "mallory", "alice", "mallory"])
    assert [cached(answers[0]), cached(answers[2])] == [0, len(SYSTEM)]
    assert sorted([cached(answers[1]), cached(answers[3])]) == [0, len(SYSTEM)]
    assert [body["choices"][0]["text"] for body in answers] == [_cold_text(reference, p) for p in BURST]


def test_a_short_shared_start_is_not_waited_for(tiny_model_dir, reference, monkeypatch):
    """Prompts that share fewer than MIN_SHARED_ROWS tokens start at once, side by side."""
    from freespec.engine.batch import MIN_SHARED_ROWS

    model = freespec.load(str(tiny_model_dir))
    app = create_app(model, served_name="tiny", drafter="none")
    prompts = [prompt[len(SYSTEM) - MIN_SHARED_ROWS + 1 :] for prompt in BURST]
    answers = _burst(app, monkeypatch, prompts)
    assert [cached(body) for body in answers] == [0] * len(prompts)
    assert [body["choices"][0]["text"] for body in answers] == [_cold_text(reference, p) for p in prompts]
