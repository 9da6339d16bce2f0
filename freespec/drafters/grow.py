"""Dynamic draft trees shared by the n-gram drafters: grow best-first by estimated acceptance.

A drafter describes its candidates as a tree it can *expand*: for a node, its children as
(token, share, handle), where share is the child's part of its parent's evidence (counts,
weights, visits). A child at depth d is accepted, given its parent was, with probability
``hit_rate(d) * share``: :class:`HitRate` learns the first factor per depth from verification.
:func:`grow` takes the nodes in decreasing path probability (the product along the path) until
the budget is spent, so the result is the most promising tree of that size, its nodes ordered
best-first with their scores (which the budget policy and :mod:`freespec.drafters.fused` rely on).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

from freespec.engine.budget import interpolate
from freespec.engine.tree import DraftTree

Expand = Callable[[Hashable], Iterable[tuple[int, float, Hashable]]]


def grow(root: int, handle: Hashable, expand: Expand, budget: int,
         hit_rate: Callable[[int], float] = lambda depth: 1.0) -> DraftTree:
    """The best tree of at most ``budget`` nodes besides the root, by path probability.

    >>> children = {"r": [(5, 0.9, "a"), (6, 0.1, "b")], "a": [(7, 0.5, "c")], "b": [], "c": []}
    >>> tree = grow(1, "r", lambda h: children[h], budget=2)
    >>> tree.tokens.tolist(), tree.parents.tolist(), tree.scores.round(2).tolist()  # 0.9, 0.45 > 0.1
    ([1, 5, 7], [-1, 0, 1], [1.0, 0.9, 0.45])
    >>> grow(1, "r", lambda h: children[h], budget=2, hit_rate=lambda d: 0.2 * d).scores.round(3).tolist()
    [1.0, 0.18, 0.036]
    """
    tokens, parents, scores, depths = [root], [-1], [1.0], [0]
    frontier: list = []  # (-path probability, order, parent node, token, handle)
    order = 0

    def push_children(node: int, node_handle: Hashable) -> None:
        nonlocal order
        rate = hit_rate(depths[node] + 1)
        for token, share, child in expand(node_handle):
            if share > 0.0:
                heapq.heappush(frontier, (-scores[node] * rate * share, order, node, token, child))
                order += 1

    push_children(0, handle)
    while frontier and len(tokens) <= budget:
        negative, _, parent, token, child = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent)
        scores.append(-negative)
        depths.append(depths[parent] + 1)
        push_children(len(tokens) - 1, child)
    return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                     np.array(scores, dtype=np.float64))


class WeightedTrie:
    """Continuations of the context merged by common prefix, each weighing what its source is worth.

    A node's weight is the total weight of the continuations through it; a child's conditional
    probability is its weight over its parent's (continuations that end at the parent count in the
    parent, so a branch most sources stop before is not over-trusted).

    >>> trie = WeightedTrie()
    >>> trie.add([4, 5], 2.0); trie.add([4, 6], 1.0); trie.add([8], 0.5)
    >>> grow(3, 0, trie.expander(), budget=4).tokens.tolist()
    [3, 4, 5, 6, 8]
    """

    def __init__(self):
        self.weight = [0.0]  # per node; node 0 is the root
        self.children: list[dict[int, int]] = [{}]

    def add(self, tokens: Sequence[int], weight: float) -> None:
        node = 0
        self.weight[0] += weight
        for token in tokens:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.weight)
                self.children[node][token] = child
                self.weight.append(0.0)
                self.children.append({})
            self.weight[child] += weight
            node = child

    def expander(self) -> Expand:
        """Children with their share of the parent's weight (see :func:`grow`)."""
        def expand(node: int):
            total = self.weight[node]
            return [(token, self.weight[child] / total, child) for token, child in self.children[node].items()]
        return expand


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
    >>> rate.observe(tree, [0, 1])  # root→node 1 hit, node 1→node 2 missed
    >>> [round(rate(depth), 3) for depth in (1, 2, 3)]  # (1 + 2 · 0.5) / 3, (0 + 2 · 0.667) / 3, ...
    [0.667, 0.444, 0.444]
    """

    def __init__(self, max_depth: int = 16, prior: float = 2.0):
        self.prior = prior
        self.hits = np.zeros(max_depth + 1)  # [depth]: index 0 unused (the root is never drafted)
        self.tries = np.zeros(max_depth + 1)
        self._rates: list[float] | None = None  # per depth, until the next observe

    def __call__(self, depth: int) -> float:
        if self._rates is None:
            rates, rate = [1.0], 0.5
            for hits, tries in zip(self.hits[1:].tolist(), self.tries[1:].tolist()):
                rate = (hits + self.prior * rate) / (tries + self.prior)
                rates.append(rate)
            self._rates = rates
        return self._rates[min(depth, len(self._rates) - 1)]

    def observe(self, tree: DraftTree, accepted: list[int], verified: int | None = None) -> None:
        """Learn from ``accepted``, the path verification took in ``tree``. With ``verified``,
        ``tree`` is a shadow draft whose first ``verified`` nodes after the root were observed
        already: count only what they did not show (tries at path nodes whose children all lie
        beyond them, hits beyond them), so that every node counts once.

        >>> rate = HitRate()
        >>> shadow = DraftTree(np.array([1, 2, 3, 4]), np.array([-1, 0, 1, 2]))
        >>> rate.observe(shadow.prefix(2), [0, 1]); rate.observe(shadow, [0, 1, 2, 3], verified=1)
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


