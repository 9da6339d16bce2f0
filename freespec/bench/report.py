"""Benchmark reports from result records: metrics, summary.md, PNG plots, and run-to-run comparison.

A record is one line of ``results.jsonl``: one question × method × turn with ``token_ids``,
``new_tokens``, ``seconds`` and ``accepted_lengths`` (tokens emitted per forward pass of the target
model, so ``len(accepted_lengths)`` is its forward passes).

Metrics, per method, per category and overall:

- tokens/s: total new tokens over total wall seconds (prefill included);
- speedup: the mean over questions of the method's tokens/s over the baseline's on the same
  question, both summed over the turns both have (Spec-Bench's per-question speed);
- τ: new tokens over forward passes (the bonus token included; plain decoding has 1);
- identical: the share of question × turn records whose tokens equal those of the method's
  reference (its own engine's greedy method) on the same question and turn. When sampling, only
  freespec methods are compared (with ``none``, seeded alike: each emitted token consumes one
  random number whatever the drafter, so the text must match); for the others it is n/a.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from freespec.bench.methods import REFERENCE, BenchError, is_drafter, reference_of

PLOTS = ("speedup.png", "accepted.png")


def _order(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (m != REFERENCE, reference_of(m) != REFERENCE, m))


def summarize(records: list[dict], baseline: str) -> dict:
    """Per method (overall and per category): tokens/s, τ, speedup vs ``baseline``, identical rate."""
    by_key = {(r["question_id"], r["method"], r["turn"]): r for r in records}
    methods = _order({r["method"] for r in records})

    def speed(method: str, question, turns: set[int]) -> float | None:
        rows = [by_key[question, method, t] for t in turns]
        seconds = sum(r["seconds"] for r in rows)
        return sum(r["new_tokens"] for r in rows) / seconds if seconds else None

    def metrics(method: str, rows: list[dict]) -> dict:
        tokens = sum(r["new_tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        entry = {"questions": len({r["question_id"] for r in rows}), "turns": len(rows), "new_tokens": tokens,
                 "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0}
        passes = sum(len(r["accepted_lengths"]) for r in rows if "accepted_lengths" in r)
        if passes:
            entry["mean_accepted"] = round(sum(r["new_tokens"] for r in rows if "accepted_lengths" in r) / passes, 4)
        turns = defaultdict(set)
        for r in rows:
            turns[r["question_id"]].add(r["turn"])
        ratios = []
        for question, mine in turns.items():
            common = {t for t in mine if (question, baseline, t) in by_key}
            if common and (base := speed(baseline, question, common)) and (own := speed(method, question, common)):
                ratios.append(own / base)
        if ratios:
            entry["speedup"] = round(statistics.fmean(ratios), 4)
        reference = reference_of(method)
        same = [r["token_ids"] == by_key[key]["token_ids"] for r in rows
                if (key := (r["question_id"], reference, r["turn"])) in by_key and comparable(r, by_key[key])]
        entry["reference"] = reference
        if any(r.get("sampled") for r in rows):
            entry["sampled"] = True
        if same:
            entry["identical"] = round(sum(same) / len(same), 4)
        return entry

    summary = {"baseline": baseline, "overall": {}, "categories": {}, "accepted_histogram": {}}
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        summary["overall"][method] = metrics(method, rows)
        lengths = Counter(n for r in rows for n in r.get("accepted_lengths", []))
        summary["accepted_histogram"][method] = {str(n): lengths[n] for n in sorted(lengths)}
        for category in sorted({r["category"] for r in rows}):
            summary["categories"].setdefault(category, {})[method] = metrics(
                method, [r for r in rows if r["category"] == category])
    return summary


def comparable(record: dict, reference: dict) -> bool:
    """Whether ``record`` must reproduce ``reference``: both greedy, or both freespec sampling.

    >>> comparable({"method": "recycling", "sampled": True}, {"method": "none", "sampled": True})
    True
    >>> comparable({"method": "hf-greedy"}, {"method": "none", "sampled": True})
    False
    """
    if record.get("sampled", False) != reference.get("sampled", False):
        return False
    return not record.get("sampled") or is_drafter(record["method"])


def markdown(summary: dict) -> str:
    """summary.md: one row per category, one column per method, then the identical-output rates."""
    methods = list(summary["overall"])

    def cell(entry: dict | None) -> str:
        if entry is None:
            return ""
        speedup = f", {entry['speedup']:.2f}x" if "speedup" in entry else ""
        tau = f", τ {entry['mean_accepted']:.2f}" if "mean_accepted" in entry else ""
        return f"{entry['tokens_per_second']:.1f} tok/s{speedup}{tau}"

    lines = [f"Machine: {summary.get('machine', 'unknown')}", f"Command: `{summary.get('command', '')}`", "",
             f"Cells: tokens/s, speedup vs `{summary['baseline']}` (mean of per-question ratios), "
             "τ = mean accepted tokens per forward pass.", "",
             "| category | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for category, entries in summary["categories"].items():
        lines.append(f"| {category} | " + " | ".join(cell(entries.get(m)) for m in methods) + " |")
    lines.append("| **overall** | " + " | ".join(cell(summary["overall"][m]) for m in methods) + " |")
    rates = []
    for method in methods:
        entry = summary["overall"][method]
        if method == entry["reference"]:
            continue
        if "identical" in entry:
            rate = f"{entry['identical']:.0%}"
        elif entry.get("sampled") or summary["overall"].get(entry["reference"], {}).get("sampled"):
            rate = "n/a (sampled)"
        else:
            rate = f"n/a ({entry['reference']} not run)"
        rates.append(f"{method} {rate} (vs {entry['reference']})")
    lines += ["", "Identical output to the method's own greedy reference, per question and turn: "
              + (", ".join(rates) or "no method with a reference ran")]
    for note in summary.get("notes", []):
        lines.append(f"- {note}")
    plots = [name for name in PLOTS if name in summary.get("plots", [])]
    if plots:
        lines += [""] + [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[str]:
    """Write speedup.png (per category and method) and accepted.png (accepted length per step).

    Returns the names written; raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = [m for m in summary["overall"] if "speedup" in summary["overall"][m]]
    if methods:
        groups = list(summary["categories"]) + ["overall"]
        speedups = {method: [summary["categories"][g].get(method, {}).get("speedup", 0.0) for g in groups[:-1]]
                    + [summary["overall"][method]["speedup"]] for method in methods}
        figure, axes = _bars(plt, speedups, groups, (min(18.0, max(8.0, 0.25 * len(groups) * len(methods) + 2)), 4.5))
        axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes.set_xticks(range(len(groups)), groups, rotation=35, ha="right")
        axes.set_ylabel(f"speedup vs {summary['baseline']}")
        axes.set_title("Speedup per category (mean of per-question tokens/s ratios)")
        written.append(_save(plt, figure, axes, out / "speedup.png"))
    histograms = {m: h for m, h in summary["accepted_histogram"].items() if h}
    if histograms:
        lengths = range(1, max(int(n) for h in histograms.values() for n in h) + 1)
        shares = {method: [histogram.get(str(n), 0) / sum(histogram.values()) for n in lengths]
                  for method, histogram in histograms.items()}
        figure, axes = _bars(plt, shares, lengths, (max(6.0, 0.5 * len(lengths) + 3), 4.0))
        axes.set_xticks(range(len(lengths)), lengths)
        axes.set_xlabel("tokens accepted per forward pass (bonus token included)")
        axes.set_ylabel("share of forward passes")
        axes.set_title("Accepted length per step")
        written.append(_save(plt, figure, axes, out / "accepted.png"))
    return written


