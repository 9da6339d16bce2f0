"""Draft sources. Each implements :class:`freespec.drafters.base.Drafter`; none touches verification."""

from freespec.drafters.base import Drafter
from freespec.drafters.recycling import TokenRecycling

DRAFTERS = ("recycling", "none")
"""Names accepted by the API, CLI and benchmark; ``none`` is plain decoding through the same runner."""

__all__ = ["DRAFTERS", "Drafter", "TokenRecycling"]
