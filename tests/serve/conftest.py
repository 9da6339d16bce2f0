"""Fixtures for the server's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import tiny_config, word_tokenizer


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a 4096-token context: one answer can keep the model busy for seconds."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = 4096
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny-llama-4k")
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
