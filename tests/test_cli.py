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
from freespec.kernels.threads import usable_cpus

REPO = Path(__file__).parents[1]

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


def test_more_threads_than_cpus_and_ports_past_65535_are_refused_in_one_line(tiny_model_dir, capsys):
    """1,000 threads on two cores decoded 0.3 tokens/s (after recalibrating for 43 s); port 99999
    ended in a traceback from the socket."""
    cpus = usable_cpus()
    err = run_error(capsys, ["generate", PROMPT, "--model", str(tiny_model_dir), "--threads", str(cpus + 1)])
    assert err == f"freespec: error: threads must be 1 to {cpus} (the CPUs this process may use), got {cpus + 1}"
    with pytest.raises(ValueError, match=f"threads must be 1 to {cpus} "):
        freespec.load(str(tiny_model_dir), threads=0)
    err = run_error(capsys, ["serve", "--model", str(tiny_model_dir), "--port", "99999"])
    assert err == ("freespec: error: argument --port: must be a TCP port, 1 to 65535; got 99999 "
                   "(see freespec serve --help)")


def test_a_prompt_with_bytes_that_are_not_utf8_is_refused_in_one_line(tiny_model_dir, capsys):
    """Python keeps a non-UTF-8 byte of argv as a lone surrogate, on which the tokenizer raised a
    TypeError (a traceback)."""
    err = run_error(capsys, ["generate", "caf\udce9", "--model", str(tiny_model_dir)])
    assert err == ("freespec: error: the prompt is not valid Unicode text: character 3 is a lone surrogate "
                   "('\\udce9'); is the input UTF-8?")


def test_quiet_prints_no_stats(tiny_model_dir, capsys):
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--quiet"]) == 0
    assert "[freespec]" not in capsys.readouterr().err


def test_batch_is_lossless_and_honours_each_line(tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(
        tmp_path / "prompts.jsonl",
        {"prompt": PROMPT, "id": "a"},
        "",
        {"messages": [{"role": "user", "content": "w9 w8 w7"}]},
        {"prompt": "w10 w11 w12 w10 w11", "max_new_tokens": 5, "logprobs": 2},
    )
    results = {}
    for drafter, parallel in (("none", "1"), ("recycling", "8"), ("recycling", "1")):
        output = tmp_path / f"{drafter}-{parallel}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                     "--drafter", drafter, "--max-new-tokens", "12", "--parallel", parallel]) == 0
        results[drafter, parallel] = read_jsonl(output)
        assert f"[freespec] 3 prompts → {output}: " in capsys.readouterr().err
    outputs = [[(r["token_ids"], r["text"], r.get("token_logprobs")) for r in lines] for lines in results.values()]
    assert outputs[0] == outputs[1] == outputs[2]  # in order, whatever ran beside each request
    results["recycling"] = results["recycling", "8"]

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
    assert "token_logprobs" not in first and limited["logprobs"] == 2  # the request is kept
    scored = model.generate("w10 w11 w12 w10 w11", max_new_tokens=5, drafter="none", logprobs=2)
    assert limited["token_logprobs"] == [{"token_id": entry.token, "logprob": entry.logprob,
                                          "top": [list(pair) for pair in entry.top]} for entry in scored.logprobs]
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
                 "--max-new-tokens", "3", "--drafter", "none", "--parallel", "1"]) == 130
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
    ('{"prompt": "w1", "max_new_tokens": 0}', '"max_new_tokens" must be a positive integer'),
    ('{"prompt": "w1", "max_new_tokens": 2.5}', '"max_new_tokens" must be a positive integer'),
    ('{"prompt": "w1", "max_new_tokens": true}', '"max_new_tokens" must be a positive integer'),
    ('{"prompt": "w1", "temperature": "hot"}', "temperature must be a number in [0, 2], got 'hot'"),
    ('{"prompt": "w1", "logprobs": 21}', "logprobs must be None or an integer in [0, 20]"),
    ('{"prompt": "w1", "stop": ["w2", 5]}', "stop strings must be non-empty strings, got 5"),
    ('{"prompt": "w1", "stop": {"w2": 1}}', "stop must be a string or a list of strings"),
    ('{"prompt": "w1", "logit_bias": {"w2": 1}}', "logit_bias: keys must be token ids (strings of digits), got 'w2'"),
    ('{"prompt": "w1", "logit_bias": {"5": 101}}', "the bias of token 5 must be a number in [-100, 100]"),
])
def test_a_badly_formed_line_stops_the_batch_before_the_model_loads(tmp_path, capsys, line, message):
    """Every line is checked first: a mistake on line 9,000 is not found hours in. The model named
    does not even exist: the line is what the error names."""
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": PROMPT}, "", {"prompt": "w3 w4"}, line,
                         {"prompt": "w5"})
    output = tmp_path / "out.jsonl"
    output.write_text("yesterday's results\n")
    err = run_error(capsys, ["generate", "--model", str(tmp_path / "no-model"), "--input", str(source),
                             "--output", str(output)])
    assert "prompts.jsonl line 4: " in err and message in err
    assert output.read_text() == "yesterday's results\n"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user"}]}', "messages must be a non-empty list"),
    pytest.param(json.dumps({"prompt": " ".join(["w1"] * 600)}), "context is 512", id="longer-than-context"),
])
def test_a_line_the_model_refuses_names_it_and_keeps_earlier_results(tiny_model_dir, tmp_path, capsys, line, message):
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": PROMPT}, "", {"prompt": "w3 w4"}, line,
                         {"prompt": "w5"})
    output = tmp_path / "out.jsonl"
    err = run_error(capsys, ["generate", "--model", str(tiny_model_dir), "--input", str(source),
                             "--output", str(output), "--max-new-tokens", "3", "--drafter", "none"])
    assert "prompts.jsonl line 4: " in err and message in err
    assert [r["prompt"] for r in read_jsonl(output)] == [PROMPT, "w3 w4"]


