"""Benchmark methods: freespec drafters and peers behind one signature, prompt ids → :class:`Output`.

A method is a peer named in :data:`PEERS` or any freespec drafter name, run as
``model.generate(prompt_ids=..., drafter=name)``. Every peer names its *reference*: the greedy
method of its own engine whose output it must reproduce token for token (``hf-lookup`` against
``hf-greedy``, ``llamacpp-lookup`` against ``llamacpp-greedy``; the greedy peers and all freespec
drafters against freespec's ``none``). Adding a peer is one function and one :data:`PEERS` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from freespec.api import Model
from freespec.drafters import DRAFTERS
from freespec.engine.sampling import OPTIONS, SamplingParams

REFERENCE = "none"
DEFAULT_METHODS = ("none", "recycling", "hf-greedy", "hf-lookup", "llamacpp-greedy", "llamacpp-lookup")
LOOKUP_TOKENS = 10  # draft length of both prompt-lookup peers (Spec-Bench's PLD setting)


class BenchError(ValueError):
    """Bad benchmark input the user can fix (questions file, methods, result folders)."""


@dataclass
class Output:
    """One generation: its tokens and, per forward pass of the target model, the tokens it emitted."""

    token_ids: list[int]
    accepted_lengths: list[int]
    draft_sizes: list[int] | None = None  # freespec only: draft nodes verified per pass
    sampled: bool = False  # drawn at temperature > 0: equal to a reference only with the same seed and engine


Generate = Callable[[list[int]], Output]
"""One method, ready to run: prompt ids → its generation."""


@dataclass
class Setup:
    """What methods are built from: the loaded model and the run's settings."""

    model: Model
    max_new_tokens: int
    seed: int = 0
    gguf: Path | None = None  # the GGUF file the model came from, for llama.cpp
    context: int = 2048  # tokens llama.cpp must hold: the longest prompt plus the answer and a draft
    # how freespec methods and hf-sample choose tokens (greedy peers keep only the repetition
    # penalty); freespec requests are seeded from the per-question seed the bench sets in torch
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Peer:
    build: Callable[[Setup], Generate]
    reference: str  # the greedy method whose output this one must equal
    missing: Callable[[Setup], str | None]  # why it cannot run here, or None
    about: str


def is_drafter(name: str) -> bool:
    """A freespec drafter name, or drafters fused with ``+``.

    >>> is_drafter("none"), is_drafter("hf-greedy")
    (True, False)
    """
    return name in DRAFTERS or ("+" in name and all(part in DRAFTERS for part in name.split("+")))


def reference_of(method: str) -> str:
    """The greedy method ``method``'s output is compared with (``none`` is its own reference).

    >>> reference_of("hf-lookup"), reference_of("recycling")
    ('hf-greedy', 'none')
    """
    return PEERS[method].reference if method in PEERS else REFERENCE


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in PEERS and not is_drafter(m)]
    if unknown or not methods:
        raise BenchError(f"unknown methods: {', '.join(unknown) or '(none given)'}; choose from freespec drafters "
                         f"({', '.join(DRAFTERS)}) and peers ({', '.join(PEERS)})")


def unavailable(method: str, setup: Setup) -> str | None:
    """Why ``method`` cannot run with this setup (a note for the report), or None."""
    return PEERS[method].missing(setup) if method in PEERS else None


def build_method(method: str, setup: Setup) -> Generate:
    if method in PEERS:
        return PEERS[method].build(setup)
    # each method learns across questions from its own runs only (Token Recycling's tables and the
    # suffix stores are shared by a model's forks: a method run just before on the same turn would
    # hand it that turn's answer)
    model = setup.model.with_own_state()

    def run(prompt_ids: list[int]) -> Output:
        sampling = replace(setup.sampling, seed=torch.initial_seed())  # the same for every method
        # every turn prefills its whole conversation, as the peers' turns do (llama.cpp is reset)
        result = model.generate(prompt_ids=prompt_ids, drafter=method, max_new_tokens=setup.max_new_tokens,
                                reuse_prefix=False, sampling=sampling)
        return Output(result.token_ids, result.stats.accepted_lengths, result.stats.draft_sizes,
                      sampled=not setup.sampling.greedy)

    return run


# --- transformers ------------------------------------------------------------------------------

