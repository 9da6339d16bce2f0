"""The ``freespec`` command: stream one completion, run a JSONL batch, or measure forward costs.

Every input the user can fix (arguments, input lines, prompts the model cannot take, models that
cannot be found) is reported as one line, ``freespec: error: ...``, with exit status 2, so
scripts get a stable message instead of a traceback.

torch and transformers take seconds to import, so this module imports them (and every part of
freespec that needs them) only inside the commands: ``--help``, ``--version`` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from freespec import DEFAULT_DRAFTER, __version__
from freespec.engine.sampling import (  # light: no torch
    OPTIONS,
    SAMPLING_KEYS,
    SamplingParams,
    bias_from_json,
)
from freespec.paths import AtomicFile
from freespec.serve import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_MB, DEFAULT_STATE_INTERVAL

if TYPE_CHECKING:
    from freespec.api import Model
    from freespec.engine.loop import Generation, GenerationStats

USAGE_ERROR = 2
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
DEFAULT_MAX_NEW_TOKENS = 256
STATE_HELP = ("what the drafters learn across requests (Token Recycling's tables, the suffix drafter's earlier "
              "requests), loaded from FILE if it exists so that the first requests draft warm")


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit status 2."""


def _drafter_names() -> str:
    from freespec.drafters import DRAFTERS

    return ", ".join(DRAFTERS)


def _peer_names() -> str:
    from freespec.bench.methods import PEERS

    return ", ".join(PEERS)


def _default_methods() -> str:
    from freespec.bench.methods import DEFAULT_METHODS

    return ",".join(DEFAULT_METHODS)


class _HelpFormatter(argparse.HelpFormatter):
    """Fills in the names of drafters and benchmark methods only when help is printed: they are
    defined beside code that needs torch."""

    NAMES: dict[str, Callable[[], str]] = {"{drafters}": _drafter_names, "{peers}": _peer_names,
                                           "{default_methods}": _default_methods}

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        for marker, names in self.NAMES.items():
            if marker in text:
                text = text.replace(marker, names())
        return text


