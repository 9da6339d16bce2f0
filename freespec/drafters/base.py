"""The drafter protocol: propose a tree before each verification, learn from its result after."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from freespec.tree import DraftTree


class Drafter(Protocol):
    prompt_topk: int
    """How many top candidates per prompt position :meth:`begin` wants (0: none, skip the work)."""

    def begin(self, prompt: np.ndarray, prompt_topk: np.ndarray | None) -> None:
        """A new request starts. ``prompt_topk`` [len(prompt) - 1, prompt_topk]: the model's top
        candidates after each prompt token but the last, when asked for."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """A tree rooted at ``context[-1]`` with at most ``budget`` nodes besides the root.

        Nodes must be ordered by decreasing estimated acceptance, so that any prefix of the
        tree is the best tree of its size (the budget policy relies on it).
        """

    def update(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """After verification: ``logits`` [len(tree), vocab] at every node, ``accepted`` path."""
