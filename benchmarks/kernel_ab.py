"""Two kernel builds in one process: the working tree's C sources against a git revision's.

On a shared VM the speed of fresh processes moves by 10-15% from run to run, more than most kernel
changes gain. Here both builds are loaded side by side in one process, each with a runner over
the same weights and the same 256 cached tokens, and their passes of q tokens alternate a few at
a time, so both see the same machine. A pass is a greedy decoding step's (the one-call decoder
and the exact greedy head's maxima; ``--whole-head``: all the logits). Prints, per q, each
build's median ms per pass, the median of the paired ratios (base / working tree: above 1 when the
working tree is faster) and whether the two builds' logits had the same bits, as a change that
keeps the kernels' contract must.

    python benchmarks/kernel_ab.py --base HEAD~1 [--model PATH] [--sizes 1,2,4,8] [--rounds 30] [--context 256]
    python benchmarks/kernel_ab.py --base HEAD~1 --sizes "" --requests 8 --context 400  # batched decoding steps

The base revision's ``freespec.h`` must declare what the working tree's does (comments aside:
both builds are called through one ABI); ``FREESPEC_KERNEL_ISA=avx2`` compares the AVX2 builds.
Two builds of the same sources (``--base HEAD`` on a clean tree) measure the method's own spread:
30 rounds gave paired medians of 0.996-1.009 on the Zen 4 VM.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from freespec.api import Model
from freespec.kernels import abi, select
from freespec.kernels.backend import CKernels
from freespec.kernels.build import SOURCES, compile_library
from freespec.model.loading import load
from freespec.model.runner import BatchPass, batch_logits, forward_batch

CONTEXT = 256
REPOSITORY = Path(__file__).resolve().parents[1]


def _declarations(header: bytes) -> list[str]:
    """A C header's tokens without its comments: what two builds must share."""
    return re.sub(rb"/\*.*?\*/|//[^\n]*", b" ", header, flags=re.S).decode().split()


def build_revision(revision: str, isa: str, directory: Path) -> ctypes.CDLL:
    """The kernels of ``revision`` (its csrc files, compiled for ``isa`` in ``directory``), declared
    with the working tree's ABI; SystemExit with one line if they cannot be had."""
    for source in SOURCES:
        path = source.relative_to(REPOSITORY).as_posix()
        shown = subprocess.run(["git", "-C", str(REPOSITORY), "show", f"{revision}:{path}"], capture_output=True)
        if shown.returncode != 0:
            raise SystemExit(f"kernel_ab: no {path} at {revision!r}: {shown.stderr.decode().strip()}")
        if source.name == "freespec.h" and _declarations(shown.stdout) != _declarations(source.read_bytes()):
            raise SystemExit(f"kernel_ab: {path} at {revision!r} declares other things than the working tree's: "
                             "the two builds would not share one ABI")
        (directory / source.name).write_bytes(shown.stdout)
    library = directory / f"kernels-{isa}-base.so"
    built = compile_library(directory / SOURCES[-1].name, isa, library)
    if built.returncode != 0:
        raise SystemExit(f"kernel_ab: {revision!r}'s kernels do not compile: {built.stderr.strip().splitlines()[0]}")
    return abi.declare(ctypes.CDLL(str(library)))


def alternating(names: list[str], rounds: int, batch: int, step) -> dict[str, list[float]]:
    """Each name's ms per ``step(name)``, one figure per round: ``rounds`` rounds of ``batch`` steps
    a name, the names' order flipped every round, after a first round that warms them up."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds + 1):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(batch):
                step(name)
            if index:
                times[name].append(1000 * (time.perf_counter() - start) / batch)
    return times


def paired_costs(runners: dict[str, object], sizes: list[int], rounds: int, batch: int,
                 cached: int = CONTEXT, seed: int = 0, whole_head: bool = False) -> list[dict]:
    """Per q: each of the two runners' median ms per pass of q tokens after ``cached`` ones, over
    ``rounds`` alternating batches of ``batch`` passes (the order flips each round), the paired
    ratios' median (first runner over second) and whether their logits were the same bits.

    A pass is a greedy decoding step's (the one-call decoder, then the exact greedy head's
    maxima), or with ``whole_head`` the pass and all its logits (as forward_cost.py times it)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(1000, *(runner.vocab_size for runner in runners.values()))
    context = torch.randint(vocab, (cached,), generator=generator)
    names = list(runners)
    rows = []
    for q in sizes:
        tokens = torch.randint(vocab, (q,), generator=generator)
        positions = torch.arange(cached, cached + q)
        mask = torch.ones(q, q, dtype=torch.bool).tril_()
        ids, depths, tree_mask = tokens.numpy(), np.arange(q), mask.numpy()

        def step(runner) -> None:
            if whole_head:
                runner.logits(runner.forward(tokens, positions, mask))
            else:
                runner.tree_logits(ids, depths, tree_mask).argmax

        for runner in runners.values():
            runner.reset(cached + q + 1)
            runner.prefill(context)
        times = alternating(names, rounds, batch, lambda name: step(runners[name]))
        logits = {name: runner.logits(runner.forward(tokens, positions, mask)) for name, runner in runners.items()}
        first, second = names
        rows.append({"q": q, **{name: statistics.median(times[name]) for name in names},
                     "ratio": statistics.median(a / b for a, b in zip(times[first], times[second])),
                     "same_bits": torch.equal(logits[first], logits[second])})
    return rows


