"""Dynamic draft trees shared by the n-gram drafters: grow best-first by estimated acceptance.

A drafter describes its candidates as a tree it can *expand*: for a node, its children as
(token, share, handle), where share is the child's part of its parent's evidence (counts,
weights, visits). A child at depth d is accepted, given its parent was, with probability
``score(d, share)``, which the drafter learns from verification (:mod:`freespec.drafters.scoring`).
:func:`grow` takes the nodes in decreasing path probability (the product along the path) until
the budget is spent, so the result is the most promising tree of that size, its nodes ordered
best-first with their scores (which the budget policy and :mod:`freespec.drafters.fused` rely on).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Sequence
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from freespec.engine.tree import DraftTree

Expand = Callable[[Hashable], Iterable[tuple[int, float, Hashable]]]
Score = Callable[[int, float], float]
"""(depth, share) → the chance a node is accepted given its parent was."""


class Grown(NamedTuple):
    """A grown tree with, per node, what its calibration needs to learn: the raw share each node
    had of its parent's evidence and its depth (root: 1.0 and 0)."""

    tree: DraftTree
    shares: list[float]
    depths: list[int]


def grow(root: int, handle: Hashable, expand: Expand, budget: int, score: Score = lambda depth, share: share,
         floor: float = 0.0, max_depth: int | None = None) -> Grown:
    """The best tree of at most ``budget`` nodes besides the root, by path probability: the product
    of ``score(depth, share)`` along the path (non-decreasing in the share). Nodes whose path
    probability falls below ``floor``, or deeper than ``max_depth``, are not drafted.

    >>> children = {"r": [(5, 0.9, "a"), (6, 0.1, "b")], "a": [(7, 0.5, "c")], "b": [], "c": []}
    >>> tree, shares, depths = grow(1, "r", lambda h: children[h], budget=2)
    >>> tree.tokens.tolist(), tree.parents.tolist(), tree.scores.round(2).tolist()  # 0.9, 0.45 > 0.1
    ([1, 5, 7], [-1, 0, 1], [1.0, 0.9, 0.45])
    >>> shares, depths
    ([1.0, 0.9, 0.5], [0, 1, 2])
    >>> grow(1, "r", lambda h: children[h], budget=2, score=lambda d, s: 0.2 * d * s).tree.scores.round(3).tolist()
    [1.0, 0.18, 0.036]
    >>> grow(1, "r", lambda h: children[h], budget=3, floor=0.2).tree.tokens.tolist()  # 6 (0.1) is below
    [1, 5, 7]
    """
    tokens, parents, scores, shares, depths = [root], [-1], [1.0], [1.0], [0]
    frontier: list = []  # (-path probability, order, parent node, its children by share, which one)
    order = 0
    deepest = budget if max_depth is None else max_depth

    def push(node: int, children: list, which: int) -> None:
        """Offer ``node``'s child ``which``; its later siblings only once it is taken (they score
        no more, ``score`` rising with the share), so a wide node costs no more than a narrow one."""
        nonlocal order
        if which < len(children) and children[which][1] > 0.0:
            probability = scores[node] * score(depths[node] + 1, children[which][1])
            if probability > floor:
                heapq.heappush(frontier, (-probability, order, node, children, which))
                order += 1

    def open_node(node: int, node_handle: Hashable) -> None:
        if depths[node] < deepest:
            children = sorted(expand(node_handle), key=itemgetter(1), reverse=True)  # ties keep their order
            push(node, children, 0)

    open_node(0, handle)
    while frontier and len(tokens) <= budget:
        negative, _, parent, children, which = heapq.heappop(frontier)
        token, share, child = children[which]
        tokens.append(token)
        parents.append(parent)
        scores.append(-negative)
        shares.append(share)
        depths.append(depths[parent] + 1)
        push(parent, children, which + 1)
        open_node(len(tokens) - 1, child)
    tree = DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                     np.array(scores, dtype=np.float64))
    return Grown(tree, shares, depths)


class WeightedTrie:
    """Continuations of the context merged by common prefix, each weighing what its source is worth.

    A node's weight is the total weight of the continuations through it; a child's conditional
    probability is its weight over its parent's (continuations that end at the parent count in the
    parent, so a branch most sources stop before is not over-trusted).

    >>> trie = WeightedTrie()
    >>> trie.add([4, 5], 2.0); trie.add([4, 6], 1.0); trie.add([8], 0.5)
    >>> grow(3, 0, trie.expander(), budget=4).tree.tokens.tolist()
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
