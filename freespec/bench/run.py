"""Spec-Bench-style benchmark: the same questions, prompts, settings and machine for every method.

Methods (:mod:`freespec.bench.methods`) are freespec drafters and peers (transformers' ``generate``
greedy, with prompt lookup or an assistant model; llama.cpp greedy and prompt lookup). Every turn
of every question is chat-formatted (raw text for a base model without a chat template, such as
Gemma-3-270M); a later turn sees the earlier questions and the method's *own* earlier answers, as
in MT-Bench. Methods run interleaved per question and turn (drift of the machine hits all alike),
after one warm-up each, with the RNG seeded per question and turn.

Outputs in ``--out``: ``results.jsonl`` (one line per question × method × turn, appended as each
finishes, so an interrupted run loses nothing and ``--resume`` skips what is done), ``run.json``
(the settings a resumed run must share), ``summary.json``, ``summary.md`` and PNG plots
(:mod:`freespec.bench.report`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freespec.api import Model
from freespec.bench.methods import BenchError, Setup, build_method, unavailable
from freespec.bench.report import PLOTS, load_records, markdown, plot, summarize
from freespec.paths import write_atomically

DEFAULT_QUESTIONS = Path(__file__).resolve().parent / "data" / "spec_bench_questions.jsonl"
"""Spec-Bench's 480 questions, shipped with freespec (Apache-2.0: see LICENSE and NOTICE beside it)."""
WARM_UP = "Say hello."

__all__ = ["BenchError", "DEFAULT_QUESTIONS", "Question", "load_questions", "plan", "run_bench", "write_reports"]


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def _parse_question(line: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with question_id, category and turns")
    missing = [key for key in ("question_id", "category", "turns") if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise ValueError(f"question_id must be an integer or a string, got {qid!r}")
    if not isinstance(category, str) or not category.strip():
        raise ValueError("category must be a non-empty string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("turns must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns))


def load_questions(path: Path, categories: list[str] | None = None, per_category: int | None = None,
                   limit: int | None = None) -> list[Question]:
    """Spec-Bench JSONL: one ``{"question_id", "category", "turns": [str, ...]}`` per line.

    The whole file is checked, so a bad line is reported before any generation starts.
    """
    if not path.is_file():
        raise BenchError(f"questions file not found: {path} (pass a Spec-Bench JSONL with --questions)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"{path} is not UTF-8 text") from None
    questions, seen, taken = [], {}, defaultdict(int)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            question = _parse_question(line)
        except ValueError as error:
            raise BenchError(f"{path} line {number}: {error}") from None
        if question.question_id in seen:
            raise BenchError(f"{path} line {number}: question_id {question.question_id!r} repeats line "
                             f"{seen[question.question_id]}")
        seen[question.question_id] = number
        if categories and question.category not in categories:
            continue
        if per_category and taken[question.category] >= per_category:
            continue
        taken[question.category] += 1
        questions.append(question)
    if not seen:
        raise BenchError(f"{path} holds no questions")
    if categories and (missing := set(categories) - set(taken)):
        raise BenchError(f"no questions in categories: {', '.join(sorted(missing))}")
    return questions[:limit] if limit else questions


def turn_messages(question: Question, turn: int, answers: list[str]) -> list[dict]:
    """Chat messages for ``turn`` (1-based): the earlier questions with the method's own answers.

    >>> turn_messages(Question(1, "qa", ("Hi?", "And?")), 2, ["Hello."])  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': 'Hi?'}, {'role': 'assistant', 'content': 'Hello.'},
     {'role': 'user', 'content': 'And?'}]
    """
    messages = []
    for asked, answer in zip(question.turns[: turn - 1], answers, strict=True):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question.turns[turn - 1]}]


def turn_prompt(model: Model, question: Question, turn: int, answers: list[str]) -> list[int]:
    """The token ids of ``turn``: its :func:`turn_messages` chat-formatted, or, for a model without a
    chat template (a base model), raw text: the earlier questions and answers and this question,
    each followed by a blank line."""
    if model.has_chat_template:
        return model.encode(messages=turn_messages(question, turn, answers))
    earlier = zip(question.turns[: turn - 1], answers, strict=True)
    texts = [text for asked, answer in earlier for text in (asked, answer)]
    return model.encode("".join(text + "\n\n" for text in [*texts, question.turns[turn - 1]]), chat=False)


