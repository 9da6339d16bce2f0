"""Aggregate decoding rate of continuous batching, with and without speculation, server excluded.

At each number of concurrent requests n, ``n`` forks of the model decode the answers to ``n``
Spec-Bench first turns together through :class:`freespec.engine.batch.Batch` (one forward pass
carries every request's step). Every prompt is prefilled first, so the figure is the decoding
phase alone: new tokens of all requests / seconds from the first decoding pass to the last.
Speculation modes run interleaved at each level on the same prompts; each mode keeps its forks
across levels (a server's slots keep their drafters), warmed first with other prompts. Every
answer must be the same tokens in every mode (greedy is lossless): a differing one is reported.

``--steady R``: a server's steady load instead: at each level n forks answer R prompts, each fork
taking the next prompt as soon as its answer is done (prompts are prefilled between the others'
decoding steps), one batch per mode kept across levels; the rate counts the whole run, prefill
included, until the last answer.

    PYTHONPATH=. python benchmarks/batch_decode.py --levels 1,2,4,8,16 --modes none,recycling --tokens 64
    PYTHONPATH=. python benchmarks/batch_decode.py --levels 1,4,8,16 --steady 32 --tokens 128

Prints a Markdown table: tokens/s per mode and level, the ratio to ``none``, τ (tokens per
request per pass), rows per pass, and passes.
"""

from __future__ import annotations

import argparse
import time

import torch

from freespec.api import Model
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions
from freespec.engine.batch import Batch, Running
from freespec.model.loading import load


def decode_together(forks: list[Model], prompts: list[list[int]], drafter: str, tokens: int) -> dict:
    """Decode one answer per fork, all in one batch; the decoding phase's figures."""
    running = [Running(fork.stream(prompt_ids=prompt, drafter=drafter, max_new_tokens=tokens, reuse_prefix=False))
               for fork, prompt in zip(forks, prompts)]
    batch = Batch()
    while any(request.generation.prefilling for request in running):
        batch.step(running)
    passes, rows, started = 0, 0, time.perf_counter()
    while not all(request.generation.done for request in running):
        batch.step(running)
        passes += 1
        rows += sum(request.generation.stats.draft_sizes[-1] + 1 for request in running if request.emitted)
    seconds = time.perf_counter() - started
    for request in running:
        if request.error is not None:
            raise request.error
    generations = [request.generation for request in running]
    new = sum(len(generation.token_ids) for generation in generations)
    return {"tokens_per_second": new / seconds, "passes": passes, "rows_per_pass": rows / max(passes, 1),
            "tau": new / max(sum(generation.stats.forward_passes for generation in generations), 1),
            "answers": [generation.token_ids for generation in generations]}


def decode_steadily(forks: list[Model], prompts: list[list[int]], drafter: str, tokens: int, batch: Batch) -> dict:
    """Answer every prompt with ``len(forks)`` requests running at all times: a fork that finishes
    takes the next prompt at once (a server under steady load). Figures over the whole run,
    prefill included, until the last answer."""
    queue = list(enumerate(prompts))
    answers: list[list[int]] = [[] for _ in prompts]
    slots: dict[int, tuple[int, Running]] = {}  # fork → (prompt index, its request)
    passes = rows = verified = 0
    started = time.perf_counter()
    while queue or slots:
        for fork in range(len(forks)):
            if fork not in slots and queue:
                index, prompt = queue.pop(0)
                slots[fork] = (index, Running(forks[fork].stream(prompt_ids=prompt, drafter=drafter,
                                                                  max_new_tokens=tokens, reuse_prefix=False)))
        running = [request for _, request in slots.values()]
        batch.step(running)
        passes += 1
        for fork, (index, request) in list(slots.items()):
            if request.error is not None:
                raise request.error
            if request.emitted:
                rows += request.generation.stats.draft_sizes[-1] + 1
                verified += 1
            if request.generation.done:
                answers[index] = request.generation.token_ids
                del slots[fork]
    seconds = time.perf_counter() - started
    new = sum(len(answer) for answer in answers)
    return {"tokens_per_second": new / seconds, "passes": passes, "rows_per_pass": rows / max(passes, 1),
            "tau": new / max(verified, 1), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF or model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--levels", default="1,2,4,8,16", help="numbers of concurrent requests")
    parser.add_argument("--modes", default="none,recycling", help="drafters, 'none' for plain batching")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every level (other prompts each round)")
    parser.add_argument("--steady", type=int, default=None, metavar="R",
                        help="steady load instead: R requests per level, each fork taking the next as it finishes "
                             "(prefill included in the rate)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(level) for level in args.levels.split(",")]
    modes = args.modes.split(",")
    model = Model(load(args.model))
    questions = load_questions(DEFAULT_QUESTIONS)
    prompts = [model.encode(question.turns[0]) for question in questions]
    warm, prompts = prompts[: max(levels)], prompts[max(levels):]
    forks = {mode: [model.fork() for _ in range(max(levels))] for mode in modes}
    batches = {mode: Batch() for mode in modes}  # steady load: one batch per mode, as in a server
    for mode in modes:  # every slot's drafter warmed with one answer of its own, as a server's slots are
        decode_steadily(forks[mode], warm, mode, args.tokens, batches[mode])
    results: dict[tuple[str, int], list[dict]] = {}
    differing = 0
    for round_ in range(args.rounds):
        for level in levels:
            span = args.steady or max(levels)
            chosen = prompts[(round_ * span) % len(prompts):][: args.steady or level]
            answers = None
            for mode in modes:
                if args.steady:
                    result = decode_steadily(forks[mode][:level], chosen, mode, args.tokens, batches[mode])
                else:
                    result = decode_together(forks[mode][:level], chosen, mode, args.tokens)
                results.setdefault((mode, level), []).append(result)
                answers = answers or result["answers"]
                differing += sum(a != b for a, b in zip(answers, result["answers"]))
                print(f"round {round_ + 1} level {level} {mode}: {result['tokens_per_second']:.1f} tok/s, "
                      f"tau {result['tau']:.2f}, {result['rows_per_pass']:.1f} rows/pass", flush=True)

    def mean(mode: str, level: int, key: str) -> float:
        return sum(result[key] for result in results[mode, level]) / len(results[mode, level])

    print(f"\n| mode | {' | '.join(f'{level} requests' for level in levels)} |")
    print(f"|---|{'---|' * len(levels)}")
    for mode in modes:
        cells = []
        for level in levels:
            rate = mean(mode, level, "tokens_per_second")
            ratio = rate / mean(modes[0], level, "tokens_per_second")
            cells.append(f"{rate:.1f} ({ratio:.2f}x, τ {mean(mode, level, 'tau'):.2f}, "
                         f"{mean(mode, level, 'rows_per_pass'):.1f} rows)")
        print(f"| {mode} | {' | '.join(cells)} |")
    print(f"\ndiffering answers: {differing}")


if __name__ == "__main__":
    main()
