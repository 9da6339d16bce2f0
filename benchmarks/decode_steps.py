"""Decode steps alone: each drafter's tokens/s and step cost with the prefill left out.

``freespec bench`` times whole turns, prefill included, which every method pays alike; this
times only the draft → verify → accept steps (``GenerationStats.decode_seconds``), over the first
turns of Spec-Bench questions, methods interleaved per question, and checks every method's
tokens against the first method's.

    python benchmarks/decode_steps.py [--methods none,recycling,lookup] [--per-category 2] [--max-new-tokens 256]

Prints a Markdown table: decode tokens/s, speedup over the first method, τ, draft nodes
verified per pass, milliseconds per step, and the prefill seconds of all questions.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions


@dataclass
class Totals:
    tokens: int = 0
    passes: int = 0
    draft_nodes: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default="none,recycling,lookup")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    methods = args.methods.split(",")
    model = freespec.load(args.model)
    chat = model.has_chat_template  # a base model (Gemma-3-270M's file) takes the questions as raw text
    # each method learns from its own runs only (Token Recycling's tables and the suffix stores are
    # shared by a model's drafters: a method run just before on the same question would hand its answer on)
    models = {method: model.with_own_state() for method in methods}
    questions = load_questions(DEFAULT_QUESTIONS, per_category=args.per_category)
    for method in methods:  # warm-up
        models[method].generate("Hello there.", drafter=method, max_new_tokens=16, chat=chat)
    totals: dict[str, Totals] = defaultdict(Totals)
    for question in questions:
        reference = None
        for method in methods:
            result = models[method].generate(question.turns[0], drafter=method, max_new_tokens=args.max_new_tokens,
                                    reuse_prefix=False, chat=chat)
            if reference is None:
                reference = result.token_ids
            elif result.token_ids != reference:
                raise SystemExit(f"question {question.question_id}: {method} differs from {methods[0]}")
            stats, total = result.stats, totals[method]
            total.tokens += stats.new_tokens
            total.passes += stats.forward_passes
            total.draft_nodes += sum(stats.draft_sizes)
            total.decode_seconds += stats.decode_seconds
            total.prefill_seconds += stats.prefill_seconds
    base = totals[methods[0]]
    print(f"{len(questions)} first turns, {args.max_new_tokens} new tokens at most, identical tokens for all "
          f"methods\n")
    print(f"| method | decode tok/s | vs {methods[0]} | τ | draft nodes per pass | ms per step | prefill s |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        total = totals[method]
        speed = total.tokens / total.decode_seconds
        print(f"| {method} | {speed:.1f} | {speed / (base.tokens / base.decode_seconds):.2f}x | "
              f"{total.tokens / total.passes:.2f} | {total.draft_nodes / total.passes:.2f} | "
              f"{1000 * total.decode_seconds / total.passes:.2f} | {total.prefill_seconds:.1f} |")


if __name__ == "__main__":
    main()
