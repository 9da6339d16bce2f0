"""Rotary embedding tables, computed by the model's own rotary module (no fork of its maths)."""

from __future__ import annotations

import torch


class RotaryTables:
    """cos and sin [positions, head_dim] for every position a pass may use, grown on demand.

    A position's row is computed once and never depends on the other positions of a pass, so
    decoding and verification rotate a token identically. Dynamic scaling (tables that change
    with the sequence length) is computed per pass instead. LongRoPE (Phi-3's long-context
    variants) switches from its short to its long factors once the sequence passes the original
    context: each row is the one transformers uses when the sequence ends at that position (short
    factors below ``original_max_position_embeddings``, long from there on; transformers'
    own prefill of a longer prompt rotates all its tokens with the long factors instead).

    Models with a table per layer type (Gemma 3: local and global bases) name it ``kind``.
    """

    def __init__(self, rotary: torch.nn.Module, max_positions: int, probe: torch.Tensor):
        """``probe``: any [1, hidden] tensor of the model's dtype (the module reads only its dtype)."""
        self._rotary, self._max_positions, self._probe = rotary, max_positions, probe
        self._tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope(self, kind: str | None) -> tuple[str, dict]:
        """(rope type, rope parameters) of table ``kind``."""
        parameters = getattr(self._rotary.config, "rope_parameters", None) or {}
        if kind is None:
            return str(getattr(self._rotary, "rope_type", "default")), parameters
        return self._rotary.rope_type[kind], parameters.get(kind) or {}

    def _call(self, positions: torch.Tensor, kind: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's (cos, sin) [len(positions), head_dim] for a sequence ending at positions[-1]."""
        keywords = {} if kind is None else {"layer_type": kind}
        cos, sin = self._rotary(self._probe, positions.unsqueeze(0), **keywords)
        return cos[0].contiguous(), sin[0].contiguous()

    def rows(self, positions: torch.Tensor, kind: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos table, sin table, rows): token i's (cos, sin) [head_dim] are row ``rows[i]`` of
        the contiguous tables; ``positions`` [n] int64, each below the model's context."""
        rope_type, parameters = self._rope(kind)
        if "dynamic" in rope_type:
            cos, sin = self._call(positions, kind)
            return cos, sin, torch.arange(len(positions))
        end = int(positions.max()) + 1
        cos, sin = self._tables.get(kind, (torch.empty(0), torch.empty(0)))
        if cos.shape[0] < end:
            size = min(self._max_positions, max(end, 2 * cos.shape[0], 1024))
            bounds = [0, size]
            switch = parameters.get("original_max_position_embeddings") if rope_type == "longrope" else None
            if switch and 0 < switch < size:
                bounds = [0, switch, size]  # each segment in one call: short factors, then long ones
            parts = [self._call(torch.arange(start, stop), kind) for start, stop in zip(bounds, bounds[1:])]
            cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
            self._tables[kind] = (cos, sin)
        return cos, sin, positions
