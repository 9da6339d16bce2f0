"""Shared test helpers: tiny random models (Llama, Qwen2, Qwen3, GPT-2) with a word-level tokenizer,
built offline, and the statistics and generation helpers several test folders use."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from freespec.api import Model
from freespec.engine.distribution import repetition_penalty, target_probs
from freespec.engine.sampling import SamplingParams
from freespec.model.loading import LoadedModel
from freespec.model.runner import ModelRunner

# -- from conftest.py ------------------------------------------------------------


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


# -- from test_sampling.py ------------------------------------------------------------


ALPHA = 1e-3  # chi-square p-values below this reject "same distribution"


VOCAB = 12


DEPTH = 3  # the statistics are over the first DEPTH generated tokens


CONTEXT = np.array([1, 2, 3, 4, 5])


FULL = SamplingParams(temperature=0.8, top_k=9, top_p=0.95, min_p=0.02, repetition_penalty=1.5)


def small_model(seed: int = 0, layers: int = 1) -> torch.nn.Module:
    """12 tokens, 1 layer by default; logits scaled so a few tokens dominate, as in real text."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    return model


def exact_table(hf_model, params: SamplingParams) -> dict[tuple, torch.Tensor]:
    """prefix (tuple of < DEPTH tokens) → plain sampling's distribution after CONTEXT + prefix."""
    table, prefixes = {}, [()]
    for _ in range(DEPTH):
        ids = torch.tensor([[*CONTEXT, *prefix] for prefix in prefixes])
        with torch.no_grad():
            logits = hf_model(ids).logits[:, -1]  # [prefixes, vocab]
        for prefix, row in zip(prefixes, logits):
            seen = np.array([*CONTEXT, *prefix])
            table[prefix] = target_probs(repetition_penalty(row, seen, params.repetition_penalty), params).double()
        prefixes = [(*prefix, token) for prefix in prefixes for token in range(VOCAB)]
    return table


def exact_joint(table: dict[tuple, torch.Tensor]) -> np.ndarray:
    """[VOCAB ** DEPTH] probability of each sequence of the first DEPTH tokens (row-major)."""
    joint = table[()].numpy()
    for level in range(1, DEPTH):
        prefixes = [tuple(int(t) for t in np.unravel_index(i, (VOCAB,) * level)) for i in range(VOCAB ** level)]
        joint = (joint[:, None] * np.stack([table[p].numpy() for p in prefixes])).reshape(-1)
    return joint


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's test; outcomes expected fewer than 5 times are pooled into one bin."""
    expected = probs * counts.sum()
    if np.any(counts[probs == 0]):
        return 0.0  # an impossible sequence was produced
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = torch.tensor((keep.sum() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


def total_variation(counts: np.ndarray, probs: np.ndarray) -> float:
    return float(np.abs(counts / counts.sum() - probs).sum() / 2)



# -- from test_equality.py ------------------------------------------------------------


PROMPTS = [[2, 5, 6, 7, 3], [2, *range(40, 90), 3]]


def make_model(family, seed=0, budget=None, scale=8.0, tree_shape="dynamic"):
    return Model(LoadedModel(tiny_model(family, seed=seed, scale=scale), word_tokenizer(), family, None),
                 budget=budget, tree_shape=tree_shape)


def generate(model, prompt, drafter, max_new_tokens=48):
    return model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=max_new_tokens)



# -- from test_runner.py ------------------------------------------------------------


def decode_one_by_one(runner: ModelRunner, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Logits of ids[start:end] decoded as plain decoding does: one token per forward, committed."""
    logits = []
    for i in range(start, end):
        logits.append(runner.logits(runner.forward(ids[i : i + 1], torch.tensor([i]), torch.ones(1, 1, dtype=torch.bool))))
        runner.commit([0])
    return torch.cat(logits)



# -- from test_server.py ------------------------------------------------------------


def metric(url: str, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def post(url: str, body: bytes | str | dict, headers: dict | None = None, method: str = "POST",
         timeout: float = 60):
    """Raw HTTP: (status, parsed JSON body or text, headers)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, response_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, response_headers = error.code, error.read(), error.headers
    try:
        return status, json.loads(raw), response_headers
    except ValueError:
        return status, raw.decode(), response_headers


def open_stream(url: str, body: dict, path: str = "/v1/chat/completions",
                timeout: float = 60) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST ``body`` with ``stream: true``; the response is read line by line (server-sent events)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- from model/test_fallback.py ------------------------------------------------------------


FALLBACK_FAMILIES = ["opt", "gpt_neox", "phi"]
"""Families without a fast path, run through transformers (learned positions; parallel residual
with partial rotary; parallel attention and MLP with partial rotary)."""


def fallback_config(family: str, window: int = 8):
    """A tiny config of a family the native runner does not cover, with the word tokenizer's vocabulary.

    ``cohere2`` and ``gemma3_text`` interleave sliding-window layers (of ``window`` positions) with
    global ones."""
    common = dict(vocab_size=len(WORDS), bos_token_id=None, eos_token_id=0, pad_token_id=0, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512)
    if family == "opt":
        return AutoConfig.for_model("opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **common)
    if family in ("gpt_neox", "phi"):
        return AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, **common)
    if family in ("cohere2", "gemma3_text"):
        layers = ["sliding_attention", "full_attention", "sliding_attention"]
        return AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                    sliding_window=window, **{**common, "num_hidden_layers": 3}, layer_types=layers)
    raise ValueError(family)


def fallback_model(family: str, seed: int = 0, scale: float = 8.0, window: int = 8):
    """A random model of ``family`` (see :func:`fallback_config`); ``scale`` sharpens its logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(fallback_config(family, window)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model
