"""The forward pass: batch-invariant kernel, agreement with transformers, tree masks, cache commit."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from freespec import kernels
from freespec.engine.tree import DraftTree
from freespec.model import runner as runner_module
from freespec.model.weights import UnsupportedModelError
from tests.helpers import (
    decode_one_by_one,
    make_model,
    runner_for,
    tiny_config,
    tiny_model,
)

TORCH = kernels.select("torch")  # torch's ops: no build


def test_forward_refuses_inputs_whose_lengths_disagree(c_kernels):
    runner = runner_for(tiny_model("llama"), c_kernels)
    runner.reset(16)
    runner.prefill(torch.tensor([1, 2, 3]))
    for tokens, positions, mask in ((torch.tensor([], dtype=torch.long), torch.tensor([3]), torch.ones(1, 1)),
                                    (torch.tensor([4, 5]), torch.tensor([3]), torch.ones(2, 2)),
                                    (torch.tensor([4]), torch.tensor([3]), torch.ones(2, 2))):
        with pytest.raises(ValueError, match=r"forward needs tokens \[q\], positions \[q\] and a tree mask"):
            runner.forward(tokens, positions, mask.bool())


@pytest.mark.parametrize("rope_type", ["dynamic", "linear"])
def test_runner_matches_transformers_with_scaled_rotary_tables(rope_type, c_kernels):
    # dynamic tables are recomputed per pass and handed to the decoder with their own rows
    config = tiny_config("llama")
    config.rope_parameters = {**config.rope_parameters, "rope_type": rope_type, "factor": 2.0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    runner = runner_for(model, c_kernels)
    ids = torch.randint(runner.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids[None]).logits[0]  # [40, vocab]
    runner.reset(48)
    prefill = runner.logits(runner.prefill(ids[:35]))
    step = runner.logits(runner.forward(ids[35:], torch.arange(35, 40), torch.ones(5, 5, dtype=torch.bool).tril()))
    torch.testing.assert_close(torch.cat([prefill, step]), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_forward_takes_any_integer_ids_and_mask_dtype(family, c_kernels):
    # the fused decoder reads raw pointers: other dtypes must be converted, not misread
    runner = runner_for(tiny_model(family, seed=2), c_kernels)
    ids = torch.randint(runner.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    results = []
    for id_type, mask_type in ((torch.int64, torch.bool), (torch.int32, torch.float32)):
        runner.reset(16)
        runner.prefill(ids[:6].to(id_type))
        mask = torch.ones(3, 3).tril().to(mask_type)
        results.append(runner.logits(runner.forward(ids[6:].to(id_type), torch.arange(6, 9).to(id_type), mask)))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
def test_runner_matches_transformers_and_commits_tree_paths(family, c_kernels):
    model = tiny_model(family, seed=1)
    runner = runner_for(model, c_kernels)
    ids = torch.randint(runner.vocab_size, (30,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids[None]).logits[0]  # [30, vocab]
    runner.reset(64)
    prefill = runner.logits(runner.prefill(ids[:20]))
    torch.testing.assert_close(prefill, reference[:20], rtol=1e-4, atol=1e-4)
    # root ids[20] with the true continuation ids[21:24] on one branch and junk on another
    tree = DraftTree(np.array([*ids[20:24].tolist(), 3, 4]), np.array([-1, 0, 1, 2, 0, 4]))
    logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    torch.testing.assert_close(logits[:4], reference[20:24], rtol=1e-4, atol=1e-4)
    runner.commit([0, 1, 2])  # keep ids[20:23], drop the rest
    assert runner.length == 23
    tail = runner.logits(runner.forward(ids[23:30], torch.arange(23, 30), torch.ones(7, 7, dtype=torch.bool).tril()))
    torch.testing.assert_close(tail, reference[23:30], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_tree_logits_equal_one_token_logits_bitwise(family, kernel_build):
    """Verification and plain decoding compute a token's logits identically (the lossless core)."""
    runner = runner_for(tiny_model(family, seed=2), kernel_build)
    ids = torch.randint(runner.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    runner.reset(32)
    runner.prefill(ids[:8])
    tree = DraftTree(np.array([*ids[8:12].tolist(), 7, 9]), np.array([-1, 0, 1, 2, 0, 4]))
    tree_logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    assert torch.equal(tree_logits[:4], decode_one_by_one(runner, ids, 8, 12))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gemma2", "gpt2"])
def test_a_trees_own_pass_gives_the_logits_of_forward_then_logits(family, kernel_build):
    """tree_logits (the one-call decoder from numpy arrays into a reused buffer; Gemma 2's capped
    logits and GPT-2 through forward) gives the bits of logits(forward(...)), their first maxima,
    and the same cache rows: the next step's logits agree too."""
    runner = runner_for(tiny_model(family, seed=4), kernel_build)
    ids = torch.randint(runner.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
    trees = [DraftTree(np.array([*ids[8:12].tolist(), 7, 9]), np.array([-1, 0, 1, 2, 0, 4])),
             DraftTree.root_only(int(ids[8])), DraftTree(np.array([int(ids[8]), 3]), np.array([-1, 0]))]
    for tree in trees * 2:  # again: the one buffer, grown to the most rows, is reused
        passes = []
        for own in (True, False):
            runner.reset(32)
            runner.prefill(ids[:8])
            if own:
                logits = runner.tree_logits(tree.tokens, tree.depths, tree.ancestor_mask)
                tensor, argmax = logits.tensor.clone(), logits.argmax
            else:
                tensor = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
                argmax = torch.argmax(tensor, dim=-1).numpy()
            runner.commit([0])
            root = torch.ones(1, 1, dtype=torch.bool)
            after = runner.logits(runner.forward(torch.tensor([5]), torch.tensor([9]), root))
            passes.append((tensor, argmax, after))
        (own, own_argmax, own_after), (reference, argmax, after) = passes
        assert torch.equal(own, reference) and np.array_equal(own_argmax, argmax) and torch.equal(own_after, after)


def test_a_trees_own_pass_refuses_what_forward_refuses(c_kernels):
    runner = runner_for(tiny_model("llama", seed=10), c_kernels)
    runner.reset(4)  # rounded up to 256 rows
    runner.prefill(torch.tensor([1, 2, 3]))
    mask = np.ones((2, 2), dtype=bool)
    for bad in (256, 10**12, -3):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range: this model's ids are 0..255"):
            runner.tree_logits(np.array([4, bad]), np.array([0, 1]), mask)
    with pytest.raises(ValueError, match=r"positions 3..600 are outside the model's context of 512"):
        runner.tree_logits(np.array([4, 5]), np.array([0, 597]), mask)
    with pytest.raises(ValueError, match="cache overflow: 303 rows needed, capacity 256"):
        runner.tree_logits(np.arange(300) % 100, np.arange(300), np.ones((300, 300), dtype=bool))
    assert runner.length == 3
    expected = runner.tree_logits(np.array([4, 5]), np.array([0, 1]), mask).tensor.clone()
    converted = runner.tree_logits(np.array([4, 5], dtype=np.int32), np.array([0, 1]), mask.astype(np.float32))
    assert torch.equal(converted.tensor, expected)  # other dtypes are converted, not misread


def test_large_tree_is_batch_invariant_too(kernel_build):
    """An 80-node tree (the paper's size) must not switch to a non-invariant kernel."""
    runner = runner_for(tiny_model("llama", seed=3), kernel_build)
    ids = torch.randint(runner.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    runner.reset(128)
    runner.prefill(ids[:8])
    junk = torch.randint(runner.vocab_size, (86,), generator=torch.Generator().manual_seed(3)).tolist()
    # the real chain ids[8:12] first, then 86 junk nodes hanging off the root and off each other
    tree = DraftTree(np.array([*ids[8:12].tolist(), *junk]), np.array([-1, 0, 1, 2, *[max(0, i - 2) for i in range(4, 90)]]))
    tree_logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    assert torch.equal(tree_logits[:4], decode_one_by_one(runner, ids, 8, 12))


def test_unsupported_architecture_is_named(c_kernels):
    from transformers import BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match=r"^bloom has no fast path; supported: .*fast path: llama"):
        runner_for(model, c_kernels)


def test_cache_bounds(c_kernels):
    runner = runner_for(tiny_model("llama"), c_kernels)
    with pytest.raises(ValueError, match="context of 512"):
        runner.reset(513)
    runner.reset(4)  # rounded up to 256 rows
    runner.prefill(torch.arange(4))
    with pytest.raises(ValueError, match="cache overflow: 304 rows needed, capacity 256"):
        runner.forward(torch.arange(300) % 100, torch.arange(4, 304), torch.ones(300, 300, dtype=torch.bool))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fallback_without_kernels_still_decodes_correctly(family):
    """Without a C compiler, torch kernels serve decode and verification (not batch-invariant)."""
    model = tiny_model(family, seed=4)
    runner = runner_for(model, TORCH)
    assert not runner.kernels.batch_invariant and runner._decoder is None
    ids = torch.randint(runner.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    runner.reset(32)
    runner.prefill(ids[:12])
    tree = DraftTree(np.array([*ids[12:20].tolist(), 5]), np.array([-1, 0, 1, 2, 3, 4, 5, 6, 0]))
    logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    torch.testing.assert_close(logits[:8], reference[12:20], rtol=1e-4, atol=1e-4)


def without_layers(model, skip: set[int]):
    """The transformers model with the layers in ``skip`` removed: the reference for skipping passes."""
    import copy

    model = copy.deepcopy(model)
    if model.config.model_type == "gpt2":
        model.transformer.h = torch.nn.ModuleList(b for i, b in enumerate(model.transformer.h) if i not in skip)
        return model
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(model.model.layers) if i not in skip)
    return model


@pytest.mark.parametrize("family, backend", [("llama", "one call"), ("qwen2", "one call"), ("qwen3", "one call"),
                                             ("gpt2", "per op"), ("llama", "per op"), ("llama", "torch")])
def test_skipping_layers_equals_the_model_without_them(family, backend, c_kernels):
    """One-call C decoder (Llama, Qwen2, Qwen3), C kernels one operation at a time (GPT-2, and
    Llama when asked for) and torch's (SDPA)."""
    chosen = {"one call": c_kernels, "per op": kernels.select(c_kernels.isa, one_call_decoder=False), "torch": TORCH}
    model = tiny_model(family, seed=5, layers=4)
    runner = runner_for(model, chosen[backend])
    assert (runner._decoder is not None) == (backend == "one call")
    ids = torch.randint(runner.vocab_size, (10,), generator=torch.Generator().manual_seed(5))
    skip = {1, 2}
    with torch.no_grad():
        reference = without_layers(model, skip)(ids[None], use_cache=False).logits[0]  # [10, vocab]
    runner.reset(32)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    first = runner.logits(runner.forward(ids[:8], torch.arange(8), causal, frozenset(skip)))
    runner.commit(range(8))
    then = runner.logits(runner.forward(ids[8:10], torch.arange(8, 10), causal[:2, :2], frozenset(skip)))
    torch.testing.assert_close(torch.cat([first, then]), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skipping_nothing_is_the_normal_pass_and_truncate_rolls_back(family, c_kernels):
    """A skipping draft advances the cache; after truncate, verification is bit-identical to a
    pass that never saw the draft (its rows, stale in skipped layers, are overwritten)."""
    runner = runner_for(tiny_model(family, seed=6, layers=3), c_kernels)
    ids = torch.randint(runner.vocab_size, (12,), generator=torch.Generator().manual_seed(6))
    one = torch.ones(1, 1, dtype=torch.bool)
    runner.reset(32)
    runner.prefill(ids[:8])
    tree = DraftTree(ids[8:12].numpy(), np.array([-1, 0, 1, 2]))
    expected = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    assert torch.equal(runner.logits(runner.forward(*tree.attention_inputs(runner.length), frozenset())), expected)
    for position in range(8, 11):  # draft three tokens, committing them, with layer 1 skipped
        runner.forward(ids[position : position + 1] + 1, torch.tensor([position]), one, frozenset({1}))
        runner.commit([0])
    runner.truncate(8)
    assert torch.equal(runner.logits(runner.forward(*tree.attention_inputs(runner.length))), expected)
    with pytest.raises(ValueError, match="cannot truncate the cache to 9 rows: it holds 8"):
        runner.truncate(9)
    with pytest.raises(ValueError, match=r"cannot skip layers \[3\]: the model has layers 0..2"):
        runner.forward(ids[:1], torch.tensor([8]), one, frozenset({3}))


def test_reserve_grows_the_cache_and_keeps_its_rows(c_kernels):
    runner = runner_for(tiny_model("llama", seed=7), c_kernels)
    ids = torch.randint(runner.vocab_size, (9,), generator=torch.Generator().manual_seed(7))
    one = torch.ones(1, 1, dtype=torch.bool)
    runner.reset(8)
    runner.prefill(ids[:8])
    expected = runner.logits(runner.forward(ids[8:9], torch.tensor([8]), one))
    runner.reserve(300)
    assert runner.capacity >= 300 and runner.length == 8
    assert torch.equal(runner.logits(runner.forward(ids[8:9], torch.tensor([8]), one)), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunk,scratch", [(7, runner_module.PREFILL_SCRATCH), (512, 600)])
def test_prefill_rows_do_not_depend_on_chunks_or_on_decoding(family, chunk, scratch, kernel_build, monkeypatch):
    """A prompt's cache rows and hidden states are the same bits prefilled at once, in chunks
    (cut by PREFILL_CHUNK or by the attention scratch bound), or decoded one token at a time:
    what a reused prefix relies on."""
    runner = runner_for(tiny_model(family, seed=8), kernel_build)
    ids = torch.randint(runner.vocab_size, (40,), generator=torch.Generator().manual_seed(8))
    runner.reset(64)
    whole = runner.prefill(ids)
    keys, values = runner.cache.keys[:, :, :40].clone(), runner.cache.values[:, :, :40].clone()
    monkeypatch.setattr(runner_module, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(runner_module, "PREFILL_SCRATCH", scratch)
    runner.reset(64)
    assert torch.equal(runner.prefill(ids), whole)
    assert torch.equal(runner.cache.keys[:, :, :40], keys) and torch.equal(runner.cache.values[:, :, :40], values)
    runner.reset(64)
    runner.prefill(ids[:25])
    assert torch.equal(decode_one_by_one(runner, ids, 25, 40), runner.logits(whole[25:]))
    assert torch.equal(runner.cache.keys[:, :, :40], keys) and torch.equal(runner.cache.values[:, :, :40], values)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_causal_prefill_chunks_after_cached_rows_equal_decoding(kv_heads, kernel_build, monkeypatch):
    """Chunks of 32+ rows take the attention kernel's causal path (the chunk joins the shared
    prefix), here after cached rows and with 64-wide heads (the register P·V); the rows must be
    the bits that decoding one token at a time writes."""
    config = tiny_config("llama")
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 256, 4, kv_heads
    torch.manual_seed(3)
    runner = runner_for(AutoModelForCausalLM.from_config(config).eval(), kernel_build)
    ids = torch.randint(runner.vocab_size, (100,), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(runner_module, "PREFILL_CHUNK", 40)  # chunks 40 (causal), 40 (causal, past 40), 20
    runner.reset(128)
    chunked = runner.prefill(ids[:100])
    keys, values = runner.cache.keys[:, :, :100].clone(), runner.cache.values[:, :, :100].clone()
    runner.reset(128)
    runner.prefill(ids[:10])
    assert torch.equal(decode_one_by_one(runner, ids, 10, 100), runner.logits(chunked[10:]))
    assert torch.equal(runner.cache.keys[:, :, :100], keys) and torch.equal(runner.cache.values[:, :, :100], values)


def test_reuse_keeps_the_shared_prefix_and_never_rows_of_skipping_passes(c_kernels):
    runner = runner_for(tiny_model("llama", seed=9, layers=3), c_kernels)
    ids = list(range(5, 25))
    one = torch.ones(1, 1, dtype=torch.bool)
    runner.reset(16)
    runner.prefill(torch.tensor(ids[:12]))
    assert runner.reuse([*ids[:8], 99, 98], 300) == 8
    assert runner.length == 8 and runner.capacity >= 300
    assert runner.reuse(ids[:5], 300) == 5
    runner.prefill(torch.tensor(ids[5:10]))
    runner.forward(torch.tensor(ids[10:11]), torch.tensor([10]), one, frozenset({1}))  # a skipping draft
    runner.commit([0])
    assert runner.reuse(ids, 300) == 10
    tree = DraftTree(np.array(ids[10:13]), np.array([-1, 0, 1]))  # a verified path commits reusable rows
    runner.forward(*tree.attention_inputs(runner.length))
    runner.commit([0, 2])
    assert runner.reuse([*ids[:10], ids[10], ids[12]], 300) == 12 and runner.reuse(ids, 300) == 11
    runner.reset(16)
    assert runner.reuse(ids, 16) == 0
    on_torch = runner_for(tiny_model("llama", seed=9, layers=3), TORCH)  # not batch-invariant: keep nothing
    on_torch.reset(16)
    on_torch.prefill(torch.tensor(ids[:4]))
    assert on_torch.reuse(ids, 16) == 0


@pytest.mark.parametrize("family, backend", [("llama", "one call"), ("llama", "per op"), ("gpt2", "per op"),
                                             ("llama", "torch")])
def test_token_ids_and_positions_outside_the_tables_are_refused(family, backend, c_kernels):
    """An id past the embedding was read as the memory after it in C (id 49200 of 49152 gave a
    normal-looking answer, 10**12 a segfault), a negative one as memory before it (torch wrapped
    it around): the runner refuses them, and positions outside the context, before any work."""
    chosen = {"one call": c_kernels, "per op": kernels.select(c_kernels.isa, one_call_decoder=False), "torch": TORCH}
    runner = runner_for(tiny_model(family, seed=10), chosen[backend])
    assert runner.vocab_rows == 256
    runner.reset(16)
    runner.prefill(torch.tensor([1, 2, 3]))
    chain = torch.ones(2, 2, dtype=torch.bool).tril()
    expected = runner.logits(runner.forward(torch.tensor([4, 5]), torch.tensor([3, 4]), chain))
    for bad in (256, 10**12, -3):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range: this model's ids are 0..255"):
            runner.forward(torch.tensor([4, bad]), torch.tensor([3, 4]), chain)
        with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
            runner.prefill(torch.tensor([4, bad]))
    for bad in (-1, 512):
        with pytest.raises(ValueError, match=f"positions {bad}..{bad} are outside the model's context of 512"):
            runner.forward(torch.tensor([4]), torch.tensor([bad]), chain[:1, :1])
    assert runner.length == 3
    assert torch.equal(runner.logits(runner.forward(torch.tensor([4, 5]), torch.tensor([3, 4]), chain)), expected)


def test_generate_takes_token_ids_as_a_list_an_array_or_a_tensor_and_refuses_what_is_not_ids():
    """Floats were truncated (1.5 → 1), arrays and tensors failed with "truth value ... is
    ambiguous", a str became "invalid literal for int()", and prompt with prompt_ids ran the ids."""
    model = make_model("llama", seed=0)
    expected = model.generate(prompt_ids=[1, 2, 3], drafter="none", max_new_tokens=4).token_ids
    for ids in ((1, 2, 3), np.array([1, 2, 3], dtype=np.int32), torch.tensor([[1, 2, 3]])):
        assert model.generate(prompt_ids=ids, drafter="none", max_new_tokens=4).token_ids == expected
    refused = [([1.5, 2], "prompt_ids must be integer token ids, got 1.5"),
               ([1, True], "prompt_ids must be integer token ids, got True"),
               ("w1 w2", "prompt_ids must be a list of integer token ids, got str"),
               (torch.tensor([1.0, 2.0]),
                r"one row of integer token ids, got an array of shape \(2,\) and type torch.float32"),
               (np.ones((2, 3), dtype=np.int64), r"one row of integer token ids, got an array of shape \(2, 3\)")]
    for ids, message in refused:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt_ids=ids, max_new_tokens=4)
    for count in (2.5, "5", True, 0):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a positive integer, got {count!r}"):
            model.generate(prompt_ids=[1, 2], max_new_tokens=count)
    with pytest.raises(ValueError, match="give one of prompt, messages or prompt_ids"):
        model.generate("w1", prompt_ids=[1, 2], max_new_tokens=4)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams, got dict"):
        model.generate(prompt_ids=[1, 2], max_new_tokens=4, sampling={"temperature": 0.5})
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'; the sampling options are tem"):
        model.generate(prompt_ids=[1, 2], max_new_tokens=4, temprature=0.5)


def test_generate_names_a_prompt_id_outside_the_vocabulary():
    model = make_model("llama", seed=0)
    for drafter in ("none", "recycling"):
        with pytest.raises(ValueError, match="token id 1000000000000 is out of range: this model's ids are 0..255"):
            model.generate(prompt_ids=[1, 2, 3, 10**12, 5], drafter=drafter, max_new_tokens=4)
    assert len(model.generate(prompt_ids=[1, 2, 3], drafter="none", max_new_tokens=4).token_ids) == 4
