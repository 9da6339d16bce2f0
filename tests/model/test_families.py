"""Gemma 1-3, Phi-3, Mistral, Llama 3.x and tied Qwen2.5 on tiny random models (tests.helpers.FAMILIES):
logits against transformers, bit-exact verification across sliding windows, and what is refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    T5Config,
)

from freespec import kernels
from freespec.engine.tree import DraftTree
from freespec.model import runner as runner_module
from freespec.model.weights import UnsupportedModelError, extract, refuse_unsupported
from tests.helpers import (
    FAMILIES,
    WINDOW,
    decode_one_by_one,
    make_model,
    runner_for,
    tiny_config,
    tiny_model,
)

TORCH = kernels.select("torch")
WINDOWED = ["gemma2", "gemma3_text", "phi3", "mistral"]  # every layer, or every other one, has a window of WINDOW


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_logits_match_transformers_past_the_window(family, backend, c_kernels):
    """Prefill, a tree with a right and a wrong branch, commit, then a causal tail: every token's
    logits are transformers' (whose masks define the windows) within fp32 rounding, same argmax."""
    model = tiny_model(family, seed=1)
    runner = runner_for(model, c_kernels if backend == "c" else TORCH)
    ids = torch.randint(250, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids[None]).logits[0]  # [50, vocab]
    runner.reset(64)
    prefill = runner.logits(runner.prefill(ids[:30]))
    tree = DraftTree(np.array([*ids[30:36].tolist(), 3, 4]), np.array([-1, 0, 1, 2, 3, 4, 0, 6]))
    branch = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))[:6]
    runner.commit([0, 1, 2, 3])
    tail = runner.logits(runner.forward(ids[34:], torch.arange(34, 50), torch.ones(16, 16, dtype=torch.bool).tril()))
    ours = torch.cat([prefill, branch[:4], tail])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(branch, reference[30:36], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_the_one_call_decoder(family, c_kernels):
    """Windows, soft-caps, post-norms, GeGLU, scaled embeddings, two rotary tables: all in C."""
    assert runner_for(tiny_model(family), c_kernels)._decoder is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_equals_transformers_generate(family):
    """Across the window and, for LongRoPE, across its switch to the long factors at position 64
    (transformers' step-by-step generation uses the factors of the length reached, as we do)."""
    model = make_model(family, 3)
    hf_model = tiny_model(family, seed=3, scale=8.0)
    prompt = [2, *range(40, 90), 3]  # 52 tokens: generation passes position 64
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=32).token_ids == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_drafts_straddling_the_window_verify_bit_exactly(family, kernel_build):
    """A chain twice the window deep with side branches: each chain node's logits are the bits
    plain decoding gives, though its window drops the prefix and then its own first ancestors."""
    runner = runner_for(tiny_model(family, seed=2), kernel_build)
    ids = torch.randint(250, (44,), generator=torch.Generator().manual_seed(1))
    runner.reset(64)
    runner.prefill(ids[:20])
    chain = 2 * WINDOW
    parents = [-1, *range(chain - 1), 0, chain, 5, 2 * WINDOW - 2]
    tree = DraftTree(np.array([*ids[20:44].tolist(), 7, 9, 11, 13]), np.array(parents))
    tree_logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    assert torch.equal(tree_logits[:chain], decode_one_by_one(runner, ids, 20, 44))


@pytest.mark.parametrize("family", WINDOWED + ["gemma"])
def test_prefill_chunks_across_the_window_write_the_rows_decoding_writes(family, kernel_build, monkeypatch):
    """Chunks shorter than, equal to and longer than the window (40: the kernel's causal path,
    whose rows join the prefix), and decoding one token at a time from a context shorter than
    the window on: the same cache rows and logits, bit for bit."""
    runner = runner_for(tiny_model(family, seed=8), kernel_build)
    ids = torch.randint(250, (60,), generator=torch.Generator().manual_seed(8))
    runner.reset(64)
    whole = runner.logits(runner.prefill(ids))
    keys, values = runner.cache.keys[:, :, :60].clone(), runner.cache.values[:, :, :60].clone()
    for chunk in (5, WINDOW, 40):
        monkeypatch.setattr(runner_module, "PREFILL_CHUNK", chunk)
        runner.reset(64)
        assert torch.equal(runner.logits(runner.prefill(ids)), whole), chunk
        assert torch.equal(runner.cache.keys[:, :, :60], keys) and torch.equal(runner.cache.values[:, :, :60], values)
    runner.reset(64)
    runner.prefill(ids[:3])
    assert torch.equal(decode_one_by_one(runner, ids, 3, 2 * WINDOW + 5), whole[3 : 2 * WINDOW + 5])
    rows = 2 * WINDOW + 5
    assert torch.equal(runner.cache.keys[:, :, :rows], keys[:, :, :rows])
    assert torch.equal(runner.cache.values[:, :, :rows], values[:, :, :rows])


