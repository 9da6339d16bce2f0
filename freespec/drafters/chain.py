"""Autoregressive chain drafts from a model (the target with layers skipped, or a smaller model).

Shared by :mod:`freespec.drafters.layerskip` and :mod:`freespec.drafters.draft_model`. The draft
runs on a :class:`freespec.model.runner.ModelRunner`: each drafted token is forwarded and committed so
the next one sees it; the caller decides which of those rows to keep afterwards.

What a drafted token is depends on the request (:class:`ChainSampler`): its logits get the
request's logit bias and penalties as the target's do (so a token the request bans is not
drafted); greedy requests, and point-mass drafts (a fused tree, whose merge keeps no draft
probabilities), take the argmax; sampled requests draw it from the draft's own processed
distribution q and keep q as ``DraftTree.draft_probs``, so
:func:`freespec.engine.verify.rejection_accept` keeps the output exact.
"""

from __future__ import annotations

import numpy as np
import torch

from freespec.drafters.base import BaseDrafter
from freespec.engine.distribution import draw, penalties, target_probs
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.model.runner import ModelRunner

CONFIDENCE = 0.8
"""Drafting stops after a token whose draft probability falls below this (SWIFT's early stop)."""
PREFILL_ROWS = 64  # from this many tokens to catch up on, a chunked prefill is faster


class ChainSampler:
    """How the next draft token is chosen: the request's sampling settings and random generator."""

    def __init__(self):
        self.params = SamplingParams()
        self.generator: torch.Generator | None = None
        self.answer_start = 0  # where the answer begins in a context: the frequency and presence penalties' tokens

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        """``generator`` None: draft point masses (argmax) even when the request samples."""
        self.params, self.generator = params, generator

    @property
    def samples(self) -> bool:
        return not self.params.greedy and self.generator is not None

    def pick(self, logits: torch.Tensor, prefix: np.ndarray) -> tuple[int, float, torch.Tensor | None]:
        """(token, its draft probability, q [vocab] or None) from the draft's logits [vocab] after
        ``prefix`` (the context and the chain so far)."""
        logits = penalties(logits, prefix, self.answer_start, self.params)
        if not self.samples:
            probs = torch.softmax(logits, dim=-1)  # [vocab]
            token = int(torch.argmax(logits))
            return token, float(probs[token]), None
        q = target_probs(logits, self.params)  # [vocab]
        token = draw(q, self.generator)
        return token, float(q[token]), q


class ChainDrafter(BaseDrafter):
    """A drafter that drafts chains on ``runner`` with :func:`draft_chain`, choosing tokens as the
    request does (:class:`ChainSampler`); it never reads the target's logits."""

    reads_logits = False

    def __init__(self, runner: ModelRunner, confidence: float = CONFIDENCE):
        self.runner = runner
        self.confidence = confidence
        self.sampler = ChainSampler()

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        self.sampler.set_sampling(params, generator)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """The answer starts after the prompt and the first step's root (its last token)."""
        self.sampler.answer_start = len(prompt) + 1


def draft_chain(runner: ModelRunner, feed: np.ndarray, context: np.ndarray, budget: int, sampler: ChainSampler,
                skip: frozenset[int] = frozenset(), confidence: float = CONFIDENCE) -> DraftTree:
    """A chain of at most ``budget`` tokens after ``context`` (which ends with the root).

    ``feed``: the context tokens the runner's cache lacks (at least the root); they are forwarded
    and committed first, then every drafted token but the last. Scores are path probabilities
    under the draft, non-increasing along the chain.
    """
    root = int(context[-1])
    tokens, scores, rows = [root], [1.0], []
    path_score = 1.0
    while len(tokens) <= budget:
        logits = runner.logits(_advance(runner, feed, skip)[-1:])[0]  # [vocab]
        token, probability, q = sampler.pick(logits, np.concatenate((context, np.array(tokens[1:], dtype=np.int64))))
        rows.append(q)
        path_score *= probability
        tokens.append(token)
        scores.append(path_score)
        if probability < confidence:
            break
        feed = np.array([token])
    draft_probs = None
    if sampler.samples and rows:
        leaf = torch.full_like(rows[0], 1.0 / len(rows[0]))  # the last node has no children: unused
        draft_probs = torch.stack([*rows, leaf])  # [nodes, vocab]
    return DraftTree(np.array(tokens, dtype=np.int64), np.arange(-1, len(tokens) - 1, dtype=np.int64),
                     np.array(scores, dtype=np.float64), draft_probs)


def _advance(runner: ModelRunner, tokens: np.ndarray, skip: frozenset[int]) -> torch.Tensor:
    """Forward ``tokens`` causally after the cache and commit them; their hidden states [n, hidden]."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if len(ids) >= PREFILL_ROWS and not skip:
        return runner.prefill(ids)
    n = len(ids)
    hidden = runner.forward(ids, torch.arange(runner.length, runner.length + n),
                            torch.ones(n, n, dtype=torch.bool).tril_(), skip)
    runner.commit(range(n))
    return hidden
