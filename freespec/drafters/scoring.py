"""How drafters score their nodes: each node's chance of being accepted, learned from verification.

Scores order a tree best-first, let the budget policy size each step by them, and let a fused
drafter compare its sources, so they must be probabilities, not raw counts. Two ways to get there:

- :class:`HitRate`: count-based drafters (lookup, trie, aded, retrieval, jacobi) multiply each
  node's share of its parent's evidence by the rate at which nodes at that depth were accepted;
  :class:`HitRateDrafter` learns it from every verified step and every resolved shadow draft.
- :class:`AcceptanceCalibration`: Token Recycling maps each recycled probability to the acceptance
  rate verification showed for such probabilities (the model's confidence in an earlier context
  overstates).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from freespec.drafters.base import BaseDrafter
from freespec.engine.costs import interpolate
from freespec.engine.tree import DraftTree


class HitRate:
    """How often a drafted node is accepted given its parent was, per depth, learned from
    verification: each accepted node with children in the tree is a try at the next depth, the
    path going on a hit. A depth's estimate starts from the one above it (``prior`` pseudo-tries
    at that rate; depth 1 from 1/2), so depths never verified yet borrow what is known.

    Depth matters: a copy that has started tends to go on. On Spec-Bench (26 questions, 256
    tokens) prompt lookup's first node was accepted 57% of the time, the second given the
    first 75%, the fifth 85%, the eighth 92%; one rate for all depths made deep drafts look
    hopeless to the budget policy. The rates calibrate scores of drafters whose raw counts are
    not probabilities, so that their trees can be compared with other drafters' and the budget
    policy's estimates stay meaningful.

    >>> rate = HitRate()
    >>> tree = DraftTree(np.array([1, 2, 3]), np.array([-1, 0, 1]))
    >>> rate.learn(tree, [0, 1])  # root→node 1 hit, node 1→node 2 missed
    >>> [round(rate(depth), 3) for depth in (1, 2, 3)]  # (1 + 2 · 0.5) / 3, (0 + 2 · 0.667) / 3, ...
    [0.667, 0.444, 0.444]
    """

    def __init__(self, max_depth: int = 16, prior: float = 2.0):
        self.prior = prior
        self.hits = np.zeros(max_depth + 1)  # [depth]: index 0 unused (the root is never drafted)
        self.tries = np.zeros(max_depth + 1)
        self._rates: list[float] | None = None  # per depth, until the next learn

    def __call__(self, depth: int) -> float:
        if self._rates is None:
            rates, rate = [1.0], 0.5
            for hits, tries in zip(self.hits[1:].tolist(), self.tries[1:].tolist()):
                rate = (hits + self.prior * rate) / (tries + self.prior)
                rates.append(rate)
            self._rates = rates
        return self._rates[min(depth, len(self._rates) - 1)]

    def learn(self, tree: DraftTree, accepted: list[int], verified: int | None = None) -> None:
        """Learn from ``accepted``, the path verification took in ``tree``. With ``verified``,
        ``tree`` is a shadow draft whose first ``verified`` nodes after the root were observed
        already: count only what they did not show (tries at path nodes whose children all lie
        beyond them, hits beyond them), so that every node counts once.

        >>> rate = HitRate()
        >>> shadow = DraftTree(np.array([1, 2, 3, 4]), np.array([-1, 0, 1, 2]))
        >>> rate.learn(shadow.prefix(2), [0, 1]); rate.learn(shadow, [0, 1, 2, 3], verified=1)
        >>> rate.tries[1:4].tolist(), rate.hits[1:4].tolist()  # node 1 seen verified, 2 and 3 in the shadow
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
        """
        seen = len(tree) if verified is None else verified + 1  # nodes [0, seen) already observed
        deepest = len(self.hits) - 1
        for node in accepted:
            children = tree.children[node]
            if children and (verified is None or children[0] >= seen):
                self.tries[min(int(tree.depths[node]) + 1, deepest)] += 1
        for node in accepted[1:]:
            if verified is None or node >= seen:
                self.hits[min(int(tree.depths[node]), deepest)] += 1
        self._rates = None


def isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in weighted squares (pool adjacent violators).

    >>> isotonic(np.array([0.1, 0.5, 0.2, 0.9]), np.array([1.0, 1.0, 3.0, 1.0])).tolist()
    [0.1, 0.275, 0.275, 0.9]
    """
    blocks: list[list[float]] = []  # [value, weight, length] of each pooled run
    for value, weight in zip(values.tolist(), weights.tolist()):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, n2), (v1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [b[2] for b in blocks])


class AcceptanceCalibration:
    """Maps a drafter's predicted chance that a node is accepted, given its parent was, to the
    rate verification actually showed for such predictions (per bin, Laplace-smoothed).

    Recycled probabilities are the model's confidence after the same token in an *earlier*
    context, so they overstate: on Spec-Bench, nodes predicted at 0.9-1.0 were accepted ~60% of
    the time while low predictions held. Calibrated scores let a tree, or a fused tree of
    several sources, weigh such nodes fairly. The table is made non-decreasing (:func:`isotonic`)
    and read by linear interpolation from 0 (which stays 0: no candidate at all) through the bin
    centres, so siblings sorted by prediction stay sorted and an untrained calibration is the
    identity (up to the last centre). A tree calls it once or twice per node, every step, so it is
    plain Python on a table kept until the next :meth:`learn`.

    >>> calibration = AcceptanceCalibration(bins=2, prior=1.0)  # prior: one pseudo-try at each bin's centre
    >>> [calibration(p) for p in (0.25, 0.5, 0.0)]
    [0.25, 0.5, 0.0]
    >>> calibration.learn([0.9, 0.9, 0.9, 0.2], [True, False, False, False])
    >>> calibration.table().tolist(), [calibration(p) for p in (0.75, 0.5)]
    ([0.125, 0.4375], [0.4375, 0.28125])
    """

    def __init__(self, bins: int = 10, prior: float = 2.0):
        self.bins = bins
        self.hits = (np.arange(bins) + 0.5) / bins * prior
        self.tries = np.full(bins, prior)
        self._centres = [0.0, *((np.arange(bins) + 0.5) / bins).tolist()]  # interpolation knots
        self._values: list[float] | None = None  # [0, *table()] until the next learn

    def table(self) -> np.ndarray:
        """[bins] the calibrated probability for each bin of predictions."""
        return isotonic(self.hits / self.tries, self.tries)

    def __call__(self, predicted: float) -> float:
        if self._values is None:
            self._values = [0.0, *self.table().tolist()]
        return interpolate(self._centres, self._values, predicted)

    def learn(self, predicted: Iterable[float], hit: Iterable[bool]) -> None:
        """Chances predicted for nodes whose parent was accepted, and whether each node was."""
        for chance, accepted in zip(predicted, hit):
            index = min(max(int(chance * self.bins), 0), self.bins - 1)
            self.tries[index] += 1.0
            self.hits[index] += bool(accepted)
        self._values = None


class HitRateDrafter(BaseDrafter):
    """A drafter whose scores are evidence shares times :class:`HitRate`: it learns the rate from
    each verified step and, with shadow drafts, from the nodes that were never verified."""

    def __init__(self):
        self.hit_rate = HitRate()

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.hit_rate.learn(tree, accepted)

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        self.hit_rate.learn(tree, path, verified)
