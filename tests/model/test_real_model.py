"""The embedded SmolLM2-135M-Instruct: read in place from its GGUF file, the greedy output it gave
before (when it went through an fp32 conversion), and speculative output equal to plain greedy."""

import json
from pathlib import Path

import pytest

import freespec
from freespec.kernels import GGMLWeight, Stacked

pytestmark = pytest.mark.real_model  # the real SmolLM2-135M GGUF: skip with -m 'not real_model'

PROMPTS = [
    "Write a Python function that checks if a number is prime.",
    "Summarize in one sentence: The quick brown fox jumps over the lazy dog because the dog was asleep.",
    "List three uses of copper.",
]


@pytest.fixture(scope="module")
def model():
    return freespec.load()


def test_the_greedy_output_is_what_the_fp32_conversion_gave(model):
    """Recorded with the previous loader (GGUF → transformers fp32 → exact Q4_1/Q8_0 blocks
    recovered): the weights read in place are the same numbers, so every token is the same."""
    recorded = json.loads((Path(__file__).parent / "data" / "smollm2_greedy.json").read_text())
    for kind, outputs in recorded.items():
        for prompt, expected in outputs.items():
            result = model.generate(prompt, drafter="none", max_new_tokens=64, chat=kind == "chat")
            assert result.token_ids == expected, (kind, prompt)


def test_the_weights_are_the_files_blocks(model):
    """Read from the file in its Q4_1/Q8_0 blocks (the AVX2 runner copies them into the packed
    layout; AVX-512 reads them where they lie)."""
    layer = model.loaded.weights.layers[0]
    assert isinstance(layer.qkv.weight, Stacked) and {part.type.name for part in layer.qkv.weight.parts} == {"Q4_1"}
    assert isinstance(model.loaded.weights.embed, GGMLWeight) and model.loaded.weights.embed.type.name == "Q8_0"
    runner = model.runner.weights
    if model.runner.kernels.isa == "avx2":
        assert {part.kind for part in runner.layers[0].qkv.weight.parts} == {"q4"} and runner.embed.kind == "q8"
    elif model.runner.kernels.isa == "avx512":
        assert runner.layers[0].qkv.weight is layer.qkv.weight and runner.embed is model.loaded.weights.embed
    assert runner.lm_head.weight is runner.embed  # tied
    assert model.runner.weight_formats == ["Q4_1", "Q8_0"]


def test_recycling_equals_plain_on_the_real_model(model):
    """With the budget chosen from measured costs (which may switch speculation off on a fast
    machine) and with 8 draft nodes every step, so drafts are surely verified."""
    accepted = []
    for prompt in PROMPTS:
        plain = model.generate(prompt, drafter="none", max_new_tokens=64)
        for budget in (None, 8):
            fast = model.generate(prompt, drafter="recycling", max_new_tokens=64, budget=budget)
            assert fast.token_ids == plain.token_ids, (prompt, budget)
        accepted.append(fast.stats.mean_accepted)
    assert plain.text.strip()
    assert max(accepted) > 1.0


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_fixed_large_tree_equals_plain_on_the_real_model(model, tree):
    model.tree_shape = tree
    model.reset()
    plain = model.generate(PROMPTS[0], drafter="none", max_new_tokens=48)
    fast = model.generate(PROMPTS[0], drafter="recycling", max_new_tokens=48, budget=80)
    assert fast.token_ids == plain.token_ids
    if tree == "static":
        assert set(fast.stats.draft_sizes) == {80}
    else:  # best-first trees stop where recycled probabilities run out
        assert max(fast.stats.draft_sizes) == 80


def test_seeded_sampling_equals_plain_sampling_on_the_real_model(model):
    """Each emitted token consumes one random number either way: a seed fixes the text."""
    options = dict(max_new_tokens=32, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=1)
    plain = model.generate(PROMPTS[2], drafter="none", **options)
    fast = model.generate(PROMPTS[2], drafter="recycling", budget=16, **options)
    assert fast.token_ids == plain.token_ids
    assert plain.token_ids != model.generate(PROMPTS[2], drafter="none", **{**options, "seed": 2}).token_ids


