"""ADED (adaptive draft-verification): a tri-gram table adapted online, drafts built by MCTS.

State: for each token pair (a, b), the probabilities of the next token c, at most ``top`` of them.
An optional corpus prior (the tokens of a retrieval datastore, ``--datastore``) fills the table
before any request; every tri-gram that then appears in a context gains ``boost`` probability
(rows renormalised when they exceed 1), so the table drifts toward what this model writes. The
table is shared across requests.

Draft: Monte-Carlo tree search from the context's last two tokens. Each iteration walks down by
PUCT, ``Q/N + (c1 + ln((N_parent + c2 + 1) / c2)) · p · √N_parent / (1 + N)`` (p: the tri-gram
prior, Q: summed rewards), expands the leaf it reaches with its pair's successors (up to
``max_nodes`` nodes, depth ≤ ``depth``), and backs up the reward: the leaf's path probability.
The draft keeps the most visited paths (best-first by visit share, which never grows along a
path), calibrated per depth by what verification accepted. Defaults are the paper's: depth 4, 150 iterations,
c1 = 32, c2 = 8, 64 nodes, 12 successors per pair.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from freespec.drafters.scoring import CalibratedDrafter
from freespec.engine.tree import DraftTree


class TrigramPrior:
    """Tri-gram probabilities counted from a token array (-1 separates documents), top ``top`` per pair.

    >>> prior = TrigramPrior.count(np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, -1]), top=2)
    >>> prior.row(1, 2)
    {3: 0.6667, 4: 0.3333}
    """

    def __init__(self, pairs: np.ndarray, starts: np.ndarray, successors: np.ndarray, probs: np.ndarray):
        self.pairs, self.starts = pairs, starts  # sorted pair keys a * 2**32 + b; row i is starts[i]:starts[i+1]
        self.successors, self.probs = successors, probs

    @classmethod
    def count(cls, tokens: np.ndarray, top: int = 12) -> TrigramPrior:
        tokens = np.asarray(tokens, dtype=np.int64)
        a, b, c = tokens[:-2], tokens[1:-1], tokens[2:]
        valid = (a >= 0) & (b >= 0) & (c >= 0)
        a, b, c = a[valid], b[valid], c[valid]
        pair = a * 2**32 + b
        keys, counts = np.unique(np.stack([pair, c]), axis=1, return_counts=True)  # [2, unique], sorted by pair
        order = np.lexsort((-counts, keys[0]))  # by pair, then most frequent first
        keys, counts = keys[:, order], counts[order]
        pairs, starts = np.unique(keys[0], return_index=True)
        totals = np.add.reduceat(counts, starts) if len(counts) else np.zeros(0)
        rank = np.arange(len(counts)) - np.repeat(starts, np.diff(np.append(starts, len(counts))))
        keep = rank < top
        row = np.repeat(np.arange(len(pairs)), np.diff(np.append(starts, len(counts))))
        probs = counts / totals[row]
        kept_starts = np.searchsorted(np.flatnonzero(keep), starts)
        return cls(pairs, np.append(kept_starts, keep.sum()), keys[1][keep], probs[keep])

    def row(self, a: int, b: int) -> dict[int, float]:
        key = a * 2**32 + b
        i = int(np.searchsorted(self.pairs, key))
        if i == len(self.pairs) or self.pairs[i] != key:
            return {}
        span = slice(self.starts[i], self.starts[i + 1])
        return {int(c): round(float(p), 4) for c, p in zip(self.successors[span], self.probs[span])}


class TrigramTable:
    """The online table: rows copied from the prior on first change, then boosted by what appears."""

    def __init__(self, prior: TrigramPrior | None = None, boost: float = 0.04, top: int = 12):
        self.prior, self.boost, self.top = prior, boost, top
        self.rows: dict[tuple[int, int], dict[int, float]] = {}

    def row(self, a: int, b: int) -> dict[int, float]:
        row = self.rows.get((a, b))
        if row is None:
            row = self.prior.row(a, b) if self.prior is not None else {}
        return row

    def learn(self, a: int, b: int, c: int) -> None:
        """The tri-gram (a, b, c) appeared: c gains ``boost``; the row stays a (sub-)distribution.

        >>> table = TrigramTable(boost=0.5, top=2)
        >>> table.learn(1, 2, 3); table.learn(1, 2, 3); table.learn(1, 2, 4); table.row(1, 2)
        {3: 0.6667, 4: 0.3333}
        """
        row = dict(self.row(a, b))
        row[c] = row.get(c, 0.0) + self.boost
        total = sum(row.values())
        if total > 1.0:
            row = {token: p / total for token, p in row.items()}
        best = sorted(row.items(), key=lambda item: -item[1])[: self.top]
        self.rows[(a, b)] = {token: round(p, 4) for token, p in best}


class SearchNode:
    __slots__ = ("token", "prior", "visits", "value", "children", "expanded")

    def __init__(self, token: int, prior: float):
        self.token, self.prior = token, prior
        self.visits, self.value = 0, 0.0
        self.children: list[SearchNode] = []
        self.expanded = False


def search(table: TrigramTable, a: int, b: int, iterations: int = 150, depth: int = 4, max_nodes: int = 64,
           c1: float = 32.0, c2: float = 8.0) -> SearchNode:
    """The MCTS tree from the pair (a, b); its root holds token b.

    >>> table = TrigramTable(boost=0.5)
    >>> for c in (3, 3, 4): table.learn(1, 2, c)
    >>> table.learn(2, 3, 5)
    >>> root = search(table, 1, 2, iterations=20)
    >>> [(n.token, n.visits) for n in root.children], [(n.token, n.visits) for n in root.children[0].children]
    ([(3, 13), (4, 6)], [(5, 12)])
    """
    root = SearchNode(b, 1.0)
    nodes = 0
    for _ in range(iterations):
        path, node, pair, probability = [root], root, (a, b), 1.0
        while node.expanded and node.children:
            explore = (c1 + math.log((node.visits + c2 + 1) / c2)) * math.sqrt(node.visits)
            node = max(node.children, key=lambda child: (child.value / child.visits if child.visits else 0.0)
                       + explore * child.prior / (1 + child.visits))
            probability *= node.prior
            pair = (pair[1], node.token)
            path.append(node)
        if not node.expanded and len(path) <= depth and nodes < max_nodes:
            node.expanded = True
            row = sorted(table.row(*pair).items(), key=lambda item: -item[1])[: max_nodes - nodes]
            node.children = [SearchNode(token, p) for token, p in row]
            nodes += len(node.children)
        for visited in path:
            visited.visits += 1
            visited.value += probability
        if root.expanded and not root.children:
            break
    return root


class Aded(CalibratedDrafter):
    """The ``aded`` drafter; its table is shared across requests until the model is reset."""

    shadow_drafts = True
    reads_logits = False

    def __init__(self, prior: TrigramPrior | None = None, boost: float = 0.04, iterations: int = 150,
                 depth: int = 4, max_nodes: int = 64):
        super().__init__()
        self.table = TrigramTable(prior, boost)
        self.iterations, self.depth, self.max_nodes = iterations, depth, max_nodes
        self._seen = 0  # context tokens of this request already counted in the table

    @classmethod
    def from_datastore(cls, path: str | Path, tokenizer=None, vocab_size: int | None = None) -> Aded:
        """With the tri-grams of a retrieval datastore's corpus as the prior."""
        from freespec.drafters.datastore import Datastore

        return cls(TrigramPrior.count(np.asarray(Datastore(path, tokenizer, vocab_size).tokens)))

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self._seen = 0

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if len(context) < self._seen:
            self._seen = 0
        tokens = context[max(self._seen - 2, 0) :].tolist()
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            self.table.learn(a, b, c)
        self._seen = len(context)
        if len(context) < 2:
            return DraftTree.root_only(int(context[-1]))
        root = search(self.table, int(context[-2]), int(context[-1]), self.iterations, self.depth, self.max_nodes)
        def expand(node: SearchNode):
            return [(child.token, child.visits / node.visits, child) for child in node.children if child.visits]

        return self.grow(int(context[-1]), root, expand, budget)
