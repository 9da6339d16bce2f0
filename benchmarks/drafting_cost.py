"""What drafting costs per decoding step: the drafter's own time (propose, learn, learn_shadow and
begin) as a share of the step, per method, on Spec-Bench first turns.

    python benchmarks/drafting_cost.py [--methods suffix,lookup,suffix+recycling] [--per-category 1]
        [--max-new-tokens 256] [--repeat 1]

Each method runs on every question (``--repeat`` times, so cross-request stores fill), its drafter's
methods timed by wrapping them; the decode time of each request comes from its stats. Prints a
Markdown table: steps, ms per step, drafting µs per step (propose / learn / shadow), its share of
the step, and begin's ms per request (a store's update lands there).

``--cpu`` counts CPU time instead of wall time (the drafter's calls by thread time, each request by
process time, prefill included), so that a machine busy with other work does not distort the
share; it runs with one thread (``--threads``), where the step is longer than with all cores, so
the share it shows is a lower bound for the multi-threaded step's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions

TIMED = ("propose", "learn", "learn_shadow", "begin")


def timed(drafter, totals: dict[str, float], clock=time.perf_counter) -> None:
    """Wrap ``drafter``'s methods so that their seconds (by ``clock``) add up in ``totals``."""
    for name in TIMED:
        method = getattr(drafter, name)

        def wrapper(*args, _method=method, _name=name, **kwargs):
            started = clock()
            try:
                return _method(*args, **kwargs)
            finally:
                totals[_name] += clock() - started

        setattr(drafter, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="suffix,lookup,recycling,suffix+recycling")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, help="at most this many questions")
    parser.add_argument("--repeat", type=int, default=1, help="ask every question this many times")
    parser.add_argument("--cpu", action="store_true", help="CPU time, not wall time (see above)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 with --cpu)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    model = freespec.load(threads=args.threads or (1 if args.cpu else None))
    models = {method: model.with_own_state() for method in methods}  # each method learns from its own runs only
    totals = {method: defaultdict(float) for method in methods}
    for method in methods:
        models[method].generate("Hello there.", drafter=method, max_new_tokens=16)  # warm-up, then time it
        timed(models[method].drafter(method)[0], totals[method], time.thread_time if args.cpu else time.perf_counter)
        totals[method].clear()
    questions = load_questions(DEFAULT_QUESTIONS, per_category=args.per_category, limit=args.limit)
    for _ in range(args.repeat):
        for question in questions:
            for method in methods:
                started = time.process_time()
                stats = models[method].generate(question.turns[0], drafter=method, max_new_tokens=args.max_new_tokens).stats
                total = totals[method]
                total["cpu"] += time.process_time() - started
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
        step = total["cpu"] if args.cpu else total["decode"]
        print(f"| {method} | {steps:.0f} | {1000 * step / steps:.2f} | {total['tokens'] / steps:.2f} "
              f"| {1e6 * total['propose'] / steps:.0f} | {1e6 * total['learn'] / steps:.0f} "
              f"| {1e6 * total['learn_shadow'] / steps:.0f} | {drafting / step:.1%} "
              f"| {1000 * total['begin'] / total['requests']:.2f} |")


if __name__ == "__main__":
    main()