def _bars(plt, series: dict[str, list[float]], groups, size: tuple[float, float]):
    """A figure with one bar per series in each group, side by side; (figure, axes)."""
    figure, axes = plt.subplots(figsize=size)
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        axes.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))], values, width, label=label)
    return figure, axes


def _save(plt, figure, axes, path: Path) -> str:
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


RECORD_KEYS = ("question_id", "category", "method", "turn", "new_tokens", "seconds", "token_ids")
"""What every record holds (see the module's docstring)."""


def load_records(path: Path) -> list[dict]:
    """Records of a results.jsonl; a line cut short by an interruption, if last, is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise BenchError(f"{path} line {number}: not a JSON record") from None
        missing = [key for key in RECORD_KEYS if key not in record] if isinstance(record, dict) else RECORD_KEYS
        if missing:
            raise BenchError(f"{path} line {number}: not a result record (no {', '.join(missing)})")
        records.append(record)
    return records


def load_summary(folder: Path, baseline: str = "hf-greedy") -> dict:
    """A result folder's summary.json, or one computed from its results.jsonl against ``baseline``."""
    if (folder / "summary.json").is_file():
        return json.loads((folder / "summary.json").read_text())
    if (folder / "results.jsonl").is_file():
        return summarize(load_records(folder / "results.jsonl"), baseline)
    raise BenchError(f"{folder} holds no summary.json or results.jsonl")


def compare(a: Path, b: Path) -> str:
    """A Markdown table of per-method, per-category changes from result folder ``a`` to ``b``.

    A folder without summary.json is summarised against the other folder's baseline.
    """
    saved = [json.loads((f / "summary.json").read_text()) for f in (a, b) if (f / "summary.json").is_file()]
    baseline = saved[0]["baseline"] if saved else "hf-greedy"
    old, new = load_summary(a, baseline), load_summary(b, baseline)

    def pair(x: dict | None, y: dict | None, key: str, form: str, relative: bool = False) -> str:
        u, v = (x or {}).get(key), (y or {}).get(key)
        if u is None and v is None:
            return ""
        text = f"{'—' if u is None else format(u, form)} → {'—' if v is None else format(v, form)}"
        if u is not None and v is not None:
            text += f" ({(v / u - 1):+.1%})" if relative and u else f" ({v - u:+{form}})"
        return text

    lines = [f"Changes from `{a}` to `{b}`; speedups are vs `{old['baseline']}` → `{new['baseline']}`.", "",
             "| method | category | questions | tokens/s | speedup | τ | identical |", "|---|---|---|---|---|---|---|"]
    methods = _order(set(old["overall"]) | set(new["overall"]))
    categories = sorted(set(old["categories"]) | set(new["categories"]))
    for method in methods:
        for name, x, y in [("**overall**", old["overall"].get(method), new["overall"].get(method))] + [
                (c, old["categories"].get(c, {}).get(method), new["categories"].get(c, {}).get(method))
                for c in categories]:
            if x is None and y is None:
                continue
            lines.append(f"| {method} | {name} | {pair(x, y, 'questions', 'd')} | "
                         f"{pair(x, y, 'tokens_per_second', '.1f', relative=True)} | "
                         f"{pair(x, y, 'speedup', '.2f')} | {pair(x, y, 'mean_accepted', '.2f')} | "
                         f"{pair(x, y, 'identical', '.0%')} |")
    return "\n".join(lines) + "\n"
