"""Verification: the one place that decides which drafted tokens are accepted.

Vocabulary: the *accepted path* is the root followed by the drafted nodes the model agrees with;
the *bonus token* is the model's own prediction after the last accepted node. A step therefore
emits ``len(path) - 1 + 1`` tokens, which is what "accepted length" counts (plain decoding: 1).
"""

from __future__ import annotations

import numpy as np

from freespec.tree import DraftTree


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
    path = [0]
    node = 0
    while True:
        want = predicted[node]
        follow = next((c for c in tree.children[node] if tree.tokens[c] == want), None)
        if follow is None:
            return path, int(want)
        path.append(follow)
        node = follow
