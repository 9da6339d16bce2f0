"""Rotary embedding tables, computed by the model's own rotary module (no fork of its maths)."""

from __future__ import annotations

import torch


class RotaryTables:
    """cos and sin [positions, head_dim] for every position a pass may use, grown on demand.

    A position's row is computed once and never depends on the other positions of a pass, so
    decoding and verification rotate a token identically. Dynamic scaling (tables that change
    with the sequence length) is computed per pass instead.
    """

    def __init__(self, rotary: torch.nn.Module, max_positions: int, probe: torch.Tensor):
        """``probe``: any [1, hidden] tensor of the model's dtype (the module reads only its dtype)."""
        self._rotary, self._max_positions, self._probe = rotary, max_positions, probe
        self._dynamic = "dynamic" in str(getattr(rotary, "rope_type", ""))
        self._cos = self._sin = torch.empty(0)

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos table, sin table, rows): token i's (cos, sin) [head_dim] are row ``rows[i]`` of
        the contiguous tables; ``positions`` [n] int64, each below the model's context."""
        if self._dynamic:
            cos, sin = self._rotary(self._probe, positions.unsqueeze(0))
            return cos[0].contiguous(), sin[0].contiguous(), torch.arange(len(positions))
        end = int(positions.max()) + 1
        if self._cos.shape[0] < end:
            size = min(self._max_positions, max(end, 2 * self._cos.shape[0], 1024))
            cos, sin = self._rotary(self._probe, torch.arange(size).unsqueeze(0))
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        return self._cos, self._sin, positions