def batched_costs(runners: dict[str, object], requests: int, rounds: int, batch: int, cached: int = CONTEXT,
                  seed: int = 0) -> dict:
    """A batched decoding step of ``requests`` requests (each one token after ``cached`` cached tokens
    of its own, in forks of the runner; one pass with attention per request, then one exact greedy
    head call over all rows, as the server's batch runs them): each build's median ms per step over
    ``rounds`` alternating batches of ``batch`` steps, the paired ratios' median (first build over
    second) and whether the two builds' final hidden states had the same bits."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(1000, *(runner.vocab_size for runner in runners.values()))
    contexts = [torch.randint(vocab, (cached + index,), generator=generator) for index in range(requests)]
    tokens = torch.randint(vocab, (requests,), generator=generator)
    forks = {name: [runner.fork() for _ in range(requests)] for name, runner in runners.items()}
    for runs in forks.values():
        for fork, context in zip(runs, contexts):
            fork.reset(len(context) + 2)
            fork.prefill(context)
    passes = {name: [BatchPass(fork, tokens[index:index + 1], torch.tensor([len(contexts[index])]),
                               torch.ones(1, 1, dtype=torch.bool)) for index, fork in enumerate(runs)]
              for name, runs in forks.items()}

    def step(name: str) -> list[torch.Tensor]:
        hidden = forward_batch(passes[name])
        for part in batch_logits(forks[name][0], hidden, [0] * requests):
            part.argmax
        return hidden

    names = list(runners)
    times = alternating(names, rounds, batch, step)
    first, second = names
    hidden = {name: torch.cat(step(name)) for name in names}
    return {"q": f"{requests} requests x 1", **{name: statistics.median(times[name]) for name in names},
            "ratio": statistics.median(a / b for a, b in zip(times[first], times[second])),
            "same_bits": torch.equal(hidden[first], hidden[second])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision whose kernels to compare with")
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--sizes", default="1,2,4,8", help="tokens per pass, comma-separated")
    parser.add_argument("--rounds", type=int, default=30, help="alternations of the two builds per size")
    parser.add_argument("--batch", type=int, default=10, help="passes per build and round")
    parser.add_argument("--context", type=int, default=CONTEXT, help=f"cached tokens before each pass (default {CONTEXT})")
    parser.add_argument("--requests", default="",
                        help="also batched decoding steps of these numbers of requests, comma-separated "
                             "(one token each after --context cached tokens plus one per request)")
    parser.add_argument("--whole-head", action="store_true",
                        help="time every pass with all its logits (default: a greedy step's, the exact greedy head's maxima)")
    args = parser.parse_args(argv)
    working = select()
    if not isinstance(working, CKernels):
        raise SystemExit("kernel_ab: no C kernel build here (a C compiler and an x86-64 CPU with AVX2 are needed)")
    loaded = load(args.model)
    with tempfile.TemporaryDirectory() as directory:
        base = CKernels(build_revision(args.base, working.isa, Path(directory)), working.isa)
        runners = {"base": Model(loaded, kernels=base).runner, "working tree": Model(loaded, kernels=working).runner}
        sizes = [int(size) for size in args.sizes.split(",") if size]
        rows = paired_costs(runners, sizes, args.rounds, args.batch, cached=args.context, whole_head=args.whole_head)
        rows += [batched_costs(runners, int(requests), args.rounds, args.batch, cached=args.context)
                 for requests in args.requests.split(",") if requests]
    head = "all logits" if args.whole_head else "a greedy step's maxima"
    print(f"{working.isa} kernels, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.batch} passes "
          f"after {args.context} cached tokens ({head}), base {args.base}\n")
    print("| q | base ms | working tree ms | base / working tree (paired median) | same bits |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['q']} | {row['base']:.3f} | {row['working tree']:.3f} | {row['ratio']:.3f} | "
              f"{'yes' if row['same_bits'] else 'NO'} |")
    return 0 if all(row["same_bits"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
