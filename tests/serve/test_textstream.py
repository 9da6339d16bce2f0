"""Token chunks to text: what the server streams and what the CLI prints."""

from __future__ import annotations

import random

import pytest

from freespec.serve.textstream import TextStream


def utf8(ids: list[int]) -> str:
    """Byte tokens: a character split over chunks decodes to U+FFFD until its last byte arrives."""
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("seed", range(20))
def test_text_stream_equals_the_whole_decode_under_any_chunking(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", " ", "é", "€", "😀", "stop", "s", "\n"]) for _ in range(40))
    ids = list(text.encode())
    stops = rng.choice([[], ["stop"], ["😀", "xyz"], ["€a"]])
    stream, deltas, at = TextStream(utf8, stops), [], 0
    while at < len(ids) and not stream.stopped:
        size = rng.randint(1, 4)
        deltas.append(stream.push(ids[at:at + size]))
        at += size
    deltas.append(stream.finish())
    hits = [text.index(stop) for stop in stops if stop in text]
    expected = text[: min(hits)] if hits else text
    assert "".join(deltas) == stream.text == expected
    assert not any("\ufffd" in delta for delta in deltas)
    assert stream.stopped == bool(hits)
