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

from collections import deque
from collections.abc import Hashable, Iterable

import numpy as np
import torch

from freespec.drafters.base import BaseDrafter
from freespec.drafters.grow import Expand, grow
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

    def hit_score(self, depth: int, share: float) -> float:
        return self.hit_rate(depth) * share

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.hit_rate.learn(tree, accepted)

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        self.hit_rate.learn(tree, path, verified)


class DepthCalibration:
    """Each node's chance of being accepted given its parent was, from its raw score (its share of
    its parent's evidence, in [0, 1]), its depth and a group its drafter names (e.g. how long a
    match the draft rests on): per group and depth an isotonic map over ``bins`` bins of shares,
    learned from verified nodes and shadow drafts.

    Depth d's bins start from depth d - 1's map (``prior`` pseudo-tries at its value; depth 1
    from the share itself), so deep nodes, rarely tried, borrow what is known above them. The maps
    are rebuilt at most every ``refresh`` learning calls: a step reads them for every node it
    drafts, and a few steps' news do not move them much.

    >>> calibration = DepthCalibration(groups=1, max_depth=2, bins=2, prior=1.0, refresh=1)
    >>> calibration(0, 1, 0.25), calibration(0, 2, 0.75)  # untrained: the share itself
    (0.25, 0.75)
    >>> calibration.learn(0, [1, 1, 1, 2], [0.9, 0.9, 0.9, 0.9], [False, False, True, True])
    >>> round(calibration(0, 1, 0.75), 4), round(calibration(0, 2, 0.75), 4)  # (1 + .75) / 4; (1 + .4375) / 2
    (0.4375, 0.7188)
    """

    def __init__(self, groups: int = 1, max_depth: int = 8, bins: int = 10, prior: float = 2.0, refresh: int = 8):
        self.max_depth, self.bins, self.prior, self.refresh = max_depth, bins, prior, refresh
        self.hits = np.zeros((groups, max_depth + 1, bins))  # [group, depth, bin]; depth 0 unused
        self.tries = np.zeros((groups, max_depth + 1, bins))
        self._centres = ((np.arange(bins) + 0.5) / bins).tolist()
        self._knots = [0.0, *self._centres]
        self._maps: list[list[list[float]]] | None = None  # [group][depth] → values at the knots
        self._stale = 0  # learning calls since the maps were built

    def maps(self) -> list[list[list[float]]]:
        """[group][depth] the calibrated chance at each knot (0, then the bin centres)."""
        maps = []
        for hits, tries in zip(self.hits, self.tries):
            above = np.array(self._centres)
            per_depth = [[0.0, *self._centres]]
            for depth in range(1, self.max_depth + 1):
                above = isotonic((hits[depth] + self.prior * above) / (tries[depth] + self.prior),
                                 tries[depth] + self.prior)
                per_depth.append([0.0, *above.tolist()])
            maps.append(per_depth)
        return maps

    def __call__(self, group: int, depth: int, share: float) -> float:
        if self._maps is None:
            self._maps, self._stale = self.maps(), 0
        return interpolate(self._knots, self._maps[group][min(depth, self.max_depth)], share)

    def learn(self, group: int, depths: Iterable[int], shares: Iterable[float], hits: Iterable[bool]) -> None:
        """Nodes of one group whose parent was accepted: their depths, shares and whether each was."""
        for depth, share, hit in zip(depths, shares, hits):
            depth = min(depth, self.max_depth)
            index = min(int(share * self.bins), self.bins - 1)
            self.tries[group, depth, index] += 1.0
            self.hits[group, depth, index] += hit
        self._stale += 1
        if self._stale >= self.refresh:
            self._maps = None


class CalibratedDrafter(BaseDrafter):
    """A drafter whose node scores are calibrated chances of acceptance: it grows its trees with
    :func:`freespec.drafters.grow.grow` through its :class:`DepthCalibration` and teaches the
    calibration with every verified step and every resolved shadow draft.

    Learning needs each node's share, which the tree does not carry: the drafter keeps its recent
    proposals and finds the one a tree it is told about came from by its token array (a verified
    prefix, :meth:`freespec.engine.tree.DraftTree.prefix`, is a view of the proposal's).
    """

    def __init__(self, groups: int = 1):
        self.calibration = DepthCalibration(groups)
        self._recent: deque[tuple[np.ndarray, int, list[float], list[int]]] = deque(maxlen=64)

    def grow(self, root: int, handle: Hashable, expand: Expand, budget: int, group: int = 0,
             floor: float = 0.0, max_depth: int | None = None) -> DraftTree:
        """The best tree for ``budget`` (see :func:`freespec.drafters.grow.grow`), scored by the
        calibration of ``group``; remembered for learning."""
        calibration = self.calibration
        tree, shares, depths = grow(root, handle, expand, budget, lambda depth, share: calibration(group, depth, share),
                                    floor, max_depth)
        self.remember(tree, group, shares, depths)
        return tree

    def remember(self, tree: DraftTree, group: int, shares: list[float], depths: list[int]) -> None:
        """Keep what learning from ``tree`` (or a prefix of it) needs."""
        self._recent.append((tree.tokens, group, shares, depths))

    def _proposal(self, tree: DraftTree) -> tuple[np.ndarray, int, list[float], list[int]] | None:
        tokens = tree.tokens if tree.tokens.base is None else tree.tokens.base
        return next((entry for entry in reversed(self._recent) if entry[0] is tokens), None)

    def _learn(self, tree: DraftTree, path: list[int], first: int) -> None:
        """Teach the calibration with nodes from ``first`` on whose parent lies on ``path``."""
        proposal = self._proposal(tree)
        if proposal is None or len(tree) <= first:  # the root alone, or not a tree this drafter grew
            return
        _, group, shares, depths = proposal
        on_path = set(path)
        nodes = [node for node, parent in enumerate(tree.parents.tolist()) if node >= first and parent in on_path]
        self.calibration.learn(group, [depths[n] for n in nodes], [shares[n] for n in nodes],
                               [n in on_path for n in nodes])

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self._learn(tree, accepted, 1)

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        self._learn(tree, path, verified + 1)