def test_a_second_chat_turn_reuses_the_first_and_changes_no_token(model):
    """The second turn's conversation starts with the first turn's rows: kept, they give the
    tokens a whole fresh prefill gives, plain and speculative alike."""
    chat = [{"role": "user", "content": PROMPTS[2]}]
    first = model.generate(messages=chat, drafter="recycling", max_new_tokens=32)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now three uses of iron."}]
    cold = model.generate(messages=chat, drafter="none", max_new_tokens=32, reuse_prefix=False)
    model.generate(messages=chat[:1], drafter="none", max_new_tokens=32)  # leave the first turn cached again
    for drafter in ("recycling", "none"):
        warm = model.generate(messages=chat, drafter=drafter, max_new_tokens=32)
        assert warm.token_ids == cold.token_ids, drafter
        assert warm.stats.cached_tokens > len(model.encode(messages=chat[:1])) - 1


def test_token_pieces_give_each_tokens_exact_bytes(model):
    """Byte-level BPE: a token may hold part of a character (its text shows U+FFFD), and the
    tokens' bytes, joined, are the text's; the completions form's offsets find each token in it."""
    from freespec.engine.logprobs import TokenLogprob
    from freespec.serve.logprobs import Logprobs, TokenPieces

    pieces = TokenPieces(model.tokenizer)
    text = "Héllo wörld 😀\n  x = café"
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces.piece(token)[1] for token in ids) == text.encode()
    assert any("\ufffd" in pieces.piece(token)[0] for token in ids)  # the emoji is split over tokens
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pieces.piece(end) == ("<|im_end|>", b"<|im_end|>", False)
    logged = pieces.logged([*ids, end], [TokenLogprob(token, -1.0) for token in [*ids, end]])
    offsets = Logprobs(chat=False).shape(logged)["text_offset"]
    assert offsets[-1] == len(text)  # the special token adds no text
    for token, offset in zip(ids, offsets):
        piece = pieces.piece(token)[0]
        if "\ufffd" not in piece:
            assert text[offset:].startswith(piece)


def test_logprobs_are_the_same_bits_for_every_drafter_and_for_scoring(model):
    """The answer's log-probabilities do not depend on the drafter, and scoring prompt + answer
    (its rows prefilled) gives them back bit for bit."""
    ids = model.encode(PROMPTS[2])
    reference = model.generate(prompt_ids=ids, drafter="none", max_new_tokens=24, logprobs=3)
    records = [(entry.token, entry.logprob, entry.top) for entry in reference.logprobs]
    for drafter in ("suffix", "recycling", "lookup"):
        fast = model.generate(prompt_ids=ids, drafter=drafter, max_new_tokens=24, logprobs=3)
        assert [(entry.token, entry.logprob, entry.top) for entry in fast.logprobs] == records, drafter
    scored = model.generate(prompt_ids=ids + reference.token_ids, max_new_tokens=0, prompt_logprobs=3)
    assert [(entry.token, entry.logprob, entry.top) for entry in scored.prompt_logprobs[len(ids):]] == records


def test_stop_strings_end_every_drafter_where_plain_decoding_ends(model):
    """A stop at each of the answer's words (and at a newline): every drafter gives plain decoding's
    text, tokens and token count."""
    ids = model.encode(PROMPTS[0])
    answer = model.generate(prompt_ids=ids, drafter="none", max_new_tokens=64).text
    stops = [*dict.fromkeys(answer.split()[1:9]), "\n"]
    for stop in stops:
        plain = model.generate(prompt_ids=ids, drafter="none", max_new_tokens=64, stop=stop)
        assert plain.finish_reason == "stop" and stop not in plain.text, stop
        for drafter in ("suffix", "lookup", "recycling"):
            fast = model.generate(prompt_ids=ids, drafter=drafter, max_new_tokens=64, stop=stop)
            assert (fast.text, fast.token_ids, fast.stats.new_tokens) == (plain.text, plain.token_ids,
                                                                         len(plain.token_ids)), (stop, drafter)
