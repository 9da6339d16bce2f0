"""What the engine asks of a drafter: a tree before each verification, learning after it.

The loop types against this protocol alone, so the engine never imports a drafter.
:class:`freespec.drafters.base.BaseDrafter` implements it with the defaults below (flags off but
``reads_logits``, every hook a no-op), and every drafter subclasses it: the engine reads each flag
and calls each hook directly, whatever the drafter.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree


class Drafter(Protocol):
    wants_prompt_logits: bool
    """Whether :meth:`begin` wants the prompt's logits (computing them costs an lm_head pass)."""

    shadow_drafts: bool
    """Whether the engine may draft more nodes than it verifies, to learn what larger trees would
    accept (see :mod:`freespec.engine.budget`): :meth:`propose` costs little next to a forward pass,
    draws no random numbers, leaves no state that depends on the budget, and :meth:`learn` takes
    any prefix of the proposed tree."""

    reads_logits: bool
    """Whether :meth:`learn` reads ``logits``; one that does not may be handed an empty [0, vocab]
    tensor instead (a fused drafter then skips gathering its rows: ~40 µs a step)."""

    reads_top_k: int
    """k > 0: :meth:`learn` reads only each node's k best tokens and their probabilities, so a
    greedy step may hand it :class:`freespec.model.runner.TopCandidates` from the exact greedy
    head's integer pass (approximate, and costing no whole head) instead of the logits; 0: the
    logits themselves, if :attr:`reads_logits`."""

    learning_optional: bool
    """Whether the engine may skip :meth:`learn` after a step that verified no draft: what the
    drafter learns is a cache of what the model said (Token Recycling's rows), which a skipped
    step leaves staler, never inconsistent. A batch skips it for requests that draft nothing
    this pass (their time goes to the other requests' tokens)."""

    def set_sampling(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        """How the request chooses tokens, before it starts.

        A drafter that samples its drafts from a model draws each node's children from its own
        distribution q with ``generator`` (without replacement, in index order) and sets
        ``DraftTree.draft_probs``, so that verification's recursive rejection keeps the output
        exact. With ``params.greedy`` or ``generator`` None it drafts point masses (e.g. its
        argmax) and leaves ``draft_probs`` None, as every other drafter always does.
        """

    def set_tenant(self, tenant: str | None) -> None:
        """Whose request comes next (a server's API key; None: no key, or not a server). A drafter
        that keeps text from earlier requests drafts a request only from its own tenant's."""

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """A new request starts: ``prompt``, its prompt less the last token (the first step's
        root). ``prompt_logits`` [n, vocab]: the model's logits after each of the prompt's last n
        tokens, when asked for (a few)."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """A tree rooted at ``context[-1]`` with at most ``budget`` nodes besides the root.

        Nodes must be ordered by decreasing estimated acceptance, so that any prefix of the
        tree is the best tree of its size (the budget policy relies on it). A drafter that can
        estimate each node's acceptance probability puts it in ``DraftTree.scores`` (non-increasing
        along every path); fused drafters compare sources by it.
        """

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """After verification: ``logits`` [len(tree), vocab] at every node (see :attr:`reads_logits`;
        or their top candidates, see :attr:`reads_top_k`) and the ``accepted`` path.

        ``tree`` is the last proposed tree or a prefix of it, or the root alone when the engine
        verified no draft this step (then no :meth:`propose` preceded this call).
        """

    def learn_shadow(self, tree: DraftTree, path: list[int], verified: int) -> None:
        """Once the tokens that followed a shadow draft are known: the whole draft, ``path`` (the
        branch those tokens spelled in it: what verifying all of it would have accepted,
        :meth:`freespec.engine.tree.DraftTree.follow`) and ``verified``, the number of nodes after
        the root that were verified and already given to :meth:`learn`. A drafter whose scores say
        deeper nodes rarely pay would otherwise never get them verified, so never learn otherwise."""
