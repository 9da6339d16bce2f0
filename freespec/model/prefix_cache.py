"""The prefix cache: KV-cache rows of earlier requests' prompts, kept for later requests that start the same way.

A server's conversations interleave (A, B, A, B): the working :class:`~freespec.model.kv_cache.KVCache`
holds only the last request's rows, so A's second turn would prefill all of A's history again.
:class:`PrefixCache` files each request's rows away in a radix tree of token runs (as SGLang's
RadixAttention does, at token granularity), one tree per scope (a server's tenant: one API key
never reads another's rows), under a byte budget with least-recently-used leaves evicted first.
A new request loads the longest prefix of its prompt that its scope holds into the working cache.

Exact by construction: a row depends only on the tokens up to it (every pass is batch-invariant,
see :meth:`freespec.model.runner.ModelRunner.reuse`), and rows are copied bit for bit.

>>> cache = KVCache(layers=1, kv_heads=1, head_dim=2, max_positions=64)
>>> cache.reset(8); cache.pending = [5, 6, 7]; cache.commit([0, 1, 2])
>>> store = PrefixCache(budget_bytes=1 << 20)
>>> store.save(cache, scope="alice")  # rows evicted to fit the budget
0
>>> cache.reset(8)
>>> store.load(cache, [5, 6, 9], scope="mallory"), store.load(cache, [5, 6, 9], scope="alice")
(0, 2)
>>> cache.row_tokens, store.rows
([5, 6], 3)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from freespec.model.kv_cache import SKIPPED, KVCache, common_prefix


@dataclass(eq=False)
class _Node:
    """An edge of the tree: a run of tokens and their rows, keys and values [layers, kv_heads, run, head_dim]."""

    tokens: list[int]
    keys: torch.Tensor
    values: torch.Tensor
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # by first token
    used: int = 0  # the tick of the last request that read or wrote it

    def split(self, at: int) -> _Node:
        """Cut this edge after ``at`` tokens; return the new upper part (this node keeps the rest).
        Both parts get their own copies, so evicting one frees its memory."""
        upper = _Node(self.tokens[:at], self.keys[:, :, :at].clone(), self.values[:, :, :at].clone(),
                      self.parent, {self.tokens[at]: self}, self.used)
        self.parent.children[self.tokens[0]] = upper
        self.tokens = self.tokens[at:]
        self.keys, self.values = self.keys[:, :, at:].clone(), self.values[:, :, at:].clone()
        self.parent = upper
        return upper


def _root() -> _Node:
    return _Node([], torch.empty(0), torch.empty(0))


class PrefixCache:
    """Rows of earlier requests' token prefixes, per scope, in at most ``budget_bytes`` of memory."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._roots: dict[Hashable, _Node] = {}
        self._ticks = itertools.count(1)
        self.rows = 0  # rows held, all scopes together
        self.row_bytes = 0  # bytes per row (known from the first cache saved)

    @property
    def bytes(self) -> int:
        return self.rows * self.row_bytes

    def save(self, cache: KVCache, scope: Hashable) -> int:
        """File away the committed rows of ``cache`` under ``scope`` (up to the first row written
        by a pass that skipped layers), then evict down to the budget; return the rows evicted."""
        tokens = cache.row_tokens
        if SKIPPED in tokens:
            tokens = tokens[: tokens.index(SKIPPED)]
        if not tokens or self.budget_bytes == 0:
            return 0
        self.row_bytes = 2 * cache.layers * cache.kv_heads * cache.head_dim * cache.keys.element_size()
        tick = next(self._ticks)
        node, done = self._roots.setdefault(scope, _root()), 0
        node.used = tick
        while done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                end = len(tokens)
                child = _Node(tokens[done:end], cache.keys[:, :, done:end].clone(),
                              cache.values[:, :, done:end].clone(), node)
                node.children[tokens[done]] = child
                self.rows += end - done
            else:
                matched = common_prefix(child.tokens, tokens[done:])
                if matched < len(child.tokens):
                    child = child.split(matched)
            child.used = tick
            node, done = child, done + len(child.tokens)
        return self._evict()

    def load(self, cache: KVCache, tokens: Sequence[int], scope: Hashable) -> int:
        """Make ``cache`` hold the rows of the longest prefix of ``tokens`` that it or ``scope``'s
        tree holds (the cache's own rows are kept when they match as far); return that length."""
        held = common_prefix(cache.row_tokens, tokens)
        path, matched = self._match(tokens, scope)
        if matched <= held:
            return held
        cache.reserve(matched)
        done, tick = 0, next(self._ticks)
        for node in path:
            node.used = tick
            end = min(done + len(node.tokens), matched)
            if end > held:  # rows the cache lacks
                start = max(done, held)
                cache.keys[:, :, start:end] = node.keys[:, :, start - done : end - done]
                cache.values[:, :, start:end] = node.values[:, :, start - done : end - done]
            done = end
        cache.length = matched
        cache.row_tokens = list(tokens[:matched])
        return matched

    def clear(self) -> None:
        self._roots.clear()
        self.rows = 0

    def _match(self, tokens: Sequence[int], scope: Hashable) -> tuple[list[_Node], int]:
        """The nodes along the longest prefix of ``tokens`` held for ``scope`` (the last one may
        match only in part), and that prefix's length."""
        node, done, path = self._roots.get(scope), 0, []
        while node is not None and done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                break
            matched = common_prefix(child.tokens, tokens[done:])
            path.append(child)
            done += matched
            if matched < len(child.tokens):
                break
            node = child
        return path, done

    def _evict(self) -> int:
        """Drop least-recently-used rows until the rows fit the budget: the oldest leaf's tail,
        or the whole leaf. A node is never older than its children (a request touches its whole
        path), so the oldest node is a leaf."""
        evicted = 0
        while self.bytes > self.budget_bytes:
            oldest = min(self._leaves(), key=lambda node: node.used)
            excess = -(-(self.bytes - self.budget_bytes) // self.row_bytes)  # rows, rounded up
            if excess < len(oldest.tokens):  # keep its head
                keep = len(oldest.tokens) - excess
                oldest.tokens = oldest.tokens[:keep]
                oldest.keys, oldest.values = oldest.keys[:, :, :keep].clone(), oldest.values[:, :, :keep].clone()
            else:
                excess = len(oldest.tokens)
                del oldest.parent.children[oldest.tokens[0]]
            self.rows -= excess
            evicted += excess
        for scope in [scope for scope, root in self._roots.items() if not root.children]:
            del self._roots[scope]
        return evicted

    def _leaves(self):
        stack = [root for root in self._roots.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None:
                yield node
