"""Fixtures shared by every test folder; plain helpers live in tests/helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from freespec import kernels
from tests.helpers import (
    tiny_model,
    word_tokenizer,
)


@pytest.fixture
def c_kernels() -> kernels.Kernels:
    """The default C kernel build (every test machine has one: tests/kernels checks it)."""
    return kernels.select()


@pytest.fixture(params=kernels.supported_isas())
def kernel_build(request) -> kernels.Kernels:
    """Runs a test once per C kernel build (batch invariance must hold in each): the backend
    to pass to the runners it makes."""
    return kernels.select(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with a chat template: loadable by path like any HF model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", scale=8.0).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_no_chat_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-nochat")
    tiny_model("llama", scale=8.0).save_pretrained(path)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Kernels and calibrations go to a per-run cache; what transformers reads from GGUF files'
    metadata (config, tokenizer) stays shared (slow to make)."""

    previous = os.environ.get("FREESPEC_CACHE")
    os.environ["FREESPEC_CACHE"] = str(tmp_path_factory.mktemp("freespec-cache"))
    shared = Path(previous) if previous else Path.home() / ".cache" / "freespec"
    metadata = Path(os.environ["FREESPEC_CACHE"]) / "gguf"
    (shared / "gguf").mkdir(parents=True, exist_ok=True)
    metadata.symlink_to(shared / "gguf", target_is_directory=True)
    yield