class _Parser(argparse.ArgumentParser):
    """Reports argument errors like every other user error (subcommand parsers inherit this)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _sampling_options(seed: bool = True) -> argparse.ArgumentParser:
    """One flag per field of :class:`freespec.engine.sampling.SamplingParams` (``--top-k`` for
    ``top_k``), described by its help; the dataclass checks the values (its messages name the field).

    ``bench`` has its own ``--seed`` (per question and turn), so it takes these without one.
    """
    options = _Parser(add_help=False)
    for option in OPTIONS:
        if option.name != "seed" or seed:
            default = "" if option.default is None else f" (default: {option.default})"
            options.add_argument(f"--{option.name.replace('_', '-')}", type=option.kind, default=option.default,
                                 metavar=option.metavar, help=option.help + default)
    options.add_argument("--logit-bias", type=_bias_pair, action="append", metavar="ID=BIAS",
                         help="add BIAS (-100 to 100) to token ID's logit before everything else, greedy "
                              "decoding included (repeat for several tokens)")
    return options


def _bias_pair(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (a token id and a number), got {text!r}") from None


def _sampling(args: argparse.Namespace, request: dict | None = None, seed: bool = True) -> SamplingParams:
    """How a request samples: its own keys over the command's flags (``seed=False``: the command's
    ``--seed`` is not a sampling seed). Raises ValueError for a bad value."""
    keys = [key for key in SAMPLING_KEYS if key != "seed" or seed]
    options = {key: (request or {}).get(key, getattr(args, key)) for key in keys}
    if request is not None and "logit_bias" in request:
        bias = request["logit_bias"]  # JSON's keys are strings; anything but an object SamplingParams refuses
        try:
            options["logit_bias"] = bias_from_json(bias) if isinstance(bias, dict) else bias
        except ValueError as error:
            raise ValueError(f"logit_bias: {error}") from None
    elif getattr(args, "logit_bias", None):
        options["logit_bias"] = tuple(args.logit_bias)
    return SamplingParams(**options)


def _drafter_name(text: str) -> str:
    if text == DEFAULT_DRAFTER:  # argparse converts the default on every parse, and checking imports torch
        return text
    from freespec.drafters import check_name

    try:
        return check_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _drafter_names(text: str) -> list[str]:
    return [_drafter_name(name.strip()) for name in text.split(",") if name.strip()]


def _stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a non-empty string")
    return text


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535; got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of megabytes >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="freespec", description="Lossless speculative decoding on the CPU.")
    parser.add_argument("--version", action="version", version=f"freespec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    model_options = _Parser(add_help=False)
    model_options.add_argument("--model", help="model directory, .gguf file or hub id owner/name; anything "
                               "else is taken for a local path (default: the embedded SmolLM2-135M-Instruct)")
    model_options.add_argument("--threads", type=_positive_int, metavar="N",
                               help="torch CPU threads, at most the CPUs this process may use "
                                    "(default: torch's, one per core)")
    model_options.add_argument("--device", default="cpu", metavar="DEVICE",
                               help="where the model runs: cpu, or any device torch has here (cuda, cuda:1, mps, "
                                    "...); the batch-invariant fast path is CPU-only, so there, and for families "
                                    "without a fast path, the model runs through transformers' own forward "
                                    "(default: cpu)")
    model_options.add_argument("--quiet", action="store_true", help="no statistics, no progress bars")
    model_options.add_argument("--tree", choices=("dynamic", "static"), default="dynamic",
                               help="Token Recycling's tree: best-first by recycled probabilities, "
                                    "or the paper's static template (default: dynamic)")
    model_options.add_argument("--datastore", type=Path, metavar="DIR",
                               help="datastore for the retrieval drafter and aded's tri-gram prior "
                                    "(freespec datastore build)")
    model_options.add_argument("--draft-model", type=Path, metavar="PATH",
                               help="a smaller model with the same tokenizer (directory or .gguf) for the "
                                    "draft-model drafter; in bench without --methods it also adds hf-assisted "
                                    "(transformers' assisted generation)")

    generate = commands.add_parser("generate", parents=[model_options, _sampling_options()], help="generate text",
                                   description="Stream one completion to stdout, or run a JSONL batch.")
    generate.add_argument("prompt", nargs="?", metavar="PROMPT",
                          help="the prompt; - reads it from standard input (omit with --input)")
    generate.add_argument("--drafter", type=_drafter_name, default=DEFAULT_DRAFTER, metavar="NAME",
                          help="draft source: {drafters}, or several joined by '+' "
                               f"(one fused tree); none is plain greedy decoding (default: {DEFAULT_DRAFTER})")
    generate.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                          help=f"most tokens to generate per prompt; with the prompt it must fit the model's "
                               f"context (default: {DEFAULT_MAX_NEW_TOKENS}, cut to the context left)")
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                          help="apply the model's chat template to prompts (default: on)")
    generate.add_argument("--budget", type=_positive_int, metavar="N",
                          help="fixed draft nodes per step (default: chosen from measured costs)")
    generate.add_argument("--stop", type=_stop_string, action="append", metavar="TEXT",
                          help="end the answer before TEXT (repeat for several; the first that comes ends it)")
    generate.add_argument("--state", type=Path, metavar="FILE", help=STATE_HELP + ", saved there afterwards")
    generate.add_argument("--input", metavar="FILE", help="JSONL requests, one "
                          '{"prompt": ...} or {"messages": [...]} per line, optional "max_new_tokens", '
                          '"logprobs" (N: each token\'s log-probability and N alternatives, as "token_logprobs"), '
                          '"stop" (a string or a list of them) '
                          f"and sampling keys ({', '.join(map(json.dumps, SAMPLING_KEYS))}, "
                          '"logit_bias": {"ID": BIAS}) overriding the flags')
    generate.add_argument("--parallel", type=_positive_int, default=8, metavar="N",
                          help="with --input: run up to N requests at once, batched into each forward pass "
                               "(each gets the output it gets alone; default: 8)")
    generate.add_argument("--output", metavar="FILE", help="JSONL results, one line per request; FILE is "
                          "replaced when the batch ends, stops on an error or is interrupted (until then "
                          "results go to a temporary file beside it), and left alone if nothing ran")
    generate.set_defaults(run=_generate)

    calibrate = commands.add_parser("calibrate", parents=[model_options], help="measure forward costs",
                                    description="Measure t(q), the cost of a forward pass over q tokens, "
                                                "and cache it for the budget policy.")
    calibrate.add_argument("--repeats", type=_positive_int, default=3, metavar="N",
                           help="timed runs per size; the median is kept (default: 3)")
    calibrate.set_defaults(run=_calibrate)

    bench = commands.add_parser("bench", parents=[model_options, _sampling_options(seed=False)],
                                help="benchmark methods on Spec-Bench",
                                description="Run methods over the same questions (every turn); write results.jsonl, "
                                            "summary.json, summary.md and PNG plots. --compare A B prints the "
                                            "changes between two result folders instead.")
    bench.add_argument("--methods",
                       help="comma-separated: freespec drafters ({drafters}) and peers ({peers}); peers that "
                            "cannot run here are skipped with a note (default: {default_methods}, and "
                            "hf-sample when sampling)")
    bench.add_argument("--questions", type=Path, default=None, metavar="FILE",
                       help="Spec-Bench-format JSONL (default: the 480 Spec-Bench questions shipped with freespec)")
    bench.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    bench.add_argument("--per-category", type=_positive_int, metavar="N",
                       help="first N questions of each category (default: all)")
    bench.add_argument("--limit", type=_positive_int, metavar="N", help="at most N questions (default: all)")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                       help=f"most tokens per answer (default: {DEFAULT_MAX_NEW_TOKENS})")
    bench.add_argument("--baseline", metavar="METHOD",
                       help="the method speedups are relative to (default: hf-greedy, or hf-sample when "
                            "sampling, if among the methods; else the first method)")
    bench.add_argument("--seed", type=int, default=0, help="seeds the RNGs per question and turn (default: 0)")
    bench.add_argument("--budget", type=_positive_int, metavar="N",
                       help="fixed draft nodes per step for every drafter (default: chosen from measured costs)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR",
                       help="folder for results and reports (default: bench-out)")
    bench.add_argument("--resume", action="store_true",
                       help="keep results.jsonl and skip what it holds (default: start over)")
    bench.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                       help="print the changes from result folder A to B and exit")
    bench.set_defaults(run=_bench)

    datastore = commands.add_parser("datastore", help="build the retrieval drafter's datastore",
                                    description="Corpus datastores for the retrieval drafter (REST).")
    datastore_commands = datastore.add_subparsers(dest="datastore_command", required=True)
    build = datastore_commands.add_parser(
        "build", help="tokenise a corpus and sort its suffixes",
        description="Tokenise CORPUS with the model's tokenizer and write a suffix-array datastore to DIR. "
                    "CORPUS is a text file (paragraphs split on blank lines) or a .jsonl file (each line a "
                    'string, or an object: its "text", else all its strings).')
    build.add_argument("corpus", type=Path, metavar="CORPUS")
    build.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    build.add_argument("--model", help="whose tokenizer to use (default: the embedded SmolLM2-135M-Instruct)")
    build.set_defaults(run=_datastore_build)


    serve = commands.add_parser("serve", parents=[model_options], help="serve an OpenAI-compatible HTTP API",
                                description="POST /v1/chat/completions and /v1/completions (streaming too), "
                                            "GET /v1/models, /health and /metrics.")
    serve.add_argument("--drafter", type=_drafter_name, default=DEFAULT_DRAFTER, metavar="NAME",
                       help=f"default draft source (default: {DEFAULT_DRAFTER})")
    serve.add_argument("--drafters", type=_drafter_names, metavar="A,B,...",
                       help="the drafters a request may name, each built once at start; the --drafter is "
                            "always one (default: the --drafter and none)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="(default: 8000)")
    serve.add_argument("--api-key", action="append", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every route but /health and /metrics; "
                            "repeat it for several tenants (default: $FREESPEC_API_KEY)")
    serve.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                       help="prefill every prompt whole; by default a request reuses the cache rows of its "
                            "tenant's (API key's) earlier prompts where they agree")
    serve.add_argument("--prefix-cache-mb", type=_megabytes, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                       help="memory for the cache rows of earlier prompts, every tenant's together, least recently "
                            f"used dropped first; 0 keeps only the last request's (default: {DEFAULT_PREFIX_CACHE_MB})")
    serve.add_argument("--request-timeout", type=_positive_seconds, metavar="SECONDS",
                       help="stop a request this long after it arrived, queueing and prefill included, "
                            "and answer 504 (default: no limit)")
    serve.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: --model)")
    serve.add_argument("--max-tokens", type=_positive_int, default=256, metavar="N",
                       help="tokens per answer when a request gives no max_tokens (default: 256)")
    serve.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                       help="requests that may wait (being tokenized or queued); more get 429 (default: 64)")
    serve.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                       help="requests generating at once, each forward pass carrying a step of each; an answer "
                            f"is the same whatever runs beside it (default: {DEFAULT_MAX_BATCH})")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, metavar="N",
                       help="largest request body (default: 1 MiB)")
    serve.add_argument("--replicas", type=_positive_int, metavar="N",
                       help="serve N copies of the model behind Ray Serve on a local Ray instance, each "
                            "conversation kept on one copy; --threads is then per copy (default: the cores "
                            "shared out) and --max-queue per copy (needs: pip install 'freespec[ray]'; "
                            "default: one copy in this process, no Ray)")
    serve.add_argument("--state", type=Path, metavar="FILE",
                       help=STATE_HELP + ", saved there every --state-interval and when the server stops (it holds "
                            "the tenants' earlier prompts and answers: keep it as private as they are; one process: "
                            "not with --replicas)")
    serve.add_argument("--state-interval", type=_positive_seconds, default=DEFAULT_STATE_INTERVAL, metavar="SECONDS",
                       help=f"seconds between saves of --state while requests end (default: {DEFAULT_STATE_INTERVAL:g})")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        args = _parser().parse_args(argv)
        args.run(args)
    except UsageError as error:
        print(f"freespec: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("freespec: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `freespec generate ... | head`: the reader left, as a SIGPIPE'd tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return BROKEN_PIPE
    return 0


def _check_draft_model(names: list[str], args: argparse.Namespace) -> None:
    """Refuse the draft-model drafter without --draft-model before any model is loaded."""
    if args.draft_model is None and any("draft-model" in name.split("+") for name in names):
        raise UsageError("the draft-model drafter needs --draft-model PATH (a smaller model with the same tokenizer)")


def _load(args: argparse.Namespace, budget: int | None = None) -> Model:
    from transformers.utils import logging as transformers_logging

    from freespec.api import DamagedStateError, load
    from freespec.model.hf_runner import fallback_notice
    from freespec.model.loading import ModelLoadError
    from freespec.model.weights import UnsupportedModelError

    if getattr(args, "drafter", None):
        _check_draft_model([args.drafter], args)
    if args.quiet or not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()  # it draws them into files and pipes too
    try:
        model = load(args.model, threads=args.threads, budget=budget, tree_shape=args.tree,
                     datastore=args.datastore, draft_model=args.draft_model, device=args.device)
        if getattr(args, "state", None) and args.state.exists():
            try:
                model.load_state(args.state)
            except DamagedStateError as error:  # overwritten by this run's state at the end
                print(f"freespec: warning: {error}; starting without it", file=sys.stderr)
    except (ModelLoadError, UnsupportedModelError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not args.quiet and (notice := fallback_notice(model.runner)):
        print(f"[freespec] {notice}", file=sys.stderr)
    return model


def _save_state(model: Model, args: argparse.Namespace) -> None:
    if args.state:
        try:
            model.save_state(args.state)
        except OSError as error:
            raise UsageError(f"cannot write {args.state}: {error.strerror}") from None


def _start(model: Model, args: argparse.Namespace, request: dict, sampling: SamplingParams,
           where: str = "") -> Generation:
    """Encode and check one request (``sampling``: its options, checked before the model loaded):
    freespec raises ValueError with a readable message for bad input.

    A token limit the user gave must fit the context with the prompt (as the server checks
    ``max_tokens``); the default one is cut to the context left.
    """
    try:
        prompt_ids = model.encode(request.get("prompt"), request.get("messages"), args.chat)
        asked = request.get("max_new_tokens", args.max_new_tokens)
        context = model.runner.max_positions
        if asked is not None and len(prompt_ids) < context < len(prompt_ids) + asked:
            raise ValueError(f"max_new_tokens {asked} + the prompt's {len(prompt_ids)} tokens exceed the model's "
                             f"context of {context}")
        return model.stream(prompt_ids=prompt_ids, max_new_tokens=asked or DEFAULT_MAX_NEW_TOKENS,
                            drafter=args.drafter, sampling=sampling, logprobs=request.get("logprobs"))
    except ValueError as error:
        raise UsageError(f"{where}{error}") from None


def _summary(stats: GenerationStats, drafter: str) -> str:
    return (f"{stats.new_tokens} tokens, {stats.forward_passes} forward passes, "
            f"τ {stats.mean_accepted:.2f} tokens/pass, {stats.tokens_per_second:.1f} tokens/s "
            f"({stats.seconds:.2f} s, drafter {drafter})")


def _generate(args: argparse.Namespace) -> None:
    if args.prompt == "-" and args.input is None:
        try:  # a prompt too long, or too awkward to quote, for an argument; UTF-8 whatever the locale
            args.prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("standard input is not UTF-8 text") from None
    if args.input is None and args.output is None:
        if args.prompt is None:
            raise UsageError("give a PROMPT, or --input and --output for a batch")
        if not args.prompt.strip():
            raise UsageError("the prompt is empty")
    elif args.input is None or args.output is None:
        raise UsageError("--input and --output go together")
    elif args.prompt is not None:
        raise UsageError("give either PROMPT or --input/--output, not both")
    if args.input is None:
        try:
            sampling = _sampling(args)  # bad flags are reported before a model loads
        except ValueError as error:
            raise UsageError(str(error)) from None
        _generate_one(args, sampling)
    else:
        _generate_batch(args)


def _generate_one(args: argparse.Namespace, sampling: SamplingParams) -> None:
    """Print text as it is accepted (:meth:`freespec.api.Model.text_of`)."""
    model = _load(args, args.budget)
    generation = _start(model, args, {"prompt": args.prompt}, sampling)
    for piece in model.text_of(generation, args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    _save_state(model, args)
    if not args.quiet:
        print(f"[freespec] {_summary(generation.stats, args.drafter)}", file=sys.stderr)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:  # splits on newlines only, unlike str.splitlines
            return file.readlines()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def _parse_request(line: str, where: str) -> dict:
    """One input line as a request, shape-checked; the model checks the content (length, chat)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(request, dict):
        raise UsageError(f"{where}expected a JSON object, got {type(request).__name__}")
    if ("prompt" in request) == ("messages" in request):
        raise UsageError(f'{where}give exactly one of "prompt" or "messages"')
    if "prompt" in request and not (isinstance(request["prompt"], str) and request["prompt"].strip()):
        raise UsageError(f'{where}"prompt" must be a non-empty string')
    if "messages" in request and not isinstance(request["messages"], list):
        raise UsageError(f'{where}"messages" must be a list of {{"role": ..., "content": ...}} objects')
    limit = request.get("max_new_tokens", 1)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise UsageError(f'{where}"max_new_tokens" must be a positive integer, got {json.dumps(limit)}')
    from freespec.engine.logprobs import check_top  # numpy: not for every command
    from freespec.engine.textstream import check_stops

    try:
        check_top(request.get("logprobs"))
        check_stops(request.get("stop"))
    except ValueError as error:
        raise UsageError(f"{where}{error}") from None
    return request


