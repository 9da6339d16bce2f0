"""Several drafters as one: their trees merged by longest common prefix under one node budget.

Each source proposes its best tree for the whole budget; identical paths are merged (as RASD
merges retrieval and model drafts) and the ``budget`` best nodes are kept. Every source's scores
are calibrated chances of acceptance (:mod:`freespec.drafters.scoring`), so they compare; a merged
node's chance given its parent is the best its sources give, calibrated once more per depth and
per *group*: the sources that drafted it and those that drafted another token after its parent
instead (two sources that agree are right more often than either alone; one that another
contradicts less often than one the others left alone, as a stored answer's chain where Token
Recycling's tree stops), learned from the merged nodes verification and shadow drafts tried.
Scores are products along paths, so the kept nodes come best-first with parents before children
and any prefix is again the best tree of its size.

A source without scores gets ones that fall with its node order. After verification each source
learns from the longest prefix of its own tree that was verified, in its own node numbering (the
engine may verify only a prefix of the merged tree: a shadow draft, see :mod:`freespec.engine.budget`),
and once the shadow resolves, each source hears about the rest of its part.

A source whose learning is a cache (Token Recycling's rows) must earn its time: the tokens only it
drafted, at what a token costs in these steps, against the seconds it spends drafting and learning
(:class:`SourceUse`). One that does not sits out for a while, so that a fusion costs about what its
useful members do.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from freespec.drafters.base import BaseDrafter, Drafter
from freespec.drafters.scoring import DepthCalibration, teach
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.model.runner import TopCandidates


def tree_scores(tree: DraftTree) -> np.ndarray:
    """The tree's scores, or ones falling with node order when its drafter gives none.

    >>> tree_scores(DraftTree(np.array([1, 2, 3]), np.array([-1, 0, 0]))).tolist()
    [1.0, 0.5, 0.25]
    """
    if tree.scores is not None:
        return np.asarray(tree.scores, dtype=np.float64)
    return 0.5 ** np.arange(len(tree), dtype=np.float64)


class Merged(NamedTuple):
    """A merged tree; per source, the merged index of each of its nodes (-1: cut); per merged
    node what its calibration learns from: the group (the bitmask of the sources that drafted it,
    or'ed with the bitmask of those that drafted another child of its parent instead shifted left
    by the number of sources), the raw chance (the best any source gave it given its parent) and
    the depth; and the tree's parents as a list (learning reads them every step)."""

    tree: DraftTree
    where: list[list[int]]
    groups: list[int]
    shares: list[float]
    depths: list[int]
    parents: list[int]


