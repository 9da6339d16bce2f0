"""The benchmark harness: questions, multi-turn prompts, metric formulas, resume, peers, reports, compare."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from freespec.api import Model, load
from freespec.bench import methods as bench_methods
from freespec.bench import report as bench_report
from freespec.bench import run as bench
from freespec.bench.methods import Output, Peer, Setup
from freespec.cli import main
from freespec.model.loading import from_transformers
from tests.helpers import tiny_model, word_tokenizer

MAX_NEW = 10


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(from_transformers(tiny_model("llama", scale=8.0), word_tokenizer(), "tiny"))


def write_questions(path: Path, *questions: tuple) -> Path:
    """(id, category, turns...) tuples as Spec-Bench lines."""
    path.write_text("".join(json.dumps({"question_id": q[0], "category": q[1], "turns": list(q[2:])}) + "\n"
                            for q in questions))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(qid, method, tokens, seconds, category="qa", turn=1, accepted=None, ids=None):
    r = {"question_id": qid, "category": category, "method": method, "turn": turn, "new_tokens": tokens,
         "seconds": seconds, "token_ids": ids if ids is not None else list(range(tokens))}
    if accepted is not None:
        r["accepted_lengths"] = accepted
    return r


# --- metrics -----------------------------------------------------------------------------------

def test_summary_formulas_on_hand_made_records():
    records = [
        record(1, "none", 10, 1.0, accepted=[1] * 10), record(1, "hf-greedy", 10, 2.0),
        record(1, "recycling", 10, 0.5, accepted=[3, 3, 2, 2]),
        # question 2 has two turns: its speeds sum both
        record(2, "none", 20, 1.0, category="math", accepted=[1] * 20),
        record(2, "none", 10, 1.0, category="math", turn=2, accepted=[1] * 10),
        record(2, "hf-greedy", 20, 4.0, category="math"), record(2, "hf-greedy", 10, 2.0, category="math", turn=2),
        record(2, "recycling", 20, 2.0, category="math", accepted=[2] * 10, ids=[9] * 20),
        record(2, "recycling", 10, 1.0, category="math", turn=2, accepted=[2] * 5),
        # hf-lookup is checked against hf-greedy, not against none
        record(1, "hf-lookup", 10, 1.0, accepted=[5, 5]), record(2, "hf-lookup", 20, 2.0, category="math", ids=[7] * 20),
    ]
    summary = bench_report.summarize(records, baseline="hf-greedy")
    overall = summary["overall"]
    assert list(overall) == ["none", "hf-greedy", "recycling", "hf-lookup"]
    # speedup: mean of per-question ratios; question 2 is (30 tokens / 2 s) / (30 / 6 s) = 3 for none
    assert overall["none"]["speedup"] == pytest.approx((2 + 3) / 2)  # question 1: (10/1)/(10/2) = 2
    assert overall["recycling"]["speedup"] == pytest.approx(((10 / 0.5) / 5 + (30 / 3) / 5) / 2)
    # hf-lookup lacks question 2's second turn: that question compares turn 1 alone, (20/2)/(20/4) = 2
    assert overall["hf-lookup"]["speedup"] == pytest.approx(((10 / 1) / 5 + 2) / 2)
    # tokens/s: totals over all turns; τ: tokens over forward passes of the records that count them
    assert overall["recycling"]["tokens_per_second"] == pytest.approx(40 / 3.5, abs=1e-3)
    assert overall["recycling"]["mean_accepted"] == pytest.approx(40 / 19, abs=1e-4)
    assert overall["hf-lookup"]["mean_accepted"] == 5.0
    assert "mean_accepted" not in overall["hf-greedy"]
    assert overall["none"]["questions"] == 2 and overall["none"]["turns"] == 3
    # identical: per question × turn, against each method's own reference
    assert overall["recycling"]["identical"] == pytest.approx(2 / 3, abs=1e-4)
    assert overall["recycling"]["reference"] == "none"
    assert overall["hf-lookup"]["reference"] == "hf-greedy" and overall["hf-lookup"]["identical"] == 0.5
    assert summary["categories"]["math"]["recycling"]["speedup"] == 2.0
    assert summary["accepted_histogram"]["recycling"] == {"2": 17, "3": 2}
    text = bench_report.markdown(summary)
    assert "| math | 15.0 tok/s, 3.00x, τ 1.00 | 5.0 tok/s, 1.00x | 10.0 tok/s, 2.00x, τ 2.00 | 10.0 tok/s, 2.00x |" in text
    assert "recycling 67% (vs none)" in text and "hf-lookup 50% (vs hf-greedy)" in text


def test_identical_rate_is_absent_when_the_reference_did_not_run():
    summary = bench_report.summarize([record(1, "hf-lookup", 4, 1.0), record(1, "none", 4, 1.0)], baseline="none")
    assert "identical" not in summary["overall"]["hf-lookup"]
    assert "hf-lookup n/a (hf-greedy not run)" in bench_report.markdown(summary)


# --- questions and prompts ---------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"question_id": 2, "category": "qa", "turns": ["x"]', "line 2: not JSON"),
    ('["w1"]', "line 2: expected a JSON object"),
    ('{"question_id": 2, "turns": ["x"]}', "line 2: missing category"),
    ('{"question_id": 2, "category": "qa", "turns": []}', "line 2: turns must be a non-empty list"),
    ('{"question_id": 2, "category": "qa", "turns": ["x", " "]}', "line 2: turns must be a non-empty list"),
    ('{"question_id": true, "category": "qa", "turns": ["x"]}', "line 2: question_id must be"),
    ('{"question_id": 1, "category": "qa", "turns": ["x"]}', "line 2: question_id 1 repeats line 1"),
])
def test_questions_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["w1"]}\n' + line + "\n")
    with pytest.raises(bench.BenchError, match=rf"q.jsonl {message}"):
        bench.load_questions(path)


def test_missing_questions_file_and_categories(tmp_path):
    with pytest.raises(bench.BenchError, match="not found"):
        bench.load_questions(tmp_path / "missing.jsonl")
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1"), (2, "math", "w2"), (3, "qa", "w3", "w4"))
    assert [q.question_id for q in bench.load_questions(path, categories=["qa"])] == [1, 3]
    assert [q.turns for q in bench.load_questions(path, per_category=1)] == [("w1",), ("w2",)]
    assert bench.load_questions(path)[2].turns == ("w3", "w4")
    with pytest.raises(bench.BenchError, match="no questions in categories: poetry"):
        bench.load_questions(path, categories=["poetry"])


def test_question_selection_on_the_real_file():
    questions = bench.load_questions(bench.DEFAULT_QUESTIONS, per_category=2)
    assert len(questions) == 26 and len({q.category for q in questions}) == 13
    assert all(len(q.turns) == 2 for q in questions if q.category == "writing")
    assert len(bench.load_questions(bench.DEFAULT_QUESTIONS, categories=["math"], limit=3)) == 3


class Echo:
    """A peer that answers every prompt with the same tokens and remembers the prompts it saw."""

    def __init__(self, answer: list[int]):
        self.answer, self.prompts = answer, []

    def __call__(self, setup: Setup):
        def run(prompt_ids: list[int]) -> Output:
            self.prompts.append(prompt_ids)
            return Output(self.answer, [1] * len(self.answer))
        return run


def test_later_turns_see_the_methods_own_answers(model, tmp_path, monkeypatch):
    echo = Echo(model.encode("w7 w8 w9", chat=False))
    monkeypatch.setitem(bench_methods.PEERS, "echo", Peer(echo, "none", lambda s: None, "test peer"))
    path = write_questions(tmp_path / "q.jsonl", (1, "writing", "w1 w2 w3", "w4 w5"), (2, "qa", "w6"))
    questions = bench.load_questions(path)
    out = tmp_path / "out"
    bench.run_bench(model, questions, ["none", "echo"], out, Setup(model, MAX_NEW), progress=False)
    records = {(r["question_id"], r["method"], r["turn"]): r for r in lines(out / "results.jsonl")}
    assert len(records) == 6 and len(lines(out / "results.jsonl")) == 6
    # echo's second turn was conditioned on echo's own first answer...
    assert echo.prompts[-2] == model.encode(messages=[
        {"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w7 w8 w9"},
        {"role": "user", "content": "w4 w5"}])
    # ...and none's on none's: generating from that prompt reproduces the recorded second turn
    first = records[1, "none", 1]
    prompt = model.encode(messages=bench.turn_messages(questions[0], 2, [first["text"]]))
    second = records[1, "none", 2]
    assert second["prompt_tokens"] == len(prompt)
    assert second["token_ids"] == model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=MAX_NEW).token_ids
    assert sum(second["accepted_lengths"]) == second["new_tokens"] == len(second["token_ids"])
    assert second["text"] == model.decode(second["token_ids"])


# --- resume ------------------------------------------------------------------------------------

def test_an_interrupted_run_resumes_without_losing_or_repeating(model, tmp_path, monkeypatch):
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2 w3", "w3 w2"), (2, "qa", "w4 w5"), (3, "math", "w6"))
    questions = bench.load_questions(path)
    methods = ["none", "recycling", "hf-greedy"]
    calls = {"n": 0}
    real_build = bench.build_method

    def flaky_build(method, setup):
        run = real_build(method, setup)

        def flaky(prompt_ids):
            calls["n"] += 1
            if calls["n"] == 3 + 5 + 1:  # 3 warm-ups and 5 turns done
                raise KeyboardInterrupt
            return run(prompt_ids)
        return flaky

    out = tmp_path / "out"
    monkeypatch.setattr(bench, "build_method", flaky_build)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(model, questions, methods, out, Setup(model, MAX_NEW), progress=False)
    monkeypatch.setattr(bench, "build_method", real_build)
    kept = (out / "results.jsonl").read_text()
    assert len(kept.splitlines()) == 5
    with open(out / "results.jsonl", "a") as results:  # a line cut short by a kill
        results.write('{"question_id": 2, "method": "no')
    with pytest.raises(bench.BenchError, match=r"cannot resume .*max_new_tokens 10 → 4"):
        bench.run_bench(model, questions, methods, out, Setup(model, 4), resume=True, progress=False)
    bench.run_bench(model, questions, methods, out, Setup(model, MAX_NEW), resume=True, progress=False)
    resumed = (out / "results.jsonl").read_text()
    assert resumed.startswith(kept)
    keys = [(r["question_id"], r["method"], r["turn"]) for r in lines(out / "results.jsonl")]
    assert len(keys) == len(set(keys)) == 4 * len(methods)
    # the same results as a run that was never interrupted (greedy: every method is deterministic)
    fresh = tmp_path / "fresh"
    bench.run_bench(model, questions, methods, fresh, Setup(model, MAX_NEW), progress=False)
    ids = lambda folder: {(r["question_id"], r["method"], r["turn"]): r["token_ids"] for r in lines(folder / "results.jsonl")}
    assert ids(out) == ids(fresh)
    # without --resume the results start over
    bench.run_bench(model, questions[2:], ["none"], out, Setup(model, 4), progress=False)
    assert len(lines(out / "results.jsonl")) == 1


# --- peers -------------------------------------------------------------------------------------

REPETITIVE = "w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6 w7"


def test_hf_peers_match_hf_greedy_and_count_passes(model, tiny_model_dir):
    setup = Setup(load(tiny_model_dir, draft_model=tiny_model_dir), 24)
    prompt = model.encode(REPETITIVE)
    outputs = {m: bench_methods.build_method(m, setup)(prompt) for m in ("hf-greedy", "hf-lookup", "hf-assisted")}
    assert outputs["hf-greedy"].accepted_lengths == [1] * len(outputs["hf-greedy"].token_ids)
    for method, output in outputs.items():
        assert output.token_ids == outputs["hf-greedy"].token_ids, method
        assert sum(output.accepted_lengths) == len(output.token_ids)
    # the draft model is the model itself: every drafted token is accepted
    assert max(outputs["hf-assisted"].accepted_lengths) > 1
    assert bench_methods.unavailable("hf-assisted", Setup(model, 4)).startswith("needs --draft-model")


def next_toy_token(context: np.ndarray) -> int:
    """The fake llama.cpp model: a cycle through a few tokens, then the stop token at 40 in context."""
    return 0 if len(context) >= 40 else (5 * int(context[-1]) + 3) % 17 + 4


class FakeLookup:
    """Stands in for llama_cpp.llama_speculative.LlamaPromptLookupDecoding: the tokens that followed
    the latest earlier occurrence of the last token."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10):
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        for start in range(len(input_ids) - 2, -1, -1):
            if input_ids[start] == input_ids[-1]:
                return input_ids[start + 1: start + 1 + self.num_pred_tokens]
        return np.array([], dtype=np.intc)


