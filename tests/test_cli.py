"""The ``freespec`` command line, run in-process on the tiny models from conftest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import freespec
from freespec import cli
from freespec.cli import main
from freespec.engine.costs import SIZES

PROMPT = "w1 w2 w3 w4 w5 w6"


def write_jsonl(path: Path, *lines: object) -> Path:
    """Objects are dumped as JSON; strings are written as they are (for broken lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_error(capsys, argv: list[str]) -> str:
    """Run a command that must fail; return its one-line error message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freespec: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("drafter", ["none", "recycling"])
def test_prompt_streams_the_generated_text(tiny_model_dir, capsys, drafter):
    expected = freespec.load(str(tiny_model_dir)).generate(PROMPT, max_new_tokens=16, drafter=drafter)
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--drafter", drafter,
                 "--max-new-tokens", "16"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert f"[freespec] {len(expected.token_ids)} tokens, " in err
    assert "forward passes, τ " in err and f"drafter {drafter})" in err


def test_quiet_prints_no_stats(tiny_model_dir, capsys):
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--quiet"]) == 0
    assert "[freespec]" not in capsys.readouterr().err


def test_batch_is_lossless_and_honours_each_line(tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(
        tmp_path / "prompts.jsonl",
        {"prompt": PROMPT, "id": "a"},
        "",
        {"messages": [{"role": "user", "content": "w9 w8 w7"}]},
        {"prompt": "w10 w11 w12 w10 w11", "max_new_tokens": 5},
    )
    results = {}
    for drafter in ("none", "recycling"):
        output = tmp_path / f"{drafter}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                     "--drafter", drafter, "--max-new-tokens", "12"]) == 0
        results[drafter] = read_jsonl(output)
        assert f"[freespec] 3 prompts → {output}: " in capsys.readouterr().err
    assert [r["token_ids"] for r in results["none"]] == [r["token_ids"] for r in results["recycling"]]

    first, chat, limited = results["recycling"]
    assert first["id"] == "a" and first["prompt"] == PROMPT  # the request is kept
    for result in (first, chat, limited):
        assert {"text", "token_ids", "finish_reason", "stats"} <= result.keys()
        assert result["stats"]["new_tokens"] == len(result["token_ids"]) > 0
        assert {"forward_passes", "mean_accepted", "seconds"} <= result["stats"].keys()
    model = freespec.load(str(tiny_model_dir))
    expected = model.generate(messages=chat["messages"], max_new_tokens=12, drafter="none")
    assert chat["token_ids"] == expected.token_ids and chat["text"] == expected.text
    assert len(limited["token_ids"]) <= 5 and len(first["token_ids"]) <= 12
    assert limited["finish_reason"] == "length" or limited["token_ids"][-1] in model.stop_ids


def test_interrupted_batch_keeps_finished_lines(tiny_model_dir, tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": "w1 w2"}, {"prompt": "w3 w4"})
    output = tmp_path / "out.jsonl"
    start, calls = cli._start, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return start(*args, **kwargs)

    monkeypatch.setattr(cli, "_start", interrupt_second)
    assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                 "--max-new-tokens", "3", "--drafter", "none"]) == 130
    assert capsys.readouterr().err.strip().endswith("freespec: interrupted")
    assert [r["prompt"] for r in read_jsonl(output)] == ["w1 w2"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["w1"]', "expected a JSON object"),
    ('{"text": "w1"}', 'exactly one of "prompt" or "messages"'),
    ('{"prompt": "w1", "messages": []}', 'exactly one of "prompt" or "messages"'),
    ('{"prompt": 5}', '"prompt" must be a non-empty string'),
    ('{"prompt": "   "}', '"prompt" must be a non-empty string'),
    ('{"messages": "w1"}', '"messages" must be a list'),
    ('{"messages": [{"role": "user"}]}', "messages must be a non-empty list"),
    ('{"prompt": "w1", "max_new_tokens": 0}', '"max_new_tokens" must be a positive integer'),
    ('{"prompt": "w1", "max_new_tokens": 2.5}', '"max_new_tokens" must be a positive integer'),
    ('{"prompt": "w1", "max_new_tokens": true}', '"max_new_tokens" must be a positive integer'),
    pytest.param(json.dumps({"prompt": " ".join(["w1"] * 600)}), "context is 512", id="longer-than-context"),
])
def test_bad_line_names_it_and_keeps_earlier_results(tiny_model_dir, tmp_path, capsys, line, message):
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": PROMPT}, "", {"prompt": "w3 w4"}, line,
                         {"prompt": "w5"})
    output = tmp_path / "out.jsonl"
    err = run_error(capsys, ["generate", "--model", str(tiny_model_dir), "--input", str(source),
                             "--output", str(output), "--max-new-tokens", "3", "--drafter", "none"])
    assert "prompts.jsonl line 4: " in err and message in err
    assert [r["prompt"] for r in read_jsonl(output)] == [PROMPT, "w3 w4"]


def test_prompt_longer_than_the_context(tiny_model_dir, capsys):
    err = run_error(capsys, ["generate", " ".join(["w7"] * 600), "--model", str(tiny_model_dir), "--no-chat"])
    assert "context is 512" in err


def test_model_without_chat_template(tiny_model_no_chat_dir, capsys):
    err = run_error(capsys, ["generate", PROMPT, "--model", str(tiny_model_no_chat_dir)])
    assert "no chat template" in err and "--no-chat" in err
    assert main(["generate", PROMPT, "--model", str(tiny_model_no_chat_dir), "--no-chat",
                 "--max-new-tokens", "8", "--drafter", "none"]) == 0
    model = freespec.load(str(tiny_model_no_chat_dir))
    expected = model.generate(PROMPT, max_new_tokens=8, chat=False, drafter="none")
    assert capsys.readouterr().out == expected.text + "\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "  "], "the prompt is empty"),
    (["generate", "w1", "--max-new-tokens", "0"], "--max-new-tokens: must be positive"),
    (["generate", "w1", "--max-new-tokens", "many"], "--max-new-tokens: expected an integer"),
    (["generate"], "give a PROMPT"),
    (["generate", "--input", "in.jsonl"], "--input and --output go together"),
    (["generate", "w1", "--input", "in.jsonl", "--output", "out.jsonl"], "not both"),
    (["generate", "--input", "missing.jsonl", "--output", "out.jsonl"], "cannot read missing.jsonl"),
    (["generate", "w1", "--model", "no/such/dir"], "model not found: no/such/dir"),
    (["generate", "w1", "--model", "missing.gguf"], "GGUF file not found"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in run_error(capsys, argv)
    assert not (tmp_path / "out.jsonl").exists()


def test_calibrate_prints_a_cost_table(tiny_model_dir, capsys):
    assert main(["calibrate", "--model", str(tiny_model_dir), "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [int(q) for q, _, _ in rows] == list(SIZES)
    assert rows[0][2] == "1.00" and all(float(ms) > 0 for _, ms, _ in rows)


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "freespec", "generate", ""], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr == "freespec: error: the prompt is empty\n"


def test_state_file_warms_the_next_run(tiny_model_dir, tmp_path, capsys):
    state = tmp_path / "recycling.npz"
    args = ["generate", "w1 w2 w3 w4", "--model", str(tiny_model_dir), "--max-new-tokens", "40", "--budget", "8",
            "--state", str(state)]
    assert main(args) == 0
    cold = capsys.readouterr()
    assert state.is_file()
    assert main(args) == 0  # the second process-equivalent run loads the learned matrix
    warm = capsys.readouterr()
    assert warm.out == cold.out  # lossless either way

    def passes(err: str) -> int:
        return int(err.split(" forward passes")[0].split()[-1])

    assert passes(warm.err) < passes(cold.err)


def test_bad_state_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    state = tmp_path / "broken.npz"
    state.write_text("not a matrix")
    code = main(["generate", "w1 w2", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--state", str(state)])
    assert code == 2
    assert "cannot load drafter state" in capsys.readouterr().err
