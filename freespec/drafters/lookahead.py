"""Lookahead decoding (Fu et al.): a Jacobi window verified alongside n-grams it harvested.

Each step the tree holds two kinds of branches off the root:

- up to ``G`` n-grams from the pool that start with the root token (their ``N - 1`` following
  tokens), merged by common prefix and weighted by recency: the *verification* branch;
- the *lookahead* branch: a chain of ``W`` guessed future tokens (the Jacobi window). The model's
  argmax at each chain node is a new guess for the position after it, given the guesses before
  it, which is one Jacobi iteration; :meth:`Lookahead.learn` reads those logits.

Guesses live at absolute positions. After ``N - 1`` iterations the tokens along a diagonal (the
guess for position q from the oldest window, for q + 1 from the next, ..., and the newest
prediction for q + N - 1) form an n-gram in which each token was produced from the ones before
it; all such n-grams enter the pool. Positions the window has not reached yet are seeded with the
context's own tokens one window back. The chain takes at most half the budget and comes after the
pool's branches, which are ordered best-first.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import numpy as np
import torch

from freespec.drafters.grow import Grown, WeightedTrie, grow
from freespec.drafters.scoring import CalibratedDrafter
from freespec.engine.tree import DraftTree


def diagonal_ngrams(windows: list[dict[int, int]], predicted: dict[int, int], n: int) -> list[tuple[int, ...]]:
    """The n-grams along diagonals of the last ``n - 1`` windows followed by the newest predictions.

    >>> older, newer = {5: 1, 6: 2}, {5: 1, 6: 3, 7: 4}
    >>> diagonal_ngrams([older, newer], {7: 9, 8: 8}, n=3)  # 1 (older @5), 3 (newer @6), 9 (new @7)
    [(1, 3, 9), (2, 4, 8)]
    """
    if len(windows) < n - 1:
        return []
    layers = [*windows[-(n - 1) :], predicted]
    grams = []
    for start in sorted(layers[0]):
        gram = [layers[k].get(start + k) for k in range(n)]
        if None not in gram:
            grams.append(tuple(gram))
    return grams


POOL, WINDOW = 0, 1  # calibration groups: the pool's n-grams, the window's guesses


class Lookahead(CalibratedDrafter):
    """The ``jacobi`` drafter (lookahead decoding: N, W, G); its n-gram pool lasts across requests."""

    def __init__(self, n: int = 5, window: int = 7, guesses: int = 7, pool_per_token: int = 32):
        if n < 2 or window < 1 or guesses < 1:
            raise ValueError(f"need N >= 2, W >= 1, G >= 1, got {n}, {window}, {guesses}")
        super().__init__()
        self.n, self.window, self.guesses, self.pool_per_token = n, window, guesses, pool_per_token
        self.pool: dict[int, list[tuple[int, ...]]] = defaultdict(list)  # first token → continuations, newest last
        self.begin(np.zeros(0, dtype=np.int64), None)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self._windows: list[dict[int, int]] = []  # the guesses verified in the last N - 1 steps
        self._guess: dict[int, int] = {}  # position → next guess
        self._root_position: int | None = None
        self._chain: list[int] = []  # tree nodes of the lookahead branch in the last proposal
        self._proposed: DraftTree | None = None

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        self._root_position = len(context) - 1
        chain_length = min(self.window, budget // 2)
        pool_tree, shares, depths = self._pool_tree(root, budget - chain_length)
        tokens, parents = pool_tree.tokens.tolist(), pool_tree.parents.tolist()
        scores = pool_tree.scores.tolist()
        groups = [POOL] * len(tokens)
        self._chain = []
        chain_score = 1.0
        for j in range(1, chain_length + 1):  # the Jacobi window, after every pool node (scores never rise)
            position = self._root_position + j
            guess = self._guess.get(position, int(context[max(position - self.window, 0)]))
            parents.append(self._chain[-1] if self._chain else 0)
            tokens.append(guess)
            chain_score *= self.calibration(WINDOW, j, 1.0)
            scores.append(min(chain_score, scores[-1]))
            groups.append(WINDOW)
            shares.append(1.0)
            depths.append(j)
            self._chain.append(len(tokens) - 1)
        self._proposed = DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                                   np.array(scores, dtype=np.float64))
        self.remember(self._proposed, groups, shares, depths)
        return self._proposed

    def _pool_tree(self, root: int, budget: int) -> Grown:
        trie = WeightedTrie()
        for rank, gram in enumerate(reversed(self.pool.get(root, [])[-self.guesses :])):
            trie.add(gram, 0.9**rank)
        return grow(root, 0, trie.expander(), budget, partial(self.calibration, POOL))

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        if self._root_position is None:  # no proposal yet in this request
            return
        # ``tree`` is the proposal, a prefix of it (in a fused drafter), or the root alone
        chain = [c for c in self._chain if c < len(tree)] if self._proposed is not None else []
        super().learn(tree, logits, accepted)  # the calibration
        nodes = [0, *chain]
        predicted_tokens = torch.argmax(logits[nodes], dim=-1).tolist()
        verified = {self._root_position + i: int(tree.tokens[node]) for i, node in enumerate(nodes)}
        predicted = {self._root_position + i + 1: token for i, token in enumerate(predicted_tokens)}
        self._windows = [*self._windows, verified][-(self.n - 1) :]
        for gram in diagonal_ngrams(self._windows, predicted, self.n):
            entries = self.pool[gram[0]]
            if gram[1:] in entries:
                entries.remove(gram[1:])
            entries.append(gram[1:])
            del entries[: -self.pool_per_token]
        self._guess = predicted
        self._root_position += len(accepted)  # where the next root lands if no proposal resets it
        self._proposed = None