class FakeLlama:
    """Stands in for llama_cpp.Llama, following its documented generate loop: eval a batch, sample
    greedily at each new position, keep drafted tokens while they match, then ask the draft model."""

    made: list[FakeLlama] = []

    def __init__(self, model_path: str, *, n_ctx: int = 512, n_batch: int = 512, logits_all: bool = False,
                 draft_model=None, n_threads=None, n_threads_batch=None, seed: int = 0, verbose: bool = True):
        assert Path(model_path).is_file()
        self.n_ctx, self.draft_model, self.logits_all = n_ctx, draft_model, logits_all
        self.score_rows = n_ctx if logits_all else min(n_ctx, n_batch)
        self.input_ids, self.n_tokens, self.reused_prefix = np.zeros(n_ctx, dtype=np.intc), 0, False
        FakeLlama.made.append(self)

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens) -> None:
        if self.n_tokens + len(tokens) > self.n_ctx:
            raise RuntimeError("llama_decode returned 1")
        if self.draft_model is not None and self.n_tokens + len(tokens) > self.score_rows:
            raise ValueError("could not broadcast input array")  # what the real one does without logits_all
        self.input_ids[self.n_tokens: self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)

    def generate(self, tokens, temp: float = 0.8, repeat_penalty: float = 1.1, reset: bool = True):
        assert temp == 0.0 and repeat_penalty == 1.0
        self.reused_prefix |= reset and self.n_tokens > 0
        self.reset()
        sample_idx, tokens = self.n_tokens + len(tokens) - 1, list(tokens)
        while True:
            self.eval(tokens)
            while sample_idx < self.n_tokens:
                token = next_toy_token(self.input_ids[: sample_idx + 1])
                sample_idx += 1
                yield token
                tokens = [token]
                if sample_idx < self.n_tokens and token != self.input_ids[sample_idx]:
                    self.n_tokens = sample_idx
                    break
            if self.draft_model is not None:
                self.input_ids[self.n_tokens: self.n_tokens + len(tokens)] = tokens
                draft = self.draft_model(self.input_ids[: self.n_tokens + len(tokens)])
                tokens.extend(draft.astype(int)[: self.n_ctx - self.n_tokens - len(tokens)])


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    package, speculative = types.ModuleType("llama_cpp"), types.ModuleType("llama_cpp.llama_speculative")
    package.Llama, speculative.LlamaPromptLookupDecoding = FakeLlama, FakeLookup
    package.llama_speculative = speculative
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    FakeLlama.made.clear()


