"""Spec-Bench-style benchmark: the same questions, settings and machine for every method.

Methods are freespec drafters (``none``, ``recycling``) and peers (``hf-greedy``: transformers'
own ``generate``). Each question's first turn is chat-formatted and generated greedily by every
method in turn (interleaved, so drift of the machine hits all methods alike), after one warm-up.

Outputs in ``--out``: ``results.jsonl`` (one line per question × method, appended as each
finishes, so an interrupted run loses nothing and ``--resume`` skips what is done),
``summary.json`` and ``summary.md``.

Metrics: tokens/s is total new tokens over total wall seconds (prefill included); speedup is the
mean over questions of a method's tokens/s divided by the baseline's on the same question;
τ (mean accepted tokens per forward pass, bonus token included) for freespec methods; identical
is the share of questions whose token ids equal the greedy reference (freespec ``none``).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from freespec.api import Model

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"
REFERENCE = "none"
PEERS = ("hf-greedy",)


class BenchError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    prompt: str


def load_questions(path: Path, categories: list[str] | None = None, per_category: int | None = None,
                   limit: int | None = None) -> list[Question]:
    """Spec-Bench JSONL: one ``{"question_id", "category", "turns": [str, ...]}`` per line."""
    if not path.is_file():
        raise BenchError(f"questions file not found: {path} (pass a Spec-Bench JSONL with --questions)")
    questions, taken = [], defaultdict(int)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question = Question(record["question_id"], str(record["category"]), record["turns"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            raise BenchError(f"{path} line {number}: not a Spec-Bench question ({error})") from None
        if not isinstance(question.prompt, str) or not question.prompt.strip():
            raise BenchError(f"{path} line {number}: the first turn must be a non-empty string")
        if categories and question.category not in categories:
            continue
        if per_category and taken[question.category] >= per_category:
            continue
        taken[question.category] += 1
        questions.append(question)
    if categories and (missing := set(categories) - set(taken)):
        raise BenchError(f"no questions in categories: {', '.join(sorted(missing))}")
    return questions[:limit] if limit else questions


def method_runner(model: Model, method: str, max_new_tokens: int) -> Callable[[list[int]], dict]:
    """A function prompt ids → result record for one method."""
    if method == "hf-greedy":
        stop = sorted(model.stop_ids)

        def run(prompt_ids: list[int]) -> dict:
            inputs = torch.tensor([prompt_ids])
            with torch.inference_mode():
                output = model.hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                                 max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=stop[0])
            return {"token_ids": output[0, len(prompt_ids):].tolist()}

        return run

    def run(prompt_ids: list[int]) -> dict:
        result = model.generate(prompt_ids=prompt_ids, drafter=method, max_new_tokens=max_new_tokens)
        stats = result.stats
        return {"token_ids": result.token_ids, "forward_passes": stats.forward_passes,
                "accepted_lengths": stats.accepted_lengths, "draft_sizes": stats.draft_sizes}

    return run


def run_bench(model: Model, questions: list[Question], methods: list[str], out: Path, max_new_tokens: int,
              resume: bool = False, progress: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = set()
    if resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done.add((record["question_id"], record["method"]))
    elif results_path.exists():
        results_path.unlink()
    runners = {m: method_runner(model, m, max_new_tokens) for m in methods}
    warm = model.encode("Say hello.")
    for run in runners.values():
        run(warm)
    todo = [(q, m) for q in questions for m in methods if (q.question_id, m) not in done]
    with open(results_path, "a", encoding="utf-8") as results, \
            tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for question, method in todo:
            prompt_ids = model.encode(question.prompt)
            started = time.perf_counter()
            record = runners[method](prompt_ids)
            seconds = time.perf_counter() - started
            record.update(question_id=question.question_id, category=question.category, method=method,
                          seconds=round(seconds, 4), new_tokens=len(record["token_ids"]),
                          text=model.decode(record["token_ids"]))
            results.write(json.dumps(record, ensure_ascii=False) + "\n")
            results.flush()
            bar.set_postfix_str(f"q {question.question_id} {method} {record['new_tokens'] / seconds:.1f} tok/s")
            bar.update()
    return results_path


def summarize(records: list[dict], baseline: str) -> dict:
    """Per method (and per category): tokens/s, τ, speedup vs ``baseline``, identical-output rate."""
    by_key = {(r["question_id"], r["method"]): r for r in records}
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != REFERENCE, m))

    def metrics(rows: list[dict]) -> dict:
        tokens = sum(r["new_tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        entry = {"questions": len(rows), "new_tokens": tokens, "seconds": round(seconds, 3),
                 "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0}
        passes = [r["forward_passes"] for r in rows if "forward_passes" in r]
        if passes:
            entry["mean_accepted"] = round(sum(r["new_tokens"] for r in rows if "forward_passes" in r) / sum(passes), 4)
        ratios, same = [], []
        for r in rows:
            base = by_key.get((r["question_id"], baseline))
            if base and base["seconds"] and r["seconds"] and base["new_tokens"]:
                ratios.append((r["new_tokens"] / r["seconds"]) / (base["new_tokens"] / base["seconds"]))
            reference = by_key.get((r["question_id"], REFERENCE))
            if reference:
                same.append(r["token_ids"] == reference["token_ids"])
        if ratios:
            entry["speedup"] = round(statistics.fmean(ratios), 4)
        if same:
            entry["identical"] = round(sum(same) / len(same), 4)
        return entry

    summary = {"baseline": baseline, "reference": REFERENCE, "overall": {}, "categories": {}}
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        summary["overall"][method] = metrics(rows)
        for category in sorted({r["category"] for r in rows}):
            summary["categories"].setdefault(category, {})[method] = metrics([r for r in rows if r["category"] == category])
    return summary


def markdown(summary: dict, machine: str, command: str) -> str:
    methods = list(summary["overall"])

    def row(name: str, entries: dict) -> str:
        cells = []
        for method in methods:
            e = entries.get(method)
            if e is None:
                cells.append("")
                continue
            tau = f", τ {e['mean_accepted']:.2f}" if "mean_accepted" in e else ""
            cells.append(f"{e['tokens_per_second']:.1f} tok/s, {e.get('speedup', float('nan')):.2f}x{tau}")
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = [f"Machine: {machine}", f"Command: `{command}`", "",
             f"Cells: tokens/s, speedup vs `{summary['baseline']}` (mean of per-question ratios), τ = mean accepted tokens per forward pass.", "",
             "| category | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for category, entries in summary["categories"].items():
        lines.append(row(category, entries))
    lines.append(row("**overall**", summary["overall"]))
    lines.append("")
    lines.append("Identical output to freespec `none` (plain greedy): " + ", ".join(
        f"{m} {summary['overall'][m].get('identical', float('nan')):.0%}" for m in methods))
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    from freespec.calibrate import _cpu_name

    return f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_reports(out: Path, baseline: str, command: str) -> dict:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    summary = summarize(records, baseline)
    summary["machine"] = machine_description()
    summary["command"] = command
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, summary["machine"], command))
    return summary
