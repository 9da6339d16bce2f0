"""A smaller model with the same tokenizer drafts a chain (SpS, Big Little Decoder).

The draft model runs on its own :class:`freespec.model.runner.ModelRunner` and KV cache. At each
proposal it catches up on the tokens the target accepted since the last one: the rows of drafted
tokens that were accepted are kept (same tokens after the same prefix), the rest are dropped, so
a step usually forwards only the bonus token before drafting. The rows outlive the request: a
chat's next turn forwards only what its conversation added.
"""

from __future__ import annotations

import numpy as np

from freespec.drafters.chain import CONFIDENCE, ChainDrafter, draft_chain
from freespec.engine.tree import DraftTree
from freespec.model.runner import ModelRunner


class DraftModel(ChainDrafter):
    """Drafts with ``runner`` (the small model), whose vocabulary must be the target's."""

    def __init__(self, runner: ModelRunner, vocab_size: int, confidence: float = CONFIDENCE):
        if runner.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary has {runner.vocab_size} tokens, the target's "
                             f"{vocab_size}: the draft model must use the same tokenizer")
        super().__init__(runner, confidence)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        runner = self.runner
        if len(context) + budget > runner.max_positions:
            return DraftTree.root_only(int(context[-1]))  # beyond the draft model's context
        runner.reserve(len(context) + budget)
        kept = runner.keep_prefix(context[:-1])  # the root is always forwarded: its logits
        return draft_chain(runner, context[kept:], context, budget, self.sampler, confidence=self.confidence)