def test_llama_cpp_peers_through_the_documented_api(model, tmp_path, fake_llama_cpp):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2"), (2, "rag", "w3", "w4 w5"))
    methods = ["none", "llamacpp-greedy", "llamacpp-lookup"]
    setup = Setup(model, 64, gguf=gguf)
    assert bench.plan(methods, setup) == (methods, [])
    bench.run_bench(model, bench.load_questions(path), methods, tmp_path / "out", setup, progress=False)
    greedy, lookup = FakeLlama.made
    assert lookup.logits_all and not greedy.logits_all and greedy.n_ctx == lookup.n_ctx >= 64
    assert not greedy.reused_prefix and not lookup.reused_prefix  # every request prefills its whole prompt
    assert "eval" not in vars(greedy) and "eval" not in vars(lookup)  # the pass counter is removed afterwards
    records = {(r["question_id"], r["method"], r["turn"]): r for r in lines(tmp_path / "out" / "results.jsonl")}
    for (question, method, turn), r in records.items():
        if method != "none":
            assert r["token_ids"] == records[question, "llamacpp-greedy", turn]["token_ids"]
            assert r["token_ids"][-1] == 0 and 0 not in r["token_ids"][:-1]  # stops at the stop token
            assert sum(r["accepted_lengths"]) == r["new_tokens"] and r["forward_passes"] == len(r["accepted_lengths"])
    summary = bench_report.summarize(list(records.values()), "llamacpp-greedy")["overall"]
    assert summary["llamacpp-greedy"]["mean_accepted"] == 1.0
    assert summary["llamacpp-lookup"]["mean_accepted"] > 1.5
    assert summary["llamacpp-lookup"]["identical"] == 1.0 and summary["llamacpp-lookup"]["reference"] == "llamacpp-greedy"
    # length-limited too
    output = bench_methods.build_method("llamacpp-lookup", Setup(model, 5, gguf=gguf))(model.encode("w1"))
    assert len(output.token_ids) == 5


