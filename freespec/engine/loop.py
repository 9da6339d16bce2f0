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
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from freespec.engine.budget import BudgetPolicy
from freespec.engine.drafter import Drafter
from freespec.engine.logprobs import TokenLogprob, check_top, token_logprobs
from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree
from freespec.engine.verify import verify
from freespec.model.runner import ModelRunner, PassLogits

WARM_START_POSITIONS = 16  # prompt positions whose logits warm the drafter (see README, warm start)
LOGITS_ROWS = 64  # prompt rows whose logits are computed at once for their log-probabilities


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


@dataclass
class Step:
    """One request's part of the next forward pass, its rows after the ``start`` committed ones:
    a chunk of its prompt to prefill (``tree`` None: causal, its rows committed whole by whoever
    runs it) or a draft tree to verify. The tensors a batched pass reads are made when read (a
    request alone verifies its tree from the tree's numpy arrays)."""

    tree: DraftTree | None
    start: int
    prompt: list[int] | None = None  # the prefill chunk's tokens

    def __len__(self) -> int:
        return len(self.prompt) if self.tree is None else len(self.tree)

    @property
    def tokens(self) -> torch.Tensor:
        """[q] int64."""
        return torch.tensor(self.prompt, dtype=torch.long) if self.tree is None else torch.from_numpy(self.tree.tokens)

    @property
    def positions(self) -> torch.Tensor:
        """[q] int64."""
        if self.tree is None:
            return torch.arange(self.start, self.start + len(self))
        return self.tree.positions(self.start)

    @property
    def tree_mask(self) -> torch.Tensor:
        """[q, q] which of the step's tokens each one sees."""
        if self.tree is None:
            return torch.ones(len(self), len(self), dtype=torch.bool).tril_()
        return torch.from_numpy(self.tree.ancestor_mask)


def token_id_list(ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    """``ids`` as a list of ints: a list or tuple of integers, or an integer numpy array or tensor
    of one row ([n], or a tokenizer's ``return_tensors`` batch of one, [1, n]). ValueError for
    anything else, which would otherwise be truncated (1.5 → 1) or fail deep in a pass.

    >>> token_id_list(np.array([[5, 7]])), token_id_list((5, np.int32(7)))
    ([5, 7], [5, 7])
    >>> token_id_list([5, 7.0])
    Traceback (most recent call last):
    ValueError: prompt_ids must be integer token ids, got 7.0
    """
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        if isinstance(ids, torch.Tensor):
            integer = not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool)
        else:
            integer = np.issubdtype(ids.dtype, np.integer)
        if not integer or ids.ndim > 2 or ids.ndim == 2 and ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must be one row of integer token ids, got an array of shape "
                             f"{tuple(ids.shape)} and type {ids.dtype}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"prompt_ids must be a list of integer token ids, got {type(ids).__name__}")
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
    if bad is not None:
        raise ValueError(f"prompt_ids must be integer token ids, got {bad!r}")
    return [int(i) for i in ids]