def merge_trees(trees: list[DraftTree], budget: int,
                calibrate: Callable[[int, int, float], float] = lambda group, depth, share: share) -> Merged:
    """Merge trees with the same root by common prefix; keep the ``budget`` best nodes.

    A merged node's chance given its parent is ``calibrate(group, depth, raw)``, ``raw`` the best
    any of its sources gives (a source's score over its parent's); its score is the product along
    its path, so the kept nodes come best-first with parents before children. Plain Python on
    lists: trees have a handful of nodes, where numpy's per-call overhead shows.

    >>> a = DraftTree(np.array([9, 1, 2]), np.array([-1, 0, 1]), np.array([1.0, 0.8, 0.6]))
    >>> b = DraftTree(np.array([9, 1, 3, 4]), np.array([-1, 0, 1, 0]), np.array([1.0, 0.5, 0.5, 0.3]))
    >>> merged = merge_trees([a, b], budget=3)  # 9→1 (0.8, both), 9→1→3 (0.8 · 1.0), 9→1→2 (0.8 · 0.75)
    >>> merged.tree.tokens.tolist(), merged.tree.parents.tolist(), merged.tree.scores.tolist()
    ([9, 1, 3, 2], [-1, 0, 1, 1], [1.0, 0.8, 0.8, 0.6])
    >>> merged.where, merged.groups  # 9→1 drafted by both (bits 1, 2); 9→1→3 by b against a's 2 (2 | 1 << 2)
    ([[0, 1, 3], [0, 1, 2, -1]], [0, 3, 6, 9])
    """
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("merged trees must share their root")
    if all(len(tree) == 1 for tree in trees):  # nothing drafted (a fifth of a fusion's steps)
        return Merged(DraftTree._unchecked(np.array([root], dtype=np.int64), np.array([-1], dtype=np.int64), np.ones(1)),
                      [[0] for _ in trees], [0], [1.0], [0], [-1])
    node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) → merged node
    parents, tokens, raw, groups, depths = [-1], [root], [1.0], [0], [0]
    merged_index = []
    for source, tree in enumerate(trees):
        index = [0]  # the merged node of each of its nodes
        if len(tree) > 1:
            bit = 1 << source
            own, own_parents, own_tokens = tree_scores(tree).tolist(), tree.parents.tolist(), tree.tokens.tolist()
            for i in range(1, len(own)):
                parent, token = index[own_parents[i]], own_tokens[i]
                node = node_of.get((parent, token))
                if node is None:
                    node = node_of[parent, token] = len(tokens)
                    parents.append(parent)
                    tokens.append(token)
                    raw.append(0.0)
                    groups.append(0)
                    depths.append(depths[parent] + 1)
                above = own[own_parents[i]]
                raw[node] = max(raw[node], min(own[i] / above, 1.0) if above > 0 else 0.0)
                groups[node] |= bit
                index.append(node)
        merged_index.append(index)
    opinions = [0] * len(tokens)  # per node: the sources that drafted some child of it
    for node in range(1, len(tokens)):
        opinions[parents[node]] |= groups[node]
    for node in range(1, len(tokens)):  # and those that drafted another child of its parent instead
        groups[node] |= (opinions[parents[node]] & ~groups[node]) << len(trees)
    scores = [1.0]
    for node in range(1, len(tokens)):  # parents come first
        scores.append(scores[parents[node]] * calibrate(groups[node], depths[node], raw[node]))
    keep = sorted(range(1, len(tokens)), key=lambda n: (-scores[n], depths[n], n))[:budget]
    new = [-1] * len(tokens)
    new[0] = 0
    for position, node in enumerate(keep, 1):
        new[node] = position
    order = [0, *keep]
    kept_parents = [-1, *(new[parents[n]] for n in keep)]
    tree = DraftTree._unchecked(np.array([tokens[n] for n in order], dtype=np.int64),  # parents come first
                                np.array(kept_parents, dtype=np.int64), np.array([scores[n] for n in order]))
    return Merged(tree, [[new[node] for node in index] for index in merged_index], [groups[n] for n in order],
                  [raw[n] for n in order], [depths[n] for n in order], kept_parents)


def present(where: list[int], limit: int) -> int:
    """How many of a source's first nodes are all among the merged tree's first ``limit`` nodes
    (``where``: the merged index of each of its nodes, -1 when cut from the draft).

    >>> present([0, 2, 1, -1, 3], 9), present([0, 2, 1, -1, 3], 2)
    (3, 1)
    """
    for node, merged in enumerate(where):
        if not 0 <= merged < limit:
            return node
    return len(where)


def source_view(where: list[int], accepted: list[int], limit: int = sys.maxsize) -> tuple[int, list[int]]:
    """(n, path): a source's first n nodes are all present (see :func:`present`: drafted and among
    the first ``limit`` merged nodes, the part verified); the accepted path among them, in the
    source's own numbering.

    >>> source_view([0, 2, 1, -1], accepted=[0, 2, 1])  # merged 2 is its node 1
    (3, [0, 1, 2])
    >>> source_view([0, 2, 1, -1], accepted=[0, 1], limit=2)
    (1, [0])
    """
    verified = present(where, limit)
    source_node = {merged: node for node, merged in enumerate(where[:verified])}
    path = [0]
    for node in accepted[1:]:
        if node not in source_node:
            break
        path.append(source_node[node])
    return verified, path


def rows_of(logits: torch.Tensor | TopCandidates, rows: list[int]) -> torch.Tensor | TopCandidates:
    """``logits[rows]``: a view when the rows are consecutive, else a copy by ``index_select``
    (indexing with a list takes the general advanced-indexing path: ~3x slower on rows of
    49,152 logits, ~150 µs a step where a fused member's nodes are not consecutive).

    >>> logits = torch.arange(8.0).view(4, 2)
    >>> rows_of(logits, [1, 2]).tolist(), rows_of(logits, [0, 3]).tolist()
    ([[2.0, 3.0], [4.0, 5.0]], [[0.0, 1.0], [6.0, 7.0]])
    """
    if isinstance(logits, TopCandidates):
        return logits.rows(rows)
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0] : rows[0] + len(rows)]
    return torch.index_select(logits, 0, torch.tensor(rows))


SOURCE_WATCH_STEPS = 32
"""Steps a source that may sit out is watched before it is judged (see :class:`SourceUse`)."""

