"""The transformers fallback: families without a fast path run through their own forward with tree
masks, and stay lossless; models no runner takes are refused in one line.

The fallback is not batch-invariant, so equality with plain greedy rests on the tiny random
models having no near-ties (their logits are sharpened); a failure is still a bug until shown to
be a near-tie.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    LlamaConfig,
    MambaConfig,
    MixtralConfig,
    MptConfig,
)

import freespec
from freespec import kernels
from freespec.api import Model
from freespec.cli import main
from freespec.drafters import DRAFTERS, datastore
from freespec.engine.tree import DraftTree
from freespec.model.hf_runner import (
    TransformersRunner,
    make_runner,
    torch_device,
)
from freespec.model.loading import from_transformers
from freespec.model.runner import ModelRunner, PrefillCancelled
from freespec.model.weights import UnsupportedModelError, refuse_unsupported
from tests.helpers import (
    FALLBACK_FAMILIES,
    PROMPTS,
    WORDS,
    fallback_model,
    tiny_model,
    word_tokenizer,
)

MAX_NEW = 32


def fallback(family: str, seed: int = 0, **options) -> Model:
    """A Model of ``family`` with the model itself as its draft model (every drafter can run)."""
    hf_model = fallback_model(family, seed=seed, window=options.pop("window", 8))
    draft = from_transformers(copy.deepcopy(hf_model), word_tokenizer(), f"{family}-draft")
    model = Model(from_transformers(hf_model, word_tokenizer(), family), draft_model=draft, **options)
    assert isinstance(model.runner, TransformersRunner), f"{family} has a fast path now: test another family"
    return model


def random_ids(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(len(WORDS), (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A datastore of the fallback models' own greedy replies, so retrieval drafts get accepted."""
    texts = []
    for family in FALLBACK_FAMILIES:
        hf_model = fallback_model(family)
        for prompt in PROMPTS:
            output = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0]
            texts.append(" ".join(WORDS[t] for t in output.tolist()))
    path = tmp_path_factory.mktemp("fallback-store")
    datastore.build(texts, word_tokenizer(), path)
    return path


# -- routing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_families_without_a_fast_path_run_through_transformers(family):
    assert isinstance(make_runner(from_transformers(fallback_model(family), None, family), kernels.select()), TransformersRunner)
    assert isinstance(make_runner(from_transformers(tiny_model("llama"), None, "llama"), kernels.select()), ModelRunner)


# -- the runner against transformers' own forward --------------------------------------------------


@pytest.mark.parametrize("family", [*FALLBACK_FAMILIES, "cohere2", "gemma3_text"])
def test_tree_passes_and_reordering_commits_match_transformers(family):
    model = fallback_model(family, seed=1)
    runner = TransformersRunner(model)
    ids = random_ids(30)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]  # [30, vocab]
    runner.reset(40)
    torch.testing.assert_close(runner.logits(runner.prefill(ids[:20])), reference[:20], rtol=1e-4, atol=1e-4)
    # root ids[20]: a wrong child first, then the true continuation ids[21:24]
    tree = DraftTree(np.array([ids[20], (ids[21] + 1) % len(WORDS), *ids[21:24]]), np.array([-1, 0, 0, 2, 3]))
    logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    torch.testing.assert_close(logits[[0, 2, 3, 4]], reference[20:24], rtol=1e-4, atol=1e-4)
    runner.commit([0, 2, 3, 4])  # not a prefix of the node order: rows move
    assert runner.length == 24 and runner.row_tokens == ids[:24].tolist()
    step = runner.forward(ids[24:30], torch.arange(24, 30), torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(runner.logits(step), reference[24:30], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["cohere2", "gemma3_text"])
@pytest.mark.parametrize("context", [3, 7, 8, 9, 21])
def test_sliding_window_layers_see_only_their_window(family, context):
    """Window 8: contexts shorter than, equal to and longer than it, and a draft chain straddling it
    (its nodes' windows end inside the committed prefix, then inside the chain itself)."""
    model = fallback_model(family, seed=2, window=8)
    runner = TransformersRunner(model)
    ids = random_ids(context + 14, seed=context)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]  # [context + 14, vocab]
    runner.reset(len(ids))
    if context:
        torch.testing.assert_close(runner.logits(runner.prefill(ids[:context])), reference[:context],
                                   rtol=1e-4, atol=1e-4)
    # a wrong branch at the root beside a true chain of 10 nodes (longer than the window)
    chain = ids[context : context + 11]
    tree = DraftTree(np.array([*chain, (chain[1] + 1) % len(WORDS)]), np.array([-1, *range(10), 0]))
    logits = runner.logits(runner.forward(*tree.attention_inputs(runner.length)))
    torch.testing.assert_close(logits[:11], reference[context : context + 11], rtol=1e-4, atol=1e-4)
    runner.commit(list(range(11)))
    rest = ids[context + 11 :]
    step = runner.forward(rest, torch.arange(context + 11, len(ids)), torch.ones(3, 3, dtype=torch.bool).tril())
    torch.testing.assert_close(runner.logits(step), reference[context + 11 :], rtol=1e-4, atol=1e-4)


