"""Prefill cost, and what a chat's next turn saves by reusing the turns before it.

Prefill runs the same batch-invariant pass as decoding, so the cache rows an earlier request
left behind are the rows a fresh prefill would write. A chat sends its whole conversation with
each turn; with ``reuse_prefix`` (the default) only the new tokens are prefilled.

    python benchmarks/prefill_cost.py [--model PATH] [--repeats 5]   # FREESPEC_KERNEL_ISA=avx2 for that build

Prints two Markdown tables of medians in milliseconds: the prefill of a prompt of n tokens; and
the first token of a follow-up turn (a conversation of n tokens, then 24 new ones), with the
whole conversation prefilled afresh and with the conversation's rows reused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import freespec

LENGTHS = (100, 400, 1500)
NEW_TURN = 24  # tokens of the follow-up question and its chat markup


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = freespec.load(args.model)
    runner = model.runner

    def prefill(prompt: torch.Tensor) -> None:
        runner.reset(len(prompt))
        runner.prefill(prompt)

    def first_token(conversation: list[int], reuse: bool) -> None:
        model.generate(prompt_ids=conversation, drafter="none", max_new_tokens=1, reuse_prefix=reuse)

    def next_turn(conversation: list[int], reuse: bool) -> float:
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            first_token(conversation[:-NEW_TURN], reuse=False)  # the turn before, untimed
            start = time.perf_counter()
            first_token(conversation, reuse)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times[1:])

    prompts = {n: torch.randint(1000, (n,)) for n in LENGTHS}
    prefills = [median_ms(lambda: prefill(prompts[n]), args.repeats) for n in LENGTHS]
    fresh, reused = [], []
    for n in LENGTHS:
        conversation = torch.randint(1000, (n + NEW_TURN,)).tolist()
        fresh.append(next_turn(conversation, reuse=False))
        reused.append(next_turn(conversation, reuse=True))
    print(f"{model.runner.kernels.isa} kernels, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, ms\n")
    print("| conversation tokens | " + " | ".join(str(n) for n in LENGTHS) + " |")
    print("|---" * (len(LENGTHS) + 1) + "|")
    print("| prefill | " + " | ".join(f"{ms:.0f}" for ms in prefills) + " |")
    print(f"| next turn (+{NEW_TURN} tokens), first token, prefilled afresh | "
          + " | ".join(f"{ms:.0f}" for ms in fresh) + " |")
    print(f"| next turn (+{NEW_TURN} tokens), first token, earlier turns reused | "
          + " | ".join(f"{ms:.0f}" for ms in reused) + " |")


if __name__ == "__main__":
    main()
