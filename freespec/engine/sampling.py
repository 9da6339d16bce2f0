"""How the next token is chosen: one carrier from the CLI, the server, the benchmark and the API to the engine.

Each field of :class:`SamplingParams` carries its user-facing description as an :class:`Option`
(help text, bounds, whether it matters to greedy decoding), and everything else is derived from
it: the checks here, the command line's flags (``--top-k`` ...), the server's request fields and
their bounds, the benchmark's transformers peer. Adding an option is one field here plus its
effect in :mod:`freespec.engine.distribution`.

This module imports neither torch nor numpy, so a command line can build its flags quickly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral, Real


@dataclass(frozen=True)
class Option:
    """How one sampling field is described to users and checked.

    ``ge``, ``gt`` and ``le`` bound the value as pydantic's ``Field`` does; ``greedy`` says whether
    the field changes greedy decoding too (else it only shapes the distribution sampling draws from).
    """

    help: str
    metavar: str
    kind: type  # int or float (int values are taken for a float); None only where it is the default
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    greedy: bool = False
    name: str = ""  # filled in from the field
    default: object = None

    @property
    def bounds(self) -> dict[str, float]:
        """The bounds as keyword arguments (``ge``, ``gt``, ``le``) for pydantic's ``Field``."""
        return {name: value for name in ("ge", "gt", "le") if (value := getattr(self, name)) is not None}

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.default is None
        if isinstance(value, bool) or not isinstance(value, Integral if self.kind is int else Real):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def expected(self) -> str:
        """What the value must be, in words.

        >>> Option("", "P", float, gt=0, le=1, default=1.0).expected(), Option("", "N", int, ge=0).expected()
        ('a number in (0, 1]', 'an integer >= 0 or None')
        """
        noun = "an integer" if self.kind is int else "a number"
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        if low is not None and self.le is not None:
            text = f"{noun} in {low[0]}{_show(low[1])}, {_show(self.le)}]"
        elif low is not None:
            text = f"{noun} {'>=' if low[0] == '[' else '>'} {_show(low[1])}"
        else:
            text = noun
        return text + (" or None" if self.default is None else "")


def _show(bound: float) -> str:
    """A bound as the user would write it: ``2**64 - 1`` rather than twenty digits.

    >>> _show(0), _show(0.5), _show(-2**63), _show(2**64 - 1)
    ('0', '0.5', '-2**63', '2**64 - 1')
    """
    for power in (63, 64):
        if bound in (2**power, -(2**power)):
            return f"{'-' if bound < 0 else ''}2**{power}"
        if bound == 2**power - 1:
            return f"2**{power} - 1"
    return f"{bound:g}"


