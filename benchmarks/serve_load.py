"""Load test for ``freespec serve``: concurrent clients on loopback, streamed answers checked against whole ones.

Two modes. **Scaling** (``--levels 1,2,4,8,16``): at each number of concurrent clients, with and
without speculation, the clients share the streaming of greedy answers to the same ``--requests``
Spec-Bench first turns (each client asks the next one as soon as it has its answer); prints a
Markdown table of aggregate tokens/s (and its ratio to one client), p50/p99 time to first token
(and the p99 of the requests after each client's first, which arrive as other answers end rather
than all at once at the start),
p50/p99 inter-token latency (the gaps between streamed chunks, spread over their tokens) and
failed or differing answers (each prompt's answer must be the same text at every load and with
every drafter). ``--llama-cpp`` runs the same against llama-cpp-python's server on the same GGUF
(one request at a time: it has no batching), when installed. The clients stream over plain HTTP
(``--client openai``: the official client, whose parsing costs more of the machine the server
runs on); the server runs in this process unless ``--url`` names one started apart (``freespec
serve --drafters DRAFTER,none``), as a deployment runs it.

    python benchmarks/serve_load.py --levels 1,2,4,8,16 --requests 32 --max-tokens 64 --llama-cpp
    freespec serve --port 8011 &  python benchmarks/serve_load.py --url http://127.0.0.1:8011 --levels 1,8

**Checking** (the default): each of ``--clients`` threads sends ``--requests`` greedy requests
with the official ``openai`` client, cycling through a few prompts, both drafters and streaming
on and off. Greedy decoding is lossless, so every answer to the same prompt must be the same
text whatever the drafter or the mode. Prints throughput, latency and time-to-first-token
percentiles; exits 1 on any failed request or differing answer.

    # start a server in this process on the embedded model (the lead's real-model run):
    python benchmarks/serve_load.py --model default --clients 8 --requests 25 --max-tokens 64
    # or point it at a server already running on this machine:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-id SmolLM2-135M-Instruct

Only loopback addresses are accepted; the run stops by itself after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

from freespec import DEFAULT_DRAFTER

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
             drafters: tuple[str, ...] = (DEFAULT_DRAFTER, "none"), prompts: list[str] | None = None,
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


@dataclass
class Timed:
    """One streamed answer of the scaling run: when each chunk of text arrived."""

    prompt: str
    text: str = ""
    tokens: int = 0
    first_token_seconds: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between chunks, per token of the later chunk
    error: str | None = None
    client_first: bool = False  # its client's first request: all of those arrive at once


def _openai_chunks(client, model_id: str, messages: list[dict], max_tokens: int, extra: dict) -> Iterator:
    """(content, completion tokens) of each chunk of a stream read with the official ``openai`` client."""
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra):
        yield (chunk.choices[0].delta.content if chunk.choices else None,
               chunk.usage.completion_tokens if chunk.usage else None)


def _http_chunks(url: str, api_key: str, model_id: str, messages: list[dict], max_tokens: int,
                 extra: dict) -> Iterator:
    """The same over a plain HTTP stream (the standard library's ``http.client``, each ``data:`` line
    parsed with ``json``): the clients share the measured machine with the server, and the ``openai``
    client's per-chunk parsing took a few percent of a 2-core machine (see docs/serving.md, Load test)."""
    body = json.dumps({"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, **extra})
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    try:
        connection.request("POST", address.path.rstrip("/") + "/v1/chat/completions", body,
                           {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read(300).decode(errors='replace')}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            choices, usage = chunk.get("choices"), chunk.get("usage")
            yield (choices[0].get("delta", {}).get("content") if choices else None,
                   usage["completion_tokens"] if usage else None)
    finally:
        connection.close()


def _timed(prompt: str, chunks: Iterator) -> Timed:
    """One streamed answer timed: ``chunks`` yields (content, completion tokens) per chunk, sending the
    request when first asked. Tokens and gaps are corrected where the server sent several tokens a
    chunk or no usage."""
    outcome = Timed(prompt)
    parts, last = [], None
    started = time.perf_counter()
    try:
        for content, tokens in chunks:
            now = time.perf_counter()
            if content:
                parts.append(content)
                if last is None:
                    outcome.first_token_seconds = now - started
                else:
                    outcome.gaps.append(now - last)
                last = now
            if tokens:
                outcome.tokens = tokens
    except Exception as error:  # every failure counts; the run goes on
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.text = "".join(parts)
    if not outcome.error and not outcome.tokens:  # a server that sends no usage: one token a chunk
        outcome.tokens = len(parts)
    if outcome.gaps and outcome.tokens > len(parts):  # several tokens in a chunk: spread its gap over them
        per_chunk = outcome.tokens / len(parts)
        outcome.gaps = [gap / per_chunk for gap in outcome.gaps for _ in range(round(per_chunk))]
    return outcome


CLIENTS = ("http", "openai")
"""The scaling mode's clients: plain HTTP streams (default) or the official ``openai`` client."""


def run_level(url: str, model_id: str, clients: int, prompts: list[str], max_tokens: int,
              extra: dict, api_key: str = "load-test", system: str = "",
              client: str = "http") -> tuple[list[Timed], float]:
    """``clients`` threads streaming one answer to each of ``prompts`` (each takes the next prompt
    as soon as its last answer is done, so every level serves the same work); the answers and the
    wall time of the whole level. ``api_key``: the tenant the requests come from; ``system``: a
    system message every request starts with (none if empty); ``client``: one of CLIENTS."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {client!r}")
    check_loopback(url)
    outcomes: list[Timed] = []
    lock = threading.Lock()
    # each client's first prompt is its own before any thread starts: the opening burst is always
    # the first ``clients`` prompts, however late a thread gets going
    waiting = list(reversed(prompts[clients:]))

    def client_loop(prompt: str) -> None:
        if client == "openai":
            import openai

            sdk = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
        first = True
        while True:
            messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": prompt}]
            if client == "openai":
                chunks = _openai_chunks(sdk, model_id, messages, max_tokens, extra)
            else:
                chunks = _http_chunks(url, api_key, model_id, messages, max_tokens, extra)
            outcome = _timed(prompt, chunks)
            outcome.client_first, first = first, False
            with lock:
                outcomes.append(outcome)
                if not waiting:
                    return
                prompt = waiting.pop()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(prompt,), daemon=True) for prompt in prompts[:clients]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def scaling(url: str, model_id: str, server: str, modes: dict[str, dict], levels: list[int], prompts: list[str],
            max_tokens: int, warm_up: list[str], system: str = "", client: str = "http") -> list[dict]:
    """One row per (speculation mode, clients): the scaling table's numbers. Each (mode, clients)
    run is a tenant of its own (its own API key): a drafter that keeps a tenant's earlier requests
    (``suffix``) would otherwise draft each answer from the same prompt's answer at an earlier
    level, and a server's prefix cache would spare it the prompts' prefill. ``system``: a system
    message every request starts with; ``client``: one of CLIENTS."""
    rows, answers, base = [], {}, {}  # answers: prompt -> the first text it got; base: mode -> 1-client rate
    for extra in modes.values():  # warm up: every slot exists and its drafters have learned, as in a running server
        run_level(url, model_id, max(levels), warm_up, max_tokens, extra, system=system, client=client)
    for clients in levels:  # the modes interleaved at each level: a drifting machine shifts both alike
        for mode, extra in modes.items():
            outcomes, seconds = run_level(url, model_id, clients, prompts, max_tokens, extra,
                                          api_key=f"load-test-{mode}-{clients}", system=system, client=client)
            ok = [o for o in outcomes if not o.error]
            differing = 0
            for outcome in ok:
                differing += answers.setdefault(outcome.prompt, outcome.text) != outcome.text
            rate = sum(o.tokens for o in ok) / seconds
            base.setdefault(mode, rate)
            gaps = [gap for o in ok for gap in o.gaps]
            first = [o.first_token_seconds for o in ok if o.first_token_seconds is not None]
            # the requests after each client's first: they arrive as others finish, not in one burst
            later = [o.first_token_seconds for o in ok if o.first_token_seconds is not None and not o.client_first]
            rows.append({"server": server, "speculation": mode, "clients": clients, "tokens_per_second": round(rate, 1),
                         "vs_1_client": round(rate / base[mode], 2), "ttft_p50_s": _percentile(first, 50),
                         "ttft_p99_s": _percentile(first, 99), "ttft_p99_later_s": _percentile(later, 99),
                         "itl_p50_ms": _ms(_percentile(gaps, 50)),
                         "itl_p99_ms": _ms(_percentile(gaps, 99)), "failed": len(outcomes) - len(ok),
                         "differing": differing})
            print(_row(rows[-1]), flush=True)
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


COLUMNS = ("server", "speculation", "clients", "tokens_per_second", "vs_1_client", "ttft_p50_s", "ttft_p99_s",
           "ttft_p99_later_s", "itl_p50_ms", "itl_p99_ms", "failed", "differing")


def _row(row: dict) -> str:
    return "| " + " | ".join(str(row[column]) for column in COLUMNS) + " |"


def spec_bench_prompts(count: int, tokens: int = 0, tokenizer=None) -> list[str]:
    """``count`` Spec-Bench first turns spread over the categories; with ``tokens``, each made
    ``tokens`` long (by ``tokenizer``): followed by the next questions' turns, then cut."""
    from freespec.bench.run import DEFAULT_QUESTIONS, load_questions

    turns = [question.turns[0] for question in load_questions(DEFAULT_QUESTIONS)]
    step = max(1, len(turns) // count)  # spread over the categories
    prompts = []
    for start in range(0, step * count, step):
        prompt, following = turns[start % len(turns)], start + 1
        if tokens:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            while len(ids) < tokens:
                ids += tokenizer.encode("\n\n" + turns[following % len(turns)], add_special_tokens=False)
                following += 1
            prompt = tokenizer.decode(ids[:tokens])
        prompts.append(prompt)
    return prompts


def system_prompt(tokens: int, tokenizer) -> str:
    """A system message of ``tokens`` tokens (by ``tokenizer``) that every request of a run shares:
    Spec-Bench's last turns, which no prompt of a level starts with, joined and cut."""
    from freespec.bench.run import DEFAULT_QUESTIONS, load_questions

    ids: list[int] = []
    for question in reversed(load_questions(DEFAULT_QUESTIONS)):
        if len(ids) >= tokens:
            break
        ids += tokenizer.encode(question.turns[-1] + "\n\n", add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaCppServer:
    """llama-cpp-python's OpenAI server on ``gguf`` in a subprocess on a loopback port."""

    def __init__(self, gguf: str, threads: int):
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host",
                                         "127.0.0.1", "--port", port, "--n_threads", str(threads), "--n_ctx", "4096"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> str:
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("llama-cpp-python's server exited (is llama-cpp-python[server] installed?)")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                return self.url
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("llama-cpp-python's server did not start within 120 s")

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def main_scaling(args: argparse.Namespace) -> int:
    """The scaling table: freespec (with and without speculation), then llama-cpp-python's server."""
    import freespec
    from freespec.model.loading import embedded_gguf_path
    from freespec.serve.app import BackgroundServer, create_app

    levels = [int(level) for level in args.levels.split(",")]
    model = freespec.load(args.model, threads=args.threads)  # with --url: its tokenizer makes the prompts
    every = spec_bench_prompts(args.requests + max(levels), args.prompt_tokens, model.tokenizer)
    prompts, warm_up = every[: args.requests], every[args.requests :]  # the warm-up asks other questions
    system = system_prompt(args.system_prompt_tokens, model.tokenizer) if args.system_prompt_tokens else ""
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    modes = {args.drafter: {"drafter": args.drafter}, "none": {"drafter": "none"}}
    rows = []
    if args.url:  # a server of its own process (`freespec serve --drafters DRAFTER,none`): its prefix reuse applies
        rows += scaling(args.url, args.model_id or _first_model(args.url), "freespec", modes, levels, prompts,
                        args.max_tokens, warm_up, system, args.client)
    else:
        model.drafter(args.drafter)  # its costs are measured before the clock starts, as `freespec serve` does
        # prefix reuse off unless asked: a level's requests then prefill their whole prompts, as the
        # earlier tables in docs/serving.md were measured (levels are tenants of their own either way)
        app = create_app(model, drafter=args.drafter, drafters=("none",), max_queue=max(64, max(levels)),
                         max_batch=max(levels), prefix_reuse=args.prefix_reuse)
        with BackgroundServer(app) as url:
            rows += scaling(url, model.name, "freespec", modes, levels, prompts, args.max_tokens, warm_up, system,
                            args.client)
    if args.llama_cpp:
        gguf = embedded_gguf_path() if args.model == "default" else args.model
        with LlamaCppServer(str(gguf), threads=args.threads or os.cpu_count() or 1) as url:
            rows += scaling(url, _first_model(url), "llama-cpp-python", {"-": {}}, levels, prompts, args.max_tokens,
                            warm_up, system, args.client)
    if args.json:
        print(json.dumps(rows))
    return 1 if any(row["failed"] or (row["differing"] and row["server"] == "freespec") for row in rows) else 0


def _first_model(url: str) -> str:
    """The first model id a server lists at /v1/models."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on this machine (default: start one here with --model)")
    parser.add_argument("--model", default="default", help="model to serve when no --url (default: the embedded one)")
    parser.add_argument("--model-id", help="the model id the server expects (default: its first /v1/models entry)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25,
                        help="requests per client; scaling mode: requests per level, shared by its clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--drafters", default=f"{DEFAULT_DRAFTER},none")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds before the run gives up")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--levels", help="scaling mode: numbers of concurrent clients, e.g. 1,2,4,8,16")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER, help="scaling mode: the speculative drafter")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="scaling mode: also run llama-cpp-python's server on the same GGUF")
    parser.add_argument("--threads", type=int, help="scaling mode: both servers' threads (default: every core)")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="scaling mode: make each prompt this many tokens (the next Spec-Bench turns "
                             "appended, then cut; default: each first turn as it is)")
    parser.add_argument("--system-prompt-tokens", type=int, default=0,
                        help="scaling mode: every request starts with the same system message of this many "
                             "tokens (default: none)")
    parser.add_argument("--client", choices=CLIENTS, default="http",
                        help="scaling mode: the clients' streams, plain HTTP (default: the lightest, since the "
                             "clients share the machine with the server) or the official openai client")
    parser.add_argument("--prefix-reuse", action="store_true",
                        help="scaling mode: let freespec's server reuse the prompt rows a level's earlier or "
                             "running requests share (the server's default; off here by default)")
    args = parser.parse_args(argv)
    if args.levels:
        return main_scaling(args)
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
