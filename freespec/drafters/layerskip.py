"""SWIFT self-speculation: the target model with some layers skipped drafts a chain.

No second model and no training: the draft runs on the target's own runner and KV cache (the
committed rows are the full model's), leaving out a set of decoder layers, and the rows it writes
are rolled back before verification. Drafting stops early when the draft's confidence drops.

The skip set is searched on the fly, as SWIFT does during the first steps of generation, with a
simple search: start by skipping every other layer between the first and the last (SWIFT's
starting ratio), try evenly spread sets a half, a quarter and an eighth that size (small models
lose their drafts' agreement quickly: on SmolLM2-135M skipping half the layers agrees with the
full model almost never), then sets next to the best (one layer moved, added or dropped), a few
steps each, and keep the set that gives the most tokens per unit of cost. Cost is counted in full
forward passes: one per verification plus, per drafted token, the fraction of layers the draft
runs. It is a model of the time rather than a clock reading, so the search does not depend on how
loaded the machine is.
"""

from __future__ import annotations

import numpy as np
import torch

from freespec.drafters.chain import CONFIDENCE, ChainDrafter, draft_chain
from freespec.engine.tree import DraftTree
from freespec.model.runner import ModelRunner


def skippable_layers(num_layers: int) -> list[int]:
    """The layers a draft may skip: all but the first and the last (the last alone below 3 layers).

    >>> skippable_layers(6), skippable_layers(2)
    ([1, 2, 3, 4], [1])
    """
    return list(range(1, num_layers - 1)) if num_layers >= 3 else [num_layers - 1]


def spread(layers: list[int], count: int) -> frozenset[int]:
    """``count`` of ``layers``, evenly spread over them.

    >>> sorted(spread(list(range(1, 9)), 2)), sorted(spread(list(range(1, 9)), 4))
    ([3, 7], [2, 4, 6, 8])
    """
    return frozenset(layers[(2 * i + 1) * len(layers) // (2 * count)] for i in range(count))


def coarse_sets(layers: list[int]) -> list[frozenset[int]]:
    """The sets tried first: every other layer, then a half, a quarter and an eighth as many.

    >>> [sorted(s) for s in coarse_sets(list(range(1, 9)))]
    [[1, 3, 5, 7], [3, 7], [5]]
    """
    half = frozenset(layers[::2])
    sizes = sorted({max(1, len(half) // d) for d in (2, 4, 8)} - {len(half)}, reverse=True)
    return [half, *(spread(layers, size) for size in sizes)]


def neighbours(skip: frozenset[int], layers: list[int]) -> list[frozenset[int]]:
    """Skip sets one step from ``skip``: a layer moved to the next free one, one added, one dropped.

    >>> sorted(sorted(s) for s in neighbours(frozenset({2}), [1, 2, 3]))
    [[], [1], [1, 2], [2, 3], [3]]
    """
    found: set[frozenset[int]] = set()
    for layer in skip:
        for other in (layer - 1, layer + 1):
            if other in layers and other not in skip:
                found.add(skip - {layer} | {other})
        found.add(skip - {layer})
    found.update(skip | {layer} for layer in layers if layer not in skip)
    return sorted(found, key=lambda s: (len(s), sorted(s)))


class SkipSearch:
    """Local search over skip sets, scored by tokens per modelled cost over a few steps each."""

    def __init__(self, num_layers: int, trial_steps: int = 4, search_steps: int = 64, seed: int = 0):
        self.num_layers = num_layers
        self.layers = skippable_layers(num_layers)
        first, *coarse = coarse_sets(self.layers)
        self.best, self.best_rate = first, -1.0
        self.current = first
        self.trial_steps, self.steps_left = trial_steps, search_steps
        self._rng = np.random.default_rng(seed)
        self._queue: list[frozenset[int]] = coarse[::-1]  # popped from the end
        self._coarse = True  # trying the coarse sets: a better one does not end that phase
        self._tokens = self._cost = 0.0
        self._steps = 0

    def learn(self, drafted: int, emitted: int) -> None:
        """One verified step drafted with ``current``: ``drafted`` tokens, ``emitted`` kept."""
        if self.steps_left <= 0:
            return
        self.steps_left -= 1
        self._tokens += emitted
        self._cost += 1.0 + drafted * (self.num_layers - len(self.current)) / self.num_layers
        self._steps += 1
        if self._steps < self.trial_steps:
            return
        rate = self._tokens / self._cost
        if rate > self.best_rate:
            if self.current != self.best and not self._coarse:
                self._queue = []  # a better set: search around it instead
            self.best, self.best_rate = self.current, rate
        self._tokens = self._cost = 0.0
        self._steps = 0
        if not self._queue:
            self._coarse = False
            options = neighbours(self.best, self.layers)
            self._queue = [options[i] for i in self._rng.permutation(len(options))]
        self.current = self._queue.pop() if self.steps_left > 0 else self.best


class LayerSkip(ChainDrafter):
    """Drafts with the target model itself, skipping the layers :class:`SkipSearch` picks."""

    def __init__(self, runner: ModelRunner, confidence: float = CONFIDENCE):
        super().__init__(runner, confidence)
        self.search = SkipSearch(runner.num_layers)
        self._drafted: DraftTree | None = None

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        super().begin(prompt, prompt_logits)
        self._drafted = None

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        start = self.runner.length
        try:
            tree = draft_chain(self.runner, context[-1:], context, budget, self.sampler, self.search.current,
                               self.confidence)
        finally:
            self.runner.truncate(start)  # verification rewrites these rows with every layer
        self._drafted = tree
        return tree

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        if self._drafted is not None and len(tree) > 1:
            self.search.learn(len(self._drafted) - 1, len(accepted))
        self._drafted = None
