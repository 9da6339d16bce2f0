"""Shared test helpers: tiny random models (Llama, Qwen2, Qwen3, GPT-2, and the families of
FAMILIES: Gemma 1-3, Phi-3, Mistral, Llama 3.x) with a word-level tokenizer, built offline, and
the statistics and generation helpers several test folders use."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

from freespec.api import Model
from freespec.engine.distribution import answer_penalties, biased, repetition_penalty, target_probs
from freespec.engine.sampling import SamplingParams
from freespec.kernels import Kernels
from freespec.model.loading import from_transformers
from freespec.model.runner import ModelRunner
from freespec.model.weights import extract

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
    return family_config(family, layers, common)


WINDOW = 12
"""The sliding window of the tiny models that have one: far shorter than the tests' contexts."""

FAMILIES = ["gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "phi3-longrope", "mistral", "llama3", "qwen2-tied"]
"""Tiny models of the families beyond Llama/Qwen/GPT-2, each with what sets it apart: Gemma's
(1 + w) norms, scaled embeddings and GeGLU; Gemma 2's post-norms, alternate sliding-window layers
and soft-capping; Gemma 3's query/key norms and a rotary table per layer type (the global one
linearly scaled); Gemma 3's multimodal model (its text part runs); Phi-3's fused projections and
sliding window on every layer; LongRoPE switching factors at position 64; Mistral's window;
Llama 3.x's llama3 rope scaling and a tied head; Qwen2.5's biases with a tied head."""


def family_config(family: str, layers: int, common: dict):
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                 max_position_embeddings=512, **common)
    if family == "gemma":
        return GemmaConfig(num_key_value_heads=1, head_dim=16, **shape)
    if family == "gemma2":
        return Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **shape)
    if family in ("gemma3_text", "gemma3"):
        text = Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
            query_pre_attn_scalar=24, rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}, **shape)
        if family == "gemma3_text":
            return text
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=255,
                            boi_token_index=254, eoi_token_index=253)
    if family == "phi3":
        return Phi3Config(num_key_value_heads=2, sliding_window=WINDOW, **shape)
    if family == "phi3-longrope":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 8 for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 64}
        return Phi3Config(num_key_value_heads=2, original_max_position_embeddings=64, rope_parameters=rope, **shape)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **shape)
    if family == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope, **shape)
    if family == "qwen2-tied":
        return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **shape)
    raise ValueError(family)


def runner_for(hf_model: torch.nn.Module, kernels: Kernels, pack: bool = True) -> ModelRunner:
    """A runner over a transformers model's weights (taken over as fp32; with ``pack``, those
    that are exact 4/8-bit blocks packed), as :func:`freespec.model.loading.from_transformers` reads them."""
    loaded = from_transformers(hf_model, None, "test", pack=pack)
    if loaded.weights is None:  # no fast path: raise extract's one-line UnsupportedModelError
        extract(hf_model)
    return ModelRunner(loaded.config, loaded.weights, kernels)


