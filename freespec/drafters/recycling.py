"""Token Recycling (Luo et al., ACL 2025): recycle the model's own top-k candidates as drafts.

State is an adjacency matrix ``successors[vocab, k]``: row t holds the k tokens the model most
recently ranked highest right after token t. A draft is a static tree template whose nodes are
paths of ranks: the node (r1, r2) is ``successors[successors[root, r1], r2]``. After every
verification, each verified node's row is overwritten with its top-k, accepted or not.

Two tree shapes, both ordered best-first so that the first ``budget`` nodes form the best tree of
that size (which the budget policy relies on):

- ``dynamic`` (default): the matrix also keeps the probability the model gave each candidate, and
  every step grows its tree best-first by path probability (the product along the path), as
  DySpec and OPT-Tree do: deep where the model was confident, wide where it hesitated. Each
  recycled probability is first mapped to the acceptance rate verification showed for such
  probabilities (:class:`freespec.drafters.grow.Calibration`): recycled confidence overstates.
- ``static``: the paper's template, its nodes ordered by per-rank hit rates learned online.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from freespec import kernels
from freespec.drafters.grow import Calibration
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


def top_candidates(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely next tokens per row and their probabilities: ([n, k] ids, [n, k] probs)."""
    values, ids, normalizer = kernels.top_k(logits, k)
    return ids.numpy(), torch.exp(values - normalizer[:, None]).numpy()


def best_first_tree(root: int, successors: np.ndarray, probs: np.ndarray, budget: int,
                    calibrate: Callable[[float], float] = float) -> DraftTree:
    """Grow a tree from ``root`` by decreasing path probability, at most ``budget`` nodes besides it.

    A node's children are its token's row of ``successors`` with the row's ``probs`` (sorted
    descending) mapped through ``calibrate`` (non-decreasing); a path's probability is the
    product along it. Siblings are expanded lazily (the next rank only once the previous one is
    taken), so the heap stays small.

    >>> successors = np.array([[1, 2], [2, 0], [0, 1]])
    >>> probs = np.array([[0.6, 0.3], [0.9, 0.1], [0.5, 0.4]])
    >>> tree = best_first_tree(0, successors, probs, budget=3)
    >>> tree.tokens.tolist(), tree.parents.tolist()  # 0→1 (0.6), 0→1→2 (0.54), 0→2 (0.3)
    ([0, 1, 2, 2], [-1, 0, 1, 0])
    """
    tokens, parents, scores = [root], [-1], [1.0]
    # (-path probability, parent node, parent path probability, rank)
    frontier = [(-calibrate(probs[root, 0]), 0, 1.0, 0)]
    while frontier and len(tokens) <= budget:
        negative, parent, parent_probability, rank = heapq.heappop(frontier)
        probability = -negative
        if probability <= 0.0:
            break
        token = int(successors[tokens[parent], rank])
        tokens.append(token)
        parents.append(parent)
        scores.append(probability)
        if rank + 1 < successors.shape[1]:
            sibling = parent_probability * calibrate(probs[tokens[parent], rank + 1])
            heapq.heappush(frontier, (-sibling, parent, parent_probability, rank + 1))
        heapq.heappush(frontier, (-probability * calibrate(probs[token, 0]), len(tokens) - 1, probability, 0))
    return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                     np.array(scores, dtype=np.float64))


