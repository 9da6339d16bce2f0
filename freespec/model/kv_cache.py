"""The KV cache: preallocated keys and values of every layer with a length pointer.

A forward pass writes its n new tokens' rows after the ``length`` committed ones; committing
keeps the rows of the accepted nodes (a gather into place) and drops the rest. Each committed
row remembers its token, so a later request that starts with the same tokens can keep them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SKIPPED = -1  # the token recorded for a cache row written by a pass that skipped layers
ROUNDING = 256  # capacities are allocated in multiples of this many rows


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5]), common_prefix(np.array([1]), np.array([1, 2]))
    (2, 1)
    """
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class KVCache:
    """Keys and values [layers, kv_heads, capacity, head_dim] of up to ``max_positions`` rows."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_positions: int):
        self.layers, self.kv_heads, self.head_dim, self.max_positions = layers, kv_heads, head_dim, max_positions
        self.keys = torch.empty(0)
        self.values = torch.empty(0)
        self._layout: tuple | None = None  # (keys, values, capacity, their addresses), see _laid_out
        self.length = 0  # committed rows
        self.row_tokens: list[int] = []  # the token of each committed row; SKIPPED: not reusable
        self.pending: list[int] = []  # the last forward's tokens, as commit records them

    @property
    def capacity(self) -> int:
        return self._laid_out()[2]

    @property
    def addresses(self) -> tuple[int, int]:
        """The data addresses of keys and values (the kernels' one-request pass reads them)."""
        return self._laid_out()[3]

    def _laid_out(self) -> tuple:
        """(keys, values, capacity, addresses), asked of torch again only when the tensors change:
        a decoding step reads them where each torch call costs tens of µs (see
        :meth:`freespec.model.runner.ModelRunner.tree_logits`)."""
        keys, values = self.keys, self.values
        if self._layout is None or self._layout[0] is not keys or self._layout[1] is not values:
            capacity = keys.shape[2] if keys.dim() == 4 else 0
            self._layout = (keys, values, capacity, (keys.data_ptr(), values.data_ptr()))
        return self._layout

    def reset(self, capacity: int) -> None:
        """Empty the cache and make sure it holds ``capacity`` positions."""
        if capacity > self.max_positions:
            raise ValueError(f"{capacity} positions exceed the model's context of {self.max_positions}")
        if self.capacity < capacity:
            rounded = min(self.max_positions, -(-capacity // ROUNDING) * ROUNDING)
            shape = (self.layers, self.kv_heads, rounded, self.head_dim)
            self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.length = 0
        self.row_tokens = []

    def reserve(self, capacity: int) -> None:
        """Make sure the cache holds ``capacity`` positions, keeping the committed rows (a draft
        model's cache grows with the request instead of being sized for the longest one)."""
        if capacity <= self.capacity:
            return
        keys, values, length, row_tokens = self.keys, self.values, self.length, self.row_tokens
        self.reset(capacity)
        if length:
            self.keys[:, :, :length] = keys[:, :, :length]
            self.values[:, :, :length] = values[:, :, :length]
        self.length, self.row_tokens = length, row_tokens

    def truncate(self, length: int) -> None:
        """Drop the committed rows from ``length`` on: rows a drafter committed while drafting
        (e.g. with skipped layers) are rolled back before verification overwrites them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate the cache to {length} rows: it holds {self.length}")
        self.length = length
        del self.row_tokens[length:]

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the committed rows after the longest prefix of ``tokens`` they hold; return how
        many rows are left."""
        kept = common_prefix(self.row_tokens, tokens)
        self.truncate(kept)
        return kept

    def copy_prefix(self, source: KVCache, tokens: Sequence[int]) -> int:
        """Make this cache hold ``source``'s rows of the longest prefix of ``tokens`` that ``source``
        holds, where that is longer than its own; return the rows of ``tokens`` it then holds.
        Both caches must belong to one model (forks of it): a row depends only on the tokens up
        to it, so a copied row is the one a prefill would write.

        >>> source, cache = KVCache(1, 1, 2, 64), KVCache(1, 1, 2, 64)
        >>> source.reset(8); source.pending = [5, 6, 7]; source.commit([0, 1, 2])
        >>> source.keys[0, 0, :3] = torch.arange(6.0).view(3, 2)
        >>> cache.reset(8); cache.pending = [5, 9]; cache.commit([0, 1])
        >>> cache.copy_prefix(source, [5, 6, 8]), cache.row_tokens  # row 0 its own, row 1 copied
        (2, [5, 6])
        >>> cache.keys[0, 0, :2].tolist()
        [[0.0, 0.0], [2.0, 3.0]]
        >>> cache.copy_prefix(source, [4, 6])  # nothing shared: its own rows stay
        0
        """
        held = common_prefix(self.row_tokens, tokens)
        matched = common_prefix(source.row_tokens, tokens)
        if matched <= held:
            return held
        self.reserve(matched)
        self.keys[:, :, held:matched] = source.keys[:, :, held:matched]
        self.values[:, :, held:matched] = source.values[:, :, held:matched]
        self.length = matched
        self.row_tokens = list(tokens[:matched])
        return matched

    def commit(self, kept: Sequence[int]) -> None:
        """Keep the rows of the last forward's nodes ``kept`` (ascending), drop the others."""
        start, count = self.length, len(kept)
        if list(kept) != list(range(count)):
            source = torch.as_tensor(kept, dtype=torch.long) + start
            self.keys[:, :, start : start + count] = self.keys[:, :, source]
            self.values[:, :, start : start + count] = self.values[:, :, source]
        self.length += count
        self.row_tokens += [self.pending[node] for node in kept]
