"""``freespec generate --input`` at several ``--parallel`` levels: tokens/s and identical output.

Writes ``--prompts`` Spec-Bench first turns as a JSONL batch (every fourth line with a stop
string, every fourth sampled with a seed, every fourth with log-probabilities), runs the command
once per level in a fresh process, checks every level's output lines equal the first level's
(text, token ids, log-probabilities) and prints a Markdown table of the summary line's tokens/s
(the batch's wall time after the model loaded).

    python benchmarks/generate_parallel.py --prompts 16 --max-new-tokens 128 --levels 1,8
"""

from __future__ import annotations

import argparse
import json
import re
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
        for index, turn in enumerate(turns[::step][:prompts]):
            line = {"prompt": turn, "max_new_tokens": max_new_tokens}
            line.update([{}, {"stop": "\n\n"}, {"temperature": 0.7, "seed": index}, {"logprobs": 2}][index % 4])
            file.write(json.dumps(line) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,8", help="--parallel values, e.g. 1,2,4,8")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--model", help="model (default: the embedded one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="freespec-parallel-"))
    source = folder / "batch.jsonl"
    write_batch(source, args.prompts, args.max_new_tokens)
    print("| --parallel | tokens/s | vs first | identical lines |\n|---|---|---|---|")
    first_rate, first_lines, differing = None, None, 0
    for level in args.levels.split(","):
        output = folder / f"out-{level}.jsonl"
        command = [sys.executable, "-m", "freespec", "generate", "--input", str(source), "--output", str(output),
                   "--parallel", level, "--drafter", args.drafter] + (["--model", args.model] if args.model else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rate = float(re.search(r"([0-9.]+) tokens/s", done.stderr).group(1))
        lines = [(r["text"], r["token_ids"], r.get("token_logprobs"))
                 for r in map(json.loads, output.read_text(encoding="utf-8").splitlines())]
        first_rate, first_lines = first_rate or rate, first_lines or lines
        same = sum(a == b for a, b in zip(lines, first_lines))
        differing += len(lines) - same
        print(f"| {level} | {rate:.1f} | {rate / first_rate:.2f}x | {same}/{len(lines)} |", flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
