"""REST (retrieval-based speculative decoding): draft what followed the context in a corpus.

The datastore (:mod:`freespec.drafters.datastore`, built with ``freespec datastore build``) is a suffix
array over a tokenised corpus. Each step finds the longest suffix of the context (at most
``max_match`` tokens) that occurs in the corpus, samples up to ``max_candidates`` of its
occurrences evenly across the matching range, and merges the ``depth`` tokens that follow each
into a tree weighted by frequency, grown best-first (:mod:`freespec.drafters.grow`). It wins where
answers reuse a known corpus: documentation, code bases, a domain's boilerplate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freespec.drafters.datastore import Datastore
from freespec.drafters.grow import WeightedTrie
from freespec.drafters.scoring import CalibratedDrafter, match_group
from freespec.engine.tree import DraftTree


class Retrieval(CalibratedDrafter):
    """The ``retrieval`` drafter over one datastore; stateless across requests but for its calibration.

    No shadow drafts: a datastore lookup costs ~0.7 ms, a fifth of a pass, not worth doing every step.
    """

    reads_logits = False

    def __init__(self, datastore: str | Path | Datastore, tokenizer=None, max_match: int = 16,
                 max_candidates: int = 64, depth: int = 12, vocab_size: int | None = None):
        """``tokenizer`` and ``vocab_size`` (the model's) check the datastore fits the model."""
        super().__init__()
        self.store = datastore if isinstance(datastore, Datastore) else Datastore(datastore, tokenizer, vocab_size)
        self.max_match, self.max_candidates, self.depth = max_match, max_candidates, depth

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        length, low, high = self.store.longest_match(context, self.max_match)
        trie = WeightedTrie()
        if length:
            for tokens in self.store.continuations(low, high, length, self.depth, self.max_candidates):
                trie.add(tokens, 1.0)
        if not trie.children[0]:
            return DraftTree.root_only(int(context[-1]))
        return self.grow(int(context[-1]), 0, trie.expander(), budget, match_group(length))