def _generate_batch(args: argparse.Namespace) -> None:
    """Run each request in turn, writing each result at once to a temporary file beside the output.

    Every line's JSON, fields and sampling values are checked before the model loads, so a bad
    line stops the batch before its first prompt rather than hours into it. The output is replaced
    when the batch ends, and also when it stops early (an error the model finds in a line, an
    interrupt) with results, which are kept; a batch that fails before its first result leaves the
    output as it was, and so does a killed process.
    """
    from tqdm import tqdm

    from freespec.engine.loop import GenerationStats
    from freespec.engine.textstream import check_stops

    requests = []  # (where, request, its sampling options): every line checked before the model loads
    for number, line in enumerate(_read_lines(args.input), 1):
        if line.strip():
            where = f"{args.input} line {number}: "
            request = _parse_request(line, where)
            try:
                requests.append((where, request, _sampling(args, request)))
            except ValueError as error:
                raise UsageError(f"{where}{error}") from None
    try:
        output = AtomicFile(args.output)
    except OSError as error:
        raise UsageError(f"cannot write {args.output}: {error.strerror}") from None
    total, written, finished = GenerationStats(), 0, False
    with output, tqdm(total=len(requests), unit="prompt", disable=True if args.quiet else None) as progress:
        model = _load(args, args.budget)

        def start(where: str, request: dict, sampling: SamplingParams):
            stops = check_stops(request.get("stop", args.stop))
            return lambda on: (_start(on, args, request, sampling, where), stops)

        began = time.perf_counter()
        try:
            answers = model.run_many([start(*line) for line in requests], args.parallel)
            for (_, request, _), answer in zip(requests, answers):
                result = {**request, "text": answer.text, "token_ids": answer.token_ids,
                          "finish_reason": answer.finish_reason, "stats": answer.stats.as_dict()}
                if answer.logprobs is not None:
                    result["token_logprobs"] = [
                        {"token_id": entry.token, "logprob": entry.logprob, "top": [list(pair) for pair in entry.top]}
                        for entry in answer.logprobs]
                output.write(json.dumps(result, ensure_ascii=False) + "\n")
                output.flush()
                written += 1
                progress.update()
                total.new_tokens += answer.stats.new_tokens
                total.forward_passes += answer.stats.forward_passes
            finished = True
            total.decode_seconds = time.perf_counter() - began  # the batch's wall time: requests may overlap
        finally:
            if finished or written:
                _commit(output)
        _save_state(model, args)
    if not args.quiet:
        print(f"[freespec] {len(requests)} prompts → {args.output}: {_summary(total, args.drafter)}",
              file=sys.stderr)


