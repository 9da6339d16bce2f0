"""Verification: the one place that decides which drafted tokens are accepted.

Vocabulary: the *accepted path* is the root followed by the drafted nodes the model agrees with;
the *bonus token* is the model's own prediction after the last accepted node. A step therefore
emits ``len(path) - 1 + 1`` tokens, which is what "accepted length" counts (plain decoding: 1).

Three rules, each exact: :func:`greedy_accept` (temperature 0), :func:`sample_accept` for drafts
that are point masses (every drafter that picks tokens deterministically) and
:func:`rejection_accept` for drafts whose children were sampled from a draft distribution q.
:func:`verify` picks the rule and computes each node's target distribution with its own prefix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from freespec import kernels
from freespec.engine.distribution import draw, target_probs, tree_penalties
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.model.runner import PassLogits

Target = Callable[[int], torch.Tensor]
"""node → [vocab] the target distribution after that node's prefix (computed on demand)."""


def greedy_accept(tree: DraftTree, predicted: np.ndarray) -> tuple[list[int], int]:
    """Walk from the root to the child holding the model's argmax while one exists.

    ``predicted[i]`` is the argmax of the logits at node i. Returns (accepted node indices
    starting with the root, bonus token). Exactly what greedy decoding would emit, because each
    accepted node's token is the argmax given its accepted ancestors.

    >>> tree = DraftTree(np.array([5, 1, 2, 3, 9]), np.array([-1, 0, 0, 2, 3]))
    >>> greedy_accept(tree, np.array([2, 0, 3, 7, 0]))  # 5→2 ok, 2→3 ok, 3→7 but child is 9
    ([0, 2, 3], 7)
    >>> greedy_accept(tree, np.array([4, 0, 0, 0, 0]))  # no child of the root holds 4
    ([0], 4)
    """
    if len(tree) == 1:  # plain decoding: the root alone
        return [0], int(predicted[0])
    path = [0]
    node = 0
    while True:
        want = predicted[node]
        follow = tree.child_holding(node, want)
        if follow is None:
            return path, int(want)
        path.append(follow)
        node = follow


def sample_accept(tree: DraftTree, target: Target, generator: torch.Generator) -> tuple[list[int], int]:
    """Sample from the target at a node; descend if the sample is one of its children, else emit it.

    Why it is exact: the walk starts at the root with x1 ~ p(· | context), exactly plain
    sampling's first token. It descends to the child holding x1 only when x1 is that child's
    token, so the next node's prefix is context + x1 and x2 ~ p(· | context, x1), and so on: every
    emitted token is drawn from the target given exactly the tokens emitted before it, the bonus
    included. The drafted tokens only decide how far one forward pass reaches, never which token
    comes out. (This is the multi-draft rule of SpecInfer with point-mass drafts.) A sibling with
    the same token as an earlier one is never reached, which costs a node but changes nothing.

    Each visited node draws one uniform number, as each plain decoding step does, so with the
    same generator state the output equals plain sampling's token for token.

    >>> tree = DraftTree(np.array([5, 1, 2, 3]), np.array([-1, 0, 0, 2]))
    >>> certain = {0: 2, 2: 3, 3: 0}  # the target puts all mass on one token at each node
    >>> target = lambda node: torch.nn.functional.one_hot(torch.tensor(certain[node]), 4).double()
    >>> sample_accept(tree, target, torch.Generator().manual_seed(0))  # 5→2→3, then 0 is no child
    ([0, 2, 3], 0)
    """
    path = [0]
    node = 0
    while True:
        token = draw(target(node), generator)
        follow = tree.child_holding(node, token)
        if follow is None:
            return path, token
        path.append(follow)
        node = follow