SOURCE_REST_STEPS = (64, 1024)
"""The first and the longest rest of a source whose drafts did not pay for their time: each rest
that ends in the same verdict doubles the next."""


class SourceUse:
    """What a fused source brings and costs over the steps since it last (re)joined: the tokens
    verification accepted that only it had drafted, at the seconds a token takes in these steps,
    against the seconds its drafting and learning took. A source whose learning is optional (a
    cache of the model's predictions, Token Recycling's rows) and whose tokens did not pay for
    its time sits out for a while, drafting and learning nothing, then is watched again.

    >>> use = SourceUse()  # 0.2 ms of drafting and learning a step; 8 ms steps of 2 tokens
    >>> all(use.record(seconds=0.0002, sole=0, step_seconds=0.008, tokens=2) for _ in range(SOURCE_WATCH_STEPS))
    True
    >>> use.record(0.0002, 1, 0.008, 2), use.resting  # 1 token in 33 steps: 4 ms of value for 6.6 ms
    (False, 64)
    """

    def __init__(self):
        self.resting = 0  # steps left out of the current rest
        self.drafting: float | None = None  # this step's seconds of drafting; None: it sat the step out
        self._rest = SOURCE_REST_STEPS[0]  # the length of the next rest
        self._start_watch()

    def _start_watch(self) -> None:
        self.steps, self.sole, self.seconds, self.step_seconds, self.tokens = 0, 0, 0.0, 0.0, 0

    def record(self, seconds: float, sole: int, step_seconds: float, tokens: int) -> bool:
        """One step the source took part in: its own seconds, its sole accepted tokens, the step's
        seconds and emitted tokens. Returns whether it keeps drafting (else it rests from now)."""
        self.steps += 1
        self.sole += sole
        self.seconds += seconds
        self.step_seconds += step_seconds
        self.tokens += tokens
        if self.steps <= SOURCE_WATCH_STEPS:
            return True
        pays = self.sole * self.step_seconds / max(self.tokens, 1) >= self.seconds
        if pays:
            self._rest = SOURCE_REST_STEPS[0]
        else:
            self.resting, self._rest = self._rest, min(2 * self._rest, SOURCE_REST_STEPS[1])
        self._start_watch()
        return pays


