"""The drafter protocol: propose a tree before each verification, learn from its result after.

Drafters are made by name by the factories in :mod:`freespec.drafters`, from
:class:`freespec.drafters.DrafterSettings` (vocabulary size, Token Recycling's tree shape, the
datastore directory, the model's tokenizer): what a drafter needs beyond this protocol comes from
there, so the protocol itself stays the same for all of them.

Drafters that sample their drafts from a model (``layerskip``, ``draft-model``) also need the
request's sampling settings and random generator: they implement :class:`SamplingAware`, which
the engine checks for and calls before each request (:class:`freespec.drafters.Fused` forwards it).
Drafters whose scores come from acceptance rates learned online also implement
:class:`ShadowLearner`, to learn from the unverified part of their shadow drafts (a fused drafter
passes each its own part).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree


class Drafter(Protocol):
    wants_prompt_logits: bool
    """Whether :meth:`begin` wants the prompt's logits (computing them costs an lm_head pass)."""

    shadow_drafts: bool
    """Whether the engine may draft more nodes than it verifies, to learn what larger trees would
    accept (see :mod:`freespec.engine.budget`): :meth:`propose` costs little next to a forward pass, draws
    no random numbers, leaves no state that depends on the budget, and :meth:`update` takes any
    prefix of the proposed tree. A drafter without the attribute is taken as False."""

    reads_logits: bool
    """Whether :meth:`update` reads ``logits``. A drafter without the attribute is taken as True;
    one that says False may be handed an empty [0, vocab] tensor instead (a fused drafter then
    skips gathering its rows: ~40 µs a step)."""

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """A new request starts. ``prompt_logits`` [len(prompt), vocab]: the model's logits after
        each of these prompt tokens, when asked for (the last few hundred prompt tokens)."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """A tree rooted at ``context[-1]`` with at most ``budget`` nodes besides the root.

        Nodes must be ordered by decreasing estimated acceptance, so that any prefix of the
        tree is the best tree of its size (the budget policy relies on it). A drafter that can
        estimate each node's acceptance probability puts it in ``DraftTree.scores`` (non-increasing
        along every path); fused drafters compare sources by it.
        """

    def update(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """After verification: ``logits`` [len(tree), vocab] at every node (see :attr:`reads_logits`),
        ``accepted`` path.

        ``tree`` is the last proposed tree, or the root alone when the engine verified no draft
        this step (then no :meth:`propose` preceded this call).
        """


@runtime_checkable
class SamplingAware(Protocol):
    """Optional capability: learn how the request chooses tokens before it starts.

    With ``params.greedy`` (or ``generator`` None) draft point masses, e.g. the draft's argmax,
    and leave ``DraftTree.draft_probs`` None. Otherwise draw each node's children from the
    drafter's own distribution q with ``generator`` (without replacement, in index order) and set
    ``draft_probs``, so that verification's recursive rejection keeps the output distribution exact.
    """

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        ...


@runtime_checkable
class ShadowLearner(Protocol):
    """Optional capability of a drafter with shadow drafts: learn from the nodes never verified.

    Once the tokens that followed a shadow draft are known, the engine passes the whole draft,
    ``path`` (the branch those tokens spelled in it: what verifying all of it would have
    accepted, :meth:`freespec.engine.tree.DraftTree.follow`) and ``verified``, the number of nodes
    after the root that were verified and already given to :meth:`Drafter.update`. Without this,
    a drafter whose scores say that deeper nodes rarely pay never gets them verified, so never
    learns otherwise.
    """

    def learn_unverified(self, tree: DraftTree, path: list[int], verified: int) -> None:
        ...
