"""What ``freespec bench`` needs from a plain install, and what it must not lose: the shipped
Spec-Bench questions, consistent defaults, an atomic rewrite of results.jsonl on resume."""

from __future__ import annotations

import builtins
import fnmatch
import io
import json
import tomllib
from pathlib import Path

import pytest

from freespec.bench import run as bench
from freespec.cli import main
from tests.bench.test_bench import lines, write_questions

REPO = Path(__file__).parents[2]


def test_the_spec_bench_questions_ship_with_the_package():
    """Before, the default questions file lay outside the package, in the checkout's ../shared."""
    package = REPO / "freespec"
    assert bench.DEFAULT_QUESTIONS.is_relative_to(package)
    assert len(bench.load_questions(bench.DEFAULT_QUESTIONS)) == 480
    folder = bench.DEFAULT_QUESTIONS.parent
    assert "Apache License" in (folder / "LICENSE").read_text() and "Spec-Bench" in (folder / "NOTICE").read_text()
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["freespec"]
    for name in (bench.DEFAULT_QUESTIONS.name, "LICENSE", "NOTICE"):
        relative = (folder / name).relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_default_baseline_is_among_the_methods(tiny_model_dir, tmp_path, capsys):
    """``--methods`` without hf-greedy failed: hf-greedy is the baseline by default. Now the
    baseline is hf-greedy only if it runs, else the first method."""
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2"))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(path), "--out", str(out), "--quiet",
                 "--methods", "recycling,none", "--max-new-tokens", "4"]) == 0
    assert "recycling" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["baseline"] == "recycling"


def test_a_failed_resume_rewrite_keeps_every_result(tmp_path, monkeypatch):
    """Resuming rewrites results.jsonl without the line an interruption cut short; a write that
    fails part way (a full disk, a killed process) used to leave it truncated."""
    out = tmp_path / "out"
    out.mkdir()
    records = [{"question_id": q, "category": "qa", "method": "none", "turn": 1, "new_tokens": 1, "seconds": 0.1,
                "token_ids": [5], "text": "w1"} for q in range(3)]
    results = out / "results.jsonl"
    before = "".join(json.dumps(r) + "\n" for r in records) + '{"question_id": 3, "meth'
    results.write_text(before)
    real_open = builtins.open

    class HalfWritten:
        """A results file whose write stops half way with a full disk."""

        def __init__(self, file):
            self.file = file

        def write(self, text: str) -> int:
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    def failing_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return HalfWritten(handle) if "results.jsonl" in str(file) and mode[0] in "wx" else handle

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        bench._done_records(out, {"model": "tiny"}, resume=True)
    monkeypatch.undo()
    assert results.read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "run.json"]
    assert [r["question_id"] for r in bench._done_records(out, {"model": "tiny"}, resume=True).values()] == [0, 1, 2]
    assert [r["question_id"] for r in lines(results)] == [0, 1, 2]
