"""The output head's cost by rows: the whole head (freespec_linear) against the exact greedy head
(freespec_head_argmax), on a model's own hidden states.

The head's inputs are the final hidden states of a prefilled text (so their outlier dimensions
are real ones); each call takes M consecutive rows of them, as a pass of M tokens would. Each
cell is the range over ``--rounds`` rounds of the median of ``--calls`` calls, the two heads
alternating round by round. ``FREESPEC_KERNEL_ISA=avx2`` times the AVX2 build (its Q8_0 heads
are packed). The head must be one the greedy head reads (Q8_0, as the embedded SmolLM2-135M's and
Gemma-3-270M's are; Q6_K, a Q4_K_M file's; fp32, F16 or BF16 through int8 codes made on the first
call); the greedy head's answers are checked against the whole head's. Both go through the
one-call decoder (``head_logits``, ``head_argmax``), the greedy one for every row count asked for.

``--decode-tokens N`` then times plain greedy decoding of N tokens with the greedy head on and off,
alternating for ``--rounds`` rounds in the same process (tokens/s of the decoding steps; the
first greedy step computes the head's row bounds, so the first round pays for them), and checks
that both decode the same tokens.

    PYTHONPATH=. python benchmarks/head_speed.py [--model default] [--rows 1 2 4 8 16 24] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import freespec
from freespec.kernels import GGMLWeight
from freespec.kernels.weights import PackedWeight

TEXT = ("The history of the city begins in the early middle ages, when a small settlement grew around the "
        "river crossing. Merchants came from the north and the south, and the market became a town. ") * 4
PREFILL = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=0, help="also time plain decoding, head on and off")
    args = parser.parse_args()
    model = freespec.load(None if args.model == "default" else args.model)
    runner = model.runner
    decoder = runner._decoder
    weight = runner.weights.lm_head.weight
    vocab, hidden_size = weight.shape
    if decoder is None or not decoder.greedy_head:
        raise SystemExit(f"{model.name}: no greedy head for this model's head (see greedy_head_rows)")
    decoder.greedy_head_rows = max(args.rows)  # time every size asked for
    ids = torch.tensor(model.tokenizer(TEXT)["input_ids"][:PREFILL])
    runner.reset(len(ids) + 1)
    states = runner.prefill(ids).contiguous().numpy()  # [PREFILL, hidden]
    decoder.head_argmax(states[:1])  # the first call makes the bounds (and a 16- or 32-bit head's codes)
    if isinstance(weight, GGMLWeight):
        kind = weight.type.name
    else:
        kind = f"packed {weight.kind}" if isinstance(weight, PackedWeight) else "fp32"
    print(f"{model.name}: {kind} head {vocab} x {hidden_size}, {runner.kernels.isa} build, "
          f"{torch.get_num_threads()} threads; ms per call, whole / greedy\n")
    print("| rows | whole head | greedy head |\n|---|---|---|")
    for rows in args.rows:
        starts = [(call * 7) % (len(ids) - rows + 1) for call in range(args.calls)]
        inputs = [np.ascontiguousarray(states[start:start + rows]) for start in starts]  # [rows, hidden] each
        answers: dict[str, np.ndarray] = {}

        def whole(x: np.ndarray) -> None:
            answers["whole"] = decoder.head_logits(x).argmax(-1)

        def greedy(x: np.ndarray) -> None:
            answers["greedy"] = decoder.head_argmax(x)

        for x in inputs[:3]:  # the same answers
            whole(x)
            greedy(x)
            if answers["greedy"] is None or answers["greedy"].tolist() != answers["whole"].tolist():
                raise SystemExit(f"rows {rows}: the greedy head gave {answers['greedy']}, the whole head "
                                 f"{answers['whole'].tolist()}")
        medians: dict[str, list[float]] = {"whole": [], "greedy": []}
        for _ in range(args.rounds):
            for name, call in (("whole", whole), ("greedy", greedy)):
                times = []
                for x in inputs:
                    start = time.perf_counter()
                    call(x)
                    times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times) * 1e3)
        cells = [f"{min(values):.2f}-{max(values):.2f}" for values in medians.values()]
        print(f"| {rows} | {cells[0]} | {cells[1]} |", flush=True)
    if args.decode_tokens:
        decode(model, args.decode_tokens, args.rounds)


def decode(model: freespec.Model, tokens: int, rounds: int) -> None:
    """Plain greedy decoding with the one-call decoder's greedy head on and off, alternating."""
    decoder = model.runner._decoder
    rates: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[int]] = {}
    for _ in range(rounds):
        for greedy_head in (True, False):
            decoder.greedy_head = greedy_head
            result = model.generate(TEXT[:64], chat=False, drafter="none", max_new_tokens=tokens)
            rates[greedy_head].append(len(result.token_ids) / result.stats.decode_seconds)
            if outputs.setdefault(greedy_head, result.token_ids) != result.token_ids:
                raise SystemExit("plain decoding gave different tokens from one round to the next")
    if outputs[True] != outputs[False]:
        raise SystemExit("plain decoding gave different tokens with the greedy head on and off")
    print(f"\nplain decoding, {tokens} tokens, tokens/s by round (the same tokens both ways):")
    for greedy_head in (True, False):
        print(f"  {'greedy head' if greedy_head else 'whole head '}: " + " ".join(f"{rate:.1f}" for rate in rates[greedy_head]))


if __name__ == "__main__":
    main()
