"""Continuous batching: every running request's next step in one forward pass.

A server runs several :class:`~freespec.engine.loop.Generation` objects at once, each on its own
fork of the model's runner (its own KV cache, :meth:`freespec.model.runner.ModelRunner.fork`).
Each :meth:`Batch.step` plans every request's step (a prefill chunk or a draft tree), runs them
as one pass (:func:`freespec.model.runner.forward_batch`: the matmuls over all rows, attention per
request over its own cache) and hands each request its rows back. The kernels are
batch-invariant, so a request's tokens are the same bits whatever runs beside it.

Prefill: while other requests decode, a pass carries at most ``prefill_rows`` prompt tokens (the
oldest waiting prompt first), so a long prompt does not freeze the streams already running.

Speculation spends only what batching leaves (:func:`share_budget`): a pass of q rows costs t(q)
(the budget policy's measured curve); each decoding request brings one token for sure (its root's
bonus) and each of its draft nodes its expected gain. Nodes are taken best first across requests
while they raise the pass's expected tokens per second. Alone, a request keeps its own policy's
choice (today's speculation); with many requests the pass is already full of their own next
tokens, t(q) grows with every row, and drafts shrink to the nodes that pay for themselves.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from freespec.engine.loop import Generation, Step
from freespec.model.runner import PREFILL_CHUNK, BatchPass, forward_batch

log = logging.getLogger(__name__)

BATCH_PREFILL_ROWS = 128
"""Prompt tokens a pass carries while other requests decode: their next token waits for the pass."""


def share_budget(gains: Sequence[Sequence[float]], rows: int, tokens: float, cost: Callable[[int], float]) -> list[int]:
    """Draft nodes each request verifies in a pass that already holds ``rows`` rows expected to
    emit ``tokens`` tokens: ``gains[i]`` are request i's nodes' expected extra tokens, best first.

    Nodes are taken in order of gain across requests (each request's in its own order); of those
    prefixes the one with the most expected tokens per second ``tokens / cost(rows)`` wins, so a
    node is verified only where the pass's rate gains by it.

    >>> cost = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.5, 5: 2.0}.get
    >>> share_budget([[0.9, 0.5], [0.8]], rows=2, tokens=2.0, cost=cost)  # 2.9/1 beats 3.7/1.5
    [1, 0]
    """
    taken = [0] * len(gains)
    order: list[int] = []  # requests in the order their nodes are taken
    heap = [(-request_gains[0], index) for index, request_gains in enumerate(gains) if request_gains]
    heapq.heapify(heap)
    best, best_rate = 0, tokens / cost(rows)
    while heap:
        gain, index = heapq.heappop(heap)
        tokens -= gain
        rows += 1
        order.append(index)
        taken[index] += 1
        if taken[index] < len(gains[index]):
            heapq.heappush(heap, (-gains[index][taken[index]], index))
        if tokens / cost(rows) > best_rate:
            best, best_rate = len(order), tokens / cost(rows)
    shares = [0] * len(gains)
    for index in order[:best]:
        shares[index] += 1
    return shares


@dataclass(eq=False)
class Running:
    """A request in the batch, and what its last step brought: the tokens it emitted, or the
    exception that ended it (a fault in one request fails that request only)."""

    generation: Generation
    emitted: list[int] = field(default_factory=list)
    error: Exception | None = None


class Batch:
    """Runs the steps of several requests as one forward pass (see the module's notes).

    ``prefill_rows``: prompt tokens per pass while others decode; ``share``: cap each request's
    draft by :func:`share_budget` when several requests decode (off: each keeps its own choice).
    """

    def __init__(self, prefill_rows: int = BATCH_PREFILL_ROWS, share: bool = True):
        if prefill_rows <= 0:
            raise ValueError(f"prefill_rows must be positive, got {prefill_rows}")
        self.prefill_rows, self.share = prefill_rows, share

    def step(self, requests: Sequence[Running]) -> None:
        """One pass for every request not yet done: each gets its ``emitted`` tokens (none for a
        prefill chunk) or its ``error``. A request that is done plans no step."""
        for request in requests:
            request.emitted = []
        live = [request for request in requests if request.error is None]
        decoding = [request for request in live if not request.generation.prefilling]
        for request in decoding:
            self._guard(request, request.generation.draft)
        decoding = [request for request in decoding if request.error is None and not request.generation.done]
        prefilling = [request for request in live if request.generation.prefilling]
        planned: list[tuple[Running, Step]] = []
        budget = PREFILL_CHUNK if not decoding else self.prefill_rows  # prompt tokens this pass
        for request in prefilling:
            if budget > 0:
                step = self._guard(request, request.generation.plan, budget)
                if step is not None:
                    planned.append((request, step))
                    budget -= len(step.tokens)
        caps = self._caps(decoding, sum(len(step.tokens) for _, step in planned))
        for request, cap in zip(decoding, caps):
            step = self._guard(request, request.generation.plan, None, cap)
            if step is not None:
                planned.append((request, step))
        if planned:
            self._run(planned)

    def _caps(self, decoding: list[Running], prefill_rows: int) -> list[int | None]:
        """Each decoding request's cap on verified draft nodes: none for a request alone in its
        pass (its policy chose for it), else its share of :func:`share_budget`."""
        if not self.share or (len(decoding) == 1 and not prefill_rows) or not decoding:
            return [None] * len(decoding)
        policies = [request.generation.policy for request in decoding if request.generation.policy is not None]
        if not policies:
            return [None] * len(decoding)
        # a request with a fixed budget keeps it (its drafts, so its sampled tokens, stay as alone)
        shared = [request for request in decoding if request.generation.fixed_budget is None]
        fixed = sum(request.generation.node_count() for request in decoding if request not in shared)
        gains = [request.generation.node_gains() for request in shared]
        caps = iter(share_budget(gains, prefill_rows + len(decoding) + fixed, float(len(decoding)), policies[0].cost))
        return [None if request.generation.fixed_budget is not None else next(caps) for request in decoding]

    def _run(self, planned: list[tuple[Running, Step]]) -> None:
        """One pass over the planned steps; should it fail, each step alone, so that a fault
        fails only the request it belongs to (a pass writes only rows after the committed ones,
        so running a step again is safe)."""
        if len(planned) == 1:  # alone: the request's own pass (what iterating its generation runs)
            request, step = planned[0]
            states = self._guard(request, request.generation.run_alone, step)
            if request.error is None:
                request.emitted = self._guard(request, request.generation.take, states) or []
            return
        started = time.perf_counter()
        try:
            hidden = forward_batch([BatchPass(request.generation.runner, step.tokens, step.positions, step.tree_mask)
                                    for request, step in planned])
            logits = self._logits(planned, hidden)
        except Exception:
            log.warning("a batched pass failed; running its %d requests one at a time", len(planned), exc_info=True)
            for request, step in planned:
                self._run([(request, step)])
            return
        timing = (sum(len(step.tokens) for _, step in planned), time.perf_counter() - started)  # t(q) for the policies
        for (request, step), states, step_logits in zip(planned, hidden, logits):
            if step.tree is None:
                request.generation.runner.commit(range(len(step.tokens)))
            emitted = self._guard(request, request.generation.take, states, step_logits, *timing)
            request.emitted = emitted or []

    @staticmethod
    def _logits(planned: list[tuple[Running, Step]], hidden: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each tree step's logits [q, vocab] (None for prefill chunks), from one lm_head call over
        all of them: the head's weights are streamed once per pass, not once per request."""
        trees = [states for (_, step), states in zip(planned, hidden) if step.tree is not None]
        if not trees:
            return [None] * len(planned)
        parts = iter(planned[0][0].generation.runner.logits(torch.cat(trees)).split([len(t) for t in trees]))
        return [None if step.tree is None else next(parts) for _, step in planned]

    @staticmethod
    def _guard(request: Running, call: Callable, *arguments):
        """``call(*arguments)``, or None with the request's ``error`` set should it raise."""
        try:
            return call(*arguments)
        except Exception as error:  # this request's fault: the others go on
            request.error = error
            return None

