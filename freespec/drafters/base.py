"""The base every drafter subclasses: the engine's :class:`freespec.engine.drafter.Drafter`
protocol with its defaults, so a drafter states only what it does differently.

Drafters are made by name by the factories in :mod:`freespec.drafters`, from
:class:`freespec.drafters.DrafterSettings` (vocabulary size, Token Recycling's tree shape, the
datastore directory, the model's tokenizer, the runners): what a drafter needs beyond the protocol
comes from there, so the protocol itself stays the same for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from freespec.engine.drafter import Drafter
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree


class BaseDrafter(ABC):
    """Defaults: no prompt logits, no shadow drafts, logits read, learning never skipped,
    point-mass drafts, and no learning (see :class:`freespec.engine.drafter.Drafter` for what each means)."""

    wants_prompt_logits = False
    shadow_drafts = False
    reads_logits = True
    reads_top_k = 0
    learning_optional = False

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        """Point-mass drafts whatever the request: nothing to set."""

    def set_tenant(self, tenant: str | None) -> None:
        """Nothing kept per tenant."""

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """Nothing kept per request."""

    @abstractmethod
    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """See :meth:`freespec.engine.drafter.Drafter.propose`."""

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """Learns nothing from verification."""

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        """Learns nothing from shadow drafts."""


__all__ = ["BaseDrafter", "Drafter"]
