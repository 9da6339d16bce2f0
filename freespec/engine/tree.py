"""DraftTree: the tokens one verification pass checks, as two flat arrays.

Node 0 is the root: the last accepted token, whose key/value is not in the cache yet. Every other
node ``i`` hangs off ``parents[i] < i``, so a node's ancestors always come before it and any prefix
``[0, n)`` of the nodes is itself a tree. Plain decoding is the tree of the root alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


# every root-only tree's parents, depths and mask (never written: torch would warn of read-only ones)
_ROOT_PARENTS, _ROOT_DEPTHS = np.array([-1], dtype=np.int64), np.zeros(1, dtype=np.int64)
_ROOT_MASK = np.ones((1, 1), dtype=bool)


@dataclass(frozen=True, eq=False)
class DraftTree:
    tokens: np.ndarray  # [n] int64 token ids; tokens[0] is the root
    parents: np.ndarray  # [n] int64; parents[0] == -1, 0 <= parents[i] < i otherwise
    scores: np.ndarray | None = None  # [n] estimated probability each node is accepted (root 1), if known
    # [n, vocab] or None: for drafts sampled from a draft model, q(· | node i's prefix), the
    # distribution node i's children were drawn from without replacement, in index order.
    # None for point-mass drafts (tokens chosen deterministically), the usual case.
    draft_probs: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or len(self.tokens) == 0:
            raise ValueError("a tree needs one parent per token and at least the root")
        parents = self.parents.tolist()  # a few nodes: plain Python beats numpy's per-call overhead
        if parents[0] != -1 or not all(0 <= parent < node for node, parent in enumerate(parents[1:], 1)):
            raise ValueError(f"parents must satisfy parents[0] == -1 and 0 <= parents[i] < i: {self.parents}")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError(f"a tree of {len(self.tokens)} nodes needs as many scores, got {len(self.scores)}")
        if self.draft_probs is not None and (self.draft_probs.ndim != 2 or len(self.draft_probs) != len(self.tokens)):
            raise ValueError(f"draft_probs must be [{len(self.tokens)}, vocab], got {list(self.draft_probs.shape)}")

    @classmethod
    def root_only(cls, token: int) -> DraftTree:
        """Plain decoding's tree, made every step: its parents, depths and mask shared by every
        root-only tree rather than made."""
        tree = cls._unchecked(np.array([token], dtype=np.int64), _ROOT_PARENTS)
        tree.__dict__.update(depths=_ROOT_DEPTHS, ancestor_mask=_ROOT_MASK)
        return tree

    @classmethod
    def _unchecked(cls, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray | None = None,
                   draft_probs: torch.Tensor | None = None) -> DraftTree:
        """A tree known to be valid (the root alone, a prefix of a tree), made without
        :meth:`__post_init__`'s checks: drafters make several a step."""
        tree = object.__new__(cls)
        tree.__dict__.update(tokens=tokens, parents=parents, scores=scores, draft_probs=draft_probs)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depths(self) -> np.ndarray:
        """[n] distance from the root: the position offset of each node.

        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).depths.tolist()
        [0, 1, 2, 1]
        """
        depths = np.zeros(len(self), dtype=np.int64)
        for i in range(1, len(self)):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    @cached_property
    def ancestor_mask(self) -> np.ndarray:
        """[n, n] bool: mask[i, j] is True when j is i or an ancestor of i (what i may attend to).

        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).ancestor_mask.astype(int).tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
        """
        mask = np.eye(len(self), dtype=bool)
        for i in range(1, len(self)):
            mask[i] |= mask[self.parents[i]]
        return mask

    @cached_property
    def children(self) -> list[list[int]]:
        """children[i]: the nodes whose parent is i, in index order."""
        children: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            children[self.parents[i]].append(i)
        return children

    def child_holding(self, node: int, token: int) -> int | None:
        """The first child of ``node`` whose token is ``token``, or None.

        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).child_holding(0, 4)
        3
        """
        return next((child for child in self.children[node] if self.tokens[child] == token), None)

    def prefix(self, size: int) -> DraftTree:
        """The first ``size`` nodes (at least the root): itself a tree, since parents come first.

        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).prefix(2).tokens.tolist()
        [7, 8]
        """
        size = max(1, min(size, len(self)))
        if size == len(self):
            return self
        return DraftTree._unchecked(self.tokens[:size], self.parents[:size],
                                    None if self.scores is None else self.scores[:size],
                                    None if self.draft_probs is None else self.draft_probs[:size])

    def follow(self, continuation) -> list[int]:
        """Nodes from the root down the branch that spells ``continuation`` (the tokens that came
        after the root), as far as it goes: the path greedy verification accepts when the model's
        own next tokens are ``continuation``.

        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).follow([4, 5])
        [0, 3]
        >>> DraftTree(np.array([7, 8, 9, 4]), np.array([-1, 0, 1, 0])).follow([8, 9, 1])
        [0, 1, 2]
        """
        path = [0]
        for token in continuation:
            child = self.child_holding(path[-1], token)
            if child is None:
                break
            path.append(child)
        return path

    def positions(self, cache_length: int) -> torch.Tensor:
        """[n] int64: each node's position after ``cache_length`` committed rows."""
        return torch.from_numpy(self.depths + cache_length)

    def attention_inputs(self, cache_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [n], positions [n], tree mask [n, n]) for ModelRunner.forward."""
        return torch.from_numpy(self.tokens), self.positions(cache_length), torch.from_numpy(self.ancestor_mask)
