"""Fixtures for the server's tests."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

import freespec
from tests.helpers import tiny_config, word_tokenizer


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A second copy of the tiny model, in this process: what the server's answers must equal (a
    cold model: every answer is its prefill of the whole prompt)."""
    return freespec.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def client(server):
    """The openai client on the module's ``server``."""
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


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
