"""Token chunks to text: what the server streams and what the CLI prints."""

from __future__ import annotations

import random

import pytest

from freespec.engine.textstream import TextStream


def utf8(ids: list[int]) -> str:
    """Byte tokens: a character split over chunks decodes to U+FFFD until its last byte arrives."""
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(ids: list[int], stops: list[str], chunk_sizes) -> tuple[list[str], TextStream]:
    stream, deltas, at = TextStream(utf8, stops), [], 0
    while at < len(ids) and not stream.stopped:
        size = next(chunk_sizes)
        deltas.append(stream.push(ids[at:at + size]))
        at += size
    deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize("seed", range(40))
def test_text_stream_equals_the_whole_decode_under_any_chunking(seed):
    """Chunks of 1-4 tokens (what a speculative step accepts) give the text and the answer's
    token count of one token at a time, which for stop strings that do not overlap is the whole
    text cut at the first one; "stop" and "to" overlap: one token at a time meets "to" first."""
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", " ", "é", "€", "😀", "stop", "s", "\n"]) for _ in range(40))
    ids = list(text.encode())
    stops = rng.choice([[], ["stop"], ["😀", "xyz"], ["€a"], ["stop", "to"]])
    deltas, stream = _stream(ids, stops, iter(lambda: rng.randint(1, 4), None))
    _, alone = _stream(ids, stops, iter(lambda: 1, None))
    assert "".join(deltas) == stream.text == alone.text
    assert stream.answer_tokens == alone.answer_tokens
    assert not any("\ufffd" in delta for delta in deltas)
    hits = [text.index(stop) for stop in stops if stop in text]
    assert stream.stopped == bool(hits)
    if hits and "to" not in stops:
        assert stream.text == text[: min(hits)]
        stop_end = min(text.index(stop) + len(stop) for stop in stops if stop in text)
        assert stream.answer_tokens == len(text[:stop_end].encode())  # through the stop's last byte


def test_overlapping_stop_strings_end_where_one_token_at_a_time_ends():
    ids = list("xstop!".encode())
    deltas, stream = _stream(ids, ["stop", "to"], iter([6]))
    assert (stream.text, stream.answer_tokens) == ("xs", 4)  # "xsto" holds "to" before "stop" is whole
    assert "".join(deltas) == "xs"


DRAFTERS = ["none", "recycling", "lookup", "suffix", "jacobi", "recycling+lookup"]


@pytest.fixture(scope="module")
def model():
    from freespec.api import Model
    from freespec.model.loading import from_transformers
    from tests.helpers import tiny_model, word_tokenizer

    return Model(from_transformers(tiny_model("llama", seed=0, scale=8.0), word_tokenizer(), "llama"))


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_generate_ends_at_a_stop_string_where_plain_decoding_ends(model, drafter):
    """A stop at each word of the answer: every drafter gives plain decoding's text, tokens,
    log-probabilities and token count, though its steps accept several tokens at once."""
    prompt = "w10 w11 w12 w10 w11 w12 w10"
    words = model.generate(prompt, chat=False, max_new_tokens=24, drafter="none").text.split()
    for word in dict.fromkeys(words[1:]):
        plain = model.generate(prompt, chat=False, max_new_tokens=24, drafter="none", stop=[word, "w999"], logprobs=1)
        fast = model.generate(prompt, chat=False, max_new_tokens=24, drafter=drafter, stop=[word, "w999"], logprobs=1)
        assert plain.finish_reason == fast.finish_reason == "stop"
        assert fast.text == plain.text and word not in plain.text
        assert fast.token_ids == plain.token_ids and fast.stats.new_tokens == len(plain.token_ids)
        assert [entry.logprob for entry in fast.logprobs] == [entry.logprob for entry in plain.logprobs]
        assert plain.text + word in model.decode(plain.token_ids)  # its last token completed the stop


def test_generate_refuses_empty_stop_strings_and_takes_one_string(model):
    with pytest.raises(ValueError, match="stop strings must be non-empty strings, got ''"):
        model.generate("w1 w2", chat=False, max_new_tokens=4, stop=["w3", ""])
    answer = model.generate("w1 w2", chat=False, max_new_tokens=8, drafter="none")
    word = answer.text.split()[1]
    assert model.generate("w1 w2", chat=False, max_new_tokens=8, drafter="none", stop=word).text == \
        answer.text[: answer.text.index(word)]


@pytest.mark.parametrize("drafter", ["none", "recycling+lookup"])
def test_text_of_streams_the_answer_generate_gives(model, drafter):
    """Model.text_of: the pieces make generate()'s text, and the generation it read ends where
    generate()'s answer does (tokens, count, finish reason), with and without a stop string."""
    prompt = "w10 w11 w12 w10 w11 w12 w10"
    words = model.generate(prompt, chat=False, max_new_tokens=24, drafter="none").text.split()
    for stop in (None, words[3]):
        expected = model.generate(prompt, chat=False, max_new_tokens=24, drafter="none", stop=stop)
        generation = model.stream(prompt, chat=False, max_new_tokens=24, drafter=drafter)
        pieces = list(model.text_of(generation, stop))
        assert "".join(pieces) == expected.text and all(pieces)
        assert (generation.token_ids, generation.stats.new_tokens, generation.finish_reason) == (
            expected.token_ids, len(expected.token_ids), expected.finish_reason)
