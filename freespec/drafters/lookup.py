"""Prompt lookup / input copy: draft what followed earlier occurrences of the context's suffix.

Editing, summarisation, RAG and code answers copy long spans of their input (prompt lookup; input-
guided Aggressive Decoding). This drafter finds *all* earlier occurrences of the longest suffix of
prompt + output that occurred before (up to ``max_candidates`` of the most recent), merges the
tokens that followed each into one tree, and weighs each occurrence by recency (``decay`` per
older occurrence) and, through the merge, by frequency. The tree is grown best-first
(:mod:`freespec.drafters.grow`), its scores calibrated per match length and depth
(:class:`freespec.drafters.scoring.DepthCalibration`).

The index is incremental: every token is added once, as an n-gram end position for n = 1..``key``
(hash lists), so a step costs O(new tokens × key) plus the match check of a bounded number of
candidates, never a rescan of the context. Occurrences longer than ``key`` tokens are measured by
comparing backwards from each candidate (at most ``max_match`` tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from freespec.drafters.grow import WeightedTrie
from freespec.drafters.scoring import CalibratedDrafter, match_group
from freespec.engine.tree import DraftTree


class NgramIndex:
    """End positions of every n-gram (n = 1..key) of a growing token sequence.

    >>> index = NgramIndex(key=2)
    >>> index.extend([7, 8, 9, 7, 8])
    >>> index.positions[1][(7, 8)], index.positions[0][(9,)]
    ([1, 4], [2])
    """

    def __init__(self, key: int = 3):
        if key < 1:
            raise ValueError(f"key must be >= 1, got {key}")
        self.key = key
        self.tokens: list[int] = []
        self.positions: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(key)]

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(1, min(self.key, end + 1) + 1):
                self.positions[n - 1].setdefault(tuple(self.tokens[end - n + 1 :]), []).append(end)


def match_length(tokens: list[int], end: int, limit: int) -> int:
    """How many tokens ending at ``end`` equal the sequence's last ones (at most ``limit``).

    >>> match_length([1, 2, 3, 9, 2, 3], end=2, limit=10)  # [2, 3] ends at 2 and at the end
    2
    """
    last = len(tokens) - 1
    length = 0
    while length < limit and end - length >= 0 and tokens[end - length] == tokens[last - length]:
        length += 1
    return length


def longest_suffix_matches(index: NgramIndex, max_candidates: int, max_match: int) -> tuple[int, list[int]]:
    """(length, end positions most recent first) of the longest suffix occurring earlier.

    Only the ``max_candidates`` most recent occurrences of the last ``n``-gram are compared, for
    the largest ``n <= key`` that occurred before; ties keep every occurrence of the longest match.

    >>> index = NgramIndex(key=2)
    >>> index.extend([5, 1, 2, 6, 1, 2, 7, 3, 1, 2])
    >>> longest_suffix_matches(index, max_candidates=8, max_match=16)  # [1, 2] ends at 5 and 2
    (2, [5, 2])
    >>> index.extend([6])  # now [1, 2, 6] occurred once before, ending at 3
    >>> longest_suffix_matches(index, max_candidates=8, max_match=16)
    (3, [3])
    """
    tokens = index.tokens
    for n in range(min(index.key, len(tokens) - 1), 0, -1):
        ends = index.positions[n - 1].get(tuple(tokens[-n:]), [])[:-1]  # the last entry is the suffix itself
        if not ends:
            continue
        candidates = ends[::-1][:max_candidates]
        lengths = [match_length(tokens, end, max_match) for end in candidates]
        longest = max(lengths)
        return longest, [end for end, length in zip(candidates, lengths) if length == longest]
    return 0, []


def continuation(tokens: list[int], end: int, depth: int) -> list[int]:
    """The ``depth`` tokens that follow if the context repeats what followed ``end``.

    A match close to the end overlaps the tokens it predicts: they are copied from the
    continuation itself (as LZ77 copies), so a loop of period p is drafted in full.

    >>> continuation([1, 2, 3, 1, 2, 3, 1], end=3, depth=5)  # period 3
    [2, 3, 1, 2, 3]
    """
    out: list[int] = []
    for i in range(end + 1, end + 1 + depth):
        out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
    return out


def continuation_trie(tokens: list[int], ends: list[int], depth: int, decay: float) -> WeightedTrie:
    """The ``depth`` tokens after each end position, merged; the i-th end weighs ``decay**i``.

    >>> trie = continuation_trie([4, 5, 4, 6, 4], ends=[2, 0], depth=2, decay=0.5)
    >>> trie.children[0], trie.weight  # 6 (weight 1) after the recent 4, 5 (0.5) after the first
    ({6: 1, 5: 3}, [1.5, 1.0, 1.0, 0.5, 0.5])
    """
    trie = WeightedTrie()
    for rank, end in enumerate(ends):
        trie.add(continuation(tokens, end, depth), decay**rank)
    return trie


class PromptLookup(CalibratedDrafter):
    """The ``lookup`` drafter: per request, copies from that request's prompt and output."""

    shadow_drafts = True
    reads_logits = False

    def __init__(self, key: int = 3, max_candidates: int = 16, max_match: int = 64, depth: int = 16,
                 decay: float = 0.8):
        super().__init__()
        self.key, self.max_candidates, self.max_match = key, max_candidates, max_match
        self.depth, self.decay = depth, decay
        self.index = NgramIndex(key)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self.index = NgramIndex(self.key)  # filled from the context at each proposal

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if len(context) < len(self.index):  # a context the index has not seen grow: start over
            self.index = NgramIndex(self.key)
        self.index.extend(context[len(self.index) :].tolist())
        length, ends = longest_suffix_matches(self.index, self.max_candidates, self.max_match)
        trie = continuation_trie(self.index.tokens, ends, self.depth, self.decay)
        return self.grow(int(context[-1]), 0, trie.expander(), budget, match_group(length))
