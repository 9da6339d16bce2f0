"""Rotary tables from the config have the bits of transformers' own rotary module, for every rope type."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from freespec.model.rotary import RotaryTables

CONTEXT = 256
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                 "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 64},
}


def config(scaling: dict | None) -> LlamaConfig:
    parameters = {"rope_theta": 10000.0, **({"rope_type": "default"} if scaling is None else scaling)}
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                       rope_parameters=parameters)


@pytest.mark.parametrize("rope", list(SCALINGS))
def test_tables_equal_the_rotary_module_as_decoding_calls_it(rope):
    """Each position as transformers rotates it when decoding one token at a time after a prefill
    of the positions before it (longrope picks its factors from the length so far)."""
    module = LlamaRotaryEmbedding(config(SCALINGS[rope]))
    tables = RotaryTables(config(SCALINGS[rope]), CONTEXT)
    probe = torch.zeros(1, 1, 16)
    positions = torch.tensor([0, 1, 17, 63, 64, 65, 200, CONTEXT - 1])
    cos_table, sin_table, rows = tables.rows(positions)
    assert cos_table.shape == (CONTEXT, 16)  # grown to the context at most
    for position, row in zip(positions.tolist(), rows.tolist()):
        cos, sin = module(probe, torch.tensor([[position]]))
        assert torch.equal(cos_table[row], cos[0, 0]) and torch.equal(sin_table[row], sin[0, 0]), (rope, position)


@pytest.mark.parametrize("rope", ["default", "llama3", "yarn"])
def test_tables_equal_one_call_over_the_whole_context(rope):
    module = LlamaRotaryEmbedding(config(SCALINGS[rope]))
    cos, sin = module(torch.zeros(1, 1, 16), torch.arange(CONTEXT)[None])
    cos_table, sin_table, _ = RotaryTables(config(SCALINGS[rope]), CONTEXT).rows(torch.tensor([CONTEXT - 1]))
    assert torch.equal(cos_table, cos[0]) and torch.equal(sin_table, sin[0])


def test_longrope_switches_to_the_long_factors_at_the_original_context():
    tables = RotaryTables(config(SCALINGS["longrope"]), CONTEXT)
    cos, _, _ = tables.rows(torch.tensor([CONTEXT - 1]))
    short = RotaryTables(config({**SCALINGS["longrope"], "long_factor": SCALINGS["longrope"]["short_factor"]}), CONTEXT)
    same_factors, _, _ = short.rows(torch.tensor([CONTEXT - 1]))
    assert torch.equal(cos[:64], same_factors[:64]) and not torch.equal(cos[64:], same_factors[64:])