class _StepSizes(BaseStreamer):
    """Tokens each forward pass of HF ``generate`` added; its first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.sizes.append(int(value.numel()))  # batch of one: [1, k] or [k]
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _hf_generate(setup: Setup, sample: bool = False, **options) -> Generate:
    """transformers' own ``generate``, greedy or sampling with the bench's options, with ``options``
    (prompt lookup, an assistant model).

    transformers names its sampling keywords as :class:`SamplingParams` does: a sampling peer gets
    them all, a greedy one those that change greedy output too. The seed is not one of them: the
    bench seeds torch per question and turn; nor are OpenAI's penalties, which transformers lacks
    (the peers do not run with them: :func:`_transformers_can`).
    """
    stop, sampling = sorted(setup.model.stop_ids), setup.sampling
    hf_model = setup.model.hf_model  # built here, not in the first timed run
    do_sample = sample and not sampling.greedy
    options.update({option.name: getattr(sampling, option.name) for option in OPTIONS
                    if option.name not in ("seed", *TRANSFORMERS_LACKS) and (do_sample or option.greedy)},
                   do_sample=do_sample)

    def run(prompt_ids: list[int]) -> Output:
        inputs = torch.tensor([prompt_ids], device=hf_model.device)  # [1, prompt]
        steps = _StepSizes()
        with torch.inference_mode():
            output = hf_model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=setup.max_new_tokens,
                eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0, streamer=steps, **options)
        return Output(output[0, len(prompt_ids):].tolist(), steps.sizes, sampled=options["do_sample"])

    return run


def _hf_assisted(setup: Setup) -> Generate:
    # the draft model was checked when loaded; its transformers form is built here
    return _hf_generate(setup, assistant_model=setup.model.draft.transformers_model())


# --- llama.cpp (llama-cpp-python, an optional extra) -------------------------------------------

def _llama_cpp_missing(setup: Setup) -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama-cpp-python is not installed (pip install 'freespec[llamacpp]'; it compiles llama.cpp, "
                "about 8 minutes)")
    if setup.gguf is None:
        return "llama.cpp needs a GGUF model: --model FILE.gguf or the embedded default"
    return None


def _llama_cpp(setup: Setup, lookup: bool) -> Generate:
    """llama.cpp greedy on the same GGUF file, or with its prompt-lookup draft.

    The prompt ids are freespec's (the tokenizer was converted from the same file), so every method
    sees the same tokens. ``reset()`` before each request: llama-cpp-python would otherwise reuse the
    cached prefix shared with the previous prompt and skip part of the prefill.
    """
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    options = {}
    if lookup:
        # Its score buffer has n_batch rows unless logits_all is set, and drafting writes a row per
        # context token: without it, generation fails once the context passes n_batch (512).
        options = dict(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS), logits_all=True)
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(setup.gguf), n_ctx=setup.context, n_threads=threads,
                          n_threads_batch=threads, seed=setup.seed, verbose=False, **options)
    stop = setup.model.stop_ids

    def run(prompt_ids: list[int]) -> Output:
        lengths: list[int] = []  # one entry per eval (forward pass), counting the tokens it produced
        evaluate = llm.eval

        def counted(tokens) -> None:
            lengths.append(0)
            evaluate(tokens)

        llm.eval = counted
        llm.reset()
        token_ids: list[int] = []
        try:
            for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
                token_ids.append(int(token))
                lengths[-1] += 1
                if token in stop or len(token_ids) >= setup.max_new_tokens:
                    break
        finally:
            del llm.eval  # back to the class's method
        return Output(token_ids, lengths)

    return run


TRANSFORMERS_LACKS = ("frequency_penalty", "presence_penalty")  # sampling options generate() has no keyword for


def _transformers_can(setup: Setup) -> str | None:
    lacking = [name for name in (*TRANSFORMERS_LACKS, "logit_bias") if getattr(setup.sampling, name)]
    return f"transformers has no {' or '.join(lacking)} (OpenAI's)" if lacking else None


def _needs_draft_model(setup: Setup) -> str | None:
    if not setup.model.draft:
        return "needs --draft-model PATH (a smaller model with the same tokenizer)"
    return _transformers_can(setup)


PEERS: dict[str, Peer] = {
    "hf-greedy": Peer(lambda s: _hf_generate(s), REFERENCE, _transformers_can, "transformers generate, greedy"),
    "hf-sample": Peer(lambda s: _hf_generate(s, sample=True), "hf-greedy", _transformers_can,
                      "transformers generate with the sampling options (greedy at temperature 0)"),
    "hf-lookup": Peer(lambda s: _hf_generate(s, prompt_lookup_num_tokens=LOOKUP_TOKENS), "hf-greedy", _transformers_can,
                      f"transformers generate with prompt lookup ({LOOKUP_TOKENS} tokens)"),
    "hf-assisted": Peer(_hf_assisted, "hf-greedy", _needs_draft_model,
                        "transformers generate with an assistant model (--draft-model)"),
    "llamacpp-greedy": Peer(lambda s: _llama_cpp(s, lookup=False), REFERENCE, _llama_cpp_missing,
                            "llama.cpp (llama-cpp-python) greedy on the same GGUF"),
    "llamacpp-lookup": Peer(lambda s: _llama_cpp(s, lookup=True), "llamacpp-greedy", _llama_cpp_missing,
                            f"llama.cpp with LlamaPromptLookupDecoding ({LOOKUP_TOKENS} tokens)"),
}
"""Peers by name: how to build each, its greedy reference, and when it cannot run."""