def context_bound(model: Model, questions: list[Question], max_new_tokens: int, slack: int = 64) -> int:
    """Tokens a conversation can reach: all its turns, each answer at most ``max_new_tokens``.

    Sizes llama.cpp's context. ``slack`` covers a draft past the end and re-tokenised answers.
    """
    longest = 0
    for question in questions:
        answers = ["."] * (len(question.turns) - 1)
        prompt = turn_prompt(model, question, len(question.turns), answers)
        longest = max(longest, len(prompt) + len(question.turns) * (max_new_tokens + slack))
    return min(-(-longest // 256) * 256, model.runner.max_positions)


def plan(methods: list[str], setup: Setup) -> tuple[list[str], list[str]]:
    """The methods that can run with ``setup``, and a note for each that cannot."""
    runnable, notes = [], []
    for method in methods:
        reason = unavailable(method, setup)
        if reason:
            notes.append(f"{method} skipped: {reason}")
        else:
            runnable.append(method)
    return runnable, notes


def _seed(seed: int, question_id: int | str, turn: int) -> None:
    """The same RNG state for every method on one question and turn, resumed or not."""
    value = zlib.crc32(f"{seed}/{question_id}/{turn}".encode())
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _done_records(out: Path, settings: dict, resume: bool) -> dict[tuple, dict]:
    """Records already in ``out`` (resume), else an emptied folder; checks settings agree."""
    results, run_file = out / "results.jsonl", out / "run.json"
    if not resume:
        results.unlink(missing_ok=True)
        write_atomically(run_file, json.dumps(settings, indent=1))
        return {}
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        changed = [f"{key} {before[key]!r} → {value!r}" for key, value in settings.items()
                   if key in before and before[key] != value]  # keys newer than the folder are not compared
        if changed:
            raise BenchError(f"cannot resume {out}: its results were made with other settings ({'; '.join(changed)}); "
                             "run without --resume to start over, or choose another --out")
    write_atomically(run_file, json.dumps(settings, indent=1))
    if not results.exists():
        return {}
    records = load_records(results)
    # rewrite without a line cut short by the interruption, so appending starts on a fresh line;
    # atomically, since the file holds every result so far
    write_atomically(results, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {(r["question_id"], r["method"], r["turn"]): r for r in records}


def run_bench(model: Model, questions: list[Question], methods: list[str], out: Path, setup: Setup,
              resume: bool = False, progress: bool = True) -> Path:
    """Run every method over every turn of ``questions``; append each result to out/results.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model.name, "max_new_tokens": setup.max_new_tokens, "seed": setup.seed,
                "sampling": dataclasses.asdict(setup.sampling), "budget": model.fixed_budget,
                "tree": model.tree_shape, "datastore": str(model.datastore) if model.datastore else None}
    settings = json.loads(json.dumps(settings))  # as run.json gives them back (tuples as lists)
    done = _done_records(out, settings, resume)
    todo = [(q, turn, m) for q in questions for turn in range(1, len(q.turns) + 1) for m in methods
            if (q.question_id, m, turn) not in done]
    if not todo:
        return out / "results.jsonl"
    try:
        setup = dataclasses.replace(setup, context=context_bound(model, questions, setup.max_new_tokens))
        generate = {m: build_method(m, setup) for m in methods}
        warm = turn_prompt(model, Question("warm-up", "", (WARM_UP,)), 1, [])
    except ValueError as error:
        raise BenchError(str(error)) from None
    for run in generate.values():
        run(warm)
    totals = defaultdict(lambda: [0, 0.0, 0])  # method → new tokens, seconds, forward passes
    with open(out / "results.jsonl", "a", encoding="utf-8") as results, \
            tqdm(total=len(todo), unit="turn", disable=not progress, dynamic_ncols=True) as bar:
        for question, turn, method in todo:
            answers = [done[question.question_id, method, t]["text"] for t in range(1, turn)]
            try:
                prompt_ids = turn_prompt(model, question, turn, answers)
            except ValueError as error:
                raise BenchError(f"question {question.question_id} turn {turn}: {error}") from None
            total = totals[method]  # this method's new tokens, seconds and forward passes so far
            bar.set_postfix_str(f"q {question.question_id} turn {turn} {method} ({_running(*total)})")
            _seed(setup.seed, question.question_id, turn)
            started = time.perf_counter()
            try:
                output = generate[method](prompt_ids)
            except ValueError as error:
                raise BenchError(f"question {question.question_id} turn {turn}, {method}: {error}") from None
            seconds = time.perf_counter() - started
            record = {"question_id": question.question_id, "category": question.category, "turn": turn,
                      "method": method, "prompt_tokens": len(prompt_ids), "new_tokens": len(output.token_ids),
                      "seconds": round(seconds, 4), "forward_passes": len(output.accepted_lengths),
                      "text": model.decode(output.token_ids), "token_ids": output.token_ids,
                      "accepted_lengths": output.accepted_lengths}
            if output.draft_sizes is not None:
                record["draft_sizes"] = output.draft_sizes
            if output.sampled:
                record["sampled"] = True
            results.write(json.dumps(record, ensure_ascii=False) + "\n")
            results.flush()
            done[question.question_id, method, turn] = record
            totals[method] = [total[0] + record["new_tokens"], total[1] + seconds, total[2] + record["forward_passes"]]
            bar.update()
    return out / "results.jsonl"


def _running(tokens: int, seconds: float, passes: int) -> str:
    """Progress-bar figures for one method so far.

    >>> _running(30, 2.0, 20), _running(0, 0.0, 0)
    ('15.0 tok/s, τ 1.50', 'first run')
    """
    return f"{tokens / seconds:.1f} tok/s, τ {tokens / max(passes, 1):.2f}" if seconds else "first run"


def machine_description() -> str:
    from freespec.engine.costs import cpu_name
    from freespec.kernels import select

    kernels = f"{select().isa} kernels"
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, {kernels}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_reports(out: Path, baseline: str, command: str, notes: list[str] = ()) -> dict:
    """summary.json, summary.md and the plots, from out/results.jsonl."""
    summary = summarize(load_records(out / "results.jsonl"), baseline)
    summary.update(machine=machine_description(), command=command, notes=list(notes))
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    try:
        summary["plots"] = plot(summary, out)
    except ImportError:
        summary["plots"] = []
        summary["notes"].append("plots skipped: matplotlib is not installed (pip install 'freespec[bench]')")
    write_atomically(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    write_atomically(out / "summary.md", markdown(summary))
    return summary
