"""Trie lookup, after Ant Group's Lookahead: a bounded trie of n-grams from prompts and outputs, shared by requests.

Every token of every request's prompt and output is counted in the trie as the end of the
n-grams (n ≤ ``window``) that lead to it, so the trie holds each window-long span with the
frequency of each of its prefixes. A draft matches the longest suffix of the context (at most
``max_match`` tokens, leaving room for the continuation) whose trie node has children, and takes
the trie below it best-first by frequency: several branches where past text diverged, deep where
it always went on the same way. Requests that repeat earlier ones (templates, retries, agents,
shared RAG documents) are drafted from what their predecessors produced.

The trie is bounded: past ``capacity`` nodes all counts are halved and nodes that fall to zero
are dropped, so rare n-grams age out and frequent ones stay.
"""

from __future__ import annotations

import numpy as np
import torch

from freespec.drafters.scoring import CalibratedDrafter, match_group
from freespec.engine.tree import DraftTree


class Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, Node] = {}


class NgramTrie:
    """Counts of every n-gram (n ≤ ``window``) of the token streams fed to it.

    ``feed`` takes one stream's new tokens; ``suffixes`` are the nodes of the stream's last
    1..window-1 tokens (shortest first), kept up to date so a token costs O(window).

    >>> trie = NgramTrie(window=3, capacity=100)
    >>> trie.feed([1, 2, 1, 2, 3])
    >>> node = trie.root.children[1].children[2]
    >>> node.count, {t: c.count for t, c in node.children.items()}  # "1 2" twice, "1 2 1" and "1 2 3" once
    (2, {1: 1, 3: 1})
    """

    def __init__(self, window: int = 16, capacity: int = 65536):
        if window < 2 or capacity < window:
            raise ValueError(f"need window >= 2 and capacity >= window, got {window} and {capacity}")
        self.window, self.capacity = window, capacity
        self.root = Node()
        self.size = 0  # nodes besides the root
        self.suffixes: list[Node] = []

    def start_stream(self) -> None:
        """A new request: its n-grams do not continue the previous request's."""
        self.suffixes = []

    def feed(self, tokens) -> None:
        for token in tokens:
            grown = []
            for node in [self.root, *self.suffixes][: self.window]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = Node()
                    self.size += 1
                child.count += 1
                grown.append(child)
            self.suffixes = grown[: self.window - 1]
            if self.size > self.capacity:
                self.prune()

    def prune(self) -> None:
        """Halve every count and drop what reaches zero, until at most 3/4 of the capacity is used."""
        while self.size > self.capacity * 3 // 4:
            self.size -= _halve(self.root)
        self.suffixes = []  # they may point at dropped nodes; the next window-1 tokens refill them


def _halve(node: Node) -> int:
    """Halve the counts below ``node``; return how many nodes were dropped."""
    dropped = 0
    for token, child in list(node.children.items()):
        child.count //= 2
        if child.count == 0:
            del node.children[token]
            dropped += 1 + _size(child)
        else:
            dropped += _halve(child)
    return dropped


def _size(node: Node) -> int:
    return sum(1 + _size(child) for child in node.children.values())


class TrieLookup(CalibratedDrafter):
    """The ``trie`` drafter: one trie for all requests of a :class:`freespec.api.Model`."""

    shadow_drafts = True
    reads_logits = False

    def __init__(self, window: int = 16, max_match: int = 6, capacity: int = 65536):
        if not 1 <= max_match < window:
            raise ValueError(f"need 1 <= max_match < window, got {max_match} and {window}")
        super().__init__()
        self.trie = NgramTrie(window, capacity)
        self.max_match = max_match
        self._fed = 0  # context tokens of this request already in the trie

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self.trie.start_stream()
        self._fed = 0

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if len(context) < self._fed:  # not this request's context: count it as a new stream
            self.begin(context, None)
        self.trie.feed(context[self._fed :].tolist())
        self._fed = len(context)
        suffixes = self.trie.suffixes[: self.max_match]  # the nodes of the last 1, 2, ... tokens
        length = next((n for n in range(len(suffixes), 0, -1) if suffixes[n - 1].children), 0)
        if not length:
            return DraftTree.root_only(int(context[-1]))

        def expand(node: Node):
            return [(token, child.count / node.count, child) for token, child in node.children.items()]

        return self.grow(int(context[-1]), suffixes[length - 1], expand, budget, match_group(length))
