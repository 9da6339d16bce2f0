"""The benchmark harness: question loading, metric formulas, resume, report files."""

import json

import pytest

from freespec import bench
from freespec.api import Model
from freespec.loading import LoadedModel
from conftest import tiny_model, word_tokenizer


def record(qid, method, tokens, seconds, category="qa", passes=None, ids=None):
    r = {"question_id": qid, "category": category, "method": method, "new_tokens": tokens, "seconds": seconds,
         "token_ids": ids if ids is not None else list(range(tokens))}
    if passes is not None:
        r["forward_passes"] = passes
    return r


def test_summary_formulas_on_hand_made_records():
    records = [
        record(1, "none", 10, 1.0, passes=10), record(1, "hf-greedy", 10, 2.0), record(1, "recycling", 10, 0.5, passes=4),
        record(2, "none", 20, 1.0, passes=20, category="math"), record(2, "hf-greedy", 20, 4.0, category="math"),
        record(2, "recycling", 20, 2.0, passes=10, category="math", ids=[9] * 20),
    ]
    summary = bench.summarize(records, baseline="hf-greedy")
    overall = summary["overall"]
    assert list(overall) == ["none", "hf-greedy", "recycling"]
    # speedup: mean of per-question ratios: none (10/1)/(10/2) = 2 and (20/1)/(20/4) = 4
    assert overall["none"]["speedup"] == 3.0
    assert overall["recycling"]["speedup"] == pytest.approx((4 + 2) / 2)
    # tokens/s: totals; tau: tokens over forward passes
    assert overall["recycling"]["tokens_per_second"] == pytest.approx(30 / 2.5)
    assert overall["recycling"]["mean_accepted"] == pytest.approx(30 / 14, abs=1e-4)
    assert "mean_accepted" not in overall["hf-greedy"]
    # identical: question 2's recycling output differs from the reference
    assert overall["recycling"]["identical"] == 0.5 and overall["hf-greedy"]["identical"] == 1.0
    assert summary["categories"]["math"]["recycling"]["speedup"] == 2.0
    text = bench.markdown(summary, "test machine", "freespec bench --limit 2")
    assert "| math | 20.0 tok/s, 4.00x, τ 1.00 | 5.0 tok/s, 1.00x | 10.0 tok/s, 2.00x, τ 2.00 |" in text
    assert "recycling 50%" in text and "Machine: test machine" in text


def test_questions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(bench.BenchError, match=r"q.jsonl line 3: not a Spec-Bench question"):
        bench.load_questions(path)
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["  "]}\n')
    with pytest.raises(bench.BenchError, match="line 1: the first turn must be a non-empty string"):
        bench.load_questions(path)
    with pytest.raises(bench.BenchError, match="not found"):
        bench.load_questions(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not bench.DEFAULT_QUESTIONS.is_file(), reason="Spec-Bench questions not beside the checkout")
def test_question_selection_on_the_real_file():
    questions = bench.load_questions(bench.DEFAULT_QUESTIONS, per_category=2)
    assert len(questions) == 26 and len({q.category for q in questions}) == 13
    assert len(bench.load_questions(bench.DEFAULT_QUESTIONS, categories=["math"], limit=3)) == 3
    with pytest.raises(bench.BenchError, match="no questions in categories: poetry"):
        bench.load_questions(bench.DEFAULT_QUESTIONS, categories=["poetry"])


def test_run_resume_and_reports(tmp_path):
    model = Model(LoadedModel(tiny_model("llama", scale=8.0), word_tokenizer(), "tiny", None))
    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text("".join(
        json.dumps({"question_id": i, "category": c, "turns": [f"w{i} w{i + 1} w{i + 2}"]}) + "\n"
        for i, c in [(1, "qa"), (2, "qa"), (3, "math")]))
    questions = bench.load_questions(questions_file)
    out = tmp_path / "out"
    methods = ["none", "recycling", "hf-greedy"]
    bench.run_bench(model, questions[:2], methods, out, max_new_tokens=12, progress=False)
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 6
    # an interrupted run resumes: done lines are kept, only the missing question runs
    bench.run_bench(model, questions, methods, out, max_new_tokens=12, resume=True, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[:6] == first and len(lines) == 9
    summary = bench.write_reports(out, "hf-greedy", "freespec bench --test")
    assert summary["overall"]["recycling"]["identical"] == 1.0
    assert summary["overall"]["hf-greedy"]["identical"] == 1.0
    assert json.loads((out / "summary.json").read_text())["command"] == "freespec bench --test"
    assert "| **overall** |" in (out / "summary.md").read_text()
    # without --resume the results start over
    bench.run_bench(model, questions[:1], ["none"], out, max_new_tokens=4, progress=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
