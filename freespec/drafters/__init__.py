"""Draft sources. Each subclasses :class:`freespec.drafters.base.BaseDrafter`; none touches verification.

Drafters are made by name (:func:`create`) from a small registry of factories; ``a+b`` fuses
several into one tree (:mod:`freespec.drafters.fused`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from freespec.drafters.aded import Aded
from freespec.drafters.base import BaseDrafter, Drafter
from freespec.drafters.draft_model import DraftModel
from freespec.drafters.fused import Fused
from freespec.drafters.layerskip import LayerSkip
from freespec.drafters.lookahead import Lookahead
from freespec.drafters.lookup import PromptLookup
from freespec.drafters.ngram_trie import TrieLookup
from freespec.drafters.recycling import RecyclingTables, TokenRecycling
from freespec.drafters.retrieval import Retrieval
from freespec.drafters.scoring import DepthCalibration
from freespec.drafters.state import DamagedStateError
from freespec.drafters.suffix import Suffix, TenantStores
from freespec.model.runner import ModelRunner


@dataclass(frozen=True)
class DrafterSettings:
    """What factories may need besides the name; every field but the vocabulary is optional."""

    vocab_size: int
    tree_shape: str = "dynamic"  # Token Recycling's: "dynamic" (best-first) or "static" (paper template)
    datastore: Path | None = None  # retrieval's datastore directory (``freespec datastore build``)
    tokenizer: object | None = None  # the model's tokenizer, to check a datastore was built with it
    runner: ModelRunner | None = None  # the target's runner: layerskip drafts with it
    draft_runner: ModelRunner | None = None  # a smaller model's runner, same tokenizer: draft-model drafts with it
    shared: dict[str, object] = field(default_factory=dict)  # state every drafter of one model (and its forks) shares


def _retrieval(settings: DrafterSettings) -> Retrieval:
    if settings.datastore is None:
        raise ValueError("the retrieval drafter needs a datastore: build one with "
                         "`freespec datastore build CORPUS -o DIR`, then pass datastore=DIR (--datastore DIR)")
    return Retrieval(settings.datastore, settings.tokenizer, vocab_size=settings.vocab_size)


def _aded(settings: DrafterSettings) -> Aded:
    if settings.datastore is None:
        return Aded()
    return Aded.from_datastore(settings.datastore, settings.tokenizer, settings.vocab_size)  # the corpus's tri-grams


def _suffix(settings: DrafterSettings) -> Suffix:
    # one set of stores of earlier requests for the model: a tenant's requests run on any of a
    # server's forks, and each drafts from all of them; the corpus is optional
    stores = settings.shared.setdefault("suffix-stores", TenantStores())
    return Suffix(settings.datastore, settings.tokenizer, settings.vocab_size, stores=stores)


def _recycling(settings: DrafterSettings) -> TokenRecycling:
    # one set of tables for the model: every fork drafts from the rows all requests verified
    drafter = TokenRecycling(settings.vocab_size, tree_shape=settings.tree_shape,
                             tables=settings.shared.get(f"recycling-{settings.tree_shape}"))
    settings.shared.setdefault(f"recycling-{settings.tree_shape}", drafter.tables)
    return drafter


def _layerskip(settings: DrafterSettings) -> LayerSkip:
    if settings.runner is None:
        raise ValueError("the layerskip drafter needs the target model's runner (DrafterSettings.runner)")
    return LayerSkip(settings.runner)


def _draft_model(settings: DrafterSettings) -> DraftModel:
    if settings.draft_runner is None:
        raise ValueError("the draft-model drafter needs a draft model: a smaller model with the same tokenizer, "
                         "given as draft_model=PATH (--draft-model PATH)")
    return DraftModel(settings.draft_runner, settings.vocab_size)


FACTORIES: dict[str, Callable[[DrafterSettings], Drafter]] = {
    "recycling": _recycling,
    "lookup": lambda s: PromptLookup(),
    "suffix": _suffix,
    "trie": lambda s: TrieLookup(),
    "retrieval": _retrieval,
    "aded": _aded,
    "jacobi": lambda s: Lookahead(),
    "layerskip": _layerskip,
    "draft-model": _draft_model,
}

DRAWING = ("layerskip", "draft-model")
"""Drafters that sample their drafts (trees with ``draft_probs``): there the tree decides which
sampled token comes out, so a fusion with one of them keeps its members' state to itself: state
shared across requests would make a seed's tokens depend on what other requests taught it."""

DRAFTERS = (*FACTORIES, "none")
"""Names accepted by the API, CLI and benchmark; ``none`` is plain decoding through the same runner.
Any ``+``-joined list of the other names is accepted too (a fused drafter)."""


def check_name(name: str) -> str:
    """``name`` if it names a drafter or a fusion of several, else ValueError listing the choices.

    >>> check_name("recycling+lookup")
    'recycling+lookup'
    """
    parts = name.split("+") if isinstance(name, str) else [name]
    if len(parts) == 1 and name in DRAFTERS:
        return name
    if all(part in FACTORIES for part in parts) and len(set(parts)) == len(parts):
        return name
    raise ValueError(f"unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}, "
                     f"or join distinct ones with '+' (e.g. recycling+lookup)")


def create(name: str, settings: DrafterSettings) -> Drafter | None:
    """A fresh drafter for ``name`` (None for ``none``: plain decoding)."""
    check_name(name)
    if name == "none":
        return None
    parts = name.split("+")
    if len(parts) > 1:
        if any(part in DRAWING for part in parts):
            settings = replace(settings, shared={})
        drafter = Fused([FACTORIES[part](settings) for part in parts])
    else:
        drafter = FACTORIES[name](settings)
    _share_calibrations(drafter, name, settings.shared)
    return drafter


def _share_calibrations(drafter: Drafter, name: str, shared: dict[str, object]) -> None:
    """Give ``drafter`` (and a fusion's sources) the calibrations of the first drafter of that
    name made with ``shared``: a server's forks then score their nodes by what every request's
    steps taught. Each fork's own saw only its share of a batch's steps, and scored drafts at
    their priors, which a batched pass, verifying a node only where it pays, left out. They are
    not kept in state files: they relearn within a few requests, where an old workload's misled."""
    parts = [part for part in (drafter, *getattr(drafter, "drafters", ()))
             if isinstance(getattr(part, "calibration", None), DepthCalibration)]
    if not parts:
        return
    calibrations = shared.setdefault(f"calibrations-{name}", [part.calibration for part in parts])
    for part, calibration in zip(parts, calibrations):
        part.calibration = calibration


__all__ = ["DRAFTERS", "Aded", "BaseDrafter", "DamagedStateError", "DraftModel", "Drafter", "DrafterSettings",
           "FACTORIES", "Fused", "LayerSkip", "Lookahead", "PromptLookup", "RecyclingTables", "Retrieval",
           "Suffix", "TokenRecycling", "TrieLookup", "check_name", "create"]