def test_llama_cpp_peers_are_skipped_with_a_note_when_missing(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    runnable, notes = bench.plan(["none", "llamacpp-greedy"], Setup(model, 4, gguf=Path("m.gguf")))
    assert runnable == ["none"]
    assert notes == ["llamacpp-greedy skipped: llama-cpp-python is not installed (pip install 'freespec[llamacpp]'; "
                     "it compiles llama.cpp, about 8 minutes)"]


def test_llama_cpp_needs_a_gguf_model(model, fake_llama_cpp):
    assert "needs a GGUF model" in bench_methods.unavailable("llamacpp-lookup", Setup(model, 4))


def test_methods_are_drafters_or_peers():
    bench_methods.check_methods(["none", "recycling", "hf-lookup", "none+recycling"])
    with pytest.raises(bench.BenchError, match="unknown methods: vllm"):
        bench_methods.check_methods(["none", "vllm"])


# --- reports -----------------------------------------------------------------------------------

def hand_made_folder(folder: Path, speed: float, same: bool = True) -> Path:
    folder.mkdir()
    records = [record(q, "none", 10, 1.0, category=c, accepted=[1] * 10) for q, c in [(1, "qa"), (2, "math")]]
    records += [record(q, "recycling", 10, 10 / speed, category=c, accepted=[2] * 5, ids=None if same else [3] * 10)
                for q, c in [(1, "qa"), (2, "math")]]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_report_files_and_plots(tmp_path):
    from PIL import Image

    out = hand_made_folder(tmp_path / "a", speed=15.0)
    summary = bench.write_reports(out, "none", "freespec bench --test", ["hf-assisted skipped: reason"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["command"] == "freespec bench --test" and saved["overall"]["recycling"]["speedup"] == 1.5
    assert saved["plots"] == ["speedup.png", "accepted.png"] == summary["plots"]
    text = (out / "summary.md").read_text()
    assert "| qa | 10.0 tok/s, 1.00x, τ 1.00 | 15.0 tok/s, 1.50x, τ 2.00 |" in text
    assert "recycling 100% (vs none)" in text and "- hf-assisted skipped: reason" in text
    assert "![speedup](speedup.png)" in text
    for name in bench_report.PLOTS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = hand_made_folder(tmp_path / "a", speed=15.0)
    summary = bench.write_reports(out, "none", "x")
    assert summary["plots"] == [] and not (out / "speedup.png").exists()
    assert "plots skipped: matplotlib is not installed" in (out / "summary.md").read_text()


def test_compare_shows_per_method_and_category_changes(tmp_path, capsys):
    a = hand_made_folder(tmp_path / "a", speed=10.0)
    b = hand_made_folder(tmp_path / "b", speed=12.0, same=False)
    bench.write_reports(a, "none", "x")
    table = bench_report.compare(a, b)  # b has only results.jsonl: summarised on the fly
    assert "| recycling | **overall** | 2 → 2 (+0) | 10.0 → 12.0 (+20.0%) | 1.00 → 1.20 (+0.20) | 2.00 → 2.00 (+0.00) | " \
           "100% → 0% (-100%) |" in table
    assert "| recycling | math |" in table and "| none | qa | 1 → 1 (+0) | 10.0 → 10.0 (+0.0%) |" in table
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    assert capsys.readouterr().out == table
    with pytest.raises(bench.BenchError, match="holds no summary.json or results.jsonl"):
        bench_report.compare(a, tmp_path)


# --- command line ------------------------------------------------------------------------------

def test_a_base_model_without_a_chat_template_gets_raw_text(tmp_path):
    """Gemma-3-270M has no chat template: each turn is the conversation so far as raw text."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = None
    plain = Model(from_transformers(tiny_model("llama"), tokenizer, "plain"))
    questions = bench.load_questions(write_questions(tmp_path / "q.jsonl", (1, "qa", "w1", "w2")))
    assert bench.turn_prompt(plain, questions[0], 2, ["w3 w4"]) == plain.encode("w1\n\nw3 w4\n\nw2\n\n", chat=False)
    bench.run_bench(plain, questions, ["none", "hf-greedy"], tmp_path / "out", Setup(plain, 4), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    by_method = {(r["method"], r["turn"]): r["text"] for r in records}
    assert by_method["none", 1] == by_method["hf-greedy", 1]


def test_cli_bench_errors(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["w1"]}\n{"question_id": 2}\n')
    assert main(["bench", "--questions", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"freespec: error: {path} line 2: missing category, turns"
    for content, message in ((b"\n", "holds no questions"), (b"\xff\xfe{", "is not UTF-8 text")):  # tracebacks before
        path.write_bytes(content)
        assert main(["bench", "--questions", str(path)]) == 2
        assert capsys.readouterr().err.strip() == f"freespec: error: {path} {message}"
    assert main(["bench", "--methods", "none,vllm"]) == 2
    assert "unknown methods: vllm" in capsys.readouterr().err
    assert main(["bench", "--methods", "none", "--baseline", "hf-greedy", "--questions", str(path)]) == 2
    assert "the baseline hf-greedy is not among --methods" in capsys.readouterr().err
    # an --out that cannot be a folder is named before the model loads (a traceback after the load before)
    good = tmp_path / "good.jsonl"
    good.write_text('{"question_id": 1, "category": "qa", "turns": ["w1"]}\n')
    for out, message in ((good, f"{good} is a file; --out names a folder"),
                         (good / "out", f"cannot write {good / 'out'}: Not a directory")):
        assert main(["bench", "--questions", str(good), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"freespec: error: {message}"


def test_cli_bench_runs_and_notes_skipped_peers(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2", "w3"), (2, "qa", "w4"))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(path), "--limit", "1", "--out", str(out),
                 "--methods", "none,hf-greedy,hf-lookup,llamacpp-greedy", "--max-new-tokens", "4", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "[freespec] llamacpp-greedy skipped: llama-cpp-python is not installed" in captured.err
    assert "| **overall** |" in captured.out and "hf-lookup 100% (vs hf-greedy)" in captured.out
    assert len(lines(out / "results.jsonl")) == 2 * 3
    assert json.loads((out / "run.json").read_text())["seed"] == 3


def test_cli_bench_budget_fixes_the_draft_size(tiny_model_dir, tmp_path, capsys):
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2 w3 w1 w2"))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(path), "--out", str(out), "--quiet",
                 "--methods", "none,recycling", "--baseline", "none", "--max-new-tokens", "6", "--budget", "3", "--tree", "static"]) == 0
    records = {record["method"]: record for record in lines(out / "results.jsonl")}
    assert set(records["recycling"]["draft_sizes"]) == {3}
    assert records["recycling"]["token_ids"] == records["none"]["token_ids"]
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(path), "--out", str(out), "--quiet",
                 "--methods", "none,recycling", "--baseline", "none", "--max-new-tokens", "6", "--resume"]) == 2
    assert "other settings (budget 3 → None; tree 'static' → 'dynamic')" in capsys.readouterr().err


def test_cli_bench_draft_model_runs_the_methods_asked_for(tiny_model_dir, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", (1, "qa", "w1 w2 w3"))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(path), "--out", str(out), "--quiet",
                 "--methods", "none,draft-model", "--baseline", "none", "--draft-model", str(tiny_model_dir),
                 "--max-new-tokens", "6"]) == 0
    records = lines(out / "results.jsonl")
    assert sorted(r["method"] for r in records) == ["draft-model", "none"]  # no hf-assisted added
    assert records[0]["token_ids"] == records[1]["token_ids"]
