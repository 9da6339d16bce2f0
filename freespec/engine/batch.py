"""Continuous batching: every running request's next step in one forward pass.

A server runs several :class:`~freespec.engine.loop.Generation` objects at once, each on its own
fork of the model's runner (its own KV cache, :meth:`freespec.model.runner.ModelRunner.fork`).
Each :meth:`Batch.step` plans every request's step (a prefill chunk or a draft tree), runs them
as one pass (:func:`freespec.model.runner.forward_batch`: the matmuls over all rows, attention per
request over its own cache) and hands each request its rows back. The kernels are
batch-invariant, so a request's tokens are the same bits whatever runs beside it.

Prefill: while other requests decode, a pass carries at most ``prefill_rows`` prompt tokens (the
oldest waiting prompt first), so a long prompt does not freeze the streams already running.

Speculation spends only what batching leaves (:func:`share_budget`): a step of q rows costs what the
batch's own steps measured (:class:`StepCost`: drafting, the pass and verifying, by rows; the budget
policy's single-request curve t(q) until enough steps are timed); each decoding request brings one
token for sure (its root's bonus) and each of its draft nodes its expected gain, corrected by what
shared nodes brought (:class:`Acceptance`). Nodes are taken best first across requests while they
raise the pass's expected tokens per second; a request none of whose nodes were taken rests from
drafting for a few passes (drafting costs time of its own); and where steps that verified shared
drafts measured fewer tokens per second than steps that verified none (:class:`ShareCheck`, per
number of requests), the batch shares none but every 16th step. A pass that carries a prompt chunk
drafts nothing (but for fixed budgets): its prompt rows fill it already, and draft rows would only
lengthen the pass that the newcomer's first token waits for (serve_load.py, 8 clients, `suffix`:
time to first token p50 0.61 → 0.51 s over five alternating rounds, tokens/s unchanged within the
spread; docs/serving.md). A request
that shares nothing in a pass (resting, a step the check keeps plain, or one beside a prompt)
drafts nothing, and its root-only step skips learning
where its drafter's learning is a cache (:meth:`Generation.plan`): that step costs what plain
continuous batching's does. Alone, a request keeps its own policy's
choice (today's speculation); with many requests the pass is already full of their own next tokens,
t(q) grows with every row, and drafts shrink to the nodes that pay for themselves.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from freespec.engine.loop import Generation, Step
from freespec.model.kv_cache import common_prefix
from freespec.model.runner import PREFILL_CHUNK, BatchPass, PassLogits, batch_logits, forward_batch

log = logging.getLogger(__name__)

MAX_REST = 31
"""Most passes a request of a batch goes without drafting once its drafts stopped paying."""

BATCH_PREFILL_ROWS = 64
"""Prompt tokens a pass carries while other requests decode: their next token waits for the pass.
Zen 4 VM, SmolLM2-135M, 8 clients, 200-token prompts (benchmarks/serve_load.py --levels 8
--requests 32 --max-tokens 64 --prompt-tokens 200, two alternating runs each): 64 against 128
rows, inter-token p99 110-122 against 193-205 ms, TTFT p50 0.63-0.71 against 0.72-0.85 s, the
same throughput (114-130 tokens/s both) and TTFT p99 (2.5-3.0 s, the first burst of 8 prompts)."""


MIN_SHARED_ROWS = 16
"""Prompt rows worth waiting for: a request whose prompt starts as a prompt being prefilled waits
for that many rows or more of it (then copies them), rather than prefilling them a second time."""


def waits_for(prompt_ids: Sequence[int], leader: Generation) -> bool:
    """Whether a request with ``prompt_ids`` should wait for ``leader``'s prefill: ``leader`` is
    still to commit at least MIN_SHARED_ROWS rows of the prompt start the two share (a burst of
    requests with one system prompt, the choices of one prompt). The last prompt token is the
    first step's root, never a cached row."""
    if not leader.prefilling:
        return False
    prompt = prompt_ids[:-1]
    shared = common_prefix(leader.prompt_ids[:-1], prompt)
    return shared - common_prefix(leader.runner.cache.row_tokens, prompt) >= MIN_SHARED_ROWS


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