def test_stop_strings_end_the_printed_answer_and_each_line_of_a_batch(tiny_model_dir, tmp_path, capsys):
    """--stop for one prompt; a line's "stop" over the flag's in a batch; the answers are the API's."""
    model = freespec.load(str(tiny_model_dir))
    answer = model.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none")
    first, second = answer.text.split()[1:3]
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--no-chat", "--max-new-tokens", "12",
                 "--stop", "w999", "--stop", first, "--drafter", "recycling"]) == 0
    printed = capsys.readouterr()
    assert printed.out == answer.text[: answer.text.index(first)] + "\n"
    expected = model.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none", stop=first)
    assert f"[freespec] {len(expected.token_ids)} tokens," in printed.err
    source = write_jsonl(tmp_path / "in.jsonl", {"prompt": PROMPT}, {"prompt": PROMPT, "stop": second})
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--no-chat", "--input", str(source), "--output",
                 str(output), "--max-new-tokens", "12", "--stop", first, "--quiet"]) == 0
    for result, stop in zip(read_jsonl(output), [first, second]):
        expected = model.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none", stop=stop)
        assert (result["text"], result["token_ids"], result["finish_reason"]) == (expected.text, expected.token_ids,
                                                                                  "stop")
        assert result["stats"]["new_tokens"] == len(expected.token_ids)


def test_logit_bias_from_the_flag_and_from_a_batch_line(tiny_model_dir, tmp_path, capsys):
    model = freespec.load(str(tiny_model_dir))
    plain = model.generate(PROMPT, chat=False, max_new_tokens=8, drafter="none")
    banned = {plain.token_ids[0]: -100.0, 9: 2.5}
    expected = model.generate(PROMPT, chat=False, max_new_tokens=8, drafter="none", logit_bias=banned)
    assert expected.token_ids != plain.token_ids
    flags = [flag for token, bias in banned.items() for flag in ("--logit-bias", f"{token}={bias}")]
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--no-chat", "--max-new-tokens", "8",
                 "--quiet", *flags]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    source = write_jsonl(tmp_path / "in.jsonl", {"prompt": PROMPT, "logit_bias": {str(k): v for k, v in banned.items()}},
                         {"prompt": PROMPT})
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--no-chat", "--input", str(source), "--output",
                 str(output), "--max-new-tokens", "8", "--quiet"]) == 0
    assert [result["token_ids"] for result in read_jsonl(output)] == [expected.token_ids, plain.token_ids]


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
    (["generate", "w1", "--stop", ""], "--stop: must be a non-empty string"),
    (["generate", "w1", "--logit-bias", "5"], "--logit-bias: expected ID=BIAS"),
    (["generate", "w1", "--logit-bias", "5=-101"], "the bias of token 5 must be a number in [-100, 100]"),
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


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_python_dash_m_runs_the_cli():
    done = run_python("-m", "freespec", "generate", "")
    assert done.returncode == 2 and done.stderr == "freespec: error: the prompt is empty\n"
    done = run_python("-m", "freespec", "--version")
    assert done.returncode == 0 and done.stdout == f"freespec {freespec.__version__}\n"


def test_a_reader_that_leaves_early_ends_the_run_quietly(tiny_model_dir):
    """`freespec generate ... | head` printed a BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "freespec", "generate", PROMPT, "--model", str(tiny_model_dir),
                                "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    process.stdout.close()  # the reader is gone before the first token is written
    _, err = process.communicate(timeout=300)
    assert process.returncode == cli.BROKEN_PIPE and b"Traceback" not in err and b"Error" not in err, err


def test_a_dash_reads_the_prompt_from_standard_input(tiny_model_dir):
    prompt = "w1 w2\nw3"
    expected = freespec.load(str(tiny_model_dir)).generate(prompt, max_new_tokens=6, drafter="none").text
    command = [sys.executable, "-m", "freespec", "generate", "-", "--model", str(tiny_model_dir), "--max-new-tokens", "6",
               "--drafter", "none", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, input=prompt.encode(), capture_output=True, env=env, cwd=REPO)
    assert done.returncode == 0 and done.stdout.decode() == expected + "\n", done.stderr
    done = subprocess.run(command, input=b"caf\xe9", capture_output=True, env=env, cwd=REPO)
    assert done.returncode == 2 and done.stderr == b"freespec: error: standard input is not UTF-8 text\n"


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    """They took 3.5-5 s, most of it importing torch and transformers that they do not need."""
    script = """
