"""The draft → verify loop.

Each step has four phases: **draft** (the drafter proposes a tree under the budget the policy
picked; a cheap drafter drafts about twice the best size, the policy cuts the prefix worth
verifying by the nodes' scores, and the unverified rest is a shadow draft the policy learns from
once the next tokens are known, see :mod:`freespec.engine.budget`), **verify** (one
forward pass over root + draft), **accept** (greedy: the longest path agreeing with the argmax
plus the bonus token; sampling: the exact rule of :mod:`freespec.engine.verify`; cut at a stop token or
the token limit) and **commit** (keep the accepted rows in the KV cache; the drafter and the
policy learn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from freespec.engine.budget import BudgetPolicy
from freespec.engine.drafter import Drafter
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.engine.verify import verify
from freespec.model.runner import ModelRunner

WARM_START_POSITIONS = 16  # prompt positions whose logits warm the drafter (see README, warm start)


@dataclass
class GenerationStats:
    """Counters for one request. ``mean_accepted`` (τ) counts the bonus token: plain decoding has 1."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose cache rows an earlier request left (not prefilled)
    new_tokens: int = 0
    forward_passes: int = 0  # verification passes, prefill excluded
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens emitted per pass
    draft_sizes: list[int] = field(default_factory=list)  # draft nodes verified per pass (root excluded)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "new_tokens": self.new_tokens,
            "forward_passes": self.forward_passes,
            "mean_accepted": round(self.mean_accepted, 4),
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "accepted_lengths": self.accepted_lengths,
            "draft_sizes": self.draft_sizes,
        }