def tiny_model(family: str, seed: int = 0, scale: float = 1.0, layers: int = 2):
    """A random model; ``scale`` sharpens its logits so greedy text has repeats worth drafting.
    The FAMILIES' norm weights are perturbed too (Gemma's start at 0, which hides the 1 + w)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers=layers)).eval()
    with torch.no_grad():
        if family in FAMILIES:
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(torch.randn_like(parameter), alpha=0.3)
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
OPENAI = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.2, frequency_penalty=1.5,
                        presence_penalty=1.0, logit_bias={3: 2.0, 8: -1.5})  # OpenAI's options, strong enough to show


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
            row = repetition_penalty(biased(row, params.logit_bias), seen, params.repetition_penalty)
            row = answer_penalties(row, np.array(prefix, np.int64), params.frequency_penalty, params.presence_penalty)
            table[prefix] = target_probs(row, params).double()
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
    return Model(from_transformers(tiny_model(family, seed=seed, scale=scale), word_tokenizer(), family),
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


def fault_after_first_chunk(generation, faults: list | None = None):
    """``generation`` (a :class:`freespec.engine.loop.Generation`), made to raise a simulated fault
    in the step after its first emitted chunk (appending to ``faults`` when it does): a server's
    injected fault."""
    take = generation.take

    def faulty_take(*arguments):
        generated = len(generation.token_ids)
        emitted = take(*arguments)
        if generated:
            if faults is not None:
                faults.append(1)
            raise RuntimeError("simulated fault")
        return emitted

    generation.take = faulty_take
    return generation


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def serve_process(*arguments: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``freespec serve ARGUMENTS`` in a process of its own on a free loopback port: (the process,
    its URL) once /health answers; killed on the way out if the test left it running."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "freespec", "serve", "--port", str(port), *arguments],
                               cwd=Path(__file__).resolve().parents[1], env=os.environ.copy(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            return post(url + "/health", b"", method="GET", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, 120)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def os_threads() -> int:
    """The threads of this process, as the OS counts them (OpenMP workers included)."""
    return len(os.listdir("/proc/self/task"))


# -- GGUF files written as llama.cpp's converter writes them (tests/model) -------------------------


QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # by gguf.quants
RANDOM_BLOCK_SCALES = {"Q2_K": 2e-3, "Q3_K": 5e-4, "Q4_K": 2e-4, "Q5_K": 1e-4, "Q6_K": 1e-5, "IQ3_XXS": 1e-4,
                       "IQ3_S": 1e-4, "IQ2_XXS": 2e-4, "IQ2_XS": 2e-4, "IQ2_S": 2e-4, "IQ4_NL": 5e-4, "IQ4_XS": 2e-5,
                       "IQ1_S": 2e-3, "IQ1_M": 2e-3, "TQ1_0": 2e-2, "TQ2_0": 2e-2}
"""Largest fp16 scale of hand-packed random blocks of the types gguf cannot quantize to: weights of
about 0.05, as in real models."""

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
"""The GGUF architecture llama.cpp's converter writes for a transformers model type."""