def test_skipping_passes_leave_layers_out_and_roll_back():
    model = fallback_model("gpt_neox", seed=3)
    runner = TransformersRunner(model)
    ids = random_ids(12)
    runner.reset(16)
    runner.prefill(ids[:8])
    full = runner.logits(runner.forward(ids[8:9], torch.tensor([8]), torch.ones(1, 1, dtype=torch.bool)))
    skipped = runner.logits(runner.forward(ids[8:9], torch.tensor([8]), torch.ones(1, 1, dtype=torch.bool),
                                           skip=frozenset({1})))
    assert not torch.allclose(full, skipped)
    runner.commit([0])
    with pytest.raises(ValueError, match="must be truncated before a full pass"):
        runner.forward(ids[9:10], torch.tensor([9]), torch.ones(1, 1, dtype=torch.bool))
    runner.truncate(8)
    again = runner.logits(runner.forward(ids[8:9], torch.tensor([8]), torch.ones(1, 1, dtype=torch.bool)))
    assert torch.equal(again, full)
    with pytest.raises(ValueError, match=r"cannot skip layers \[5\]"):
        runner.forward(ids[8:9], torch.tensor([8]), torch.ones(1, 1, dtype=torch.bool), skip=frozenset({5}))


def test_forward_refuses_what_the_native_runner_refuses():
    runner = TransformersRunner(fallback_model("opt"))
    runner.reset(4)
    one = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"forward needs tokens \[q\], positions \[q\] and a tree mask"):
        runner.forward(torch.tensor([1, 2]), torch.tensor([0]), one)
    with pytest.raises(ValueError, match="token id 9999 is out of range"):
        runner.forward(torch.tensor([9999]), torch.tensor([0]), one)
    with pytest.raises(ValueError, match="outside the model's context of 512"):
        runner.forward(torch.tensor([1]), torch.tensor([512]), one)
    with pytest.raises(ValueError, match="cache overflow"):
        runner.prefill(torch.tensor([1, 2, 3, 4, 5]))
    with pytest.raises(PrefillCancelled):
        runner.prefill(torch.tensor([1]), should_stop=lambda: True)
    with pytest.raises(ValueError, match="exceed the model's context"):
        runner.reset(513)


def test_prefix_rows_are_not_reused_across_requests():
    model = fallback("opt")
    first = model.generate(prompt_ids=PROMPTS[1], drafter="none", max_new_tokens=8)
    second = model.generate(prompt_ids=PROMPTS[1] + first.token_ids + [5], drafter="none", max_new_tokens=8)
    assert second.stats.cached_tokens == 0


def test_generate_many_runs_one_request_at_a_time_on_transformers_forward():
    """No fork, no batch: generate_many runs each request alone on the model, in order."""
    model = fallback("opt")
    requests = [dict(prompt_ids=prompt, drafter="lookup", max_new_tokens=6) for prompt in PROMPTS]
    expected = [model.generate(**request).token_ids for request in requests]
    assert [result.token_ids for result in model.generate_many(requests, parallel=4)] == expected


# -- lossless through the engine -------------------------------------------------------------------


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_plain_greedy_equals_transformers_generate(family):
    model = fallback(family)
    for prompt in PROMPTS:
        expected = model.hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=MAX_NEW).token_ids == expected


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_every_drafter_equals_plain_greedy(family, store):
    model = fallback(family, datastore=store)
    accepted = 0
    for prompt in PROMPTS:
        plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=MAX_NEW)
        for drafter in [name for name in DRAFTERS if name != "none"] + ["recycling+lookup"]:
            fast = model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=MAX_NEW)
            assert fast.token_ids == plain.token_ids, drafter
            assert fast.finish_reason == plain.finish_reason
            accepted = max(accepted, max(fast.stats.accepted_lengths))
    assert accepted > 1  # some drafts were accepted: acceptance paths ran