class Fused(BaseDrafter):
    """Drafters named ``a+b+...``: one tree from all of them, each learning from its part."""

    def __init__(self, drafters: list[Drafter]):
        # a fused member (e.g. suffix, itself several sources) lends its sources: one merge, not two
        drafters = [source for drafter in drafters
                    for source in (drafter.drafters if isinstance(drafter, Fused) else [drafter])]
        if len(drafters) < 2:
            raise ValueError("a fused drafter needs at least two drafters")
        self.drafters = drafters
        self.shadow_drafts = all(d.shadow_drafts for d in drafters)
        self.learning_optional = all(d.learning_optional for d in drafters)
        # per source, what it brings and costs; only a source whose learning is a cache may sit out
        self.uses = [SourceUse() if drafter.learning_optional else None for drafter in drafters]
        self._step_started: float | None = None  # when the last proposal began: a step's time runs from it
        # how often a merged node is accepted, per depth and group: the sources that drafted it and
        # those that drafted another child of its parent (two bitmasks, see Merged)
        self.calibration = DepthCalibration(groups=1 << (2 * len(drafters)))
        self._proposed: tuple[Merged, list[DraftTree]] | None = None
        # the last proposals (merged, sources' trees), for shadows that resolve later
        self._recent: deque[tuple[Merged, list[DraftTree]]] = deque(maxlen=64)
        self._no_rows: torch.Tensor | None = None  # [0, vocab]: what sources that read no logits get

    def _active(self) -> list[Drafter]:
        """The sources drafting now (not sitting out)."""
        return [drafter for drafter, use in zip(self.drafters, self.uses) if use is None or not use.resting]

    @property
    def wants_prompt_logits(self) -> bool:
        return any(drafter.wants_prompt_logits for drafter in self._active())

    @property
    def reads_logits(self) -> bool:
        return any(drafter.reads_logits for drafter in self._active())

    @property
    def reads_top_k(self) -> int:
        """The members that read logits read only top candidates, the same k of them: so may the fusion."""
        top_k = {drafter.reads_top_k for drafter in self._active() if drafter.reads_logits}
        return top_k.pop() if len(top_k) == 1 else 0

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        """Sources draft point masses: the merged tree keeps no draft probabilities, and
        verification's point-mass rule is exact for any tree (see :mod:`freespec.engine.verify`)."""
        for drafter in self.drafters:
            drafter.set_sampling(params, None)

    def set_tenant(self, tenant: str | None) -> None:
        for drafter in self.drafters:
            drafter.set_tenant(tenant)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """Every source hears of the request, one sitting out too (the engine computes the prompt's
        logits only when a source drafting now wants them; else each gets None)."""
        for drafter in self.drafters:
            drafter.begin(prompt, prompt_logits if drafter.wants_prompt_logits else None)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        self._step_started = time.perf_counter()
        trees = []
        for drafter, use in zip(self.drafters, self.uses):
            if use is None:
                trees.append(drafter.propose(context, budget))
            elif use.resting:
                use.resting -= 1
                use.drafting = None
                trees.append(DraftTree.root_only(int(context[-1])))
            else:
                started = time.perf_counter()
                trees.append(drafter.propose(context, budget))
                use.drafting = time.perf_counter() - started
        merged = merge_trees(trees, budget, self.calibration)
        self._proposed = (merged, trees)
        if self.shadow_drafts:
            self._recent.append(self._proposed)
        return merged.tree

    def _proposed_prefix(self, tree: DraftTree) -> bool:
        """Whether ``tree`` is the last proposal or a prefix of it (a view of its arrays, or equal
        to its first nodes); else the engine verified a tree this drafter did not propose: the root alone."""
        proposed = None if self._proposed is None else self._proposed[0].tree
        if proposed is None or len(tree) > len(proposed):
            return False
        if tree is proposed or tree.tokens.base is proposed.tokens and tree.parents.base is proposed.parents:
            return True
        return (tree.tokens.tolist() == proposed.tokens[: len(tree)].tolist()
                and tree.parents.tolist() == proposed.parents[: len(tree)].tolist())

    def learn(self, tree: DraftTree, logits: torch.Tensor | TopCandidates, accepted: list[int]) -> None:
        if not self._proposed_prefix(tree):  # a source sitting out learns nothing (its logits may not be there)
            for drafter in self._active():
                drafter.learn(tree, logits, accepted)
            return
        merged, trees = self._proposed
        verified_nodes = len(tree)  # the merged nodes beyond a verified prefix count as cut
        teach(self.calibration, merged.parents[:verified_nodes], merged.groups, merged.shares, merged.depths,
              accepted, 1)
        unread = self._unread(logits)
        step_seconds = time.perf_counter() - self._step_started if self._step_started is not None else 0.0
        low = (1 << len(self.drafters)) - 1  # a group's bits of the sources that drafted the node
        for source, (drafter, own, where, use) in enumerate(zip(self.drafters, trees, merged.where, self.uses)):
            if use is not None and use.drafting is None:  # it sat this step out: nothing to learn
                continue
            verified, path = source_view(where, accepted, verified_nodes)
            started = time.perf_counter()
            drafter.learn(own.prefix(verified), rows_of(logits, where[:verified]) if drafter.reads_logits else unread,
                          path)
            if use is not None:
                sole = sum(merged.groups[node] & low == 1 << source for node in accepted[1:])
                use.record(use.drafting + time.perf_counter() - started, sole, step_seconds, len(accepted))

    def _unread(self, logits: torch.Tensor | TopCandidates) -> torch.Tensor | TopCandidates:
        """No rows of ``logits``, for the sources that read none: one empty tensor kept while the
        vocabulary is the same (slicing a fresh one costs a torch call a step)."""
        if isinstance(logits, TopCandidates):
            return logits.rows([])
        if self._no_rows is None or self._no_rows.shape[1:] != logits.shape[1:]:
            self._no_rows = logits[:0].clone()
        return self._no_rows

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        """Pass a resolved shadow draft on to every source, each in its own numbering: its nodes
        that made the merged draft, the accepted path among them, and how many of them were
        verified (and given to :meth:`learn`)."""
        proposal = next((entry for entry in reversed(self._recent) if entry[0].tree is tree), None)
        if proposal is None:  # older than the proposals kept, or not this drafter's
            return
        merged, trees = proposal
        teach(self.calibration, merged.parents, merged.groups, merged.shares, merged.depths, path, verified + 1)
        for drafter, own, where in zip(self.drafters, trees, merged.where):
            drafted, own_path = source_view(where, path)
            drafter.learn_shadow(own.prefix(drafted), own_path, present(where, verified + 1) - 1)
