"""Greedy verification: the longest path agreeing with the model's argmax, plus the bonus token."""

import numpy as np

from freespec.engine.tree import DraftTree
from freespec.engine.verify import greedy_accept


def test_greedy_accept_longest_agreeing_path():
    t = DraftTree(np.array([5, 1, 2, 3, 9, 4]), np.array([-1, 0, 0, 2, 3, 1]))
    # root predicts 2 → node 2; node 2 predicts 3 → node 3; node 3 predicts 9 → node 4; bonus after node 4
    assert greedy_accept(t, np.array([2, 0, 3, 9, 8, 0])) == ([0, 2, 3, 4], 8)
    # the branch through node 1: root predicts 1, node 1 predicts 4 → node 5
    assert greedy_accept(t, np.array([1, 4, 0, 0, 0, 6])) == ([0, 1, 5], 6)
    # nothing matches: plain decoding's one token
    assert greedy_accept(t, np.array([7, 0, 0, 0, 0, 0])) == ([0], 7)
    assert greedy_accept(DraftTree.root_only(3), np.array([42])) == ([0], 42)