class Generation:
    """One request in flight: iterate to receive token chunks as they are accepted.

    After iteration ``token_ids``, ``stats`` and ``finish_reason`` ("stop" or "length") are final.
    ``reuse_prefix``: keep the cache rows of the prompt's leading tokens that the runner's last
    request left there (a chat's earlier turns), instead of prefilling them again; the output is
    the same bits either way (see :meth:`ModelRunner.reuse`). ``should_stop`` is asked between
    prefill chunks (see :meth:`ModelRunner.prefill`). ``logprobs``: record each emitted token's
    log-probability and that many alternatives in ``logprobs`` (see :mod:`freespec.engine.logprobs`;
    None: not recorded, and greedy steps skip the head's rows that cannot win); ``prompt_logprobs``:
    the same for the prompt's tokens in ``prompt_logprobs`` (None for the first, which nothing
    predicts; the whole prompt is then prefilled, and ``max_new_tokens`` may be 0: scoring alone).

    Iterating runs every pass for this request alone. A server runs several requests' passes as
    one (:mod:`freespec.engine.batch`) through the same three calls the iteration makes:
    :meth:`plan` the next step, run it, :meth:`take` its hidden states.
    """

    def __init__(self, runner: ModelRunner, drafter: Drafter | None, policy: BudgetPolicy | None,
                 prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], fixed_budget: int | None = None,
                 sampling: SamplingParams = SamplingParams(), reuse_prefix: bool = True,
                 should_stop: Callable[[], bool] | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None):
        prompt_ids = token_id_list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.prompt_logprobs_top = check_top(prompt_logprobs)
        scoring = self.prompt_logprobs_top is not None  # the prompt's log-probabilities may be all that is asked
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                or max_new_tokens < (0 if scoring else 1)):
            raise ValueError(f"max_new_tokens must be a positive integer{' or 0' if scoring else ''}, "
                             f"got {max_new_tokens!r}")
        if len(prompt_ids) >= runner.max_positions:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {runner.max_positions}"
            )
        sampling.check_token_ids(runner.vocab_size)
        if fixed_budget is not None and fixed_budget < 0:
            raise ValueError(f"budget must be >= 0, got {fixed_budget}")
        self.runner, self.drafter, self.policy = runner, drafter, policy
        self.fixed_budget = fixed_budget
        self.reuse_prefix = reuse_prefix and not scoring  # cached rows have no logits to give
        self.should_stop = should_stop
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = min(max_new_tokens, runner.max_positions - len(prompt_ids))
        self.finish_reason = "length"
        self.stop_ids = stop_ids
        self.token_ids: list[int] = []
        self.logprobs_top = check_top(logprobs)
        self.logprobs: list[TokenLogprob] | None = None if self.logprobs_top is None else []  # one per token_ids
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if scoring else None  # one per prompt id
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.sampling = sampling
        self.generator = torch.Generator()  # per request: a seed repeats the run on this machine
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        self._unfilled: list[int] | None = None  # prompt tokens still to prefill; None: not started
        self._recent = torch.empty(0)  # [<= WARM_START_POSITIONS, hidden] the last prefilled rows' states
        self._begun = False  # whether the drafter has been told of the prompt
        self._context = np.array(self.prompt_ids, dtype=np.int64)  # prompt and generated tokens
        self._shadows = drafter is not None and fixed_budget is None and drafter.shadow_drafts
        self._pending: list[tuple[DraftTree, int, int]] = []  # shadow drafts: (tree, tokens before it, nodes verified)
        self._verified_whole = False  # the planned step verifies every node its drafter proposed
        self._draft: tuple[DraftTree, int] | None = None  # the drafted tree and its verified size, if drafted
        self._learn = True  # whether the drafter learns from the planned step (see plan)
        self._no_logits = torch.empty(0, runner.vocab_size)  # what a drafter that reads no logits learns from
        self._step: Step | None = None  # the step planned and not yet taken
        self._started = self._step_started = 0.0

    @property
    def done(self) -> bool:
        """Whether every token has been generated (a stop token, or the limit), and the prompt scored
        if that was asked."""
        if self.prompt_logprobs is not None and self.prefilling:
            return False
        return self.finish_reason == "stop" or len(self.token_ids) >= self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self._unfilled is None or bool(self._unfilled)

    @property
    def greedy_head_top_k(self) -> int | None:
        """What a step reads of its logits, where the exact greedy head can give it (a batch runs
        one for such steps, see :func:`batch_logits`): 0, only their maxima (greedy verification,
        a drafter that reads no logits); k > 0, the maxima and each row's k best tokens (a drafter
        that reads only those, :attr:`~freespec.engine.drafter.Drafter.reads_top_k`); None, the
        logits themselves."""
        if not self.sampling.reads_maxima_only or self.logprobs is not None:
            return None
        drafter = self.drafter
        if drafter is None or not drafter.reads_logits:
            return 0
        return drafter.reads_top_k or None

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            with self.runner.lock:  # a step at a time: another thread's request waits for this pass
                step = self.plan()
                if step is None:
                    return
                emitted = self.take(*self.run_alone(step))
            if emitted:
                yield emitted

    def run_alone(self, step: Step) -> tuple[torch.Tensor | None, PassLogits | None]:
        """The pass of a planned step with no other request in it: a prefill chunk's final hidden
        states [q, hidden], or a tree's logits (what :meth:`take` takes)."""
        if step.tree is None:
            return self.runner.prefill(step.tokens, self.should_stop), None  # runs and commits in chunks
        tree = step.tree
        return None, self.runner.tree_logits(tree.tokens, tree.depths, tree.ancestor_mask)

    def plan(self, prefill_limit: int | None = None, budget: int | None = None) -> Step | None:
        """The next step (None once done): a chunk of at most ``prefill_limit`` prompt tokens
        (None: all that are left) until the prompt is cached, then a drafted tree verifying at
        most ``budget`` draft nodes (None: as many as the budget policy chose, see :meth:`draft`;
        0 before a draft: the root alone, nothing drafted, and a drafter whose learning is a cache
        (:attr:`~freespec.engine.drafter.Drafter.learning_optional`) learns nothing from it)."""
        if self._unfilled is None:
            self._prepare()
        elif self.runner.holder is not self:
            raise RuntimeError("this generation's cache rows are gone (another generation ran on this model "
                               "since its last step, or the model was reset): a model runs one generation at a "
                               "time; model.fork() gives one that runs beside it")
        if self._unfilled:
            count = len(self._unfilled) if prefill_limit is None else min(prefill_limit, len(self._unfilled))
            self._step = Step(None, self.runner.length, self._unfilled[:count])
            return self._step
        if not self._begun:
            self._begin()
        if self.done:
            return None
        self._learn = True
        if self._draft is None and budget == 0:  # no room for drafts in this pass: none drafted
            self._step_started = time.perf_counter()
            self._draft = (DraftTree.root_only(int(self._context[-1])), 0)
            self._learn = self.drafter is None or not self.drafter.learning_optional
        if self._draft is None:
            self.draft()
        tree, chosen = self._draft
        verified = chosen if budget is None else min(chosen, budget)
        self._verified_whole = self._shadows and 1 < len(tree) <= verified + 1
        if len(tree) > verified + 1:  # verify the best `verified` nodes; the rest is a shadow draft
            if self._shadows or len(tree) > chosen + 1:  # not a tree cut to a batch's budget: its drafter may not
                self._pending.append((tree, len(self.token_ids), verified))
            tree = tree.prefix(verified + 1)
        self._step = Step(tree, self.runner.length)
        return self._step

    def draft(self) -> None:
        """Draft the next tree and choose how much of it to verify (the budget policy's choice),
        unless the prompt is still being prefilled or a draft waits; see :meth:`node_gains`."""
        if self.prefilling or not self._begun or self._draft is not None or self.done:
            return
        self._step_started = time.perf_counter()
        runner, drafter = self.runner, self.drafter
        room = runner.capacity - runner.length - 1
        if drafter is None or self.fixed_budget is not None:
            budget = 0 if drafter is None else min(self.fixed_budget, room)
            tree = self._propose(budget)
        elif self._shadows:  # draft more than is verified
            tree = self._propose(self.policy.shadow_size(room))
            budget = self.policy.size_for(tree.scores, room)
        else:
            budget = self.policy.choose(room)
            tree = self._propose(budget)
        self._draft = (tree, budget)

    def node_count(self) -> int:
        """Draft nodes the drafted tree would verify (0 before a draft)."""
        return 0 if self._draft is None else min(self._draft[1], len(self._draft[0]) - 1)

    def node_gains(self) -> list[float]:
        """The expected extra tokens verifying each drafted node brings (node 1, 2, ... of the
        verified part, best first): the nodes' own scores where the drafter gives them, else the
        budget policy's running averages spread over the sizes between its candidates."""
        if self._draft is None:
            return []
        tree, verified = self._draft
        if tree.scores is not None:
            return [float(score) for score in tree.scores[1 : verified + 1]]
        gains, size, tau = [], 0, self.policy.tau if self.policy is not None else {0: 1.0}
        for candidate in sorted(b for b in tau if 0 < b <= verified):
            share = max(0.0, tau[candidate] - tau[size]) / (candidate - size)
            gains += [share] * (candidate - size)
            size = candidate
        return gains + [0.0] * (verified - size)

    def take(self, hidden: torch.Tensor | None, logits: torch.Tensor | PassLogits | None = None,
             pass_rows: int | None = None, pass_seconds: float | None = None) -> list[int]:
        """Finish the planned step from its final hidden states [q, hidden]; return the tokens it
        emitted (none for a prefill chunk, whose rows the pass has committed). ``logits`` [q, vocab]:
        theirs, if already computed (a batch computes every request's in one call; a tree's own
        pass, :meth:`run_alone`, only them). ``pass_rows`` and ``pass_seconds``: the size and time
        of a batched pass it was part of, which the budget policy learns t(q) from (alone: this
        step's own)."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("take() needs a step from plan()")
        if step.tree is None:
            if self.prompt_logprobs is not None:
                self._score_prompt(hidden)
            del self._unfilled[: len(step)]
            self._recent = torch.cat([self._recent, hidden[-WARM_START_POSITIONS:]])[-WARM_START_POSITIONS:]
            if not self._unfilled:
                self._begin()
            return []
        runner, drafter, stats, tree = self.runner, self.drafter, self.stats, step.tree
        self._draft = None
        if logits is None:
            logits = runner.logits(hidden)  # [nodes, vocab]
        if not isinstance(logits, PassLogits):
            logits = PassLogits(logits, runner.kernels)
        if self.logprobs is not None:
            logits.materialize()  # the whole head, once: verification reads its maxima from it
        learned = self._no_logits  # what the drafter learns from
        if drafter is not None and drafter.reads_logits:
            if top_k := self.greedy_head_top_k:
                # its top candidates from the greedy head's pass, which verification's maxima come from too
                learned = logits.top_candidates(top_k)
            else:
                learned = logits.tensor  # the whole head, once: verification then reads its maxima from it
        # accept
        path, bonus = verify(tree, logits, self._context, self.sampling, self.generator, len(self.prompt_ids))
        emitted = [int(t) for t in tree.tokens[path[1:]]] + [bonus]
        emitted = self._cut(emitted)
        if self.logprobs is not None:  # emitted[i] was chosen at node path[i]
            rows = logits.tensor[path[: len(emitted)]].detach().to("cpu", torch.float32).numpy()
            self.logprobs += token_logprobs(rows, emitted, self.logprobs_top)
        stats.forward_passes += 1
        stats.accepted_lengths.append(len(emitted))  # what was kept: a stop or the limit may cut a path
        stats.draft_sizes.append(len(tree) - 1)
        # commit
        runner.commit(path)
        if drafter is not None:
            if self._learn:
                drafter.learn(tree, learned, path)
            self.policy.observe(len(tree) - 1, path)
            if self._verified_whole:  # a shadow of no unverified node: followed whole, the next draft goes deeper
                self.policy.observe_shadow(len(tree) - 1, path, len(tree) - 1)
            if pass_rows is None:
                self.policy.record_cost(len(tree), time.perf_counter() - self._step_started)
            else:
                self.policy.record_cost(pass_rows, pass_seconds)
        self.token_ids += emitted
        self._context = np.concatenate((self._context, emitted))
        if self._pending:
            self._pending = self._learn_from_shadows(self._pending)
        stats.new_tokens = len(self.token_ids)
        stats.decode_seconds = time.perf_counter() - self._started
        return emitted

    def _prepare(self) -> None:
        """Size the cache for the request and keep the rows of a leading part of the prompt an
        earlier request left in it, if asked to; all prompt tokens but the last (the first
        step's root) are then to be prefilled."""
        self._started = time.perf_counter()
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
        self._unfilled = prompt[cached:]
        runner.holder = self  # until another request's first step claims the cache

    def _score_prompt(self, hidden: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens that the prefilled rows' hidden states
        [q, hidden] predict (row i: the token after it), their logits a few rows at a time."""
        known = len(self.prompt_logprobs)  # the next prompt token to score
        following = self.prompt_ids[known : known + len(hidden)]
        for start in range(0, len(hidden), LOGITS_ROWS):
            logits = self.runner.logits(hidden[start : start + LOGITS_ROWS]).detach().to("cpu", torch.float32)
            self.prompt_logprobs += token_logprobs(logits.numpy(), following[start : start + LOGITS_ROWS],
                                                   self.prompt_logprobs_top)

    def _begin(self) -> None:
        """The prompt is cached: tell the drafter, start the decoding clock."""
        self._begun = True
        now = time.perf_counter()
        self.stats.prefill_seconds, self._started = now - self._started, now
        drafter = self.drafter
        if drafter is None:
            return
        prompt = self.prompt_ids[:-1]
        drafter.set_sampling(self.sampling, self.generator)
        logits = self.runner.logits(self._recent) if drafter.wants_prompt_logits and len(self._recent) else None
        drafter.begin(np.array(prompt, dtype=np.int64), logits)  # logits after the last prompt tokens but the root

    def _propose(self, nodes: int) -> DraftTree:
        context = self._context
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

    def end_at(self, count: int) -> None:
        """End the answer after its first ``count`` tokens, where its text met a stop string
        (:class:`~freespec.engine.textstream.TextStream`): tokens a step accepted after them are
        dropped with their log-probabilities, as decoding a token at a time would never have made
        them; finish_reason "stop". No step follows."""
        del self.token_ids[count:]
        if self.logprobs is not None:
            del self.logprobs[count:]
        self._context = self._context[: len(self.prompt_ids) + count]
        self.stats.new_tokens = len(self.token_ids)
        self.finish_reason = "stop"

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
