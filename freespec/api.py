"""Public entry points: ``load()`` a model, then ``generate()`` or ``stream()`` text.

>>> import freespec
>>> model = freespec.load()                      # the embedded SmolLM2-135M-Instruct
>>> result = model.generate("Name three primes.", max_new_tokens=32)
>>> result.text, result.stats.mean_accepted
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from freespec import DEFAULT_DRAFTER
from freespec.drafters import DRAWING, DamagedStateError, Drafter, DrafterSettings, create
from freespec.drafters.state import VOCAB_KEY, Learned, StateCheck, read_state, write_state
from freespec.engine.batch import Batch, Running, waits_for
from freespec.engine.budget import BudgetPolicy
from freespec.engine.costs import CostCurve, load_or_measure
from freespec.engine.logprobs import TokenLogprob
from freespec.engine.loop import Generation, GenerationStats
from freespec.engine.sampling import SAMPLING_FIELDS, SamplingParams
from freespec.engine.textstream import TextStream, check_stops
from freespec.kernels import Kernels, check_threads, release_worker_threads
from freespec.kernels import select as select_kernels
from freespec.model.hf_runner import Runner, make_runner, torch_device
from freespec.model.loading import LoadedModel, ModelLoadError, return_freed_heap
from freespec.model.loading import load as load_model
from freespec.model.runner import ModelRunner


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or stop string) or "length"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for (generate(logprobs=k))
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first None), when asked for


@dataclass(eq=False)
class _Batched:
    """A request of :meth:`Model.run_many`: its place in the order, the fork it runs on, its text."""

    index: int
    model: Model
    text: TextStream
    running: Running


class Model:
    """A loaded model with its runner and its drafters' state, kept warm across requests."""

    def __init__(self, loaded: LoadedModel, budget: int | None = None, tree_shape: str = "dynamic",
                 datastore: str | os.PathLike | None = None, draft_model: LoadedModel | None = None,
                 kernels: Kernels | None = None, device: str = "cpu"):
        """``kernels``: the backend the native runners compute with (default: :func:`freespec.kernels.select`).
        ``device``: where models run; models without a fast path, and every model off the CPU, run
        through transformers' own forward (:func:`freespec.model.hf_runner.make_runner`)."""
        self.name = loaded.name
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.kernels = kernels or select_kernels()
        self.device = device
        self.runner: Runner = make_runner(loaded, self.kernels, device)
        self.fixed_budget = budget
        self.tree_shape = tree_shape  # Token Recycling's: "dynamic" (best-first) or "static" (paper template)
        self.datastore = datastore  # the retrieval drafter's datastore directory
        self._drafters: dict[str, tuple[Drafter, BudgetPolicy]] = {}
        self._costs: list[CostCurve] = []  # t(q) once known, shared with forks
        self._shared: dict[str, object] = {}  # what drafters of this model and its forks share (DrafterSettings.shared)
        self.stop_ids = self._stop_ids(loaded.generation_config)
        self.draft: LoadedModel | None = None  # the smaller model the draft-model drafter (and hf-assisted) use
        self.draft_runner: Runner | None = None  # the draft-model drafter's
        if draft_model is not None:
            self.use_draft_model(draft_model)

    def use_draft_model(self, draft: LoadedModel) -> None:
        """Draft with ``draft`` (a smaller model with the same tokenizer) in the draft-model drafter."""
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"the draft model {draft.name} has a different vocabulary from {self.name}: "
                             f"it must use the same tokenizer")
        self.draft = draft
        self.draft_runner = make_runner(draft, self.kernels, self.device)
        for name in [name for name in self._drafters if "draft-model" in name.split("+")]:
            del self._drafters[name]  # made with the previous draft model

    def fork(self) -> Model:
        """The same model with a KV cache and drafters of its own (weights, tokenizer, kernels and
        what drafters share across requests, such as the suffix drafter's stores of earlier
        requests and Token Recycling's tables, shared): a server runs one request on each fork at a time, several forks' passes
        batched (:mod:`freespec.engine.batch`). Only the native runner forks (ValueError otherwise)."""
        if not all(hasattr(runner, "fork") for runner in (self.runner, self.draft_runner) if runner is not None):
            raise ValueError(f"{self.name} runs through transformers' forward, which cannot batch requests")
        twin = copy.copy(self)
        twin.runner = self.runner.fork()
        twin.draft_runner = None if self.draft_runner is None else self.draft_runner.fork()
        twin._drafters = {}
        return twin

    def with_own_state(self) -> Model:
        """The same model (weights, runners, KV cache, cost curve) with drafters and cross-request
        drafter state of its own (Token Recycling's tables, the suffix stores), starting empty: a
        benchmark measures each method on what that method learned, not on what another method
        just learned from the same question. Runs one request at a time with this model."""
        twin = copy.copy(self)
        twin._drafters, twin._shared = {}, {}
        return twin

    @property
    def hf_model(self) -> torch.nn.Module:
        """The model as a transformers module, for peers such as HF generate (built on first use)."""
        return self.loaded.transformers_model()

    def _stop_ids(self, generation_config) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None, chat: bool = True) -> list[int]:
        """Token ids for a prompt string or a chat message list (chat template applied)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            _require_unicode(prompt, "the prompt")
            if not chat:
                return self.tokenizer(prompt)["input_ids"]
            messages = [{"role": "user", "content": prompt}]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
        for index, message in enumerate(messages):
            _require_unicode(message["content"], f"message {index}'s content")
        if not self.has_chat_template:
            raise ValueError(f"{self.name} has no chat template: pass a plain prompt with chat=False "
                             "(--no-chat on the command line)")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def drafter(self, name: str) -> tuple[Drafter | None, BudgetPolicy | None]:
        """The named drafter and its budget policy (created once, then reused: warm state).

        ``name`` is one of :data:`freespec.drafters.DRAFTERS` or several joined by ``+`` (fused).
        """
        with self.runner.lock:  # creating one touches state shared with forks, and calibrating runs passes
            if name in self._drafters:
                return self._drafters[name]
            datastore = None if self.datastore is None else Path(self.datastore)
            drafter = create(name, DrafterSettings(self.runner.vocab_size, self.tree_shape, datastore, self.tokenizer,
                                                   self.runner, self.draft_runner, self._shared))
            if drafter is None:
                return None, None
            if not self._costs:  # measured (or read) once, for every fork of this model
                self._costs.append(load_or_measure(self.runner))
            costs = self._costs[0]
            policy = BudgetPolicy(costs, candidates=[q - 1 for q in costs if q > 1])
            if not any(part in DRAWING for part in name.split("+")):
                # one policy for the forks too (a drawing drafter's decides sampled tokens: its own)
                policy = self._shared.setdefault(f"policy-{name}", policy)
            self._drafters[name] = (drafter, policy)
            return self._drafters[name]

    def reset(self) -> None:
        """Forget all drafter state learned from earlier requests (its forks' shared state too) and
        the prompt rows they cached."""
        self._drafters.clear()
        self._shared.clear()
        for runner in (self.runner, self.draft_runner):
            if runner is not None:
                with runner.lock:
                    runner.reset(0)

    def learned_state(self) -> dict[str, np.ndarray]:
        """What this model's drafters learned across requests, as the named arrays of a state file
        (:mod:`freespec.drafters.state`): Token Recycling's tables and the suffix drafter's stores
        of each tenant's earlier prompts and outputs, where those drafters have run. Copies, taken
        between passes (a server's passes hold the lock)."""
        with self.runner.lock:
            arrays = {VOCAB_KEY: np.array(self.runner.vocab_size)}
            for shared in self._shared.values():
                if isinstance(shared, Learned):
                    arrays.update(shared.arrays())
            return arrays

    def save_state(self, path: str | os.PathLike) -> None:
        """Write :meth:`learned_state` to exactly ``path`` (an .npz archive whatever its name),
        atomically, to warm a later process. The file holds the suffix drafter's stored requests:
        keep it as private as they are. An OSError names ``path``, not the temporary file beside
        it that the state is written to first."""
        arrays = self.learned_state()
        try:
            write_state(Path(path), arrays)
        except OSError as error:
            raise type(error)(error.errno, error.strerror, os.fspath(path)) from None

    def load_state(self, path: str | os.PathLike) -> None:
        """Load a state written by :meth:`save_state` for this model's vocabulary.

        Raises :class:`DamagedStateError` (a ValueError) for a file cut short or corrupted, which
        a caller may ignore and overwrite, and ValueError for anything else (not a state file,
        another model's, unreadable); the drafters are unchanged either way.
        """
        path = Path(path)
        try:
            check = StateCheck(read_state(path), path, self.runner.vocab_size)
            state = check.state
            with self.runner.lock:
                # the drafters whose state the file holds, made now so that their shared state exists
                if "successors" in state or VOCAB_KEY not in state:  # an older file holds recycling's alone
                    self.drafter("recycling")
                if "suffix_tokens" in state:
                    self.drafter("suffix")
                applies = [part.prepare(check) for part in self._shared.values() if isinstance(part, Learned)]
                if VOCAB_KEY not in state and not any(applies):
                    raise check.damaged("it holds no successors")
                for apply in applies:  # every part checked before any changes
                    if apply is not None:
                        apply()
        except DamagedStateError as error:
            raise DamagedStateError(f"cannot load drafter state: {error}") from None
        except OSError as error:
            raise ValueError(f"cannot load drafter state {path}: {error.strerror or error}") from None
        except ValueError as error:
            raise ValueError(f"cannot load drafter state: {error}") from None

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_new_tokens: int = 256,
               drafter: str = DEFAULT_DRAFTER, chat: bool = True,
               prompt_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
               budget: int | None = None, sampling: SamplingParams | None = None, reuse_prefix: bool = True,
               should_stop: Callable[[], bool] | None = None, tenant: str | None = None,
               logprobs: int | None = None, prompt_logprobs: int | None = None, **sampling_options) -> Generation:
        """Start a request; iterate the result for token-id chunks as they are accepted.

        ``prompt_ids``: token ids instead of ``prompt`` or ``messages`` (a list, or a numpy array or
        tensor of one row).
        ``budget`` fixes the draft nodes per step (default: the model's, else chosen from measured costs).
        ``sampling`` chooses the tokens (default: greedy); any of its fields may be given as a keyword
        instead, or over it (``temperature=0.7, seed=3``). Sampled tokens come from exactly the
        distribution transformers samples from, whatever the drafter (see
        :class:`freespec.engine.sampling.SamplingParams`); a seed repeats a run.
        ``reuse_prefix``: skip prefilling the prompt's leading tokens that the previous request
        already cached (a chat's earlier turns); it never changes the output.
        ``should_stop`` is asked between prefill chunks; True stops the prefill with
        :class:`freespec.model.runner.PrefillCancelled` (a server whose client left).
        ``tenant`` (a server's API key) keeps drafters that learn text across requests (``suffix``)
        drafting each tenant's requests from that tenant's earlier ones only.
        ``logprobs``: record each token's log-probability under the model (its log-softmax, before
        the bias, the penalties and the temperature) and that many likeliest alternatives (0 to 20)
        in the generation's ``logprobs``; the same values whatever the drafter. Greedy steps then
        compute the whole output head (0.89-0.95x the decoding rate on SmolLM2-135M).
        ``prompt_logprobs``: the same for the prompt's tokens (the first has none: None), scoring a
        text; the whole prompt is then prefilled, and ``max_new_tokens`` may be 0.
        """
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__} "
                            "(or give its fields as keywords: temperature=0.7, seed=3)")
        if unknown := sorted(set(sampling_options) - set(SAMPLING_FIELDS)):
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the sampling options are "
                            f"{', '.join(SAMPLING_FIELDS)}")
        sampling = dataclasses.replace(sampling or SamplingParams(), **sampling_options)
        if prompt_ids is None:
            prompt_ids = self.encode(prompt, messages, chat)
        elif prompt is not None or messages is not None:
            raise ValueError("give one of prompt, messages or prompt_ids")
        drafter_state, policy = self.drafter(drafter)
        if drafter_state is not None:
            with self.runner.lock:  # not while another thread's step drafts with it
                drafter_state.set_tenant(tenant)
        budget = self.fixed_budget if budget is None else budget
        return Generation(self.runner, drafter_state, policy, prompt_ids, max_new_tokens, self.stop_ids, budget,
                          sampling, reuse_prefix, should_stop, logprobs, prompt_logprobs)

    def generate(self, prompt: str | None = None, *, stop: str | Sequence[str] | None = None,
                 **kwargs) -> GenerationResult:
        """The whole answer of :meth:`stream` (its keywords), ended at the first of the ``stop``
        strings if one comes (see :meth:`complete`); threads that share a model take turns, a
        whole request each, so every answer is the one it would get alone."""
        stops = check_stops(stop)
        with self.runner.lock:
            return self.complete(self.stream(prompt, **kwargs), stops)

    def complete(self, generation: Generation, stop: str | Sequence[str] | None = None) -> GenerationResult:
        """Run a started generation to its end, or to the first of the ``stop`` strings: the
        answer then ends before it, finish_reason "stop", and its tokens end with the one that
        completed it (where decoding a token at a time would have stopped; tokens a speculative
        step accepted after it are left out, of the stats' count too)."""
        text = TextStream(self.decode, check_stops(stop))
        for chunk in generation:
            if text.stops:  # no text is decoded step by step without stop strings
                text.push(chunk)
                if text.stopped:
                    break
        return self._result(generation, text)

    def text_of(self, generation: Generation, stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """The text of a started generation as it is accepted: pieces that never split a character
        (one cut between tokens waits for its last byte), ending before the first ``stop`` string,
        where decoding a token at a time would (then no more passes run)."""
        text = TextStream(self.decode, check_stops(stop))
        for chunk in generation:
            if piece := text.push(chunk):
                yield piece
            if text.stopped:
                generation.end_at(text.answer_tokens)
                return
        if piece := text.finish():
            yield piece
        if text.stopped:
            generation.end_at(text.answer_tokens)

    def generate_many(self, requests: Iterable[dict], parallel: int = 8) -> Iterator[GenerationResult]:
        """:meth:`generate` for each request (a dict of its keywords), up to ``parallel`` at once
        batched into each forward pass (continuous batching, each request on a fork of this model):
        the kernels are batch-invariant, so each result is the one it gets alone. Results come in
        the requests' order; a request refused (ValueError) ends the run after the results before it."""
        def start(request: dict) -> Callable[[Model], tuple[Generation, list[str]]]:
            options = dict(request)
            stops = check_stops(options.pop("stop", None))
            return lambda model: (model.stream(**options), stops)

        return self.run_many(map(start, requests), parallel)

    def run_many(self, starts: Iterable[Callable[[Model], tuple[Generation, list[str]]]],
                 parallel: int = 8) -> Iterator[GenerationResult]:
        """Run up to ``parallel`` generations at once, batched: each start makes its generation
        (and stop strings) on a fork of this model (on this model when its runner cannot fork:
        then one at a time). A generation begins with the rows of the
        longest prefix of its prompt that any of this run's caches holds, and one whose prompt
        starts as a prompt still being prefilled waits for those rows (:func:`waits_for`): a
        system prompt the requests share is prefilled once. Results in the starts' order; a start
        that raises ends the run once the generations before it are done and their results given."""
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be a positive integer, got {parallel!r}")
        batchable = isinstance(self.runner, ModelRunner) and self.kernels.batch_invariant
        if not batchable:
            parallel = 1  # transformers' forward runs one request at a time, on this model
        # forks run the requests, so a thread generating on this model meanwhile disturbs none of
        # them; this model's cache is read for rows their prompts start with
        batch, slots, idle = Batch(), [self], [] if batchable else [self]
        waiting = enumerate(starts)
        held: list[_Batched] = []  # started, waiting for the rows another one is prefilling
        active: list[_Batched] = []
        results: dict[int, GenerationResult] = {}
        given, failure = 0, None
        while True:
            while failure is None and len(held) + len(active) < parallel:
                try:
                    index, start = next(waiting)
                except StopIteration:
                    break
                if not idle:
                    slots.append(self.fork())
                    idle.append(slots[-1])
                model = idle.pop()  # never this model when forks run them
                try:
                    generation, stops = start(model)
                except Exception as error:  # the requests before it still finish
                    failure = error
                    idle.append(model)
                    break
                held.append(_Batched(index, model, TextStream(self.decode, stops), Running(generation)))
            for entry in list(held):
                generation = entry.running.generation
                if generation.reuse_prefix:
                    if any(waits_for(generation.prompt_ids, other.running.generation) for other in active):
                        continue
                    with self.runner.lock:  # this model may be running another thread's request
                        for other in slots:  # before its first step, which keeps the rows it copied
                            if other is not entry.model:
                                entry.model.runner.cache.copy_prefix(other.runner.cache, generation.prompt_ids)
                held.remove(entry)
                active.append(entry)
            if not active:
                break
            batch.step([entry.running for entry in active])
            for entry in list(active):
                running, text = entry.running, entry.text
                if running.error is not None:
                    raise running.error
                if running.emitted and text.stops:
                    text.push(running.emitted)
                if text.stopped or running.generation.done:
                    results[entry.index] = self._result(running.generation, text)
                    active.remove(entry)
                    idle.append(entry.model)
            while given in results:
                yield results.pop(given)
                given += 1
        if failure is not None:
            raise failure

    def _result(self, generation: Generation, text: TextStream) -> GenerationResult:
        """A generation's result, ended after the token that completed a stop string if ``text``
        met one (:meth:`Generation.end_at`)."""
        if text.stops and not text.stopped:
            text.finish()
        if text.stopped:
            generation.end_at(text.answer_tokens)
        answer = text.text if text.stopped else self.decode(generation.token_ids)
        return GenerationResult(answer, generation.token_ids, generation.finish_reason, generation.stats,
                                generation.logprobs, generation.prompt_logprobs)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _require_unicode(text: str, what: str) -> None:
    """ValueError for text that UTF-8 cannot hold: a lone surrogate (JSON's unpaired ``\\ud800``,
    or a byte of a non-UTF-8 terminal that Python kept in its argv), on which the tokenizer
    fails with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode text: character {error.start} is a lone surrogate "
                         f"({text[error.start]!r}); is the input UTF-8?") from None


def load(model: str | os.PathLike | None = None, *, threads: int | None = None, budget: int | None = None,
         tree_shape: str = "dynamic", datastore: str | os.PathLike | None = None,
         draft_model: str | os.PathLike | None = None, device: str = "cpu") -> Model:
    """Load ``model`` (None: the embedded SmolLM2-135M-Instruct; a directory; a .gguf; a hub id).

    ``budget`` fixes the number of draft nodes per step instead of choosing it from measured costs.
    ``threads`` sets torch's (and the kernels') thread count, at most the CPUs this process may
    use (ValueError otherwise). ``tree_shape`` picks Token Recycling's
    tree shape: ``dynamic`` (best-first by recycled probabilities) or ``static`` (the paper's template).
    ``datastore`` is the directory the ``retrieval`` drafter reads (``freespec datastore build``).
    ``draft_model`` (same forms as ``model``) is the smaller model, with the same tokenizer, that the
    ``draft-model`` drafter drafts with. ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) is
    where the models run: the native fast path is CPU-only, so off the CPU, and for families it
    does not support, models run through transformers' own forward (not batch-invariant: no prefix
    reuse). An unknown or unavailable device is a ValueError before anything loads.
    """
    torch_device(device)
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    draft = None
    if draft_model is not None:
        try:
            draft = load_model(draft_model)
        except ModelLoadError as error:
            raise ModelLoadError(f"the draft model: {error}") from None
    ready = Model(load_model(model), budget=budget, tree_shape=tree_shape, datastore=datastore,
                  draft_model=draft, device=device)
    return_freed_heap()
    release_worker_threads()  # whichever thread generates next gets a team that spins
    return ready
