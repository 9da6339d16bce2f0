"""Hardware-aware tree size: verify as many draft nodes as maximises tokens per second.

Verifying q tokens costs t(q) on this machine (measured by :mod:`freespec.engine.costs`, then refined
from the steps actually timed, since a shared machine's speed drifts); a tree of
b draft nodes yields on average tau(b) tokens per pass. The policy picks the b with the largest
tau(b) / t(b + 1), where b = 0 is plain decoding (tau = 1), so speculation switches itself off
when it would not pay.

tau(b) is learned online. Drafters order nodes best-first, so from one step verified with budget
B we also learn what any smaller budget b would have accepted: the accepted path cut at the first
node with index > b. Larger sizes are learned in one of two ways:

- *Shadow drafts* (drafters whose proposals are cheap and free of side effects): every step
  drafts about twice the best size (at least ``min_probe`` nodes) but verifies only a prefix.
  Once the next tokens are known, the branch of the full draft that spells them is what
  verifying it would have accepted (:meth:`freespec.engine.tree.DraftTree.follow`): tau(b) for every
  size, from every step, without spending a forward pass on it.
- *Probes* (other drafters): every ``explore_every`` steps the policy verifies about twice the
  best size, which climbs quickly and keeps a drafter that learns from verified nodes fed even
  while speculation is switched off. A probe that does worse than the best size doubles the wait
  before the next one (up to ``max_interval`` steps), so where speculation does not pay, probing
  costs little; a probe that does better restores the pace.

A shadow draft whose nodes carry scores (each node's calibrated chance of being accepted) is cut
by its own scores instead (:meth:`BudgetPolicy.size_for`): verifying its first b nodes yields
1 + their scores' sum on average, so each step takes the prefix with the most tokens per second.
Averages cannot tell a confident draft from a hopeless one; the scores can, so a step verifies
more where the drafter is sure and nothing where it is not.

t(q) starts from the calibration and follows the steps the loop times. A calibration can be wrong
in the direction that hurts: a size measured during a burst of load looks too expensive, is never
chosen, so never timed, so never corrected. Hence the first timed step of a size replaces a
larger calibrated value outright (a step cannot be faster than its pass, so a fast one is proof;
slow ones only nudge the estimate, as a pause of the process would otherwise count), and a shadow
draft that says a larger size would emit clearly more tokens than the one chosen gets that size
verified once, to time it (:meth:`BudgetPolicy.size_for`). A step faster than half the cost the
calibration timed for its size also marks the cache stale
(:meth:`freespec.engine.costs.CostCurve.mark_stale`), so the next process measures again.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

import numpy as np

from freespec.engine.costs import CostCurve, interpolate


def accepted_within(path: list[int], budget: int) -> int:
    """Tokens a step would have emitted had only nodes 1..budget been drafted (bonus included).

    >>> accepted_within([0, 1, 3, 9], 5)  # node 9 lies beyond the first 5 draft nodes
    3
    >>> accepted_within([0, 1, 3, 9], 0)
    1
    """
    emitted = 1
    for node in path[1:]:
        if node > budget:
            break
        emitted += 1
    return emitted


class BudgetPolicy:
    def __init__(self, cost: Mapping[int, float], candidates: list[int], explore_every: int = 4,
                 smoothing: float = 0.05, min_probe: int = 3, max_interval: int = 32):
        """``cost``: seconds (or any unit) per forward of q tokens, for some q ≥ 1; a
        :class:`~freespec.engine.costs.CostCurve` is marked stale when steps show it wrong.
        ``candidates``: the draft sizes to choose among (0 is added: plain decoding)."""
        self._cost_q = sorted(cost)  # plain lists: this runs every step, where numpy's call overhead shows
        self._cost_t = [float(cost[q]) for q in self._cost_q]
        self._calibration = cost if isinstance(cost, CostCurve) else None
        self._timed: set[int] = set()  # sizes with a timed step: their cost no longer rests on the calibration
        self._filled: int | None = None  # the size of the last shadow draft the text followed whole, until used
        self.candidates = sorted(set([0, *candidates]))
        self.explore_every = explore_every
        self.max_interval = max_interval
        self.min_probe = min_probe
        self.smoothing = smoothing
        self.tau: dict[int, float] = {0: 1.0}  # estimated mean accepted length per candidate
        self.interval = explore_every  # steps between probes
        self._until_probe = explore_every
        self._probe: tuple[int, int] | None = None  # (probed size, best size then) awaiting its result

    def record_cost(self, q: int, seconds: float) -> None:
        """Fold a timed step of q tokens (draft + forward + verify) into t(q). A step is counted
        at most 1.5x the estimate: a pause of the process (a page fault, the garbage collector,
        another program) would otherwise hold up a size that is rarely chosen for many steps.
        The first timed step of a size that is faster than its calibrated cost replaces it: the
        calibration ran slow there (see the module's notes)."""
        index = bisect.bisect_left(self._cost_q, q)
        if index == len(self._cost_q) or self._cost_q[index] != q:
            return
        estimate = self._cost_t[index]
        if q not in self._timed:
            self._timed.add(q)
            # a size the calibration priced from a smaller one (costs.extrapolate) was a guess, not a slow measurement
            if self._calibration is not None and q in self._calibration.timed and seconds < 0.5 * estimate:
                self._calibration.mark_stale(f"a step over {q} tokens took {seconds * 1000:.2f} ms, "
                                             f"the calibration says {estimate * 1000:.2f} ms")
            if seconds < estimate:
                self._cost_t[index] = seconds
                return
        self._cost_t[index] += self.smoothing * (min(seconds, 1.5 * estimate) - estimate)

    def cost(self, q: int) -> float:
        """t(q): interpolated between the measured sizes, constant beyond them."""
        return interpolate(self._cost_q, self._cost_t, q)

    def best(self, limit: int) -> int:
        known = [b for b in self.candidates if b in self.tau and b <= limit]
        return max(known, key=lambda b: self.tau[b] / self.cost(b + 1))

    def _larger(self, best: int, limit: int) -> int | None:
        """The candidate above ``best`` nearest to twice it (at least ``min_probe``), if any."""
        target = max(2 * best, self.min_probe)
        larger = [b for b in self.candidates if best < b <= limit]
        return min(larger, key=lambda b: abs(b - target)) if larger else None

    def choose(self, limit: int) -> int:
        """The draft size for the next step, at most ``limit`` nodes: the best size, or now and
        then a probe of a larger one (for drafters without shadow drafts)."""
        best = self.best(limit)
        self._until_probe -= 1
        if self._until_probe <= 0:
            self._until_probe = self.interval
            larger = self._larger(best, limit)
            if larger is not None:
                self._probe = (larger, best)
                return larger
        return best

    def size_for(self, scores: np.ndarray | None, limit: int) -> int:
        """How many nodes of a drafted best-first tree to verify this step (at most ``limit``).

        With the tree's ``scores`` (each node's calibrated chance of being accepted, root first)
        this step's own yield is known: verifying the first b nodes emits 1 + the sum of their
        scores on average, at cost t(b + 1). Taking the b with the most tokens per second sees
        what the running averages cannot: whether *this* draft is a confident one. Without
        scores, the best size by the running averages.

        >>> policy = BudgetPolicy({1: 1.0, 2: 1.1, 3: 1.3}, candidates=[1, 2])
        >>> policy.size_for(np.array([1.0, 0.9, 0.1]), limit=2)  # 1.9 / 1.1 beats 1 / 1 and 2.0 / 1.3
        1
        >>> policy.size_for(np.array([1.0, 0.05, 0.01]), limit=2)  # 1.05 / 1.1 < 1 / 1: plain decoding
        0
        """
        if scores is None:
            best = self.best(limit)
            return self._time_larger(best, self.tau.get(best, 1.0), limit)
        best, best_rate, expected, best_expected = 0, 1.0 / self.cost(1), 1.0, 1.0
        for size, score in enumerate(scores[1 : limit + 1].tolist(), start=1):
            expected += score
            if expected / self.cost(size + 1) > best_rate:
                best, best_rate, best_expected = size, expected / self.cost(size + 1), expected
        return self._time_larger(best, best_expected, min(limit, len(scores) - 1))

    def _time_larger(self, chosen: int, expected: float, limit: int) -> int:
        """``chosen``, or once per size a larger one to time: the candidate about twice ``chosen``
        if no step has timed it yet and the shadow drafts say it would emit at least a quarter more
        tokens than ``expected`` (what ``chosen`` should emit). Where the calibrated costs are
        right this spends one step per size; where they are too high, it is what corrects them."""
        larger = self._larger(chosen, limit)
        if larger is None or larger + 1 in self._timed or larger + 1 not in self._cost_q:
            return chosen
        return larger if self.tau.get(larger, 1.0) >= 1.25 * expected else chosen

    def shadow_size(self, limit: int) -> int:
        """How many nodes a shadow draft has: about twice the best size by the running averages
        (at least ``min_probe``), so that :meth:`size_for` can go beyond it and :meth:`observe_shadow`
        learns the larger sizes; after a shadow draft whose every node the text followed, about
        twice that draft's size, once: the averages of the sizes above a draft learn only from
        drafts as large, and a drafter whose scores undersell a long copy would otherwise keep its
        shadows at a size they already fill (see :meth:`observe_shadow`)."""
        best = self.best(limit)
        larger = self._larger(best, limit)
        size = best if larger is None else larger
        if self._filled is not None:
            deeper, self._filled = self._larger(self._filled, limit), None
            size = max(size, deeper or 0)
        return size

    def observe(self, budget: int, path: list[int]) -> None:
        """Learn from a verified step that drafted ``budget`` nodes and accepted ``path``."""
        if self._probe is not None and self._probe[0] == budget:
            best = self._probe[1]
            self._probe = None
            beat_best = accepted_within(path, budget) / self.cost(budget + 1) > self.tau[best] / self.cost(best + 1)
            previous = self.interval
            self.interval = self.explore_every if beat_best else min(2 * previous, self.max_interval)
            self._until_probe += self.interval - previous
        self._learn(path, 0, budget)

    def observe_shadow(self, drafted: int, path: list[int], verified: int) -> None:
        """Learn from a shadow draft of ``drafted`` nodes, of which the first ``verified`` were
        verified (and learned from by :meth:`observe`): ``path`` is the branch the tokens that
        followed spelled in it. A draft accepted whole makes the next shadow larger (:meth:`shadow_size`);
        the engine also reports a draft verified whole this way (``verified == drafted``), which
        has no shadow beyond it to say that the text went on."""
        self._learn(path, verified, drafted)
        if drafted and len(path) - 1 >= drafted:  # every node accepted: the text went on past the draft
            self._filled = drafted

    def _learn(self, path: list[int], above: int, up_to: int) -> None:
        """Fold what ``path`` says into tau(b) for the candidates above < b <= up_to."""
        for b in self.candidates:
            if above < b <= up_to:
                sample = accepted_within(path, b)
                old = self.tau.get(b)
                self.tau[b] = sample if old is None else old + self.smoothing * (sample - old)
