"""Drafters replayed on recorded answers, without the model: their CPU time per step and τ.

A bench run's ``results.jsonl`` holds every answer of plain decoding (``none``). Replaying one,
each step a drafter proposes ``--budget`` nodes for the context so far, the first ``--verify`` are
"verified" against the recorded answer (the branch its next tokens spell: what greedy
verification accepts), the drafter learns from them and from the rest as a shadow draft, and the
context moves on by what was accepted plus the bonus token. The drafter's thread CPU time is
counted (so a busy machine disturbs it little); the model's is not, so the τ here is the drafter's
alone, with a fixed budget instead of the budget policy's.

    python benchmarks/drafting_replay.py [--methods suffix,lookup,recycling,suffix+recycling]
        [--results benchmarks/results/spec-bench-26q/results.jsonl] [--budget 6] [--verify 4]

Prints a Markdown table: steps, τ, and µs per step in propose, in learning, and in all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from freespec.api import load
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions, turn_messages
from freespec.drafters import DrafterSettings, create, suffix

RESULTS = Path(__file__).resolve().parent / "results" / "spec-bench-26q" / "results.jsonl"


def answers(model, results: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of every first turn ``none`` answered in ``results``."""
    questions = {q.question_id: q for q in load_questions(DEFAULT_QUESTIONS)}
    pairs = []
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record["method"] == "none" and record["turn"] == 1 and record["question_id"] in questions:
            prompt = model.encode(messages=turn_messages(questions[record["question_id"]], 1, []))
            pairs.append((prompt, record["token_ids"]))
    return pairs


def replay(drafter, pairs: list[tuple[list[int], list[int]]], budget: int, verify: int) -> dict[str, float]:
    steps = tokens = 0
    propose = learn = 0.0
    for prompt, answer in pairs:
        drafter.begin(np.array(prompt[:-1]), None)
        done = 0
        while done < len(answer):
            context = np.array(prompt + answer[:done])
            started = time.thread_time()
            tree = drafter.propose(context, budget)
            propose += time.thread_time() - started
            verified = tree.prefix(verify + 1)
            path = verified.follow(answer[done:])
            shadow = tree.follow(answer[done:])
            logits = torch.zeros(len(verified), 1)  # unread: drafters that read logits are refused below
            started = time.thread_time()
            drafter.learn(verified, logits, path)
            if len(tree) > len(verified):
                drafter.learn_shadow(tree, shadow, len(verified) - 1)
            learn += time.thread_time() - started
            steps += 1
            done += len(path)  # the accepted nodes and the bonus token
            tokens += len(path)
    return {"steps": steps, "tau": tokens / steps, "propose": 1e6 * propose / steps, "learn": 1e6 * learn / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="suffix,lookup")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--budget", type=int, default=6, help="nodes proposed per step")
    parser.add_argument("--verify", type=int, default=4, help="of which verified (the rest: a shadow draft)")
    parser.add_argument("--suffix-candidates", type=int, default=1,
                        help="match lengths the suffix sources compare, longest first")
    args = parser.parse_args()
    model = load()
    pairs = answers(model, args.results)
    print(f"{len(pairs)} answers of {args.results}, budget {args.budget}, {args.verify} verified\n")
    print("| method | steps | τ | propose µs/step | learn µs/step | drafting µs/step |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        drafter = create(method, DrafterSettings(model.runner.vocab_size, tokenizer=model.tokenizer))
        for source in getattr(drafter, "drafters", [drafter]):
            if isinstance(source, suffix.SuffixSource):
                source.candidates = args.suffix_candidates
        if drafter.reads_logits:  # recycling reads the verified nodes' logits: replaying cannot give them
            raise SystemExit(f"{method} reads the model's logits; replay only drafters that do not")
        row = replay(drafter, pairs, args.budget, args.verify)
        print(f"| {method} | {row['steps']} | {row['tau']:.3f} | {row['propose']:.0f} | {row['learn']:.0f} "
              f"| {row['propose'] + row['learn']:.0f} |")


if __name__ == "__main__":
    main()