class TokenRecycling:
    """The Token Recycling drafter; its matrix stays warm across requests until :meth:`reset`."""

    wants_prompt_logits = True

    shadow_drafts = True

    def __init__(self, vocab_size: int, k: int = 8, tree: Literal["dynamic", "static"] = "dynamic",
                 template=PAPER_TEMPLATE):
        if tree not in ("dynamic", "static"):
            raise ValueError(f"tree must be 'dynamic' or 'static', got {tree!r}")
        self.vocab_size = vocab_size
        self.k = k
        self.tree = tree
        self.template = tuple(template)
        if tree == "static" and max(max(path) for path in self.template) >= k:
            raise ValueError(f"template uses ranks beyond k={k}")
        self.reset()

    def reset(self) -> None:
        """Forget everything learned (rows start as arbitrary distinct tokens of probability 0)."""
        self.successors = np.tile(np.arange(self.k, dtype=np.int64), (self.vocab_size, 1))  # [vocab, k]
        self.probs = np.zeros((self.vocab_size, self.k), dtype=np.float32)  # [vocab, k], rows descending
        self._rank_hits = np.ones(self.k)  # Laplace-smoothed counts of which rank was accepted
        self._rank_hits[0] = 4.0
        self._rank_tries = float(self.k + 8)
        self.calibration = Calibration()  # dynamic trees: recycled probability → observed acceptance
        self._reorder()

    def _reorder(self) -> None:
        self._steps_since_reorder = 0
        if self.tree != "static":
            return
        rates = self._rank_hits / self._rank_tries
        ordered = order_template(self.template, rates)
        self._node_score = np.array([np.prod(rates[list(p)]) for p in ordered])
        index = {path: i + 1 for i, path in enumerate(ordered)}  # node 0 is the root
        self._node_parent = np.array([index.get(p[:-1], 0) for p in ordered], dtype=np.int64)
        self._node_rank = np.array([p[-1] for p in ordered], dtype=np.int64)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """Warm start: the model's candidates after each of the last prompt tokens."""
        if prompt_logits is not None and len(prompt_logits):
            ids, probs = top_candidates(prompt_logits, self.k)
            self.successors[prompt], self.probs[prompt] = ids, probs

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if self.tree == "dynamic":
            return best_first_tree(int(context[-1]), self.successors, self.probs, budget, self.calibration)
        size = min(budget, len(self._node_rank))
        tokens = np.empty(size + 1, dtype=np.int64)
        tokens[0] = context[-1]
        for i in range(size):
            tokens[i + 1] = self.successors[tokens[self._node_parent[i]], self._node_rank[i]]
        parents = np.concatenate(([-1], self._node_parent[:size]))
        return DraftTree(tokens, parents, np.concatenate(([1.0], self._node_score[:size])))

    def update(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        if self.tree == "dynamic" and len(tree) > 1:
            self._calibrate(tree, accepted)
        ids, probs = top_candidates(logits, self.k)  # [n, k] each
        self.successors[tree.tokens] = ids  # a token drafted twice keeps its last row
        self.probs[tree.tokens] = probs
        if self.tree == "static":  # learn which ranks get accepted, to reorder the template
            self._rank_tries += len(accepted)
            for node in accepted[1:]:
                self._rank_hits[self._node_rank[node - 1]] += 1
            self._steps_since_reorder += 1
            if self._steps_since_reorder >= 64:
                self._reorder()

    def _calibrate(self, tree: DraftTree, accepted: list[int]) -> None:
        """Teach the calibration with the nodes whose parent was accepted (read before the rows change)."""
        on_path = set(accepted)
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        predicted, hit = [], []
        for node in range(1, len(tokens)):
            if parents[node] in on_path:
                parent_token = tokens[parents[node]]
                row = self.successors[parent_token].tolist()
                if tokens[node] in row:  # always, unless the tree came from elsewhere
                    predicted.append(float(self.probs[parent_token, row.index(tokens[node])]))
                    hit.append(node in on_path)
        self.calibration.observe(predicted, hit)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, successors=self.successors, probs=self.probs, rank_hits=self._rank_hits,
                            rank_tries=self._rank_tries, calibration_hits=self.calibration.hits,
                            calibration_tries=self.calibration.tries)

    def load(self, path: str | Path) -> None:
        state = np.load(path)
        if state["successors"].shape != (self.vocab_size, self.k):
            raise ValueError(f"{path}: matrix shape {state['successors'].shape} != ({self.vocab_size}, {self.k})")
        self.successors = state["successors"].astype(np.int64)
        self.probs = state["probs"].astype(np.float32)
        self._rank_hits, self._rank_tries = state["rank_hits"], float(state["rank_tries"])
        self.calibration = Calibration()
        if "calibration_hits" in state:  # files saved before calibration start it fresh
            self.calibration.hits, self.calibration.tries = state["calibration_hits"], state["calibration_tries"]
        self._reorder()