def _commit(output: AtomicFile) -> None:
    try:
        output.commit()
    except OSError as error:
        raise UsageError(f"cannot write {output.path}: {error.strerror} (the results are in {output.temporary})") \
            from None


def _calibrate(args: argparse.Namespace) -> None:
    from freespec.engine.costs import load_or_measure

    model = _load(args)
    costs = load_or_measure(model.runner, force=True, repeats=args.repeats)  # it says that it measures
    print(f"{'q':>4} {'ms':>9} {'× t(1)':>7}")
    for q, seconds in costs.items():
        note = "" if q in costs.timed else "  (extrapolated: t(q) per token of the largest size timed)"
        print(f"{q:>4} {seconds * 1000:>9.3f} {seconds / costs[1]:>7.2f}{note}")


def _bench(args: argparse.Namespace) -> None:
    from freespec.bench import run as bench
    from freespec.bench.methods import DEFAULT_METHODS, Setup, check_methods
    from freespec.bench.report import compare

    try:
        sampling = _sampling(args, seed=False)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        if args.compare:
            print(compare(*args.compare), end="")
            return
        peer = "hf-greedy" if sampling.greedy else "hf-sample"  # transformers doing what freespec does
        default = ",".join(DEFAULT_METHODS) + ("" if sampling.greedy else ",hf-sample")
        methods = list(dict.fromkeys(m for m in (args.methods or default).split(",") if m))
        if args.draft_model and not args.methods:  # an explicit --methods is taken as given
            methods += ["draft-model", "hf-assisted"]
        check_methods(methods)
        _check_draft_model(methods, args)
        if args.baseline is None:
            args.baseline = peer if peer in methods else methods[0]
        elif args.baseline not in methods:
            raise UsageError(f"the baseline {args.baseline} is not among --methods")
        questions = bench.load_questions(args.questions or bench.DEFAULT_QUESTIONS,
                                         args.categories.split(",") if args.categories else None,
                                         args.per_category, args.limit)
        _writable_folder(args.out)  # before the model loads, not after the first question
        model = _load(args, args.budget)
        setup = Setup(model, args.max_new_tokens, args.seed, _gguf_file(model),
                      sampling=sampling)
        methods, notes = bench.plan(methods, setup)
        for note in notes:
            print(f"[freespec] {note}", file=sys.stderr)
        if args.baseline not in methods:
            raise UsageError(f"the baseline {args.baseline} cannot run here; choose another --baseline")
        bench.run_bench(model, questions, methods, args.out, setup, args.resume, progress=not args.quiet)
        command = "freespec bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "freespec bench"
        summary = bench.write_reports(args.out, args.baseline, command, notes)
    except bench.BenchError as error:
        raise UsageError(str(error)) from None
    print((args.out / "summary.md").read_text())
    if not args.quiet:
        print(f"[freespec] {len(questions)} questions → {args.out}/ ({summary['machine']})", file=sys.stderr)


