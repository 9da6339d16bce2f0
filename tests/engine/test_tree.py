"""DraftTree: the flat arrays a verification pass reads (depths, children, mask, positions)."""

import numpy as np
import pytest

from freespec.engine.tree import DraftTree


def tree(tokens, parents):
    return DraftTree(np.array(tokens), np.array(parents))


def test_tree_mask_positions_children():
    #      0(root)
    #     /  \
    #    1    3
    #    |
    #    2
    t = tree([10, 11, 12, 13], [-1, 0, 1, 0])
    assert t.depths.tolist() == [0, 1, 2, 1]
    assert t.children == [[1, 3], [2], [], []]
    tokens, positions, mask = t.attention_inputs(cache_length=5)
    assert tokens.tolist() == [10, 11, 12, 13]
    assert positions.tolist() == [5, 6, 7, 6]
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 0, 3, 1], [-1, -1]])
def test_tree_rejects_bad_parents(parents):
    with pytest.raises(ValueError):
        tree(list(range(len(parents))), parents)
