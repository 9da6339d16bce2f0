"""Forward cost t(q): one pass over q new tokens after 256 cached ones, logits included.

Compares, in one process on one machine, transformers' stock forward (DynamicCache), freespec's
runner with fp32 weights, and freespec's runner streaming the exact 4/8-bit blocks of a GGUF
model (the default for such models). Prints a Markdown table of medians in milliseconds.

    python benchmarks/forward_cost.py [--model PATH] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

import freespec
from freespec.model.loading import from_transformers
from freespec.model.runner import ModelRunner

SIZES = (1, 2, 4, 8, 16, 32)
CONTEXT = 256


def median_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def transformers_costs(hf_model, context: torch.Tensor, repeats: int) -> dict[int, float]:
    costs = {}
    with torch.inference_mode():
        for q in SIZES:
            cache = DynamicCache()
            hf_model(context[None], past_key_values=cache, use_cache=True)
            new = torch.randint(1000, (1, q))

            def step():
                hf_model(new, past_key_values=cache, use_cache=True)
                cache.crop(-q)  # drop the q new rows (crop takes a negative count)

            costs[q] = median_ms(step, repeats)
    return costs


def runner_costs(runner: ModelRunner, context: torch.Tensor, repeats: int) -> dict[int, float]:
    runner.reset(CONTEXT + max(SIZES) + 1)
    runner.prefill(context)
    costs = {}
    for q in SIZES:
        tokens = torch.randint(1000, (q,))
        positions = torch.arange(CONTEXT, CONTEXT + q)
        mask = torch.ones(q, q, dtype=torch.bool).tril_()
        costs[q] = median_ms(lambda: runner.logits(runner.forward(tokens, positions, mask)), repeats)
    return costs


def fp32_runner(model: freespec.Model) -> ModelRunner:
    """A runner over the transformers model's fp32 weights (for a GGUF file: dequantized)."""
    loaded = from_transformers(model.hf_model, model.tokenizer, model.name, pack=False)
    return ModelRunner(loaded.config, loaded.weights, model.runner.kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    model = freespec.load(args.model)
    context = torch.randint(1000, (CONTEXT,), generator=torch.Generator().manual_seed(0))
    rows = {
        "transformers stock forward": transformers_costs(model.hf_model, context, args.repeats),
        "freespec runner, fp32 weights":
            runner_costs(fp32_runner(model), context, args.repeats),
        f"freespec runner, {'/'.join(model.runner.weight_formats)} (default)":
            runner_costs(model.runner, context, args.repeats),
    }
    print(f"{torch.get_num_threads()} threads, {CONTEXT} cached tokens, median of {args.repeats}, ms\n")
    print("| q (tokens per forward) | " + " | ".join(str(q) for q in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for name, costs in rows.items():
        print(f"| {name} | " + " | ".join(f"{costs[q]:.1f}" for q in SIZES) + " |")
        print("| ratio to q = 1 | " + " | ".join(f"{costs[q] / costs[1]:.2f}" for q in SIZES) + " |")


if __name__ == "__main__":
    main()
