"""Dynamic draft trees shared by the n-gram drafters: grow best-first by estimated acceptance.

A drafter describes its candidates as a tree it can *expand*: for a node, its children as
(token, share, handle), where share is the child's part of its parent's evidence (counts,
weights, visits). A child at depth d is accepted, given its parent was, with probability
``hit_rate(d) * share``: :class:`freespec.drafters.scoring.HitRate` learns the first factor per
depth from verification.
:func:`grow` takes the nodes in decreasing path probability (the product along the path) until
the budget is spent, so the result is the most promising tree of that size, its nodes ordered
best-first with their scores (which the budget policy and :mod:`freespec.drafters.fused` rely on).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

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