def test_qwen2_windows_on_its_upper_layers_only(kernel_build):
    """Qwen2's use_sliding_window windows the layers from max_window_layers on (layer_types)."""
    settings = {**tiny_config("qwen2", layers=3).to_dict(), "use_sliding_window": True, "sliding_window": WINDOW,
                "max_window_layers": 1, "layer_types": None}  # layer_types: derived from the three above
    config = Qwen2Config(**settings)
    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(config).eval()
    runner = runner_for(model, kernel_build)
    assert [layer.window for layer in runner.weights.layers] == [None, WINDOW, WINDOW]
    ids = torch.randint(250, (40,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    runner.reset(64)
    torch.testing.assert_close(runner.logits(runner.prefill(ids[:36])), reference[:36], rtol=1e-4, atol=1e-4)
    tree = DraftTree(ids[36:40].numpy(), np.array([-1, 0, 1, 2]))
    verified = runner.logits(runner.forward(*tree.attention_inputs(36)))
    assert torch.equal(verified, decode_one_by_one(runner, ids, 36, 40))


def reference_attention(q, keys, values, visible, scale, softcap=None):
    """q [n, heads, dim], keys/values [kv, rows, dim], visible [n, rows] → [n, heads * dim], in float64."""
    group = q.shape[1] // keys.shape[0]
    k, v = keys.double().repeat_interleave(group, 0), values.double().repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hrd->hnr", q.double(), k) * scale  # [heads, n, rows]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnr,hrd->nhd", probs, v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("window", [1, 3, 7, 100])
@pytest.mark.parametrize("shape", ["tree", "chain"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_attention_sees_a_key_iff_it_is_closer_than_the_window(window, shape, softcap, kernel_build):
    """The kernel against the definition (transformers' sliding_window_overlay: a key at p is
    visible from q iff q - p < window; so q - window is not), for a tree (positions by depth) and
    a 40-row causal chain (the kernel's causal path), with cache rows before every window set to
    NaN: were one read, the output would be NaN."""
    heads = kernels.Heads(4, 2, 64, 0.125, softcap)
    past = 30
    if shape == "tree":
        parents = [-1, 0, 1, 2, 3, 4, 0, 6, 2, 8, 9]
        depth = [0] * len(parents)
        for i, parent in enumerate(parents[1:], 1):
            depth[i] = depth[parent] + 1
        mask = torch.tensor([[j == i or _ancestor(parents, j, i) for j in range(len(parents))]
                             for i in range(len(parents))])
        positions = past + torch.tensor(depth)
    else:
        mask, positions = torch.ones(40, 40, dtype=torch.bool).tril(), past + torch.arange(40)
    n = mask.shape[0]
    generator = torch.Generator().manual_seed(window)
    qkv = torch.randn(n, (4 + 2 * 2) * 64, generator=generator)
    keys, values = torch.randn(2, 128, 64, generator=generator), torch.randn(2, 128, 64, generator=generator)
    first = max(0, int(positions.min()) - window + 1)
    keys[:, :first], values[:, :first] = float("nan"), float("nan")
    attention = kernel_build.attention(past, mask, heads, positions)
    out = attention(qkv, keys, values, None, window)
    key_positions = torch.cat([torch.arange(past), positions])  # [past + n]
    visible = torch.cat([torch.ones(n, past, dtype=torch.bool), mask], 1)
    visible &= positions[:, None] - key_positions[None, :] < window
    q = qkv.view(n, 8, 64)[:, :4]
    seen_keys, seen_values = (torch.nan_to_num(cache[:, : past + n]) for cache in (keys, values))
    expected = reference_attention(q, seen_keys, seen_values, visible, 0.125, softcap)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def _ancestor(parents: list[int], j: int, i: int) -> bool:
    while parents[i] >= 0:
        i = parents[i]
        if i == j:
            return True
    return False


@pytest.mark.parametrize("family", WINDOWED)
def test_rows_outside_every_window_are_never_read(family, c_kernels):
    """Set the cache rows no windowed layer may see to NaN: decoding gives the same bits."""
    runner = runner_for(tiny_model(family, seed=4), c_kernels)
    ids = torch.randint(250, (41,), generator=torch.Generator().manual_seed(4))
    runner.reset(64)
    runner.prefill(ids[:40])
    one = torch.ones(1, 1, dtype=torch.bool)
    expected = runner.logits(runner.forward(ids[40:], torch.tensor([40]), one))
    windowed = [index for index, layer in enumerate(runner.weights.layers) if layer.window is not None]
    assert windowed
    for index in windowed:
        runner.cache.keys[index, :, : 40 - WINDOW + 1] = float("nan")
        runner.cache.values[index, :, : 40 - WINDOW + 1] = float("nan")
    assert torch.equal(runner.logits(runner.forward(ids[40:], torch.tensor([40]), one)), expected)


def test_the_whole_context_is_served_with_sliding_windows(c_kernels):
    for family in WINDOWED:
        assert runner_for(tiny_model(family), c_kernels).max_positions == 512


def test_gemma_norms_fold_the_one_into_the_weight_exactly():
    """transformers computes x_normed * (1.0 + w.float()); freespec multiplies by a weight made the
    same way once: the same fp32 values, and the same norm within fp32 rounding."""
    model = tiny_model("gemma3_text", seed=5)
    weights = extract(model)
    layer, module = weights.layers[0], model.model.layers[0]
    assert torch.equal(layer.attn_norm.weight, 1.0 + module.input_layernorm.weight.float())
    assert torch.equal(layer.q_norm.weight, 1.0 + module.self_attn.q_norm.weight.float())
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5)) * 3
    ours = F.rms_norm(x, (64,), layer.attn_norm.weight, layer.attn_norm.eps)
    torch.testing.assert_close(ours, module.input_layernorm(x), rtol=1e-6, atol=1e-6)
    assert weights.embed_scale == float(torch.tensor(64**0.5, dtype=torch.float32))


@pytest.mark.parametrize("config, message", [
    (MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64), r"^mixtral is a mixture-of-experts model, not supported yet; supported: "),
    (T5Config(vocab_size=64, d_model=32, num_layers=1, num_heads=2), r"^t5 is an encoder-decoder model; supported: "),
])
def test_models_no_runner_serves_get_one_line(config, message):
    with pytest.raises(UnsupportedModelError, match=message) as error:
        refuse_unsupported(config)
    assert "\n" not in str(error.value) and "(fast path: llama, " in str(error.value)


def test_variants_the_runner_cannot_compute_are_refused_in_one_line(c_kernels):
    shape = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    partial = Phi3Config(**shape, partial_rotary_factor=0.75)
    bidirectional = Gemma3TextConfig(**shape, head_dim=16, use_bidirectional_attention=True)
    for config, message in ((partial, "partial rotary embedding"), (bidirectional, "bidirectional attention")):
        with pytest.raises(UnsupportedModelError, match=message):
            runner_for(AutoModelForCausalLM.from_config(config), c_kernels)


def test_longrope_rows_switch_to_the_long_factors_at_the_original_context(c_kernels):
    """Each row is what transformers computes for a sequence ending there: short factors for
    positions 0..63, long ones from 64 on."""
    model = tiny_model("phi3-longrope")
    runner = runner_for(model, c_kernels)
    cos, sin, rows = runner.rotary[None].rows(torch.arange(100))
    rotary = model.model.rotary_emb
    short = rotary(runner.weights.embed[:1], torch.arange(64)[None])
    long = rotary(runner.weights.embed[:1], torch.arange(65)[None])  # a sequence past 64: long factors
    assert torch.equal(cos[:64], short[0][0]) and torch.equal(sin[:64], short[1][0])
    assert torch.equal(cos[64], long[0][0, 64]) and not torch.equal(cos[63], long[0][0, 63])


@pytest.mark.parametrize("head_dim,kv_heads", [(64, 2), (128, 2), (256, 1)])
def test_every_head_size_gives_a_query_alone_the_bits_of_a_chunk_or_a_tree(head_dim, kv_heads, c_kernels):
    """Head sizes that are multiples of 64 accumulate P·V in registers for several queries at
    once and a wide head's single query takes the plain loop: a 40-row causal chunk (the causal
    path) and a 5-node tree give each query the bits it gets when it is decoded alone."""
    heads = kernels.Heads(4, kv_heads, head_dim, head_dim ** -0.5)
    width = (4 + 2 * kv_heads) * head_dim
    generator = torch.Generator().manual_seed(head_dim)
    past = 25
    keys = torch.randn(kv_heads, 128, head_dim, generator=generator)
    values = torch.randn(kv_heads, 128, head_dim, generator=generator)
    chain = torch.ones(40, 40, dtype=torch.bool).tril()
    parents = [-1, 0, 0, 1, 2]
    tree = torch.tensor([[j == i or _ancestor(parents, j, i) for j in range(5)] for i in range(5)])
    one = torch.ones(1, 1, dtype=torch.bool)
    for mask in (chain, tree):
        n = mask.shape[0]
        qkv = torch.randn(n, width, generator=generator)
        together = c_kernels.attention(past, mask, heads)(qkv, keys, values)
        for i in range(n):  # node i after its ancestors, decoded one at a time into rows past ..
            path = [j for j in range(n) if mask[i, j]]
            cache_keys, cache_values = keys.clone(), values.clone()
            for depth, node in enumerate(path):
                alone = c_kernels.attention(past + depth, one, heads)(qkv[node : node + 1], cache_keys, cache_values)
            assert torch.equal(alone[0], together[i]), f"D={head_dim}, {n} rows: query {i}"