def _option(default: object, help: str, metavar: str, kind: type, **checks) -> object:
    return field(default=default, metadata={"option": Option(help, metavar, kind, **checks)})


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the defaults are greedy decoding. Each field's help is its
    :class:`Option` (see :data:`OPTIONS`); bad values raise ValueError naming the field."""

    temperature: float = _option(
        0.0, "sample at temperature T; 0 is greedy (argmax), where top-k, top-p and min-p change nothing",
        "T", float, ge=0, le=2)
    top_k: int = _option(0, "keep the K most likely tokens (ties with the K-th too); 0 keeps all", "K", int, ge=0)
    top_p: float = _option(
        1.0, "keep the fewest most likely tokens whose probability reaches P (nucleus); 1 keeps all", "P", float,
        gt=0, le=1)
    min_p: float = _option(0.0, "drop tokens less likely than P times the most likely one; 0 keeps all", "P", float,
                           ge=0, le=1)
    repetition_penalty: float = _option(
        1.0, "divide the logits of tokens already in the text by R (multiply the negative ones), greedy "
        "decoding included; 1 is off", "R", float, gt=0, greedy=True)
    frequency_penalty: float = _option(
        0.0, "subtract F times each token's count in the answer so far from its logit (OpenAI's), after the "
        "repetition penalty, greedy decoding included; 0 is off", "F", float, ge=-2, le=2, greedy=True)
    presence_penalty: float = _option(
        0.0, "subtract P from the logit of every token already in the answer (OpenAI's), after the repetition "
        "penalty, greedy decoding included; 0 is off", "P", float, ge=-2, le=2, greedy=True)
    seed: int | None = _option(None, "seed each request's random generator, so a run repeats on the same machine "
                               "(default: fresh)", "N", int, ge=-(2**63), le=2**64 - 1)
    # OpenAI's: added to the model's logits before anything else, greedy decoding included. A
    # mapping (token id to bias in [-100, 100], up to MAX_BIASED tokens), so not an Option: the API
    # and the server take it, the command line does not. Kept as sorted (id, bias) pairs.
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        for option in OPTIONS:
            value = getattr(self, option.name)
            if not option.accepts(value):
                raise ValueError(f"{option.name} must be {option.expected()}, got {value!r}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reads_maxima_only(self) -> bool:
        """Whether choosing a token reads only the logits' maxima: greedy, without a penalty or a bias."""
        return (self.greedy and not self.logit_bias
                and all(getattr(self, option.name) == option.default for option in OPTIONS if option.greedy))

    def check_token_ids(self, vocab_size: int) -> None:
        """ValueError if the logit bias names a token outside a vocabulary of ``vocab_size``."""
        if self.logit_bias and (largest := self.logit_bias[-1][0]) >= vocab_size:
            raise ValueError(f"logit_bias: token id {largest} is outside the vocabulary (0 to {vocab_size - 1})")


MAX_BIASED = 300  # tokens a logit_bias may name (OpenAI's limit)


def bias_from_json(bias: Mapping[str, float]) -> dict[int, float]:
    """A ``logit_bias`` as JSON carries it (token ids as strings of digits) with int keys; the
    values are :class:`SamplingParams`'s to check.

    >>> bias_from_json({"7": 1.5})
    {7: 1.5}
    >>> bias_from_json({"w7": 1.5})
    Traceback (most recent call last):
    ValueError: keys must be token ids (strings of digits), got 'w7'
    """
    for key in bias:
        if not isinstance(key, str) or not key.isascii() or not key.isdigit():
            raise ValueError(f"keys must be token ids (strings of digits), got {key!r}")
    return {int(key): value for key, value in bias.items()}


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs; ValueError naming what is wrong.

    >>> _bias_pairs({7: 1, 2: -100.0})
    ((2, -100.0), (7, 1.0))
    """
    pairs = tuple(bias.items()) if isinstance(bias, Mapping) else bias
    if not isinstance(pairs, tuple) or not all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs):
        raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {bias!r}")
    if len(pairs) > MAX_BIASED:
        raise ValueError(f"logit_bias names {len(pairs)} tokens; at most {MAX_BIASED}")
    for token, value in pairs:
        if isinstance(token, bool) or not isinstance(token, Integral) or token < 0:
            raise ValueError(f"logit_bias: {token!r} is not a token id")
        number = not isinstance(value, bool) and isinstance(value, Real)
        if not (number and math.isfinite(value) and -100 <= value <= 100):
            raise ValueError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}")
    if len({token for token, _ in pairs}) < len(pairs):
        raise ValueError("logit_bias names a token twice")
    return tuple(sorted((int(token), float(value)) for token, value in pairs))


OPTIONS: tuple[Option, ...] = tuple(dataclasses.replace(f.metadata["option"], name=f.name, default=f.default)
                                    for f in fields(SamplingParams) if "option" in f.metadata)
"""Every scalar field's :class:`Option`, with its name and default, in field order."""

SAMPLING_KEYS = tuple(option.name for option in OPTIONS)
"""The scalar fields' names: CLI flags (``--top-k`` ...), batch JSONL keys, request fields and API keywords alike."""

SAMPLING_FIELDS = (*SAMPLING_KEYS, "logit_bias")
"""Every field's name: the API's sampling keywords."""