@pytest.mark.parametrize("budget", [4, None])
def test_drafts_across_a_sliding_window_equal_plain_greedy(budget):
    model = fallback("cohere2", window=16, budget=budget)
    prompt = PROMPTS[1]  # 52 tokens: past the window from the first step on
    plain = model.generate(prompt_ids=prompt, drafter="none", max_new_tokens=48)
    for drafter in ("recycling", "lookup", "draft-model"):
        assert model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=48).token_ids == plain.token_ids


@pytest.mark.parametrize("drafter", ["none", "recycling", "lookup", "layerskip"])
def test_seeded_sampling_repeats(drafter):
    """A fixed budget: drafts then repeat (the adaptive one follows the clock), and so do layerskip's
    rejection-sampled outputs; point-mass drafts sample the very tokens plain sampling does."""
    def sample(drafter: str) -> list[int]:
        return fallback("phi", budget=4).generate(prompt_ids=PROMPTS[0], drafter=drafter, max_new_tokens=24,
                                                  temperature=0.8, top_p=0.95, seed=7).token_ids

    first = sample(drafter)
    assert sample(drafter) == first and len(first) == 24
    if drafter in ("recycling", "lookup"):
        assert first == sample("none")


# -- refused in one line ---------------------------------------------------------------------------


def tiny(config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("config, reason", [
    (BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64), "bart is an encoder-decoder model"),
    (MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, num_local_experts=4), "mixtral is a mixture-of-experts model"),
    (MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1), "mamba keeps a recurrent state"),
    (LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 architectures=["LlamaForSequenceClassification"]), "the llama checkpoint has no causal-LM head"),
])
def test_models_no_runner_takes_are_refused_in_one_line(config, reason):
    with pytest.raises(UnsupportedModelError) as refused:
        refuse_unsupported(config)
    message = str(refused.value)
    assert message.startswith(reason) and "\n" not in message
    assert "supported: decoder-only causal LMs with a tokenizer (fast path: llama" in message
    if not config.architectures:  # a checkpoint's weights would not load; a random model does
        with pytest.raises(UnsupportedModelError, match=reason):
            make_runner(from_transformers(tiny(config), None, "tiny"), kernels.select())


def test_a_model_whose_forward_does_not_follow_a_tree_is_refused():
    """ALiBi biases attention by cache row, not position: the load-time check catches it, in one line."""
    torch.manual_seed(0)
    mpt = tiny(MptConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, max_seq_len=128))
    with pytest.raises(UnsupportedModelError, match=r"^mpt's transformers forward does not follow a draft tree") \
            as refused:
        make_runner(from_transformers(mpt, None, "mpt"), kernels.select())
    assert "\n" not in str(refused.value)


def test_unknown_and_unavailable_devices_are_refused():
    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="^unknown device 'gpu0'"):
        torch_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device 'cuda' is not available here"):
            freespec.load("no-such-dir", device="cuda")  # before anything loads


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-opt")
    fallback_model("opt").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_cli_generates_with_a_fallback_model_and_says_so_once(opt_dir, capsys):
    prompt = "w1 w2 w3 w4 w5 w6"
    expected = freespec.load(str(opt_dir)).generate(prompt, max_new_tokens=16, drafter="none")
    capsys.readouterr()
    assert main(["generate", prompt, "--model", str(opt_dir), "--max-new-tokens", "16", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert err.count("no fast path for opt: the model runs through transformers' own forward on cpu") == 1
    assert "prefix reuse is off" in err


def test_cli_refuses_unsupported_models_and_devices_in_one_line(tmp_path, opt_dir, capsys):
    encoder_decoder = tmp_path / "bart"
    tiny(BartConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)).save_pretrained(encoder_decoder)
    word_tokenizer().save_pretrained(encoder_decoder)
    no_tokenizer = tmp_path / "no-tokenizer"
    fallback_model("opt").save_pretrained(no_tokenizer)
    capsys.readouterr()
    for argv, reason in (([str(encoder_decoder)], "bart is an encoder-decoder model"),
                         ([str(no_tokenizer)], "cannot load the tokenizer of"),
                         ([str(opt_dir), "--device", "gpu0"], "unknown device 'gpu0'")):
        assert main(["generate", "w1 w2", "--model", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("freespec: error: ") and reason in err and "\n" not in err
