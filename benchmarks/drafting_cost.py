"""What drafting costs per decoding step: the drafter's own time (propose, learn, learn_shadow and
begin) as a share of the step, per method, on Spec-Bench first turns.

    python benchmarks/drafting_cost.py [--methods suffix,lookup,suffix+recycling] [--per-category 1]
        [--max-new-tokens 256] [--repeat 1]

Each method runs on every question (``--repeat`` times, so cross-request stores fill), its drafter's
methods timed by wrapping them; the decode time of each request comes from its stats. Prints a
Markdown table: steps, ms per step, drafting µs per step (propose / learn / shadow), its share of
the step, and begin's ms per request (a store's update lands there).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions

TIMED = ("propose", "learn", "learn_shadow", "begin")


def timed(drafter, totals: dict[str, float]) -> None:
    """Wrap ``drafter``'s methods so that their seconds add up in ``totals``."""
    for name in TIMED:
        method = getattr(drafter, name)

        def wrapper(*args, _method=method, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - started

        setattr(drafter, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="suffix,lookup,recycling,suffix+recycling")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, help="at most this many questions")
    parser.add_argument("--repeat", type=int, default=1, help="ask every question this many times")
    args = parser.parse_args()
    methods = args.methods.split(",")
    model = freespec.load()
    totals = {method: defaultdict(float) for method in methods}
    for method in methods:
        model.generate("Hello there.", drafter=method, max_new_tokens=16)  # warm-up, then time it
        timed(model.drafter(method)[0], totals[method])
        totals[method].clear()
    questions = load_questions(DEFAULT_QUESTIONS, per_category=args.per_category, limit=args.limit)
    for _ in range(args.repeat):
        for question in questions:
            for method in methods:
                stats = model.generate(question.turns[0], drafter=method, max_new_tokens=args.max_new_tokens).stats
                total = totals[method]
                total["steps"] += stats.forward_passes
                total["decode"] += stats.decode_seconds
                total["tokens"] += stats.new_tokens
                total["requests"] += 1
    print(f"{len(questions)} questions x {args.repeat}, {args.max_new_tokens} tokens\n")
    print("| method | steps | ms/step | τ | propose µs/step | learn µs/step | shadow µs/step | drafting share "
          "| begin ms/request |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, total in totals.items():
        steps = total["steps"]
        drafting = total["propose"] + total["learn"] + total["learn_shadow"]
        print(f"| {method} | {steps:.0f} | {1000 * total['decode'] / steps:.2f} | {total['tokens'] / steps:.2f} "
              f"| {1e6 * total['propose'] / steps:.0f} | {1e6 * total['learn'] / steps:.0f} "
              f"| {1e6 * total['learn_shadow'] / steps:.0f} | {drafting / total['decode']:.1%} "
              f"| {1000 * total['begin'] / total['requests']:.2f} |")


if __name__ == "__main__":
    main()
