"""Token Recycling with rows keyed by token pairs vs the paper's one-token rows.

Generates the first turn of N Spec-Bench questions per category with plain decoding, recycling
with pair rows (the default) and recycling with one-token rows only (``pair_slots=0``),
interleaved per question so that machine drift hits all three alike; each drafter keeps its
state across questions, as in a server. Prints tokens/s, speedup over plain decoding, τ and
identical-output counts, then which kind of row each step's first draft node came from (the
model's row for the pair, the prompt's follower of the pair, the token's row alone, none: a token
never seen) and how often such nodes were accepted.
With ``--budget 1`` every step drafts exactly one node, so those rates are first-node acceptances.

    python benchmarks/recycling_pairs.py [--per-category 2] [--max-new-tokens 256] [--budget 1]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions
from freespec.drafters import FACTORIES, TokenRecycling

ONE_TOKEN_ROWS = "recycling-one-token-rows"


class RowKinds:
    """Counts, per step, which row the first draft node came from and whether it was accepted."""

    def __init__(self, drafter: TokenRecycling):
        self.drafter, self.tried, self.hit = drafter, collections.Counter(), collections.Counter()
        self._kind = "none"
        propose, update = drafter.propose, drafter.update

        def counting_propose(context: np.ndarray, budget: int):
            root, before = int(context[-1]), int(context[-2]) if len(context) > 1 else -1
            _, probs, calibration = drafter.row(before, root)  # the row the draft's first node comes from
            kinds = {id(drafter.calibration): "token"}
            for kind, table in (("pair", drafter.pairs), ("text", drafter.text_pairs)):
                if table is not None:
                    kinds[id(table.calibration)] = kind
            self._kind = kinds[id(calibration)] if probs[0] > 0 else "never seen"
            self.tried[self._kind, "steps"] += 1
            return propose(context, budget)

        def counting_update(tree, logits, accepted):
            if len(tree) > 1:
                self.tried[self._kind, "drafted"] += 1
                self.hit[self._kind] += len(accepted) > 1
            return update(tree, logits, accepted)

        drafter.propose, drafter.update = counting_propose, counting_update

    def table(self) -> str:
        steps = sum(self.tried[kind, "steps"] for kind in ("pair", "text", "token", "never seen"))
        lines = ["| first node's row | share of steps | drafted | accepted |", "|---|---|---|---|"]
        for kind in ("pair", "text", "token", "never seen"):
            drafted = self.tried[kind, "drafted"]
            rate = f"{self.hit[kind] / drafted:.0%}" if drafted else "-"
            lines.append(f"| {kind} | {self.tried[kind, 'steps'] / max(steps, 1):.0%} | {drafted} | {rate} |")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=None, help="fixed draft nodes per step (default: the policy)")
    args = parser.parse_args()

    FACTORIES[ONE_TOKEN_ROWS] = lambda settings: TokenRecycling(settings.vocab_size, tree_shape=settings.tree_shape, pair_slots=0)
    methods = ["none", "recycling", ONE_TOKEN_ROWS]
    model = freespec.load(args.model, budget=args.budget)
    for method in methods:  # compile kernels, calibrate t(q), then start every drafter cold
        model.generate("Hello", max_new_tokens=8, drafter=method)
    model.reset()
    drafter, _ = model.drafter("recycling")
    kinds = RowKinds(drafter)

    seconds, tokens, passes, identical = (collections.Counter() for _ in range(4))
    picked = load_questions(args.questions, per_category=args.per_category)
    for number, question in enumerate(picked, 1):
        reference = None
        for method in methods:
            started = time.perf_counter()
            result = model.generate(messages=[{"role": "user", "content": question.turns[0]}],
                                    max_new_tokens=args.max_new_tokens, drafter=method)
            seconds[method] += time.perf_counter() - started
            tokens[method] += result.stats.new_tokens
            passes[method] += result.stats.forward_passes
            reference = reference or result.token_ids
            identical[method] += result.token_ids == reference
        print(f"\r{number}/{len(picked)} questions", end="", flush=True)
    print()
    plain = tokens["none"] / seconds["none"]
    print("| method | tok/s | vs none | τ | identical to none |\n|---|---|---|---|---|")
    for method in methods:
        speed = tokens[method] / seconds[method]
        print(f"| {method} | {speed:.1f} | {speed / plain:.3f}x | {tokens[method] / passes[method]:.3f} | "
              f"{identical[method]}/{len(picked)} |")
    print()
    print(kinds.table())


if __name__ == "__main__":
    main()