def llama_cpp_permute(weights: np.ndarray, heads: int, kv_heads: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` of query and key rows, copied as written there."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def byte_level_tokens() -> list[str]:
    """GPT-2's 256 byte symbols: a byte-level BPE vocabulary that needs no merges (one token a byte)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    return [symbols[byte] for byte in range(256)]


def write_gguf(path, hf_model: torch.nn.Module, types: str | dict[str, str], seed: int = 0):
    """``hf_model`` (a tiny Llama, Qwen2, Gemma 2, Gemma 3 or Phi-3) as llama.cpp writes a GGUF
    file: metadata, a byte-level tokenizer, norms and biases F32, each matrix in ``types`` (one
    type name, or GGUF tensor roles such as ``attn_v`` or ``token_embd`` → type, with a
    ``default``), tensors named by gguf-py's own map (``gguf.get_tensor_name_map``), query and key
    rows permuted for the llama architecture, Gemma's norm weights stored as 1 + w (as
    convert_hf_to_gguf.py's Gemma models write them). Matrices of RANDOM_BLOCK_SCALES's types are random
    blocks (:func:`freespec.kernels.random_blocks`: gguf cannot quantize to them): the model the
    file holds is then what its blocks dequantize to. No output tensor if the head is tied."""
    from freespec.kernels import random_blocks

    types = {"default": types} if isinstance(types, str) else types
    config, rng = hf_model.config, np.random.default_rng(seed)
    architecture, heads, hidden = GGUF_ARCHITECTURES[config.model_type], config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    names = gguf.get_tensor_name_map(next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture),
                                     config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if architecture in ("llama", "phi3"):
        writer.add_rope_dimension_count(head_dim)
    if architecture.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_level_tokens()[:config.vocab_size])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_scores([0.0] * config.vocab_size)  # no merges: transformers derives none from these
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)  # Phi-3's config would otherwise pad with id 32000
    writer.add_chat_template(CHAT_TEMPLATE)
    rope = config.rope_parameters
    if rope.get("rope_type") == "longrope":  # as convert_hf_to_gguf.py's Phi3MiniModel writes LongRoPE
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for kind in ("long", "short"):
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    for name, tensor in hf_model.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        if module == "lm_head" and config.tie_word_embeddings:
            continue
        gguf_name = f"{names.get_name(module)}.{suffix}"
        role = gguf_name.split(".")[-2]
        values = tensor.detach().to(torch.float32).numpy()
        if architecture == "llama" and role in ("attn_q", "attn_k"):
            values = llama_cpp_permute(values, heads, heads if role == "attn_q" else config.num_key_value_heads)
        if architecture.startswith("gemma") and name.endswith("norm.weight"):
            values = values + 1
        kind = "F32" if values.ndim == 1 else types.get(role, types["default"])
        if kind in RANDOM_BLOCK_SCALES:
            data = random_blocks(kind, values.shape, rng, largest=RANDOM_BLOCK_SCALES[kind])
        elif kind in QUANTIZABLE:
            data = gguf.quants.quantize(np.ascontiguousarray(values), gguf.GGMLQuantizationType[kind])
        else:  # a type freespec does not read (bad-file tests): random bytes of its size
            shape = gguf.quants.quant_shape_to_byte_shape(values.shape, gguf.GGMLQuantizationType[kind])
            data = rng.integers(0, 256, shape, dtype=np.uint8)
        writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- models read from files against transformers (tests/model) ---------------------------------


PROMPT = [2, 5, 6, 7, 3, 40, 41, 42, 43, 44, 45, 9]
NEW_TOKENS = 12


def model_for(family: str, types: str | dict[str, str] = "F32", tied: bool = False, seed: int = 0,
              layers: int = 2) -> torch.nn.Module:
    """A tiny model with random norms (a mix-up of norms shows), wide enough for K-quants' 256-weight
    blocks when ``types`` (see :func:`write_gguf`) uses them."""
    config = tiny_config(family, layers=layers)
    kinds = [types] if isinstance(types, str) else types.values()
    if any(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] == 256 for kind in kinds):  # super-blocks
        config.hidden_size, config.intermediate_size = 256, 512
        config.head_dim = 256 // config.num_attention_heads
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
        model.get_output_embeddings().weight.mul_(8.0)  # sharper logits: greedy margins well above fp32 noise
    return model


def greedy(runner: ModelRunner, prompt: list[int], count: int) -> list[int]:
    runner.reset(len(prompt) + count + 1)
    logits = runner.logits(runner.prefill(torch.tensor(prompt)))[-1:]
    tokens = []
    for _ in range(count):
        tokens.append(int(logits.argmax()))
        logits = runner.logits(runner.forward(torch.tensor(tokens[-1:]), torch.tensor([runner.length]),
                                              torch.ones(1, 1, dtype=torch.bool)))
        runner.commit([0])
    return tokens


def assert_matches_transformers(runner: ModelRunner, oracle: torch.nn.Module) -> None:
    runner.reset(len(PROMPT))
    ours = runner.logits(runner.prefill(torch.tensor(PROMPT)))  # [n, vocab]
    with torch.no_grad():
        theirs = oracle(torch.tensor([PROMPT])).logits[0]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    expected = oracle.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    assert greedy(runner, PROMPT, NEW_TOKENS) == expected


def assert_same_bits(ours: ModelRunner, reference: ModelRunner) -> None:
    """Prefill, decoding and a tree pass give the same bits on both runners."""
    ids = torch.tensor(PROMPTS[1][:24])
    for runner in (ours, reference):
        runner.reset(len(ids))
    assert torch.equal(ours.logits(ours.prefill(ids[:16])), reference.logits(reference.prefill(ids[:16])))
    assert torch.equal(decode_one_by_one(ours, ids, 16, 20), decode_one_by_one(reference, ids, 16, 20))
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([20, 21, 21, 22])
    assert torch.equal(ours.logits(ours.forward(ids[20:24], positions, tree)),
                       reference.logits(reference.forward(ids[20:24], positions, tree)))


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


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses look their module up
    spec.loader.exec_module(module)
    return module
