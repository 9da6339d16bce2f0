"""Log-probabilities in the API's shapes: each token's text and bytes, then the chat form
(``choices[].logprobs.content``) or the legacy completions form (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``).

The generation thread turns the engine's :class:`~freespec.engine.logprobs.TokenLogprob` records
into :class:`LoggedToken` (token ids resolved to text with the tokenizer it owns); :class:`Logprobs`
shapes them per request, whole or a streamed chunk at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from freespec.engine.logprobs import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    """Each token id's text and exact UTF-8 bytes (a token may hold part of a character: its text
    then shows U+FFFD, its bytes the part), read from the tokenizer's vocabulary for byte-level BPE
    (GPT-2, Llama 3, SmolLM2, Qwen) and SentencePiece byte-fallback (Llama 2, Gemma) tokenizers, and
    from decoding the token alone otherwise."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        state = str(getattr(getattr(backend, "decoder", None), "__getstate__", lambda: b"")())
        self._scheme = ("byte-level" if decoder == "ByteLevel" else
                        "byte-fallback" if "ByteFallback" in state else "text")
        self._alphabet = _byte_level_alphabet()
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self.piece = lru_cache(maxsize=1 << 16)(self._piece)

    def _piece(self, token: int) -> tuple[str, bytes, bool]:
        """(text, bytes, whether its text is part of the answer's: special tokens are skipped there)."""
        raw = self._tokenizer.convert_ids_to_tokens(token)
        data = None
        if token not in self._special and isinstance(raw, str):
            if self._scheme == "byte-level" and all(char in self._alphabet for char in raw):
                data = bytes(self._alphabet[char] for char in raw)
            elif self._scheme == "byte-fallback":
                byte = _BYTE_TOKEN.fullmatch(raw)
                data = bytes([int(byte.group(1), 16)]) if byte else raw.replace("\u2581", " ").encode("utf-8")
        if data is None:
            data = (raw if isinstance(raw, str) and token in self._special else
                    self._tokenizer.decode([token])).encode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace"), data, token not in self._special

    def logged(self, tokens: list[int], records: list[TokenLogprob | None]) -> list[LoggedToken]:
        """``tokens`` with their records (None: a prompt's first token, which nothing predicts)."""
        out = []
        for token, record in zip(tokens, records):
            text, data, in_text = self.piece(token)
            if record is None:
                out.append(LoggedToken(text, data, None, in_text, None))
                continue
            top = tuple((*self.piece(alternative)[:2], logprob) for alternative, logprob in record.top)
            out.append(LoggedToken(text, data, record.logprob, in_text, top))
        return out


@dataclass(frozen=True)
class LoggedToken:
    """One generated token as the API reports it."""

    text: str
    data: bytes  # its UTF-8 bytes (part of a character, for some tokens)
    logprob: float | None  # None: a prompt's first token (echoed), which nothing predicts
    in_text: bool  # False for a special token, whose text the answer leaves out
    top: tuple[tuple[str, bytes, float], ...] | None  # the likeliest tokens there: text, bytes, log-probability


class Logprobs:
    """One request's log-probabilities in its endpoint's shape; :meth:`shape` takes the tokens
    in order, a whole answer's or a streamed chunk's (text offsets run on across chunks)."""

    def __init__(self, chat: bool):
        self.chat = chat
        self._text = b""  # the answer's bytes so far, for the completions form's text offsets

    def shape(self, tokens: list[LoggedToken]) -> dict:
        if self.chat:
            return {"content": [{"token": token.text, "logprob": token.logprob, "bytes": list(token.data),
                                 "top_logprobs": [{"token": text, "logprob": logprob, "bytes": list(data)}
                                                  for text, data, logprob in token.top]}
                                for token in tokens], "refusal": None}
        offsets = []
        for token in tokens:
            offsets.append(len(self._text.decode("utf-8", errors="ignore")))
            if token.in_text:
                self._text += token.data
        return {"tokens": [token.text for token in tokens],
                "token_logprobs": [token.logprob for token in tokens],
                "top_logprobs": [None if token.top is None else _first_per_text(token.top) for token in tokens],
                "text_offset": offsets}


def _first_per_text(top: tuple[tuple[str, bytes, float], ...]) -> dict[str, float]:
    """The completions form's {text: log-probability}, likeliest first; two tokens of the same text
    keep the likelier one's."""
    out: dict[str, float] = {}
    for text, _, logprob in top:
        out.setdefault(text, logprob)
    return out
