"""``freespec serve --state FILE``: what the drafters learned (the suffix drafter's per-tenant
stores of earlier requests, Token Recycling's tables) is saved while requests end and when the
server stops, and a server started from the file drafts warm, with the same answers."""

from __future__ import annotations

import logging
import signal

import numpy as np

import freespec
from freespec.cli import main
from freespec.serve import persistence
from freespec.serve.app import BackgroundServer, create_app, tenant_of
from tests.helpers import metric, post, serve_process, wait_for

QUESTION = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"}]


def ask(url: str, key: str) -> str:
    body = {"messages": QUESTION, "max_tokens": 40, "drafter": "suffix"}
    status, answer, _ = post(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def passes(url: str) -> float:
    return metric(url, "freespec_forward_passes_total", drafter="suffix")


def serve(model_dir, state, **options) -> BackgroundServer:
    model = freespec.load(str(model_dir))
    if state.exists():
        model.load_state(state)
    return BackgroundServer(create_app(model, served_name="tiny", drafters=["suffix"], api_keys=("alice", "bob"),
                                       state=state, **options))


def test_a_restarted_server_drafts_from_what_the_last_one_served(tiny_model_dir, reference, tmp_path):
    state = tmp_path / "drafters.state"
    expected = reference.generate(messages=QUESTION, max_new_tokens=40, drafter="none").text
    with serve(tiny_model_dir, state) as url:
        assert ask(url, "alice") == expected
        cold = passes(url)
    saved = np.load(state)
    assert saved["suffix_tenants"].tolist() == [tenant_of("Bearer alice")]  # a digest of the key, not the key
    prompt = reference.encode(messages=QUESTION)
    assert saved["suffix_tokens"].tolist()[: len(prompt)] == prompt  # the prompt and its answer
    with serve(tiny_model_dir, state) as url:
        assert ask(url, "bob") == expected  # another tenant: no earlier requests to draft from
        stranger = passes(url)
        assert ask(url, "alice") == expected
        warm = passes(url) - stranger
        assert warm < min(cold, stranger) / 2


def test_the_state_is_saved_while_requests_end(tiny_model_dir, tmp_path):
    state = tmp_path / "drafters.state"
    with serve(tiny_model_dir, state, state_interval=3600) as url:
        ask(url, "alice")
        assert not state.exists()  # not before the interval has passed
    assert state.exists()  # and when the server stops
    state.unlink()
    with serve(tiny_model_dir, state, state_interval=0.001) as url:
        ask(url, "alice")
        wait_for(lambda: metric(url, "freespec_state_saves_total", outcome="ok") == 1, seconds=10)
        assert "suffix_tokens" in np.load(state).files


def test_a_failed_save_is_logged_and_serving_goes_on(tiny_model_dir, tmp_path, monkeypatch, caplog):
    state = tmp_path / "drafters.state"

    def disk_full(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "write_state", disk_full)
    with caplog.at_level(logging.ERROR, logger="freespec.serve"), serve(tiny_model_dir, state, state_interval=0.01) as url:
        for _ in range(3):
            ask(url, "alice")
        wait_for(lambda: metric(url, "freespec_state_saves_total", outcome="failed") >= 1, seconds=10)
        assert metric(url, "freespec_state_saves_total", outcome="ok") == 0
    assert f"could not save the drafters' state to {state}: No space left on device" in caplog.text
    assert not state.exists()


def test_the_command_line_refuses_a_state_it_could_not_keep(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "missing" / "drafters.state"
    assert main(["serve", "--model", str(tiny_model_dir), "--state", str(missing), "--quiet"]) == 2
    assert f"cannot write the state file {missing}: its directory is missing or read-only" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--state", str(tmp_path / "s"), "--replicas", "2"]) == 2
    assert "--state keeps one process's drafter state: it cannot be used with --replicas" in capsys.readouterr().err


def test_a_terminated_server_process_saves_its_state(tiny_model_dir, tmp_path):
    """SIGTERM (what systemd and docker send) stops ``freespec serve`` through its shutdown, which
    saves the state; the next process starts from it."""
    state = tmp_path / "drafters.state"
    with serve_process("--model", str(tiny_model_dir), "--state", str(state), "--quiet") as (process, url):
        status, body, _ = post(url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 12})
        assert status == 200, body
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr.decode()
    assert len(np.load(state)["suffix_tokens"]) > 12  # the prompt and its answer