def _writable_folder(path: Path) -> None:
    """Make ``path`` a folder if it is none yet; UsageError if it cannot be one this process writes in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{path} is a file; --out names a folder") from None
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: permission denied")


def _gguf_file(model: Model) -> Path | None:
    """The GGUF file the model was read from (for llama.cpp peers), or None for other models."""
    source = model.loaded.source
    return source if isinstance(source, Path) and source.suffix == ".gguf" else None


def _datastore_build(args: argparse.Namespace) -> None:
    from freespec.drafters import datastore
    from freespec.model.loading import ModelLoadError, load_tokenizer

    if args.corpus.is_dir():
        raise UsageError(f"{args.corpus} is a folder; the corpus is one text or JSONL file")
    if not args.corpus.is_file():
        raise UsageError(f"corpus not found: {args.corpus}")
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelLoadError as error:
        raise UsageError(str(error)) from None
    try:
        meta = datastore.build(datastore.read_documents(args.corpus), tokenizer, args.output)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot write {args.output}: {error.strerror}") from None
    print(f"[freespec] {meta['documents']} documents, {meta['tokens']} tokens → {args.output}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from freespec.serve import app as server

    api_keys = args.api_key or [key for key in [os.environ.get(server.API_KEY_ENV)] if key]
    drafters = args.drafters if args.drafters is not None else ["none"]
    _check_draft_model([args.drafter, *drafters], args)
    if warning := server.exposure_warning(args.host, api_keys):
        print(f"[freespec] {warning}", file=sys.stderr)
    if args.replicas:
        if args.state:
            raise UsageError("--state keeps one process's drafter state: it cannot be used with --replicas")
        return _serve_replicas(args, api_keys, drafters)
    model = _load(args)
    if not args.quiet:
        where = f"http://{args.host}:{args.port}/v1"
        print(f"[freespec] serving {args.served_model_name or model.name} at {where}"
              f"{' (API key required)' if api_keys else ''}", file=sys.stderr)
    try:
        server.serve(model, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                     served_name=args.served_model_name, drafter=args.drafter, drafters=drafters,
                     max_tokens=args.max_tokens, max_queue=args.max_queue, api_keys=api_keys,
                     max_body_bytes=args.max_body_bytes, prefix_reuse=args.prefix_reuse,
                     request_timeout=args.request_timeout, prefix_cache_mb=args.prefix_cache_mb,
                     max_batch=args.max_batch, state=args.state, state_interval=args.state_interval)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None


def _serve_replicas(args: argparse.Namespace, api_keys: list[str], drafters: list[str]) -> None:
    """``serve --replicas N``: the model is loaded by each replica, not here; a model that cannot
    be found is a usage error before Ray starts."""
    from freespec.model.loading import ModelLoadError, resolve

    try:
        from freespec.serve import replicas
    except ImportError:
        raise UsageError("--replicas needs Ray Serve: pip install 'freespec[ray]'") from None
    try:
        _, name = resolve(args.model)  # converts a GGUF once, for every replica
    except ModelLoadError as error:
        raise UsageError(str(error)) from None
    from freespec.kernels.threads import usable_cpus

    # shared out of the CPUs this process may use, which each replica's load checks its threads against
    threads = args.threads or max(1, usable_cpus() // args.replicas)
    options = {"model": args.model, "threads": threads, "tree_shape": args.tree, "datastore": args.datastore,
               "draft_model": args.draft_model, "served_name": args.served_model_name, "drafter": args.drafter,
               "drafters": drafters, "max_tokens": args.max_tokens, "max_queue": args.max_queue,
               "prefix_reuse": args.prefix_reuse, "request_timeout": args.request_timeout,
               "prefix_cache_mb": args.prefix_cache_mb, "replicas": args.replicas, "api_keys": api_keys,
               "max_body_bytes": args.max_body_bytes, "max_batch": args.max_batch}
    if not args.quiet:
        print(f"[freespec] serving {args.served_model_name or name} at http://{args.host}:{args.port}/v1 on "
              f"{args.replicas} replicas of {threads} thread(s) (Ray Serve){' (API key required)' if api_keys else ''}",
              file=sys.stderr)
    try:
        replicas.serve_replicas(options, args.host, args.port)
    except ValueError as error:
        raise UsageError(str(error)) from None