class StepCost:
    """Seconds a batched decoding step takes by its rows: base + per_row * rows, a least-squares
    line over the steps the batch timed (two or more requests decoding, no prompt rows), each
    weighing ``decay`` times the one after it.

    A whole step is timed: drafting, the pass, its logits and every request's verifying and
    learning. The single-request curve t(q) sees only the pass, and a row in a batch costs more
    than the curve says (per request attention, top-k over its logits, Python), which is what
    drafting at load spends. Until ``min_steps`` steps with rows that differ by at least
    ``min_spread`` have been timed (drafts make the rows vary), it has no opinion.

    >>> cost = StepCost(min_steps=3)
    >>> for rows in (4, 6, 8, 4, 6):
    ...     cost.record(rows, 0.002 + 0.001 * rows)
    >>> round(cost(10), 6)
    0.012
    """

    def __init__(self, decay: float = 0.99, min_steps: int = 16, min_spread: float = 1.0):
        self.decay, self.min_steps, self.min_spread = decay, min_steps, min_spread
        self._sums = [0.0] * 5  # weighted count, Σx, Σx², Σy, Σxy over (rows, seconds)
        self.steps = 0
        self.line: tuple[float, float] | None = None  # (base, per_row) once fitted

    def record(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self._sums = [self.decay * total + value
                      for total, value in zip(self._sums, (1.0, rows, rows * rows, seconds, rows * seconds))]
        count, x, xx, y, xy = self._sums
        spread = xx / count - (x / count) ** 2  # variance of the rows
        if self.steps >= self.min_steps and spread >= self.min_spread**2:
            per_row = (count * xy - x * y) / (count * xx - x * x)
            if per_row > 0:
                self.line = ((y - per_row * x) / count, per_row)

    def __call__(self, rows: int) -> float:
        base, per_row = self.line
        return max(base + per_row * rows, 1e-9)


class Acceptance:
    """Tokens the nodes that :func:`share_budget` gave requests brought, against what their gains
    said (moving sums, each step weighing ``decay`` times the one after it). Drafters calibrate
    their scores on the steps they verify, most of them alone; a batch verifies only its requests'
    best nodes, and ``ratio`` corrects their gains by what it saw (1 until it has seen enough).

    >>> accepted = Acceptance(decay=1.0, min_expected=1.0)
    >>> for _ in range(4):
    ...     accepted.record(0.8, 0)
    ...     accepted.record(0.8, 1)
    >>> round(accepted.ratio, 3)
    0.625
    """

    def __init__(self, decay: float = 0.99, min_expected: float = 8.0, bounds: tuple[float, float] = (0.25, 2.0)):
        self.decay, self.min_expected, self.bounds = decay, min_expected, bounds
        self.expected = self.brought = 0.0

    def record(self, expected: float, brought: int) -> None:
        self.expected = self.decay * self.expected + expected
        self.brought = self.decay * self.brought + brought

    @property
    def ratio(self) -> float:
        if self.expected < self.min_expected:
            return 1.0
        low, high = self.bounds
        return min(max(self.brought / self.expected, low), high)


class ShareCheck:
    """Whether sharing drafts pays at each number of decoding requests, by measurement: moving
    means of the tokens per second of a batch's decoding steps with n requests, of those that
    verified shared draft nodes and of those that verified none. Both are sampled in turn until
    each has ``min_steps``; then the better one runs and every ``explore``-th step at that n is
    the other, so that a change (longer contexts, other requests) is seen. Plain continuous
    batching is thus the floor, whatever the models of cost and acceptance get wrong.

    >>> check = ShareCheck(explore=4, min_steps=2)
    >>> for _ in range(2):
    ...     check.record(8, drafted=False, tokens=8, seconds=0.010)  # 800 tokens/s
    ...     check.record(8, drafted=True, tokens=10, seconds=0.014)  # 714 tokens/s
    >>> [check.share(8) for _ in range(4)]
    [False, False, False, True]
    """

    def __init__(self, smoothing: float = 0.1, explore: int = 16, min_steps: int = 4):
        self.smoothing, self.explore, self.min_steps = smoothing, explore, min_steps
        self.rates: dict[tuple[int, bool], float] = {}  # (requests, drafted) → tokens/s, moving mean
        self.counts: dict[tuple[int, bool], int] = {}
        self._ticks: dict[int, int] = {}

    def record(self, requests: int, drafted: bool, tokens: int, seconds: float) -> None:
        key = (requests, drafted)
        count = self.counts[key] = self.counts.get(key, 0) + 1
        rate, old = tokens / max(seconds, 1e-9), self.rates.get(key, 0.0)
        self.rates[key] = old + max(self.smoothing, 1.0 / count) * (rate - old)

    def share(self, requests: int) -> bool:
        """Whether this step at ``requests`` requests shares drafts (else every cap is 0)."""
        tick = self._ticks[requests] = self._ticks.get(requests, 0) + 1
        plain, drafted = self._counts(requests)
        if min(plain, drafted) < self.min_steps:  # both kinds in turn until each is sampled
            return drafted <= plain
        return self.preferred(requests) != (tick % self.explore == 0)

    def preferred(self, requests: int) -> bool:
        """Whether steps at ``requests`` requests share drafts by the verdict so far (sharing
        until both kinds are sampled), without taking a turn: for passes that are no sample."""
        if min(self._counts(requests)) < self.min_steps:
            return True
        return self.rates[requests, True] >= self.rates[requests, False]

    def _counts(self, requests: int) -> tuple[int, int]:
        """Steps measured at ``requests`` requests: (without shared drafts, with)."""
        return self.counts.get((requests, False), 0), self.counts.get((requests, True), 0)


@dataclass(eq=False)
class Running:
    """A request in the batch, and what its last step brought: the tokens it emitted, or the
    exception that ended it (a fault in one request fails that request only)."""

    generation: Generation
    emitted: list[int] = field(default_factory=list)
    error: Exception | None = None
    idle: int = 0  # passes in a row whose share of the draft budget was 0
    resting: int = 0  # passes left in which it drafts nothing (see Batch.step)


class Batch:
    """Runs the steps of several requests as one forward pass (see the module's notes).

    ``prefill_rows``: prompt tokens per pass while others decode; ``share``: cap each request's
    draft by :func:`share_budget` when several requests decode (off: each keeps its own choice).
    """

    def __init__(self, prefill_rows: int = BATCH_PREFILL_ROWS, share: bool = True):
        if prefill_rows <= 0:
            raise ValueError(f"prefill_rows must be positive, got {prefill_rows}")
        self.prefill_rows, self.share = prefill_rows, share
        self.step_cost = StepCost()  # what a step of several decoding requests costs by its rows
        self.accepted = Acceptance()  # how the shared nodes' expected gains compare with what they brought
        self.check = ShareCheck()  # whether shared drafts beat none, by batch size

    def step(self, requests: Sequence[Running]) -> None:
        """One pass for every request not yet done: each gets its ``emitted`` tokens (none for a
        prefill chunk) or its ``error``. A request that is done plans no step. The pass holds the
        runners' lock (forks of one model share it), as a request's own step does."""
        if not requests:
            return
        with requests[0].generation.runner.lock:
            self._step(requests)

    def _step(self, requests: Sequence[Running]) -> None:
        started = time.perf_counter()
        for request in requests:
            request.emitted = []
        live = [request for request in requests if request.error is None]
        decoding = [request for request in live if not request.generation.prefilling]
        prefilling = [request for request in live if request.generation.prefilling]
        shared = self.share and len(decoding) > 1
        measured = shared and not prefilling  # a decoding step of several requests: the check's sample
        # a pass carrying prompt rows is no fair sample (its rate is the prompt's), so it follows the check's verdict
        sharing = self.check.share(len(decoding)) if measured else not shared or self.check.preferred(len(decoding))
        for request in decoding:
            # a request with a fixed budget drafts it whatever the load (its sampled tokens stay as alone)
            # and beside a prompt chunk none drafts: prompt rows fill the pass, and a draft row would delay their first token
            quiet = request.generation.fixed_budget is None and (
                bool(prefilling) or shared and (request.resting > 0 or not sharing))
            if shared and request.resting > 0:
                request.resting -= 1
            if not quiet:  # a quiet one has no nodes, so a share of 0, and plans the root alone
                self._guard(request, request.generation.draft)
        decoding = [request for request in decoding if request.error is None and not request.generation.done]
        planned: list[tuple[Running, Step]] = []
        budget = PREFILL_CHUNK if not decoding else self.prefill_rows  # prompt tokens this pass
        for request in prefilling:
            if budget > 0:
                step = self._guard(request, request.generation.plan, budget)
                if step is not None:
                    planned.append((request, step))
                    budget -= len(step)
        caps = self._caps(decoding)
        if shared:
            self._rest(decoding, caps)
        expected = [(request, sum(request.generation.node_gains()[:cap]))  # what the shares' nodes should bring
                    for request, cap in zip(decoding, caps) if cap]
        for request, cap in zip(decoding, caps):
            step = self._guard(request, request.generation.plan, None, cap)
            if step is not None:
                planned.append((request, step))
        if planned:
            self._run(planned)
            for request, gain in expected:
                if request.error is None and request.emitted:
                    self.accepted.record(gain, len(request.emitted) - 1)
            if len(planned) > 1 and all(step.tree is not None for _, step in planned):
                seconds = time.perf_counter() - started
                self.step_cost.record(sum(len(step) for _, step in planned), seconds)
                if measured:
                    self.check.record(len(decoding), any(caps), sum(len(request.emitted) for request in decoding),
                                      seconds)

    @staticmethod
    def _rest(decoding: list[Running], caps: list[int | None]) -> None:
        """A request whose drafts found no room in the pass drafts nothing for a while: 1, then
        3, 7, ... up to MAX_REST passes as its shares stay 0 (drafting and learning from a
        draft cost time of their own, which the pass spends for nothing), then drafts again to
        see whether its nodes now pay. A share above 0 ends the rest."""
        for request, cap in zip(decoding, caps):
            if cap is None or request.generation.node_count() == 0:  # a fixed budget; nothing drafted
                continue
            if cap > 0:
                request.idle = 0
            else:  # it drafted, and none of it fits
                request.idle = min(request.idle + 1, MAX_REST.bit_length())
                request.resting = min(2**request.idle - 1, MAX_REST)

    def _caps(self, decoding: list[Running]) -> list[int | None]:
        """Each decoding request's cap on verified draft nodes: none for a request decoding alone
        (its policy chose for it), else its share of :func:`share_budget`, priced by the decoding
        rows alone (a pass that carries prompt rows drafts nothing but fixed budgets)."""
        if not self.share or len(decoding) <= 1:
            return [None] * len(decoding)
        policies = [request.generation.policy for request in decoding if request.generation.policy is not None]
        if not policies:
            return [None] * len(decoding)
        # a request with a fixed budget keeps it (its drafts, so its sampled tokens, stay as alone)
        shared = [request for request in decoding if request.generation.fixed_budget is None]
        fixed = sum(request.generation.node_count() for request in decoding if request not in shared)
        scale = self.accepted.ratio
        gains = [[gain * scale for gain in request.generation.node_gains()] for request in shared]
        cost = self.step_cost if self.step_cost.line is not None else policies[0].cost
        caps = iter(share_budget(gains, len(decoding) + fixed, float(len(decoding)), cost))
        return [None if request.generation.fixed_budget is not None else next(caps) for request in decoding]

    def _run(self, planned: list[tuple[Running, Step]]) -> None:
        """One pass over the planned steps; should it fail, each step alone, so that a fault
        fails only the request it belongs to (a pass writes only rows after the committed ones,
        so running a step again is safe)."""
        if len(planned) == 1:  # alone: the request's own pass (what iterating its generation runs)
            request, step = planned[0]
            outputs = self._guard(request, request.generation.run_alone, step)
            if request.error is None:
                request.emitted = self._guard(request, request.generation.take, *outputs) or []
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
        timing = (sum(len(step) for _, step in planned), time.perf_counter() - started)  # t(q) for the policies
        for (request, step), states, step_logits in zip(planned, hidden, logits):
            if step.tree is None:
                request.generation.runner.commit(range(len(step)))
            emitted = self._guard(request, request.generation.take, states, step_logits, *timing)
            request.emitted = emitted or []

    @staticmethod
    def _logits(planned: list[tuple[Running, Step]], hidden: list[torch.Tensor]) -> list[PassLogits | None]:
        """Each tree step's logits [q, vocab] (None for prefill chunks), from one head call over all
        of them (:func:`batch_logits`: the exact greedy head for the steps that read only maxima
        and top candidates)."""
        trees = [index for index, (_, step) in enumerate(planned) if step.tree is not None]
        if not trees:
            return [None] * len(planned)
        parts = iter(batch_logits(planned[0][0].generation.runner, [hidden[index] for index in trees],
                                  [planned[index][0].generation.greedy_head_top_k for index in trees]))
        return [None if step.tree is None else next(parts) for _, step in planned]

    @staticmethod
    def _guard(request: Running, call: Callable, *arguments):
        """``call(*arguments)``, or None with the request's ``error`` set should it raise."""
        try:
            return call(*arguments)
        except Exception as error:  # this request's fault: the others go on
            request.error = error
            return None

