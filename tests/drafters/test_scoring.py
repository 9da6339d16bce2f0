"""Scores of n-gram drafts: hit rates learned per depth from verification."""

import numpy as np
import pytest

from freespec.drafters.scoring import HitRate
from freespec.engine.tree import DraftTree


def test_hit_rate_learns_each_depth():
    rate = HitRate()
    chain = DraftTree(np.arange(5), np.arange(-1, 4))  # the root and 4 nodes in a row
    for attempt in range(20):  # half the first nodes fail; a copy that has started goes on
        rate.learn(chain, [0, 1, 2, 3, 4] if attempt % 2 else [0])
    assert rate(1) == pytest.approx((10 + 2 * 0.5) / (20 + 2))
    assert rate(2) == pytest.approx((10 + 2 * rate(1)) / (10 + 2))
    assert rate(4) > rate(3) > rate(2) > 0.9
    assert rate(5) == rate(4) == rate(100)  # never tried deeper: the depth above's rate
