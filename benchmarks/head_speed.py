"""The output head's cost by rows: the whole head (freespec_linear) against the exact greedy head
(freespec_head_argmax), on a model's own hidden states.

The head's inputs are the final hidden states of a prefilled text (so their outlier dimensions
are real ones); each call takes M consecutive rows of them, as a pass of M tokens would. Each
cell is the range over ``--rounds`` rounds of the median of ``--calls`` calls, the two heads
alternating round by round. ``FREESPEC_KERNEL_ISA=avx2`` times the AVX2 build (its Q8_0 heads
are packed). The head must be Q8_0 (the embedded SmolLM2-135M's and Gemma-3-270M's are) or Q6_K
(a Q4_K_M file's); the greedy head's answers are checked against the whole head's.

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
from freespec.kernels import GGMLWeight, abi
from freespec.kernels.backend import MatrixStruct

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
    library = runner.kernels.library
    weight = runner.weights.lm_head.weight
    head = MatrixStruct("lm_head", weight)
    vocab, hidden_size = weight.shape
    bounds = np.empty(vocab, dtype=np.float32)
    if library.freespec_head_bounds(head.pointer, bounds.ctypes.data) != abi.OK:
        raise SystemExit(f"{model.name}: the greedy head needs a Q8_0 or Q6_K head without bias")
    ids = torch.tensor(model.tokenizer(TEXT)["input_ids"][:PREFILL])
    runner.reset(len(ids) + 1)
    states = runner.prefill(ids).contiguous()  # [PREFILL, hidden]
    kind = weight.type.name if isinstance(weight, GGMLWeight) else f"packed {weight.kind}"
    print(f"{model.name}: {kind} head {vocab} x {hidden_size}, {runner.kernels.isa} build, "
          f"{torch.get_num_threads()} threads; ms per call, whole / greedy\n")
    print("| rows | whole head | greedy head |\n|---|---|---|")
    for rows in args.rows:
        starts = [(call * 7) % (len(ids) - rows + 1) for call in range(args.calls)]
        inputs = [states[start:start + rows].contiguous() for start in starts]  # [rows, hidden] each
        logits, out = torch.empty(rows, vocab), np.empty(rows, dtype=np.int64)

        def whole(x: torch.Tensor) -> None:
            abi.check_status(library.freespec_linear(head.pointer, x.data_ptr(), logits.data_ptr(), rows), "head")

        def greedy(x: torch.Tensor) -> None:
            abi.check_status(library.freespec_head_argmax(head.pointer, bounds.ctypes.data, x.data_ptr(), rows,
                                                          out.ctypes.data), "greedy head")

        for x in inputs[:3]:  # the same answers
            whole(x)
            greedy(x)
            if out.tolist() != logits.argmax(-1).tolist():
                raise SystemExit(f"rows {rows}: the greedy head gave {out.tolist()}, the whole head "
                                 f"{logits.argmax(-1).tolist()}")
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
