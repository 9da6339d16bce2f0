"""How many output-head rows an exact greedy step must compute in fp32, if an integer
approximation of the logits with a rigorous error bound picks the candidates first.

Greedy decoding and greedy verification need only each row's argmax. With the input x quantized
(to int8 or int16, with a scale per 32-weight block or one for the row) the head's integer dot
products give every logit to within a bound; only the rows whose upper bound reaches the best
lower bound can hold the argmax, and computing those few in fp32 (the kernels' own bits) gives
the same argmax as the whole head. This script measures, on a real model's hidden states, how
many rows survive, for two bounds:

- ``tight``: per block, |d| * sum |q| |e| for the quantization error e of x (costs a second
  dot product in a kernel);
- ``cheap``: the row's L1 norm (computed once at load) times the largest |e| of any block; with
  one scale for the row (``int16 row``) this is what freespec_head_argmax computes.

Both add the fp32 rounding of the exact sum, gamma * sum |w| |x| with gamma = 2 K u (the
cheap bound uses the L1 norm times max |x|), and a factor 2 of margin for a kernel that scales
its integer sums in fp32. Every step also checks that the exact argmax is among the candidates
(it must be: ``misses`` is 0) and that it is the token greedy decoding chose.

The head must be Q8_0 (the embedded SmolLM2-135M's and Gemma-3-270M's are).

    PYTHONPATH=. python benchmarks/head_bounds.py [--model default] [--tokens 48] [PROMPT ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from gguf import GGMLQuantizationType

import freespec
from freespec.kernels import GGMLWeight
from freespec.kernels.weights import repack

PROMPTS = ["Write a short story about a robot learning to paint.",
           "Explain how a refrigerator keeps food cold.",
           "The history of the printing press begins in"]


def q8_0_blocks(weight: GGMLWeight) -> tuple[np.ndarray, np.ndarray]:
    """(d [N, B] float64, q [N, B, 32] int8) of a Q8_0 matrix [N, K], B = K / 32 (the kernels' own
    unpacking, :func:`freespec.kernels.weights.repack`)."""
    if weight.type != GGMLQuantizationType.Q8_0:
        raise SystemExit(f"the output head is {weight.type.name}, not Q8_0: this script reads Q8_0 heads only")
    packed = repack(weight)
    rows, columns = weight.shape
    return packed.scales.numpy().astype(np.float64), packed.codes.numpy().reshape(rows, columns // 32, 32)


def candidates(x: np.ndarray, d: np.ndarray, q: np.ndarray, abs_q: np.ndarray, row_l1: np.ndarray,
               bits: int, per_block: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tight, cheap): boolean [N] masks of the rows that may hold the argmax, for input x [K]
    quantized with a scale per block or one for the row."""
    blocks = x.reshape(-1, 32)  # [B, 32]
    largest = np.abs(blocks).max(-1) if per_block else np.full(len(blocks), np.abs(x).max())  # [B]
    scale = largest / ((1 << (bits - 1)) - 1)
    scale[scale == 0] = 1.0
    codes = np.round(blocks / scale[:, None])
    error = np.abs(blocks - scale[:, None] * codes)  # [B, 32]
    approx = (np.einsum("nbk,bk->nb", q, codes) * d * scale).sum(-1)  # integer dots, exact in float64
    gamma = 2 * x.size * 2.0**-24
    tight = 2 * ((np.abs(d) * np.einsum("nbk,bk->nb", abs_q, error)).sum(-1)
                 + gamma * (np.abs(d) * np.einsum("nbk,bk->nb", abs_q, np.abs(blocks))).sum(-1))
    cheap = 2 * row_l1 * (error.max() + gamma * np.abs(x).max())
    return [approx + bound >= (approx - bound).max() for bound in (tight, cheap)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (each one a step)")
    args = parser.parse_args()
    model = freespec.load(None if args.model == "default" else args.model)
    runner, chat = model.runner, model.has_chat_template
    d, q = q8_0_blocks(runner.weights.lm_head.weight)
    q = q.astype(np.float64)
    abs_q = np.abs(q)
    row_l1 = (np.abs(d) * abs_q.sum(-1)).sum(-1)  # [N]
    print(f"{model.name}: Q8_0 head {q.shape[0]} x {q.shape[1] * 32}, {len(args.prompts)} prompts x {args.tokens} tokens\n")
    counts: dict[tuple[int, str], list[int]] = {}
    misses = 0
    for prompt in args.prompts:
        result = model.generate(prompt, max_new_tokens=args.tokens, drafter="none", chat=chat)
        ids = model.encode(prompt, chat=chat) + result.token_ids
        runner.reset(len(ids) + 8)
        hidden = runner.prefill(torch.tensor(ids))  # [n, K]: the head's inputs
        for i in range(len(ids) - len(result.token_ids) - 1, len(ids) - 1):
            best = int(torch.argmax(runner.logits(hidden[i : i + 1])[0]))
            if best != ids[i + 1]:
                raise SystemExit(f"step {i}: the head's argmax {best} is not the greedy token {ids[i + 1]}")
            x = hidden[i].double().numpy()
            for bits, per_block in ((8, True), (16, True), (16, False)):
                masks = candidates(x, d, q, abs_q, row_l1, bits, per_block)
                for name, mask in zip(("tight", "cheap"), masks):
                    counts.setdefault((f"int{bits} {'block' if per_block else 'row'}", name), []).append(int(mask.sum()))
                    misses += not mask[best]
    print("| x as, scale per | bound | candidate rows per step: median | p90 | max | steps |")
    print("|---|---|---|---|---|---|")
    for (codes, name), values in counts.items():
        v = np.array(values)
        print(f"| {codes} | {name} | {np.median(v):.0f} | {np.percentile(v, 90):.0f} | {v.max()} | {v.size} |")
    print(f"\nexact argmax outside the candidates: {misses} (must be 0)")


if __name__ == "__main__":
    main()
