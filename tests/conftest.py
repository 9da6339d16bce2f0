"""Tiny random models (Llama, Qwen2, GPT-2) with a small word-level tokenizer, built offline."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

WORDS = ["<eos>", "<unk>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(252)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_config(family: str, vocab: int = len(WORDS), layers: int = 2):
    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=1, max_position_embeddings=512, **common)
    if family == "qwen3":  # per-head RMSNorm on queries and keys
        return Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, scale: float = 1.0, layers: int = 2):
    """A random model; ``scale`` sharpens its logits so greedy text has repeats worth drafting."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers=layers)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _kernel_builds() -> list[str]:
    """The kernel builds this CPU runs: the 16-lane AVX-512 one where it exists, always the AVX2 one."""
    from freespec import kernels

    return ["avx512", "avx2"] if "avx512f" in kernels._cpu_flags() else ["avx2"]


def _use_kernel_build(isa: str | None) -> None:
    from freespec import kernels

    if isa is None:
        os.environ.pop("FREESPEC_KERNEL_ISA", None)
    else:
        os.environ["FREESPEC_KERNEL_ISA"] = isa
    for cached in (kernels._isa, kernels._source_digest, kernels._library):
        cached.cache_clear()


@contextmanager
def forced_kernel_build(isa: str):
    """FREESPEC_KERNEL_ISA=isa with the kernel caches cleared, then the previous setting back."""
    before = os.environ.get("FREESPEC_KERNEL_ISA")
    _use_kernel_build(isa)
    try:
        yield
    finally:
        _use_kernel_build(before)


@pytest.fixture(params=_kernel_builds())
def kernel_build(request):
    """Runs a test once per kernel build (batch invariance must hold in each); runners made
    inside keep the build they were made with."""
    with forced_kernel_build(request.param):
        yield request.param


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
    """Kernels and calibrations go to a per-run cache; converted GGUF models stay shared (slow to make)."""
    import os

    previous = os.environ.get("FREESPEC_CACHE")
    os.environ["FREESPEC_CACHE"] = str(tmp_path_factory.mktemp("freespec-cache"))
    shared = Path(previous) if previous else Path.home() / ".cache" / "freespec"
    converted = Path(os.environ["FREESPEC_CACHE"]) / "converted"
    (shared / "converted").mkdir(parents=True, exist_ok=True)
    converted.symlink_to(shared / "converted", target_is_directory=True)
    yield