class Generation:
    """One request in flight: iterate to receive token chunks as they are accepted.

    After iteration ``token_ids``, ``stats`` and ``finish_reason`` ("stop" or "length") are final.
    ``reuse_prefix``: keep the cache rows of the prompt's leading tokens that the runner's last
    request left there (a chat's earlier turns), instead of prefilling them again; the output is
    the same bits either way (see :meth:`ModelRunner.reuse`). ``should_stop`` is asked between
    prefill chunks (see :meth:`ModelRunner.prefill`).
    """

    def __init__(self, runner: ModelRunner, drafter: Drafter | None, policy: BudgetPolicy | None,
                 prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], fixed_budget: int | None = None,
                 sampling: SamplingParams = SamplingParams(), reuse_prefix: bool = True,
                 should_stop: Callable[[], bool] | None = None):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if len(prompt_ids) >= runner.max_positions:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {runner.max_positions}"
            )
        if fixed_budget is not None and fixed_budget < 0:
            raise ValueError(f"budget must be >= 0, got {fixed_budget}")
        self.runner, self.drafter, self.policy = runner, drafter, policy
        self.fixed_budget = fixed_budget
        self.reuse_prefix = reuse_prefix
        self.should_stop = should_stop
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = min(max_new_tokens, runner.max_positions - len(prompt_ids))
        self.finish_reason = "length"
        self.stop_ids = stop_ids
        self.token_ids: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.sampling = sampling
        self.generator = torch.Generator()  # per request: a seed repeats the run on this machine
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def __iter__(self) -> Iterator[list[int]]:
        runner, drafter, stats = self.runner, self.drafter, self.stats
        started = time.perf_counter()
        self._prefill()
        stats.prefill_seconds = time.perf_counter() - started
        context = np.array(self.prompt_ids, dtype=np.int64)
        shadows = drafter is not None and self.fixed_budget is None and drafter.shadow_drafts
        pending: list[tuple[DraftTree, int, int]] = []  # shadow drafts: (tree, tokens before it, nodes verified)
        started = time.perf_counter()
        while len(self.token_ids) < self.max_new_tokens:
            step_started = time.perf_counter()
            # draft
            room = runner.capacity - runner.length - 1
            if drafter is None or self.fixed_budget is not None:
                budget = 0 if drafter is None else min(self.fixed_budget, room)
                tree = self._propose(context, budget)
            elif shadows:  # draft more than is verified
                tree = self._propose(context, self.policy.shadow_size(room))
                budget = self.policy.size_for(tree.scores, room)
            else:
                budget = self.policy.choose(room)
                tree = self._propose(context, budget)
            if len(tree) > budget + 1:  # verify the best `budget` nodes; the rest is a shadow draft
                pending.append((tree, len(self.token_ids), budget))
                tree = tree.prefix(budget + 1)
            # verify
            hidden = runner.forward(*tree.attention_inputs(runner.length))
            logits = runner.logits(hidden)  # [nodes, vocab]
            # accept
            path, bonus = verify(tree, logits, context, self.sampling, self.generator)
            emitted = [int(t) for t in tree.tokens[path[1:]]] + [bonus]
            emitted = self._cut(emitted)
            stats.forward_passes += 1
            stats.accepted_lengths.append(len(emitted))  # what was kept: a stop or the limit may cut a path
            stats.draft_sizes.append(len(tree) - 1)
            # commit
            runner.commit(path)
            if drafter is not None:
                drafter.learn(tree, logits, path)
                self.policy.observe(len(tree) - 1, path)
                self.policy.record_cost(len(tree), time.perf_counter() - step_started)
            self.token_ids += emitted
            context = np.concatenate((context, emitted))
            if pending:
                pending = self._learn_from_shadows(pending)
            stats.new_tokens = len(self.token_ids)
            stats.decode_seconds = time.perf_counter() - started
            yield emitted
            if self.finish_reason == "stop":
                break

    def _prefill(self) -> None:
        """Cache all prompt tokens but the last, which becomes the first step's root; keep the rows
        of a leading part an earlier request left in the cache, if asked to."""
        runner, drafter = self.runner, self.drafter
        capacity = len(self.prompt_ids) + self.max_new_tokens
        if drafter is not None:
            capacity += max(self.policy.candidates + [self.fixed_budget or 0]) + 1
        capacity = min(capacity, runner.max_positions)
        prompt = self.prompt_ids[:-1]
        if self.reuse_prefix:
            cached = runner.reuse(prompt, capacity)
        else:
            cached = 0
            runner.reset(capacity)
        self.stats.cached_tokens = cached
        hidden = runner.prefill(torch.tensor(prompt[cached:], dtype=torch.long),  # [prompt - cached, hidden]
                                self.should_stop)
        if drafter is None:
            return
        drafter.set_sampling(self.sampling, self.generator)
        if drafter.wants_prompt_logits and len(hidden):
            recent = hidden[-WARM_START_POSITIONS:]  # the last prompt tokens but the root
            drafter.begin(np.array(prompt[-len(recent) :], dtype=np.int64), runner.logits(recent))
        else:
            drafter.begin(np.array(prompt, dtype=np.int64), None)

    def _propose(self, context: np.ndarray, nodes: int) -> DraftTree:
        return DraftTree.root_only(int(context[-1])) if nodes == 0 else self.drafter.propose(context, nodes)

    def _learn_from_shadows(self, pending: list[tuple[DraftTree, int, int]]) -> list[tuple[DraftTree, int, int]]:
        """Tell the policy and the drafter what each shadow draft would have accepted, once the
        tokens that followed it reach its depth; return the drafts still waiting."""
        waiting = []
        for tree, start, verified in pending:
            continuation = self.token_ids[start:]
            if len(continuation) < tree.depths.max():
                waiting.append((tree, start, verified))
            else:
                path = tree.follow(continuation)
                self.policy.observe_shadow(len(tree) - 1, path, verified)
                self.drafter.learn_shadow(tree, path, verified)
        return waiting

    def _cut(self, emitted: list[int]) -> list[int]:
        """Stop after a stop token or at the token limit."""
        for i, token in enumerate(emitted):
            if token in self.stop_ids:
                emitted = emitted[: i + 1]
                self.finish_reason = "stop"
                break
        room = self.max_new_tokens - len(self.token_ids)
        if len(emitted) > room:
            emitted = emitted[:room]
            self.finish_reason = "length"
        return emitted
