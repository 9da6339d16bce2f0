"""Interleaved multi-turn chats against ``freespec serve``, with and without the prefix cache.

``--conversations`` chats share a system prompt; their turns arrive interleaved (A1 B1 C1 A2 B2
C2 ...), so with ``--prefix-cache-mb 0`` a turn finds only the previous conversation's rows and
prefills its own history again, while the prefix cache keeps every conversation's. Each budget
gets a fresh in-process server on loopback; the answers must be the same text under both (exit 1
otherwise). Prints, per budget, the prompt tokens, the cached ones, the prefill seconds and the
wall time:

    python benchmarks/serve_conversations.py --conversations 4 --turns 4 --max-tokens 48
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import freespec  # noqa: E402
from freespec.serve.app import BackgroundServer, create_app  # noqa: E402
from tests.helpers import post  # noqa: E402

SYSTEM = ("You are a careful assistant for a team of engineers. Answer in plain English, briefly, and say "
          "when you are not sure. Prefer short lists to long paragraphs, give units with every number, and "
          "never invent a source. When asked about code, show the smallest example that works.")
TOPICS = ["copper wiring", "Python generators", "the French Revolution", "bread baking", "tide tables",
          "solar panels", "binary search", "honey bees"]
FOLLOW_UPS = ["Tell me more.", "Give one example.", "What is a common mistake?", "Summarize in one sentence.",
              "Why does that matter?", "What should I read next?"]


def run(model: freespec.Model, budget_mb: float, args: argparse.Namespace) -> tuple[dict, list[str]]:
    model.reset()  # each budget starts cold: no cached rows, no drafter state
    model.drafter(args.drafter)  # built (its costs measured) before the clock starts
    app = create_app(model, served_name="m", drafter=args.drafter, prefix_cache_mb=budget_mb)
    openings = [f"What should I know about {topic}?" for topic in TOPICS[: args.conversations]]
    histories = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}] for opening in openings]
    totals = {"prompt_tokens": 0, "cached_tokens": 0, "prefill_seconds": 0.0, "wall_seconds": 0.0}
    answers = []
    with BackgroundServer(app) as url:
        started = time.perf_counter()
        for turn in range(args.turns):
            for history in histories:
                status, body, _ = post(url + "/v1/chat/completions",
                                       {"messages": history, "max_tokens": args.max_tokens}, timeout=600)
                if status != 200:
                    raise SystemExit(f"request failed: {status} {body}")
                usage, text = body["usage"], body["choices"][0]["message"]["content"]
                totals["prompt_tokens"] += usage["prompt_tokens"]
                totals["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
                totals["prefill_seconds"] += usage["speculative"]["prefill_seconds"]
                answers.append(text)
                history += [{"role": "assistant", "content": text},
                            {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
        totals["wall_seconds"] = time.perf_counter() - started
    return totals, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the embedded SmolLM2-135M)")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--drafter", default="recycling")
    parser.add_argument("--prefix-cache-mb", type=float, default=512, help="the budget compared with 0")
    args = parser.parse_args(argv)
    if not 1 <= args.conversations <= len(TOPICS):
        parser.error(f"--conversations must be 1..{len(TOPICS)}")
    model = freespec.load(args.model)
    results = {}
    for budget in (0.0, args.prefix_cache_mb):
        results[budget], answers = run(model, budget, args)
        results[budget]["answers"] = answers
    same = results[0.0].pop("answers") == results[args.prefix_cache_mb].pop("answers")
    print(f"{'--prefix-cache-mb':>18} {'prompt tok':>10} {'cached':>8} {'prefill s':>9} {'wall s':>7}")
    for budget, totals in results.items():
        print(f"{budget:>18g} {totals['prompt_tokens']:>10} {totals['cached_tokens']:>8} "
              f"{totals['prefill_seconds']:>9.2f} {totals['wall_seconds']:>7.2f}")
    print("answers identical" if same else "ANSWERS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
