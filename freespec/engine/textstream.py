"""Token chunks → text deltas, cut at stop strings.

A token's text can depend on its neighbours (a leading space dropped at the start of a decode, a
character split over byte tokens), so text is decoded over a short window that starts one chunk
back and only the part past the previous window is new. A delta that ends in an incomplete
character (U+FFFD) waits for the next chunk. Text that might be the start of a stop string is held
back until it is known not to be one, so a streamed answer never shows part of a stop string and
equals the non-streamed answer. The answer ends where decoding one token at a time would have
stopped, whatever the chunks: at the first token whose text completes a stop string (speculation
may accept tokens after it in the same chunk; they are not the answer's).
"""

from __future__ import annotations

from typing import Callable, Sequence


def check_stops(stop: str | Sequence[str] | None) -> list[str]:
    """Stop strings as a list: one string or a sequence of non-empty strings (None: none).

    >>> check_stops("END"), check_stops(["END", "###"]), check_stops(None)
    (['END'], ['END', '###'], [])
    >>> check_stops(["END", ""])
    Traceback (most recent call last):
    ValueError: stop strings must be non-empty strings, got ''
    >>> check_stops(5)
    Traceback (most recent call last):
    ValueError: stop must be a string or a list of strings, got 5
    """
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    for entry in stops:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"stop strings must be non-empty strings, got {entry!r}")
    return stops


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of some stop string.

    >>> held_back("hello wor", ["world"]), held_back("hello", ["world"]), held_back("ab", ["b", "bc"])
    (3, 0, 1)
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Feed token-id chunks with :meth:`push`, end with :meth:`finish`; both return new text.

    After a stop string is seen, ``stopped`` is True and no more text comes out.

    >>> letters = lambda ids: "".join(map(chr, ids))
    >>> stream = TextStream(letters, stops=["END"])
    >>> stream.push([ord(c) for c in "hi E"]), stream.push([ord(c) for c in "Nd E"])
    ('hi ', 'ENd ')
    >>> stream.push([ord(c) for c in "ND, more"]), stream.stopped, stream.text, stream.answer_tokens
    ('', True, 'hi ENd ', 10)
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self.stops = [stop for stop in stops if stop]
        self.token_ids: list[int] = []
        self._window_start = 0  # first token of the decode window
        self._read = 0  # tokens whose text is already in _decoded
        self._decoded = ""  # all text decoded so far
        self.text = ""  # text released to the caller
        self.stopped = False
        self.answer_tokens: int | None = None  # once stopped: the tokens through the one that completed the stop string
        self._clean = 0  # tokens whose text holds no stop string

    def push(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self._clean = self._read
        self.token_ids += token_ids
        before = self._decode(self.token_ids[self._window_start:self._read])
        after = self._decode(self.token_ids[self._window_start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._decoded += after[len(before):]
            self._window_start, self._read = self._read, len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release everything still held (an incomplete last character included)."""
        if self.stopped:
            return ""
        self._clean = self._read
        before = self._decode(self.token_ids[self._window_start:self._read])
        after = self._decode(self.token_ids[self._window_start:])
        self._decoded += after[len(before):]
        self._read = len(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        sent = len(self.text)
        # A stop string cannot start before `sent`: that text was released only once no stop could start there.
        if self._stop_in(self._decoded, sent) is not None:
            end, self.answer_tokens = self._first_stop(sent)
            self.stopped = True
        else:
            end = len(self._decoded) - (0 if final else held_back(self._decoded[sent:], self.stops))
        delta = self._decoded[sent:end]
        self.text += delta
        return delta

    def _stop_in(self, text: str, start: int) -> int | None:
        """Where the earliest stop string in ``text`` from ``start`` on begins (None: none there)."""
        hits = [index for index in (text.find(stop, start) for stop in self.stops) if index >= 0]
        return min(hits) if hits else None

    def _first_stop(self, sent: int) -> tuple[int, int]:
        """(where the answer ends, its tokens) as one token at a time would give them: the first
        token after the clean ones whose text holds a stop string, cut where its earliest stop
        begins (stop strings that overlap, "stop" and "to", end a chunk's text sooner that way)."""
        for count in range(self._clean + 1, len(self.token_ids)):
            end = self._stop_in(self._decode(self.token_ids[:count]), sent)
            if end is not None:
                return end, count
        return self._stop_in(self._decoded, sent), len(self.token_ids)
