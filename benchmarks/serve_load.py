"""Load test for ``freespec serve``: concurrent clients on loopback, streamed answers checked against whole ones.

Each of ``--clients`` threads sends ``--requests`` greedy requests with the official ``openai``
client, cycling through a few prompts, both drafters and streaming on and off. Greedy decoding is
lossless, so every answer to the same prompt must be the same text whatever the drafter or the
mode. Prints throughput, latency and time-to-first-token percentiles; exits 1 on any failed
request or differing answer.

    # start a server in this process on the embedded model (the lead's real-model run):
    python benchmarks/serve_load.py --model default --clients 8 --requests 25 --max-tokens 64
    # or point it at a server already running on this machine:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-id SmolLM2-135M-Instruct

Only loopback addresses are accepted; the run stops by itself after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlparse

PROMPTS = [
    "Name three primes.",
    "Write one sentence about copper.",
    "List the days of the week.",
    "What is two plus two?",
    "Say hello in French.",
    "Count from one to five.",
]


@dataclass
class Outcome:
    key: str
    mode: str  # "stream" or "whole"
    drafter: str
    text: str = ""
    seconds: float = 0.0
    first_token_seconds: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def mismatches(self) -> dict[str, set[str]]:
        """Prompts whose successful answers are not all the same text."""
        texts = defaultdict(set)
        for outcome in self.outcomes:
            if not outcome.error:
                texts[outcome.key].add(outcome.text)
        return {key: found for key, found in texts.items() if len(found) > 1}

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if not o.error]
        tokens = sum(o.completion_tokens for o in ok)
        return {
            "requests": len(self.outcomes),
            "failed": len(self.failed),
            "mismatched_prompts": len(self.mismatches()),
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(len(ok) / self.seconds, 3) if self.seconds else 0.0,
            "tokens_per_second": round(tokens / self.seconds, 2) if self.seconds else 0.0,
            "latency_p50_s": _percentile([o.seconds for o in ok], 50),
            "latency_p99_s": _percentile([o.seconds for o in ok], 99),
            "first_token_p50_s": _percentile([o.first_token_seconds for o in ok if o.first_token_seconds], 50),
            "first_token_p99_s": _percentile([o.first_token_seconds for o in ok if o.first_token_seconds], 99),
        }


def _percentile(values: list[float], q: int) -> float | None:
    """Nearest-rank percentile.

    >>> _percentile([4.0, 1.0, 3.0, 2.0], 50), _percentile([4.0, 1.0, 3.0, 2.0], 99), _percentile([], 50)
    (2.0, 4.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, -(-q * len(ordered) // 100) - 1)], 4)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"serve_load: only loopback servers may be load-tested, got {host!r}")


def _one(client, model_id: str, prompt: str, drafter: str, stream: bool, max_tokens: int) -> Outcome:
    outcome = Outcome(prompt, "stream" if stream else "whole", drafter)
    started = time.perf_counter()
    request = dict(model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                   temperature=0, extra_body={"drafter": drafter})
    try:
        if stream:
            parts = []
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **request):
                if chunk.choices and chunk.choices[0].delta.content:
                    if outcome.first_token_seconds is None:
                        outcome.first_token_seconds = time.perf_counter() - started
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    outcome.completion_tokens = chunk.usage.completion_tokens
            outcome.text = "".join(parts)
            if not outcome.completion_tokens:
                outcome.error = "the stream ended without a usage chunk"
        else:
            reply = client.chat.completions.create(**request)
            outcome.text = reply.choices[0].message.content
            outcome.completion_tokens = reply.usage.completion_tokens
    except Exception as error:  # every failure counts; the run goes on
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_load(url: str, model_id: str, clients: int = 8, requests: int = 25, max_tokens: int = 32,
             drafters: tuple[str, ...] = ("recycling", "none"), prompts: list[str] | None = None,
             time_limit: float = 600.0) -> Report:
    """Run the clients against the server at ``url`` (loopback only) and collect every outcome."""
    import openai

    check_loopback(url)
    prompts = prompts or PROMPTS
    report = Report()
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client_loop(number: int) -> None:
        client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="load-test", max_retries=0,
                               timeout=max(1.0, time_limit))
        for i in range(requests):
            index = number * requests + i
            prompt = prompts[index % len(prompts)]
            # Each prompt comes back with every drafter, streamed and whole, in turn.
            combination = (index // len(prompts)) % (2 * len(drafters))
            drafter, stream = drafters[combination % len(drafters)], combination >= len(drafters)
            if time.monotonic() > deadline:
                outcome = Outcome(prompt, "stream" if stream else "whole", drafter, error="time limit reached")
            else:
                outcome = _one(client, model_id, prompt, drafter, stream, max_tokens)
            with lock:
                report.outcomes.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on this machine (default: start one here with --model)")
    parser.add_argument("--model", default="default", help="model to serve when no --url (default: the embedded one)")
    parser.add_argument("--model-id", help="the model id the server expects (default: its first /v1/models entry)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--drafters", default="recycling,none")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds before the run gives up")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    drafters = tuple(args.drafters.split(","))
    if args.url:
        report = _run_against(args.url, args, drafters)
    else:
        import freespec
        from freespec.serve.app import BackgroundServer, create_app

        model = freespec.load(args.model)
        with BackgroundServer(create_app(model, max_queue=max(64, args.clients))) as url:
            report = _run_against(url, args, drafters)
    summary = report.summary()
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in summary.items()))
    for outcome in report.failed[:5]:
        print(f"failed ({outcome.mode}, {outcome.drafter}): {outcome.error}", file=sys.stderr)
    for key, texts in list(report.mismatches().items())[:5]:
        print(f"answers differ for {key!r}: {sorted(texts)}", file=sys.stderr)
    return 1 if report.failed or report.mismatches() else 0


def _run_against(url: str, args: argparse.Namespace, drafters: tuple[str, ...]) -> Report:
    import urllib.request

    check_loopback(url)
    model_id = args.model_id
    if model_id is None:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as response:
            model_id = json.load(response)["data"][0]["id"]
    return run_load(url, model_id, args.clients, args.requests, args.max_tokens, drafters, time_limit=args.time_limit)


if __name__ == "__main__":
    sys.exit(main())
