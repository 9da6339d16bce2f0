"""The transformers fallback against transformers' own greedy decoding and the native runner.

Runs a model (default: the embedded SmolLM2-135M-Instruct, which has a fast path: the fallback is
forced on it here so the three can be compared on one model) over a few chat prompts:

    python benchmarks/fallback_speed.py [--model PATH] [--max-new-tokens 64] [--device cpu]

Prints a Markdown table: decode tokens per second (prefill excluded for freespec; whole
``generate`` for transformers), tokens per verification pass, and whether each method's tokens
equal transformers' greedy output.
"""

from __future__ import annotations

import argparse
import time

import torch

import freespec
from freespec.model.hf_runner import TransformersRunner

PROMPTS = [
    "Write a short poem about the sea, then repeat its first line.",
    "List the numbers from 1 to 30, separated by commas.",
    "Explain in three sentences why the sky is blue.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = freespec.load(args.model, device=args.device)
    native = model.runner if not isinstance(model.runner, TransformersRunner) else None
    fallback = model.runner if native is None else TransformersRunner(model.hf_model, args.device)
    prompts = [model.encode(prompt) for prompt in PROMPTS]

    reference, seconds = [], 0.0
    for ids in prompts:
        inputs = torch.tensor([ids], device=model.hf_model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                             max_new_tokens=args.max_new_tokens, eos_token_id=None, pad_token_id=0)
        seconds += time.perf_counter() - started
        reference.append(output[0, len(ids):].tolist())
    tokens = sum(map(len, reference))
    rows = [("transformers generate", tokens / seconds, 1.0, "-")]

    runners = [("fallback", fallback)] + ([("native", native)] if native is not None else [])
    for runner_name, runner in runners:
        model.runner = runner
        model.reset()
        for drafter in ("none", "lookup", "recycling"):
            model.generate(prompt_ids=prompts[0], drafter=drafter, max_new_tokens=8)  # calibrate and warm up
            tokens = passes = 0
            seconds = 0.0
            same = 0
            for ids, expected in zip(prompts, reference):
                result = model.generate(prompt_ids=ids, drafter=drafter, max_new_tokens=args.max_new_tokens)
                tokens += result.stats.new_tokens
                passes += result.stats.forward_passes
                seconds += result.stats.decode_seconds
                same += result.token_ids == expected[: len(result.token_ids)]
            rows.append((f"freespec {runner_name} {drafter}", tokens / seconds, tokens / passes,
                         f"{same}/{len(prompts)}"))

    print(f"{args.max_new_tokens} new tokens x {len(prompts)} prompts, {model.name} on {args.device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | tokens/s | tokens/pass | same tokens as transformers |")
    print("|---|---|---|---|")
    for name, speed, per_pass, same in rows:
        print(f"| {name} | {speed:.1f} | {per_pass:.2f} | {same} |")


if __name__ == "__main__":
    main()