import contextlib, io, sys
from freespec.cli import main
for argv in (["--help"], ["--version"], ["generate", "w1", "--max-new-tokens", "0"], ["generate"],
             ["generate", "--input", "in.jsonl"], ["bench", "--limit", "0"], ["calibrate", "--repeats", "x"],
             ["serve", "--port", "x"], ["datastore", "build"], ["frobnicate"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    assert code == (2 if err.getvalue() else 0), (argv, code, err.getvalue())
print(sorted(name for name in ("torch", "transformers", "freespec.api") if name in sys.modules))
"""
    done = run_python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_package_names_load_on_first_use():
    done = run_python("-c", "import sys, freespec; print('torch' in sys.modules, freespec.load.__module__, "
                            "freespec.GenerationStats.__name__, 'torch' in sys.modules)")
    assert done.stdout == "False freespec.api GenerationStats True\n"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        freespec.nothing  # noqa: B018


def test_a_failed_start_leaves_the_output_alone(tiny_model_dir, tmp_path, capsys):
    """Before, ``--output`` was emptied before the model was even looked for."""
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": PROMPT})
    output = tmp_path / "out.jsonl"
    output.write_text("yesterday's results\n")
    assert "model not found: /nonexistent" in run_error(capsys, ["generate", "--model", "/nonexistent", "--input",
                                                                  str(source), "--output", str(output)])
    write_jsonl(source, "{not json", {"prompt": PROMPT})
    assert "line 1: invalid JSON" in run_error(capsys, ["generate", "--model", str(tiny_model_dir), "--input",
                                                         str(source), "--output", str(output)])
    assert output.read_text() == "yesterday's results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]  # no temporary file left


def test_the_output_is_replaced_in_one_step(tiny_model_dir, tmp_path, monkeypatch):
    """While the batch runs, the output keeps its old content; a killed process leaves it so."""
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": "w1 w2"}, {"prompt": "w3 w4"})
    output = tmp_path / "out.jsonl"
    output.write_text("yesterday's results\n")
    start, seen = cli._start, []

    def look_at_the_output(*args, **kwargs):
        seen.append(output.read_text())
        return start(*args, **kwargs)

    monkeypatch.setattr(cli, "_start", look_at_the_output)
    assert main(["generate", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                 "--max-new-tokens", "3", "--drafter", "none", "--quiet"]) == 0
    assert seen == ["yesterday's results\n"] * 2
    assert [r["prompt"] for r in read_jsonl(output)] == ["w1 w2", "w3 w4"]


def test_max_new_tokens_must_fit_the_context_with_the_prompt(tiny_model_dir, tmp_path, capsys):
    """As the server checks max_tokens; before, the limit was cut silently. The default is cut."""
    err = run_error(capsys, ["generate", PROMPT, "--model", str(tiny_model_dir), "--max-new-tokens", "600"])
    assert "max_new_tokens 600 + the prompt's " in err and "exceed the model's context of 512" in err
    source = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": PROMPT, "max_new_tokens": 509})
    err = run_error(capsys, ["generate", "--model", str(tiny_model_dir), "--input", str(source),
                             "--output", str(tmp_path / "out.jsonl")])
    assert "prompts.jsonl line 1: max_new_tokens 509 + the prompt's" in err
    long_prompt = " ".join(["w7"] * 500)
    left = 512 - len(freespec.load(str(tiny_model_dir)).encode(long_prompt, chat=False))
    assert main(["generate", long_prompt, "--model", str(tiny_model_dir), "--no-chat", "--drafter", "none"]) == 0
    assert f"[freespec] {left} tokens, " in capsys.readouterr().err  # 256 by default, cut to the context left


def test_a_mistyped_local_path_fails_at_once(tmp_path, monkeypatch, capsys):
    """Before, ``models/x`` was taken for a hub id: 50 s of network retries, then a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    err = run_error(capsys, ["generate", "w1", "--model", "models/x"])
    assert "model not found: models/x (no such file or directory" in err


def test_a_gguf_file_cut_short_is_a_one_line_error(tmp_path, capsys):
    """Before: a struct.error traceback from transformers' GGUF reader."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert f"cannot load GGUF file {cut}: it is cut short or damaged" in run_error(
        capsys, ["generate", "w1", "--model", str(cut)])


@pytest.mark.parametrize("drafter", ["recycling", "suffix"])
def test_state_file_warms_the_next_run(tiny_model_dir, tmp_path, capsys, drafter):
    state = tmp_path / "drafters.state"
    args = ["generate", "w1 w2 w3 w4", "--model", str(tiny_model_dir), "--max-new-tokens", "40", "--budget", "8",
            "--drafter", drafter, "--state", str(state)]
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