def rejection_accept(tree: DraftTree, target: Target, generator: torch.Generator) -> tuple[list[int], int]:
    """Recursive rejection (SpecInfer, with siblings drawn without replacement) for drafts with q.

    ``tree.draft_probs[i]`` is q, the distribution node i's children were drawn from, one after
    the other in index order and without replacement. At a node with target p, for each child x
    in turn: accept with probability min(1, p(x) / q(x)) and descend; on rejection
    ``p ← norm(max(0, p − q))`` and ``q ← q without x, renormalised`` for the next child. With
    no child left, emit a token drawn from the current p.

    Why it is exact: by the speculative sampling lemma, if x ~ q then "accept x with probability
    min(1, p(x)/q(x)), else draw from norm(max(0, p − q))" yields a token distributed as p, for
    any q. Here the "else" branch is the same procedure on the next child, whose draft
    distribution is q without x: by induction from the last child (whose "else" is a plain
    draw) it yields exactly norm(max(0, p − q)), whichever x was rejected. Each emitted token is
    thus distributed as the target given the tokens before it.

    >>> tree = DraftTree(np.array([0, 1, 2]), np.array([-1, 0, 0]),
    ...                  draft_probs=torch.tensor([[0.0, 0.5, 0.5], [1.0, 0, 0], [1.0, 0, 0]]))
    >>> p = {0: torch.tensor([0.0, 0.0, 1.0]), 2: torch.tensor([1.0, 0.0, 0.0])}
    >>> rejection_accept(tree, p.__getitem__, torch.Generator().manual_seed(0))  # 1 rejected, 2 taken
    ([0, 2], 0)
    """
    if tree.draft_probs is None:
        raise ValueError("rejection_accept needs a tree with draft_probs; use sample_accept for point-mass drafts")
    path = [0]
    node = 0
    while True:
        p = _normalised(target(node).numpy().astype(np.float64))  # [vocab]
        q = _normalised(tree.draft_probs[node].numpy().astype(np.float64))  # [vocab]
        children = tree.children[node]
        tokens = [int(tree.tokens[c]) for c in children]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"node {node} has repeated child tokens {tokens}: draft children without replacement")
        follow = None
        for child, token in zip(children, tokens):
            if q[token] <= 0:
                raise ValueError(f"node {child} drafts token {token}, to which its draft_probs give 0")
            u = torch.rand(1, dtype=torch.float64, generator=generator).item()
            if u * q[token] < p[token]:  # probability min(1, p/q)
                follow = child
                break
            p = _normalised(np.maximum(p - q, 0.0), fallback=p)
            q[token] = 0.0
            q = _normalised(q, fallback=q)
        if follow is None:
            return path, draw(torch.from_numpy(p), generator)
        path.append(follow)
        node = follow


def _normalised(weights: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """``weights`` summing to 1; an all-zero residual (p == q up to rounding) keeps ``fallback``."""
    total = weights.sum()
    if total <= 0:
        if fallback is None:
            raise ValueError("a distribution has no mass")
        return fallback
    return weights / total


def verify(tree: DraftTree, logits: PassLogits, context: np.ndarray, params: SamplingParams,
           generator: torch.Generator, answer_start: int | None = None) -> tuple[list[int], int]:
    """The accepted path and bonus token for ``logits`` [n, vocab] at the nodes of ``tree``.

    ``context`` holds the prompt and the tokens generated so far (ending with the root's token),
    the generated ones from ``answer_start`` (None: none yet): with the node's ancestors it is the
    prefix the penalties look at. Greedy (temperature 0) takes the argmax of the penalised logits,
    as plain greedy decoding does; without a penalty, the logits' own maxima (no tensor is made).
    """
    if params.reads_maxima_only:
        return greedy_accept(tree, logits.argmax)
    answer_start = len(context) if answer_start is None else answer_start
    logits = tree_penalties(logits.tensor, context, answer_start, tree, params)
    if params.greedy:
        return greedy_accept(tree, kernels.select().argmax(logits))

    def target(node: int) -> torch.Tensor:
        return target_probs(logits[node], params)

    if tree.draft_probs is not None:
        return rejection_accept(tree, target, generator)
    return sample_accept(tree, target, generator)
