"""ModelRunner: the target model's forward pass over a preallocated KV cache with tree attention.

One code path serves prefill, plain decoding (a tree of one node) and tree verification, so a
token's logits and cache rows do not depend on which mode produced them, and the rows of an
earlier request can serve a later one that starts with the same tokens (:meth:`ModelRunner.reuse`).
Several requests, each on a fork of the runner with a cache of its own (:meth:`ModelRunner.fork`),
run as one pass (:func:`forward_batch`: a server's continuous batching); a single request's pass
is the one-request case of the same code, so its rows have the same bits either way.
The runner computes with the kernel backend it is given (:func:`freespec.kernels.select`):
Llama-style passes run as one C call each (:class:`freespec.kernels.OneCallDecoder`), other
passes one operation at a time with the batch-invariant C matmuls and attention, or with torch's.
Weights are the model's own, in the kernels' layout and in the formats of its file (GGUF blocks,
bf16, ...: :mod:`freespec.model.weights`); no transformers model is involved.

Supported families: Llama-style decoders (llama, mistral, qwen2, qwen3), Phi-3, Gemma 1-3 and
GPT-2 (:data:`freespec.model.weights.SUPPORTED_FAMILIES`). Each layer attends within its own
sliding window, if it has one, so the model's whole context is served.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from freespec.kernels import (
    Attention,
    Kernels,
    LayerNorm,
    ModelWeights,
    PassSequence,
    RMSNorm,
    Rotation,
)
from freespec.kernels.weights import qkv_rotate_half_order
from freespec.model.kv_cache import SKIPPED, KVCache
from freespec.model.rotary import RotaryTables
from freespec.model.weights import weight_formats

PREFILL_CHUNK = 512
PREFILL_SCRATCH = 1 << 24  # attention scores (floats) one prefill chunk may hold: 64 MB


def context_length(config) -> int:
    """The positions the runner serves: the model's whole context (sliding-window layers attend
    within their windows, :attr:`freespec.kernels.DecoderLayer.window`)."""
    config = config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


def _norm(x: torch.Tensor, norm: RMSNorm | LayerNorm) -> torch.Tensor:
    """The model's norm as one fused op (an eager RMSNorm module is seven small ops)."""
    if isinstance(norm, LayerNorm):
        return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


