"""What recording log-probabilities costs: decoding tokens/s with ``logprobs`` off, 0 and k.

Greedy steps without log-probabilities run the exact greedy head (only the head rows that could
win); with them the whole head runs, and each emitted token's row gets a float64 log-softmax. The
settings alternate per question, round after round, in one process (a busy VM's drift falls on all
of them alike), and must give the same tokens. Each setting and round is a tenant of its own, so
``suffix`` drafts from its own earlier answers only, never from another setting's answer to the
same question.

    PYTHONPATH=. python benchmarks/logprobs_cost.py [--model default] [--drafters none suffix] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--drafters", nargs="+", default=["none", "suffix"])
    parser.add_argument("--settings", type=int, nargs="+", default=[-1, 0, 5], help="logprobs: -1 for off")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = freespec.load(None if args.model == "default" else args.model).with_own_state()
    questions = load_questions(DEFAULT_QUESTIONS, per_category=args.per_category)
    model.generate("Hello.", max_new_tokens=8)  # the first greedy step's head bounds, the drafters' costs
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        for drafter in args.drafters:
            tokens = {setting: 0 for setting in args.settings}
            seconds = dict.fromkeys(args.settings, 0.0)
            for question in questions:
                reference = None
                for setting in args.settings:
                    result = model.generate(question.turns[0], drafter=drafter, max_new_tokens=args.max_new_tokens,
                                            logprobs=None if setting < 0 else setting, reuse_prefix=False,
                                            tenant=f"{setting}-{round_}")
                    if reference is None:
                        reference = result.token_ids
                    assert result.token_ids == reference, "log-probabilities changed the tokens"
                    tokens[setting] += result.stats.new_tokens
                    seconds[setting] += result.stats.decode_seconds
            for setting in args.settings:
                rates.setdefault((drafter, setting), []).append(tokens[setting] / seconds[setting])
    print(f"{model.name}, {model.runner.kernels.isa} build, {len(questions)} Spec-Bench first turns x "
          f"{args.max_new_tokens} tokens, {args.rounds} rounds; decoding tokens/s, median (range)\n")
    print("| drafter | " + " | ".join("logprobs off" if s < 0 else f"logprobs={s}" for s in args.settings) + " |")
    print("|---|" + "---|" * len(args.settings))
    for drafter in args.drafters:
        off = statistics.median(rates[(drafter, args.settings[0])])
        cells = []
        for setting in args.settings:
            values = rates[(drafter, setting)]
            median = statistics.median(values)
            ratio = "" if setting == args.settings[0] else f", {median / off:.2f}x"
            cells.append(f"{median:.1f} ({min(values):.1f}-{max(values):.1f}{ratio})")
        print(f"| {drafter} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
