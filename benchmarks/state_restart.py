"""The same batch asked again by a new process, with and without ``--state``: what a drafter
state file is worth after a restart.

Writes ``--prompts`` Spec-Bench first turns (greedy) as a JSONL batch, runs ``freespec generate
--input`` once with ``--state`` to learn them (the first process), then, in fresh processes
alternating for ``--rounds`` rounds: plain decoding, the drafter cold (no state) and the drafter
warm (a copy of the first process's state). Prints a Markdown table of the summary line's tokens/s
(the batch's wall time after the model loaded), each against plain decoding, and whether every
output line equals plain decoding's.

    python benchmarks/state_restart.py --prompts 20 --max-new-tokens 256 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from freespec import DEFAULT_DRAFTER
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions


def write_batch(path: Path, prompts: int, max_new_tokens: int) -> None:
    turns = [question.turns[0] for question in load_questions(DEFAULT_QUESTIONS)]
    step = max(1, len(turns) // prompts)  # spread over the categories
    with path.open("w", encoding="utf-8") as file:
        for turn in turns[::step][:prompts]:
            file.write(json.dumps({"prompt": turn, "max_new_tokens": max_new_tokens}) + "\n")


def run(source: Path, output: Path, drafter: str, parallel: int, model: str | None,
        state: Path | None = None) -> tuple[float, list[list[int]]]:
    """(tokens/s, each line's token ids) of one ``freespec generate --input`` process."""
    command = [sys.executable, "-m", "freespec", "generate", "--input", str(source), "--output", str(output),
               "--parallel", str(parallel), "--drafter", drafter]
    command += (["--model", model] if model else []) + (["--state", str(state)] if state else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rate = float(re.search(r"([0-9.]+) tokens/s", done.stderr).group(1))
    return rate, [json.loads(line)["token_ids"] for line in output.read_text(encoding="utf-8").splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="generate's --parallel (default: its own, 8)")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--model", help="model (default: the embedded one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="freespec-restart-"))
    source, learned = folder / "batch.jsonl", folder / "learned.state"
    write_batch(source, args.prompts, args.max_new_tokens)
    run(source, folder / "first.jsonl", args.drafter, args.parallel, args.model, learned)
    settings = {"none": None, f"{args.drafter}, cold": None, f"{args.drafter}, warm (--state)": learned}
    rates: dict[str, list[float]] = {name: [] for name in settings}
    outputs: dict[str, list[list[list[int]]]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, state in settings.items():
            copy = None
            if state is not None:  # each warm process starts from the first one's state (it saves its own)
                copy = folder / "warm.state"
                shutil.copyfile(state, copy)
            rate, lines = run(source, folder / "out.jsonl", "none" if name == "none" else args.drafter,
                              args.parallel, args.model, copy)
            rates[name].append(rate)
            outputs[name].append(lines)
    plain = statistics.mean(rates["none"])
    print(f"{args.prompts} prompts x {args.max_new_tokens} tokens, --parallel {args.parallel}, "
          f"{args.rounds} rounds alternating\n")
    print("| run | tokens/s per round | mean | vs plain | lines equal to plain |\n|---|---|---|---|---|")
    for name, values in rates.items():
        same = sum(lines == outputs["none"][0] for lines in outputs[name])
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f} | "
              f"{statistics.mean(values) / plain:.2f}x | {same}/{len(values)} runs |", flush=True)
    shutil.rmtree(folder)
    return 0 if all(lines == outputs["none"][0] for runs in outputs.values() for lines in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