def check_pass(tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor, skip: frozenset[int],
               num_layers: int, max_positions: int) -> None:
    """ValueError unless a forward pass's inputs agree in length, its skipped layers exist and its
    positions lie within the context (what every runner checks before it writes a row)."""
    n = tokens.shape[0]
    if tokens.ndim != 1 or n == 0 or positions.shape != (n,) or tree_mask.shape != (n, n):
        raise ValueError(f"forward needs tokens [q], positions [q] and a tree mask [q, q] with q >= 1; got "
                         f"{list(tokens.shape)}, {list(positions.shape)} and {list(tree_mask.shape)}")
    bad = [index for index in skip if not 0 <= index < num_layers]
    if bad:
        raise ValueError(f"cannot skip layers {sorted(bad)}: the model has layers 0..{num_layers - 1}")
    where = positions.tolist()
    if min(where) < 0 or max(where) >= max_positions:
        raise ValueError(f"positions {min(where)}..{max(where)} are outside the model's context of {max_positions}")


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts concatenated along rows (one part as it is: no copy on the single-request path)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _post_norm(x: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
    """A block's output normed before its residual add (Gemma 2 and 3), or as it is."""
    return x if norm is None else _norm(x, norm)


class BatchPass(NamedTuple):
    """One request's part of a batched pass (:func:`forward_batch`): its runner (whose cache the
    rows go to) and the inputs :meth:`ModelRunner.forward` takes."""

    runner: ModelRunner
    tokens: torch.Tensor  # [q]
    positions: torch.Tensor  # [q]
    tree_mask: torch.Tensor  # [q, q]


def forward_batch(passes: Sequence[BatchPass]) -> list[torch.Tensor]:
    """Several requests' passes as one: final hidden states [q_i, hidden] for each.

    The runners must be forks of one model (:meth:`ModelRunner.fork`): the matmuls run once over
    every request's rows, attention per request over its own cache. Every kernel is
    batch-invariant, so each request's result has the bits its own :meth:`ModelRunner.forward`
    gives: that is the one-request case of the same code.
    """
    if not passes:
        return []
    first = passes[0].runner
    if any(item.runner.weights is not first.weights or item.runner.kernels is not first.kernels for item in passes):
        raise ValueError("a batched pass needs runners forked from one model (ModelRunner.fork)")
    if len({id(item.runner.cache) for item in passes}) != len(passes):
        raise ValueError("a batched pass takes each runner's cache once")
    for item in passes:
        check_pass(item.tokens, item.positions, item.tree_mask, frozenset(), first.num_layers, first.max_positions)
    hidden = first._run([(item.runner.cache, item.tokens, item.positions, item.tree_mask) for item in passes])
    return list(hidden.split([item.tokens.shape[0] for item in passes]))


@dataclass
class TopCandidates:
    """Each row's k most likely next tokens and their probabilities, best first: what Token
    Recycling learns from a verified node. From the logits (exact), or from the exact greedy
    head's integer pass (approximate, within its bound of each logit: a draft's choice of
    candidates, never a token's), whichever the step computed."""

    ids: np.ndarray  # [n, k] int64
    probs: np.ndarray  # [n, k] float32

    def rows(self, rows: list[int]) -> TopCandidates:
        """These rows' candidates ([len(rows), k] each)."""
        return TopCandidates(self.ids[rows], self.probs[rows])

    @classmethod
    def of_logits(cls, logits: torch.Tensor | np.ndarray, k: int, kernels: Kernels) -> TopCandidates:
        """The exact top-k of logits [n, vocab] and their softmax probabilities."""
        values, ids, normalizer = kernels.top_k(logits if isinstance(logits, torch.Tensor) else torch.from_numpy(logits), k)
        return cls(ids, np.exp(values - normalizer[:, None]))


class PassLogits:
    """A pass's logits [q, vocab] and each row's first maximum, each computed when first read.

    Made from the logits (a tensor, or the numpy buffer of the one-call decoder's head, which the
    model's next tree pass overwrites: read them before), or from two calls over a pass's final
    hidden states (:meth:`ModelRunner.tree_logits`, :func:`batch_logits`): ``whole_head`` computes
    the logits, ``greedy_head(k)`` each row's first maximum without them and, for k > 0, its k
    best tokens by the same pass's approximation (the exact greedy head,
    :meth:`freespec.kernels.OneCallDecoder.head_argmax_top_k`: only the logits an integer bound
    cannot rule out), or None where it cannot. ``argmax`` alone then runs ``greedy_head(0)``,
    :meth:`top_candidates` ``greedy_head(k)`` (the maxima with them), and the whole head runs
    once something reads the logits themselves (:meth:`materialize`, ``tensor``).
    """

    def __init__(self, logits: torch.Tensor | np.ndarray | None, kernels: Kernels,
                 whole_head: Callable[[], torch.Tensor | np.ndarray] | None = None,
                 greedy_head: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None):
        self._logits, self._kernels, self._whole_head, self._greedy_head = logits, kernels, whole_head, greedy_head

    def top_candidates(self, k: int) -> TopCandidates:
        """Each row's k best tokens and their probabilities: from the logits if they were
        computed, else from the greedy head's integer pass (which gives ``argmax`` too: one pass
        for both), else from the logits, the whole head run now."""
        if self._logits is None and self._greedy_head is not None and "argmax" not in self.__dict__:
            result = self._greedy_head(k)
            if result is not None and result[1].shape[1] >= k:
                self.__dict__["argmax"], ids, probs = result  # the cached_property's value
                return TopCandidates(ids, probs)
        return TopCandidates.of_logits(self.materialize(), k, self._kernels)

    def materialize(self) -> torch.Tensor | np.ndarray:
        """The logits [q, vocab], the whole head run now if it has not run (a reader of the logits
        calls this before ``argmax``, which then reads them instead of running the greedy head)."""
        if self._logits is None:
            self._logits = self._whole_head()
        return self._logits

    @cached_property
    def tensor(self) -> torch.Tensor:
        """[q, vocab] fp32 (sharing the buffer's memory)."""
        logits = self.materialize()
        return logits if isinstance(logits, torch.Tensor) else torch.from_numpy(logits)

    @cached_property
    def argmax(self) -> np.ndarray:
        """[q] int64: each row's first maximum, as ``torch.argmax`` gives it."""
        if self._logits is None and self._greedy_head is not None and (result := self._greedy_head(0)) is not None:
            return result[0]
        logits = self.materialize()
        return self._kernels.argmax(logits if isinstance(logits, np.ndarray) else self.tensor)


def batch_logits(runner: ModelRunner, hidden: Sequence[torch.Tensor], top_k: Sequence[int | None]) -> list[PassLogits]:
    """The logits of several requests' passes (final hidden states [q_i, hidden] each, runners
    forked from ``runner``'s model) from one head call over all their rows: the head's weights
    stream once per pass, not once per request. The parts that read only their rows' maxima and
    perhaps their k best tokens (``top_k[i]``: 0 or k; None: the logits themselves) share one exact
    greedy head call instead, where the model's one-call decoder has one for that many rows; such
    a part runs its own whole head should its logits be read after all."""
    logits: list[PassLogits | None] = [None] * len(hidden)
    greedy = [i for i, k in enumerate(top_k) if k is not None]
    decoder = runner._decoder
    if greedy and decoder is not None and runner.weights.final_softcap is None:
        rows = torch.cat([hidden[i] for i in greedy]).numpy()  # [sum q_i, hidden]
        k = max(top_k[i] for i in greedy)
        result = decoder.head_argmax_top_k(rows, k) if k else decoder.head_argmax(rows)
        if result is not None:
            maxima, ids, probs = result if k else (result, np.empty((len(rows), 0), np.int64), np.empty((len(rows), 0)))
            start = 0
            for i in greedy:
                end = start + len(hidden[i])
                part = (maxima[start:end], ids[start:end], probs[start:end])
                logits[i] = PassLogits(None, runner.kernels, partial(runner.logits, hidden[i]), lambda _, part=part: part)
                start = end
    rest = [i for i, part in enumerate(logits) if part is None]
    if rest:
        whole = runner.logits(torch.cat([hidden[i] for i in rest])).split([len(hidden[i]) for i in rest])
        for i, part in zip(rest, whole):
            logits[i] = PassLogits(part, runner.kernels)
    return logits


def forward_logits(runner, tokens: np.ndarray, depths: np.ndarray, tree_mask: np.ndarray) -> PassLogits:
    """A draft tree's logits through a runner's ``forward`` and ``logits``: what
    :meth:`ModelRunner.tree_logits` computes without its one-call decoder, and the
    ``tree_logits`` of runners that have none (transformers', a test's)."""
    positions = torch.from_numpy(depths + runner.length)
    hidden = runner.forward(torch.from_numpy(tokens), positions, torch.from_numpy(tree_mask))
    return PassLogits(runner.logits(hidden), runner.kernels)


class PrefillCancelled(Exception):
    """A prefill's ``should_stop`` said stop (a server's client left); the chunks run so far stay committed."""


class ModelRunner:
    """Forward passes of a causal LM over a KV cache, with tree masks and cache compaction.

    Protocol: ``forward(tokens, positions, tree_mask)`` writes the new tokens' keys/values after
    the committed prefix and returns their final hidden states; ``commit(kept)`` then keeps the
    rows of the nodes in ``kept`` (in that order) and drops the rest.
    """

    def __init__(self, config, weights: ModelWeights, kernels: Kernels):
        """``config``: the model's transformers config; ``weights``: its parameters in the kernels'
        layout (:mod:`freespec.model.loading` reads them from the model's file,
        :func:`freespec.model.weights.extract` from a transformers model); ``kernels``: the
        backend every pass computes with (:func:`freespec.kernels.select`)."""
        self.kernels = kernels
        self.config = config
        self.weight_formats = weight_formats(weights)  # as the model's file stores them
        self.weights = weights = kernels.prepare(weights)
        self.vocab_size = weights.lm_head.weight.shape[0]
        self.vocab_rows = weights.embed.shape[0]  # token ids the embedding holds
        self.max_positions = context_length(config)
        self.num_layers = len(weights.layers)
        heads = self.heads = weights.heads
        self.cache = KVCache(self.num_layers, heads.kv_heads, heads.dim, self.max_positions)
        self.holder: object | None = None  # the request whose rows the cache holds (Generation.plan checks it)
        # held for each step of a request, by this runner and its forks alike (they share the decoder's
        # buffers and the rotary tables): threads sharing a model, or its forks, take turns a step at a time
        self.lock = threading.RLock()
        self.rotary: dict[str | None, RotaryTables] = {}  # per layer type (Gemma 3: local and global tables)
        if weights.positions is None:
            self.rotary = {kind: RotaryTables(config.get_text_config(), self.max_positions, kind)
                           for kind in {layer.rotary for layer in weights.layers}}
        self._act = ACT2FN[weights.activation]
        # [(heads + 2 kv_heads) dim]: the order that undoes DecoderLayer.interleaved_qk, where a layer needs it
        interleaved = any(layer.interleaved_qk for layer in weights.layers)
        self._rotate_half = qkv_rotate_half_order(heads) if interleaved else None
        self._decoder = kernels.decoder(weights)

    def fork(self) -> ModelRunner:
        """A runner of the same model (weights, kernels, tables shared) with an empty cache of its
        own: one per request a server runs at once, their passes batched by :func:`forward_batch`."""
        twin = copy.copy(self)
        twin.cache = KVCache(self.num_layers, self.heads.kv_heads, self.heads.dim, self.max_positions)
        twin.holder = None  # the lock stays shared
        return twin

    # -- the cache (see KVCache) -----------------------------------------------------------------

    @property
    def length(self) -> int:
        """Committed cache rows."""
        return self.cache.length

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reset(self, capacity: int) -> None:
        """Empty the cache and make sure it holds ``capacity`` positions."""
        self.cache.reset(capacity)
        self.holder = None

    def reserve(self, capacity: int) -> None:
        """Make sure the cache holds ``capacity`` positions, keeping the committed rows."""
        self.cache.reserve(capacity)

    def truncate(self, length: int) -> None:
        """Drop the committed rows from ``length`` on."""
        self.cache.truncate(length)

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the committed rows after the longest prefix of ``tokens`` they hold; return how many are left."""
        return self.cache.keep_prefix(tokens)

    def commit(self, kept: Sequence[int]) -> None:
        """Keep the cache rows of the last forward's nodes ``kept`` (ascending), drop the others."""
        self.cache.commit(kept)

    def reuse(self, tokens: Sequence[int], capacity: int) -> int:
        """Keep the committed rows of the longest prefix of ``tokens`` the cache already holds,
        drop the rest, make sure the cache holds ``capacity`` positions; return the rows kept.

        A row depends only on the tokens up to it (every pass is batch-invariant, prefill
        included), so a kept row is bit-identical to the one a fresh prefill would write: what
        came before never changes a request's output. Rows of passes that skipped layers are
        never kept. With torch's kernels nothing is kept (they are not batch-invariant).
        """
        if not self.kernels.batch_invariant:
            self.cache.truncate(0)
        kept = self.cache.keep_prefix(tokens)
        self.cache.reserve(capacity)
        return kept

    # -- forward ---------------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run and commit a prompt (causally, in chunks); return its final hidden states [n, hidden].

        The same batch-invariant pass as decoding, so the rows do not depend on the chunks. A
        chunk holds up to PREFILL_CHUNK tokens, fewer deep in a long context, where its attention
        scores (tokens x heads x keys) would outgrow PREFILL_SCRATCH. ``should_stop`` is asked
        before each chunk; True raises :class:`PrefillCancelled`.
        """
        hidden, start = [], 0
        while start < tokens.shape[0]:
            if should_stop is not None and should_stop():
                raise PrefillCancelled(f"prefill stopped after {start} of {tokens.shape[0]} tokens")
            length = self.cache.length
            size = max(1, min(PREFILL_CHUNK, PREFILL_SCRATCH // (self.heads.heads * (length + PREFILL_CHUNK))))
            chunk = tokens[start : start + size]
            n = chunk.shape[0]
            causal = torch.ones(n, n, dtype=torch.bool).tril_()
            hidden.append(self._run([(self.cache, chunk, torch.arange(length, length + n), causal)]))
            self.cache.commit(range(n))
            start += n
        return torch.cat(hidden) if hidden else torch.empty(0, self.weights.embed.shape[1])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final hidden states [q, hidden] for ``tokens`` [q] at ``positions`` [q].

        ``tree_mask`` [q, q] (bool, True = attend) says which new tokens each new token sees; all
        of them see the whole committed prefix. Their keys/values are written after the prefix.
        A token's result is bit-identical for any tree it sits in (see :mod:`freespec.kernels`).

        ``skip``: decoder layers to leave out (a cheaper draft of the same model, as SWIFT drafts):
        the hidden state passes them unchanged and their cache rows are not written, so such rows
        are only good for further skipping passes; :meth:`truncate` drops them before verification.
        """
        check_pass(tokens, positions, tree_mask, skip, self.num_layers, self.max_positions)
        return self._run([(self.cache, tokens, positions, tree_mask)], skip=frozenset(skip))

    def tree_logits(self, tokens: np.ndarray, depths: np.ndarray, tree_mask: np.ndarray) -> PassLogits:
        """The logits of a draft tree's pass: ``tokens`` [q] at positions ``length + depths`` [q],
        ``tree_mask`` [q, q] (bool) as in :meth:`forward`; ``logits(forward(...))``, the same bits.

        The one-call decoder runs it from numpy arrays straight into a buffer (see
        :meth:`freespec.kernels.OneCallDecoder.tree_hidden`), so that a decoding step touches no
        torch unless something reads the logits themselves, and the lm_head runs when the
        logits or their maxima are first read (:class:`PassLogits`).
        """
        if self._decoder is None or self.weights.final_softcap is not None:
            return forward_logits(self, tokens, depths, tree_mask)
        if not (tokens.dtype == np.int64 and tree_mask.dtype == np.bool_ and tokens.flags.c_contiguous
                and tree_mask.flags.c_contiguous):  # the C pass reads them by pointer
            tokens, tree_mask = np.ascontiguousarray(tokens, np.int64), np.ascontiguousarray(tree_mask, np.bool_)
        cache, length = self.cache, self.cache.length
        positions = (depths + length).astype(np.int64, copy=False)  # [q]
        ids, last = tokens.tolist(), length + int(depths.max())
        if last >= self.max_positions:
            raise ValueError(f"positions {length}..{last} are outside the model's context of {self.max_positions}")
        self._check_rows(cache, ids)
        cache.pending = ids
        rotary = [self.rotary[kind].addresses(last + 1) for kind in self._decoder.rotary_kinds]
        hidden = self._decoder.tree_hidden(tokens, positions, tree_mask, *cache.addresses, cache.capacity, length,
                                           rotary)  # [q, hidden]
        decoder = self._decoder
        return PassLogits(None, self.kernels, partial(decoder.head_logits, hidden), partial(decoder.head_argmax_top_k, hidden))

    def _check_rows(self, cache: KVCache, ids: list[int]) -> None:
        """ValueError unless rows for ``ids`` fit after the cache's committed ones and every id indexes
        the embedding (C reads it by pointer), before anything is written."""
        if cache.length + len(ids) > cache.capacity:
            raise ValueError(f"cache overflow: {cache.length + len(ids)} rows needed, capacity {cache.capacity}")
        if min(ids) < 0 or max(ids) >= self.vocab_rows:
            bad = next(i for i in ids if not 0 <= i < self.vocab_rows)
            raise ValueError(f"token id {bad} is out of range: this model's ids are 0..{self.vocab_rows - 1}")

    def _run(self, sequences: Sequence[tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]],
             skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """The pass of one or several sequences (cache, tokens [q], positions [q], tree mask [q, q]),
        once their positions are known to be in range: final hidden states [sum of q, hidden], the
        sequences' rows in order. Token ids index the embedding table (in C by pointer): any
        outside it is refused here, before anything is written."""
        for cache, tokens, _, _ in sequences:
            self._check_rows(cache, tokens.tolist())
        for cache, tokens, _, _ in sequences:
            cache.pending = [SKIPPED] * tokens.shape[0] if skip else tokens.tolist()
        # the dtypes every path reads (the C decoder by pointer): any integer ids, any mask
        tokens = _joined([tokens for _, tokens, _, _ in sequences]).to(torch.int64)  # [n]
        positions = _joined([positions for _, _, positions, _ in sequences]).to(torch.int64)  # [n]
        masks = [tree_mask.to(torch.bool) for _, _, _, tree_mask in sequences]
        with torch.inference_mode():
            if self._decoder is not None:
                rotary = [self.rotary[kind].rows(positions) for kind in self._decoder.rotary_kinds]
                parts = [PassSequence(cache.keys, cache.values, cache.length, mask)
                         for (cache, _, _, _), mask in zip(sequences, masks)]
                return self._decoder(tokens, positions, parts, rotary, skip)
            rotations = {}  # each rotary table's rotation of these tokens
            for kind, tables in self.rotary.items():
                cos_table, sin_table, rope_rows = tables.rows(positions)
                rotations[kind] = (cos_table[rope_rows], sin_table[rope_rows])  # [n, dim] each
            attentions = [(cache, self.kernels.attention(cache.length, mask, self.heads,
                                                           item_positions.to(torch.int64)))
                          for (cache, _, item_positions, _), mask in zip(sequences, masks)]
            return self._forward_per_op(tokens, positions, attentions, rotations, skip)

    def _forward_per_op(self, tokens: torch.Tensor, positions: torch.Tensor,
                        attentions: Sequence[tuple[KVCache, Attention]], rotations: dict[str | None, Rotation],
                        skip: frozenset[int]) -> torch.Tensor:
        """The pass one operation at a time, in Python: what the one-call C decoder does in C.

        Needed where that decoder does not run: GPT-2 (learned positions, LayerNorm, plain MLP),
        models it does not cover (another activation, biases beyond the QKV projection, more
        than two rotary tables), and any model on torch's kernels (no C compiler or no AVX2). Every matmul and the attention go through the backend, so with the
        C kernels the pass is batch-invariant too; its norms and activation are torch's
        (row-wise and element-wise), so its bits can differ from the one-call decoder's (a
        model always runs one of the two). ``rotations``: each rotary table's (cos, sin) [n, dim].
        ``attentions``: each sequence's cache and attention, its rows following the previous one's.
        """
        weights, linear = self.weights, self.kernels.linear
        h = self.kernels.embed(weights.embed, tokens)  # [n, hidden]
        if weights.embed_scale is not None:
            h = h * weights.embed_scale
        if weights.positions is not None:
            h = h + weights.positions[positions]
        for index, layer in enumerate(weights.layers):
            if index in skip:
                continue
            qkv = linear(_norm(h, layer.attn_norm), layer.qkv.weight, layer.qkv.bias)  # [n, (heads + 2 kv_heads) dim]
            if layer.interleaved_qk:  # llama.cpp's interleaved query and key values, back in transformers' order
                qkv = qkv[:, self._rotate_half]
            if layer.q_norm is not None:
                qkv = self._norm_queries_and_keys(qkv, layer.q_norm, layer.k_norm)
            attended = self._attend(qkv, attentions, index, rotations.get(layer.rotary), layer.window)
            h = h + _post_norm(linear(attended, layer.o.weight, layer.o.bias), layer.post_attn_norm)
            up = linear(_norm(h, layer.mlp_norm), layer.up.weight, layer.up.bias)
            if layer.gated:
                gate, up = up.chunk(2, dim=-1)
                activated = self._act(gate) * up
            else:
                activated = self._act(up)
            h = h + _post_norm(linear(activated, layer.down.weight, layer.down.bias), layer.post_mlp_norm)
        return _norm(h, weights.final_norm)

    @staticmethod
    def _attend(qkv: torch.Tensor, attentions: Sequence[tuple[KVCache, Attention]], layer: int,
                rotation: Rotation | None, window: int | None) -> torch.Tensor:
        """qkv [n, (heads + 2 kv_heads) dim] → [n, heads * dim]: each sequence's rows attend over
        its own cache's rows of ``layer``."""
        parts, start = [], 0
        for cache, attention in attentions:
            end = start + attention.n
            rows = None if rotation is None else (rotation[0][start:end], rotation[1][start:end])
            parts.append(attention(qkv[start:end], cache.keys[layer], cache.values[layer], rows, window))
            start = end
        return _joined(parts)

    def _norm_queries_and_keys(self, qkv: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm) -> torch.Tensor:
        """Qwen3's and Gemma 3's per-head RMSNorm of queries and keys, before the rotary embedding."""
        n, heads, kv_heads, dim = qkv.shape[0], self.heads.heads, self.heads.kv_heads, self.heads.dim
        q, k, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
        return torch.cat([_norm(q, q_norm), _norm(k, k_norm), v], dim=1).view(n, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, hidden] → [q, vocab] fp32 logits (soft-capped where the model caps them: Gemma 2)."""
        with torch.inference_mode():
            logits = self.kernels.linear(hidden, self.weights.lm_head.weight, self.weights.lm_head.bias)
            cap = self.weights.final_softcap
            return logits if cap is None else torch.tanh(logits / cap) * cap

    def embedding_probe(self) -> list[float]:
        """A few embedding values: tells models of the same shape apart in cache keys."""
        return self.kernels.embed(self.weights.embed, torch.arange(4))[:, :8].flatten().tolist()
