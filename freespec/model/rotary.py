"""Rotary embedding tables from the model's config, with transformers' own frequency functions.

The inverse frequencies come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` for
every scaled rope type (linear, dynamic, yarn, llama3, longrope, ...) and from the original
formula for the default one; cos and sin are computed as transformers' rotary modules compute
them, so the tables have the same bits without any module of the model.
"""

from __future__ import annotations

import torch


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The config's rope parameters (``rope_type``, ``rope_theta``, ...), per layer type where it has several."""
    config.standardize_rope_params()
    parameters = config.rope_parameters
    return parameters[layer_type] if layer_type is not None else parameters


def inverse_frequencies(config, layer_type: str | None = None,
                        seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary dim / 2], attention scaling) as transformers computes them.

    ``seq_len``: the sequence length the rope types that depend on it see (longrope: above its
    original context, the long factors).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = rope_parameters(config, layer_type)
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        keywords = {} if layer_type is None else {"layer_type": layer_type}
        return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len, **keywords)
    # the default, as the models' compute_default_rope_parameters write it
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * parameters.get("partial_rotary_factor", 1.0))
    base = parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)), 1.0


class RotaryTables:
    """cos and sin [positions, head_dim] for every position a pass may use, grown on demand.

    A position's row never depends on the other positions of a pass, so decoding, verification
    and prefill rotate a token identically. Longrope (short factors within the original context,
    long ones beyond) takes each position's factors as decoding one token at a time does in
    transformers: long from position ``original_max_position_embeddings`` on. Dynamic scaling
    changes nothing within the model's context (the only positions served).
    """

    def __init__(self, config, max_positions: int, layer_type: str | None = None):
        self._config, self._layer_type, self._max_positions = config, layer_type, max_positions
        parameters = rope_parameters(config, layer_type)
        self._frequencies = [(0, *inverse_frequencies(config, layer_type))]  # (first position, inv freq, scaling)
        if parameters.get("rope_type") == "longrope":
            original = int(parameters["original_max_position_embeddings"])
            self._frequencies.append((original, *inverse_frequencies(config, layer_type, seq_len=original + 1)))
        self._cos = self._sin = torch.empty(0)

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos table, sin table, rows): token i's (cos, sin) [head_dim] are row ``rows[i]`` of
        the contiguous tables; ``positions`` [n] int64, each below the model's context."""
        self._hold(max(positions.tolist()) + 1)  # a list's max: a torch reduction costs ~20 µs in a decoding step
        return self._cos, self._sin, positions

    def addresses(self, end: int) -> tuple[int, int]:
        """The data addresses of the cos and sin tables [*, head_dim] (contiguous fp32), once they
        hold the positions below ``end``: what the kernels' one-request pass reads."""
        self._hold(end)
        return self._addresses

    def _hold(self, end: int) -> None:
        if self._cos.shape[0] < end:
            size = min(self._max_positions, max(end, 2 * self._cos.shape[0], 1024))
            self._cos, self._sin = self._tables(size)
            self._addresses = (self._cos.data_ptr(), self._sin.data_ptr())

    def _tables(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [size, head_dim]: the rotary modules' forward for positions 0..size-1."""
        cos, sin = [], []
        bounds = [start for start, _, _ in self._frequencies[1:]] + [size]
        for (start, inv_freq, scaling), stop in zip(self._frequencies, bounds):
            if start >= size:
                break
            positions = torch.arange(start, min(stop, size))
            freqs = positions[..., None].float() * inv_freq.to(dtype=torch.float)  # [n, dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos.append(emb.cos() * scaling)
            sin.append(emb.sin() * scaling)
        return torch.cat(cos).contiguous(), torch.cat(sin).contiguous()
