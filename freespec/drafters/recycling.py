"""Token Recycling (Luo et al., ACL 2025): recycle the model's own top-k candidates as drafts.

State is an adjacency matrix ``successors[vocab, k]``: row t holds the k tokens the model most
recently ranked highest right after token t. A draft is a static tree template whose nodes are
paths of ranks: the node (r1, r2) is ``successors[successors[root, r1], r2]``. After every
verification, each verified node's row is overwritten with its top-k, accepted or not.

The template nodes are ordered by estimated acceptance (the product of per-rank hit rates along
the path, learned online), so the first ``budget`` nodes form the best tree of that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from freespec.tree import DraftTree

# The paper's best template: 80 nodes of depth <= 6 (8/21/25/15/8/3 nodes per depth), as rank paths.
PAPER_TEMPLATE: tuple[tuple[int, ...], ...] = (
    *((r,) for r in range(8)),
    *((0, r) for r in range(8)), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2),
    (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, r) for r in range(8)), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1),
    (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0),
    (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *((0, 0, 0, r) for r in range(5)), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0),
    (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)


def order_template(template, rank_hit_rate: np.ndarray) -> list[tuple[int, ...]]:
    """Sort rank paths by decreasing product of hit rates; parents always precede children.

    >>> order_template([(0,), (1,), (0, 0)], np.array([0.6, 0.3]))
    [(0,), (0, 0), (1,)]
    """
    paths = sorted(set(template), key=len)
    known = set()
    for path in paths:
        if path[:-1] and path[:-1] not in known:
            raise ValueError(f"template path {path} has no parent {path[:-1]} in the template")
        known.add(path)
    score = {p: float(np.prod(rank_hit_rate[list(p)])) for p in paths}
    return sorted(paths, key=lambda p: (-score[p], len(p), p))


class TokenRecycling:
    """The Token Recycling drafter; its matrix stays warm across requests until :meth:`reset`."""

    def __init__(self, vocab_size: int, k: int = 8, template=PAPER_TEMPLATE, prompt_warm_start: int = 256):
        self.vocab_size = vocab_size
        self.k = k
        self.template = tuple(template)
        if max(max(path) for path in self.template) >= k:
            raise ValueError(f"template uses ranks beyond k={k}")
        self.prompt_topk = k if prompt_warm_start > 0 else 0
        self.prompt_warm_start = prompt_warm_start
        self.reset()

    def reset(self) -> None:
        """Forget everything learned (rows start as arbitrary distinct tokens)."""
        self.successors = np.tile(np.arange(self.k, dtype=np.int64), (self.vocab_size, 1))  # [vocab, k]
        self._rank_hits = np.ones(self.k)  # Laplace-smoothed counts of which rank was accepted
        self._rank_hits[0] = 4.0
        self._rank_tries = float(self.k + 8)
        self._reorder()

    def _reorder(self) -> None:
        ordered = order_template(self.template, self._rank_hits / self._rank_tries)
        index = {path: i + 1 for i, path in enumerate(ordered)}  # node 0 is the root
        self._node_parent = np.array([index.get(p[:-1], 0) for p in ordered], dtype=np.int64)
        self._node_rank = np.array([p[-1] for p in ordered], dtype=np.int64)
        self._steps_since_reorder = 0

    def begin(self, prompt: np.ndarray, prompt_topk: np.ndarray | None) -> None:
        if prompt_topk is not None and len(prompt_topk):
            self.successors[prompt[: len(prompt_topk)]] = prompt_topk

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        size = min(budget, len(self._node_rank))
        tokens = np.empty(size + 1, dtype=np.int64)
        tokens[0] = context[-1]
        for i in range(size):
            tokens[i + 1] = self.successors[tokens[self._node_parent[i]], self._node_rank[i]]
        parents = np.concatenate(([-1], self._node_parent[:size]))
        return DraftTree(tokens, parents)

    def update(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        top = torch.topk(logits, self.k, dim=-1).indices.numpy()  # [n, k]
        self.successors[tree.tokens] = top  # a token drafted twice keeps its last row
        ranks = self._node_rank
        self._rank_tries += len(accepted)
        for node in accepted[1:]:
            self._rank_hits[ranks[node - 1]] += 1
        self._steps_since_reorder += 1
        if self._steps_since_reorder >= 64:
            self._reorder()

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, successors=self.successors, rank_hits=self._rank_hits, rank_tries=self._rank_tries)

    def load(self, path: str | Path) -> None:
        state = np.load(path)
        if state["successors"].shape != (self.vocab_size, self.k):
            raise ValueError(f"{path}: matrix shape {state['successors'].shape} != ({self.vocab_size}, {self.k})")
        self.successors = state["successors"].astype(np.int64)
        self._rank_hits, self._rank_tries = state["rank_hits"], float(state["rank_tries"])
        self._reorder()
