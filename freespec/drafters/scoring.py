"""How drafters score their nodes: each node's chance of being accepted, learned from verification.

Scores order a tree best-first, let the budget policy size each step by them, and let a fused
drafter compare its sources, so they must be probabilities of the same thing: the chance the node
is accepted given its parent was, as verification showed it for nodes like it. Two calibrations:

- :class:`DepthCalibration`: count-based drafters (suffix, lookup, trie, aded, retrieval, jacobi)
  map each node's share of its parent's evidence, per depth and per match length (their
  :func:`match_group`); :class:`CalibratedDrafter` grows their trees with it and teaches it with
  every verified step and every resolved shadow draft.
- :class:`AcceptanceCalibration`: Token Recycling maps each recycled probability to the acceptance
  rate verification showed for such probabilities (the model's confidence in an earlier context
  overstates), one map per kind of row.

Depth matters: a copy that has started tends to go on (prompt lookup on Spec-Bench: the first
node accepted 57% of the time, the second given the first 75%, the fifth 85%), and so does the
length of the match a draft rests on.
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence
from functools import partial

import numpy as np
import torch

from freespec.drafters.base import BaseDrafter
from freespec.drafters.grow import Expand, grow
from freespec.engine.costs import interpolate
from freespec.engine.tree import DraftTree


def isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in weighted squares (pool adjacent
    violators). Plain Python: the maps have ten bins, where numpy's per-call overhead was most of
    a rebuild.

    >>> isotonic([0.1, 0.5, 0.2, 0.9], [1.0, 1.0, 3.0, 1.0])
    [0.1, 0.275, 0.275, 0.9]
    """
    blocks: list[list[float]] = []  # [value, weight, length] of each pooled run
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, n2), (v1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [value for value, _, length in blocks for _ in range(length)]


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
        return np.array(isotonic((self.hits / self.tries).tolist(), self.tries.tolist()))

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


MATCH_GROUPS = (1, 2, 4, 8, 16)
"""Match lengths up to each bound share a calibration group; longer ones the last group."""


def match_group(length: int) -> int:
    """The calibration group of a draft resting on a match of ``length`` tokens.

    >>> [match_group(n) for n in (1, 2, 3, 8, 9, 40)]
    [0, 1, 2, 3, 4, 5]
    """
    return bisect.bisect_left(MATCH_GROUPS, length)  # the first bound at least ``length``


class DepthCalibration:
    """Each node's chance of being accepted given its parent was, from its raw score (its share of
    its parent's evidence, in [0, 1]), its depth and a group its drafter names (e.g. how long a
    match the draft rests on): per group and depth an isotonic map over ``bins`` bins of shares,
    learned from verified nodes and shadow drafts.

    Depth d's bins start from depth d - 1's map (``prior`` pseudo-tries at its value; depth 1
    from the share itself), so deep nodes, rarely tried, borrow what is known above them. The maps
    are rebuilt at most every ``refresh`` learning calls: a step reads them for every node it
    drafts, and a few steps' news do not move them much, except early: a group's n-th call
    rebuilds them once 1 + n // 4 calls have come since the last build (a new process drafting
    from stored answers otherwise scored them at the prior, 1/2 for one earlier occurrence, for
    its first 32 steps).

    >>> calibration = DepthCalibration(groups=1, max_depth=2, bins=2, prior=1.0, refresh=1)
    >>> calibration(0, 1, 0.25), calibration(0, 2, 0.75)  # untrained: the share itself
    (0.25, 0.75)
    >>> calibration.learn(0, [1, 1, 1, 2], [0.9, 0.9, 0.9, 0.9], [False, False, True, True])
    >>> round(calibration(0, 1, 0.75), 4), round(calibration(0, 2, 0.75), 4)  # (1 + .75) / 4; (1 + .4375) / 2
    (0.4375, 0.7188)
    """

    def __init__(self, groups: int = 1, max_depth: int = 8, bins: int = 10, prior: float = 2.0, refresh: int = 32):
        self.groups, self.max_depth, self.bins, self.prior, self.refresh = groups, max_depth, bins, prior, refresh
        # per group that has learned, [depth, bin] flattened (depth 0 unused): plain lists, as each step
        # counts a few nodes; only groups seen take memory (a fusion of n sources names 4^n groups)
        self._hits: dict[int, list[float]] = {}
        self._tries: dict[int, list[float]] = {}
        self._centres = ((np.arange(bins) + 0.5) / bins).tolist()
        self._maps: dict[int, list[list[float]]] = {}  # group → [depth] → values at the knots
        self._stale: dict[int, int] = {}  # per group: learning calls since its maps were built
        self._calls: dict[int, int] = {}  # per group: learning calls in all

    def _check(self, group: int) -> None:
        """A group's counts and maps are made on first use: one outside the groups is refused then."""
        if not 0 <= group < self.groups:
            raise IndexError(f"calibration group {group} out of 0 .. {self.groups - 1}")

    def _counts(self, counts: dict[int, list[float]]) -> np.ndarray:
        everything = np.zeros((self.groups, self.max_depth + 1, self.bins))
        for group, values in counts.items():
            everything[group] = np.reshape(values, (self.max_depth + 1, self.bins))
        return everything

    @property
    def hits(self) -> np.ndarray:
        """[group, depth, bin] the nodes accepted (a copy)."""
        return self._counts(self._hits)

    @property
    def tries(self) -> np.ndarray:
        """[group, depth, bin] the nodes tried (a copy)."""
        return self._counts(self._tries)

    def maps(self, group: int) -> list[list[float]]:
        """[depth] the calibrated chance at each knot (0, then the bin centres) for ``group``."""
        bins, prior, size = self.bins, self.prior, (self.max_depth + 1) * self.bins
        hits, tries = self._hits.get(group, [0.0] * size), self._tries.get(group, [0.0] * size)
        above = self._centres
        maps = [[0.0, *above]]
        for start in range(bins, size, bins):  # depth 1 on, each from the map above it
            depth_tries = [count + prior for count in tries[start : start + bins]]
            above = isotonic([(hit + prior * value) / count
                              for hit, value, count in zip(hits[start : start + bins], above, depth_tries)], depth_tries)
            maps.append([0.0, *above])
        return maps

    def __call__(self, group: int, depth: int, share: float) -> float:
        """Linear between the knots (0, then the bin centres, evenly spaced), constant beyond the last."""
        maps = self._maps.get(group)
        if maps is None:
            self._check(group)
            maps = self._maps[group] = self.maps(group)
            self._stale[group] = 0
        values = maps[depth if depth < self.max_depth else self.max_depth]
        position = share * self.bins + 0.5  # knot k (k >= 1) sits at position k
        if position >= self.bins:
            return values[-1]
        knot = int(position)
        if knot == 0:  # between 0 (at share 0) and the first centre
            return values[1] * share * 2 * self.bins
        return values[knot] + (position - knot) * (values[knot + 1] - values[knot])

    def learn(self, group: int, depths: Iterable[int], shares: Iterable[float], hits: Iterable[bool]) -> None:
        """Nodes of one group whose parent was accepted: their depths, shares and whether each was."""
        bins, top = self.bins, self.max_depth
        group_hits, group_tries = self._hits.get(group), self._tries.get(group)
        if group_hits is None:
            self._check(group)
            group_hits = self._hits[group] = [0.0] * ((top + 1) * bins)
            group_tries = self._tries[group] = [0.0] * ((top + 1) * bins)
        for depth, share, hit in zip(depths, shares, hits):
            index = min(depth, top) * bins + min(int(share * bins), bins - 1)
            group_tries[index] += 1.0
            group_hits[index] += hit
        self._stale[group] = self._stale.get(group, 0) + 1
        self._calls[group] = calls = self._calls.get(group, 0) + 1
        if self._stale[group] >= min(self.refresh, 1 + calls // 4):  # early news moves the maps most
            self._maps.pop(group, None)


def teach(calibration: DepthCalibration, parents: list[int], groups: list[int], shares: list[float],
          depths: list[int], path: list[int], first: int) -> None:
    """Teach ``calibration`` with the nodes of a tree (from ``first`` on) whose parent lies on
    ``path``, the branch verification (or the text, for a shadow draft) took: each a hit if on it."""
    on_path = set(path)
    tried = defaultdict(list)  # group → the nodes whose parent was accepted
    for node in range(first, len(parents)):
        if parents[node] in on_path:
            tried[groups[node]].append(node)
    for group, nodes in tried.items():
        calibration.learn(group, [depths[n] for n in nodes], [shares[n] for n in nodes], [n in on_path for n in nodes])


class CalibratedDrafter(BaseDrafter):
    """A drafter whose node scores are calibrated chances of acceptance: it grows its trees with
    :func:`freespec.drafters.grow.grow` through its :class:`DepthCalibration` and teaches the
    calibration with every verified step and every resolved shadow draft.

    Learning needs each node's share, which the tree does not carry: the drafter keeps its recent
    proposals and finds the one a tree it is told about came from by its token array (a verified
    prefix, :meth:`freespec.engine.tree.DraftTree.prefix`, is a view of the proposal's).
    """

    def __init__(self, groups: int = len(MATCH_GROUPS) + 1):
        self.calibration = DepthCalibration(groups)
        # recent proposals: (token array, per node: calibration group, share, depth)
        self._recent: deque[tuple[np.ndarray, list[int], list[float], list[int]]] = deque(maxlen=64)

    def grow(self, root: int, handle: Hashable, expand: Expand, budget: int, group: int = 0,
             floor: float = 0.0, max_depth: int | None = None) -> DraftTree:
        """The best tree for ``budget`` (see :func:`freespec.drafters.grow.grow`), scored by the
        calibration of ``group``; remembered for learning."""
        tree, shares, depths = grow(root, handle, expand, budget, partial(self.calibration, group), floor, max_depth)
        self.remember(tree, [group] * len(tree), shares, depths)
        return tree

    def remember(self, tree: DraftTree, groups: list[int], shares: list[float], depths: list[int]) -> None:
        """Keep what learning from ``tree`` (or a prefix of it) needs: each node's group, share and depth."""
        self._recent.append((tree.tokens, groups, shares, depths))

    def _proposal(self, tree: DraftTree) -> tuple[np.ndarray, list[int], list[float], list[int]] | None:
        tokens = tree.tokens if tree.tokens.base is None else tree.tokens.base
        return next((entry for entry in reversed(self._recent) if entry[0] is tokens), None)

    def _learn(self, tree: DraftTree, path: list[int], first: int) -> None:
        if len(tree) <= first:  # nothing to learn (the root alone, or no shadow beyond the verified part)
            return
        proposal = self._proposal(tree)
        if proposal is not None:  # else the root alone, or not a tree this drafter grew
            teach(self.calibration, tree.parents.tolist(), *proposal[1:], path, first)

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self._learn(tree, accepted, 1)

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        self._learn(tree, path, verified + 1)