class Calibration:
    """Maps a drafter's predicted chance that a node is accepted, given its parent was, to the
    rate verification actually showed for such predictions (per bin, Laplace-smoothed).

    Recycled probabilities are the model's confidence after the same token in an *earlier*
    context, so they overstate: on Spec-Bench, nodes predicted at 0.9-1.0 were accepted ~60% of
    the time while low predictions held. Calibrated scores let a tree, or a fused tree of
    several sources, weigh such nodes fairly. The table is made non-decreasing (:func:`isotonic`)
    and read by linear interpolation from 0 (which stays 0: no candidate at all) through the bin
    centres, so siblings sorted by prediction stay sorted and an untrained calibration is the
    identity (up to the last centre). A tree calls it once or twice per node, every step, so it is
    plain Python on a table kept until the next :meth:`observe`.

    >>> calibration = Calibration(bins=2, prior=1.0)  # prior: one pseudo-try at each bin's centre
    >>> [calibration(p) for p in (0.25, 0.5, 0.0)]
    [0.25, 0.5, 0.0]
    >>> calibration.observe([0.9, 0.9, 0.9, 0.2], [True, False, False, False])
    >>> calibration.table().tolist(), [calibration(p) for p in (0.75, 0.5)]
    ([0.125, 0.4375], [0.4375, 0.28125])
    """

    def __init__(self, bins: int = 10, prior: float = 2.0):
        self.bins = bins
        self.hits = (np.arange(bins) + 0.5) / bins * prior
        self.tries = np.full(bins, prior)
        self._centres = [0.0, *((np.arange(bins) + 0.5) / bins).tolist()]  # interpolation knots
        self._values: list[float] | None = None  # [0, *table()] until the next observe

    def table(self) -> np.ndarray:
        """[bins] the calibrated probability for each bin of predictions."""
        return isotonic(self.hits / self.tries, self.tries)

    def __call__(self, predicted: float) -> float:
        if self._values is None:
            self._values = [0.0, *self.table().tolist()]
        return interpolate(self._centres, self._values, predicted)

    def observe(self, predicted: Iterable[float], hit: Iterable[bool]) -> None:
        """Chances predicted for nodes whose parent was accepted, and whether each node was."""
        for chance, accepted in zip(predicted, hit):
            index = min(max(int(chance * self.bins), 0), self.bins - 1)
            self.tries[index] += 1.0
            self.hits[index] += bool(accepted)
        self._values = None
