"""REST's datastore: a tokenised corpus with a suffix array, on disk, queried memory-mapped.

``freespec datastore build CORPUS -o DIR`` writes three files:

- ``tokens.npy``: int32 [n], every document's token ids followed by ``SEPARATOR`` (-1);
- ``suffixes.npy``: int64 [n], start positions of all suffixes in lexicographic order
  (``SEPARATOR`` sorts below every token, so no match runs from one document into the next);
- ``meta.json``: the tokenizer's fingerprint and vocabulary size, document and token counts.

Queries open both arrays with ``np.load(mmap_mode="r")``: a lookup touches O(log n) pages, so a
datastore larger than memory costs only what is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

SEPARATOR = -1
FORMAT = 1


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``tokens`` in lexicographic order (prefix doubling).

    O(n log² n) numpy sorts; a shorter suffix sorts before the longer ones it begins.

    >>> suffix_array(np.array([2, 1, 2, 1])).tolist()  # 1 < 1 2 1 < 2 1 < 2 1 2 1
    [3, 1, 2, 0]
    """
    n = len(tokens)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64).reshape(-1)
    order = np.argsort(rank, kind="stable")
    width = 1
    while n > 1:
        second = np.full(n, -1, dtype=np.int64)  # rank of the suffix ``width`` further; -1: past the end
        second[: n - width] = rank[width:]
        order = np.lexsort((second, rank))
        first_sorted, second_sorted = rank[order], second[order]
        new_group = (first_sorted[1:] != first_sorted[:-1]) | (second_sorted[1:] != second_sorted[:-1])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate(([0], np.cumsum(new_group)))
        if rank[order[-1]] == n - 1 or width >= n:
            break
        width *= 2
    return order.astype(np.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: a datastore only fits the tokenizer it was built with."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest()[:16]


def read_documents(path: Path) -> Iterator[str]:
    """A ``.jsonl`` file's records, or a text file's paragraphs (split on blank lines).

    A JSONL line is a string, or an object whose ``text`` field is taken, else every string
    inside it (recursively: ``turns``, ``messages[].content``, ``prompt`` + ``response`` ...).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield paragraph
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            record = record["text"]
        strings = list(_strings(record))
        if not strings:
            raise ValueError(f"{path} line {number}: no text in this record")
        yield from strings


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def build(documents: Iterable[str], tokenizer, out: Path, batch: int = 256) -> dict:
    """Tokenise ``documents``, sort their suffixes and write the datastore to ``out``."""
    pieces, count = [], 0
    chunk: list[str] = []

    def flush():
        if not chunk:  # the tokenizer fails on an empty batch (an empty corpus)
            return
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            pieces.append(np.array([*ids, SEPARATOR], dtype=np.int32))
        chunk.clear()

    for document in documents:
        chunk.append(document)
        count += 1
        if len(chunk) == batch:
            flush()
    flush()
    if not count:
        raise ValueError("the corpus holds no text")
    tokens = np.concatenate(pieces)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "suffixes.npy", suffix_array(tokens))
    meta = {"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "documents": count, "tokens": int(len(tokens) - count)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _check_ids(path: Path, values: np.ndarray, low: int, high: int, what: str) -> None:
    """ValueError naming ``path`` unless ``values`` is a 1-D integer array within [low, high)."""
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array, got {values.dtype} {list(values.shape)}; "
                         "the datastore is damaged, build it again")
    smallest, largest = (int(values.min()), int(values.max())) if len(values) else (low, low)
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise ValueError(f"{path}: {what} must lie in [{low}, {high}), found {bad}; the datastore is damaged or "
                         "was built for another model, build it again")


def _first_not_below(tokens: np.ndarray, suffixes: np.ndarray, query: np.ndarray, upper: bool) -> int:
    """First suffix index whose first len(query) tokens are >= query (> query when ``upper``)."""
    low, high = 0, len(suffixes)
    m = len(query)
    while low < high:
        middle = (low + high) // 2
        start = int(suffixes[middle])
        window = np.asarray(tokens[start : start + m])
        differ = np.flatnonzero(window != query[: len(window)])
        if len(differ):
            below = window[differ[0]] < query[differ[0]]
        else:  # a prefix of the query (shorter: below) or equal to it (below only for the upper bound)
            below = len(window) < m or upper
        if below:
            low = middle + 1
        else:
            high = middle
    return low


def find(tokens: np.ndarray, suffixes: np.ndarray, query) -> tuple[int, int]:
    """[low, high): the suffix indices whose suffixes begin with ``query``.

    >>> tokens = np.array([5, 6, 5, 7, -1])
    >>> suffixes = suffix_array(tokens)
    >>> low, high = find(tokens, suffixes, [5])
    >>> sorted(suffixes[low:high].tolist()), find(tokens, suffixes, [6, 5, 7]), find(tokens, suffixes, [7, 5])
    ([0, 2], (3, 4), (5, 5))
    """
    query = np.asarray(query, dtype=np.int64)
    return (_first_not_below(tokens, suffixes, query, False), _first_not_below(tokens, suffixes, query, True))


def longest_match(tokens: np.ndarray, suffixes: np.ndarray, context: np.ndarray,
                  max_length: int) -> tuple[int, int, int]:
    """(length, low, high) for the longest suffix of ``context`` (≤ ``max_length``) in ``tokens``.

    Any shorter suffix of a matching one matches too, so the length is found by bisection.

    >>> tokens = np.array([1, 2, 3, 4, -1, 2, 3, 5, -1])
    >>> longest_match(tokens, suffix_array(tokens), np.array([9, 1, 2, 3]), max_length=8)[0]
    3
    """
    best = (0, 0, 0)
    low, high = 1, min(max_length, len(context))
    while low <= high:
        length = (low + high) // 2
        first, last = find(tokens, suffixes, context[-length:])
        if first < last:
            best = (length, first, last)
            low = length + 1
        else:
            high = length - 1
    return best


class Datastore:
    """A built datastore, memory-mapped: find continuations of a token sequence.

    Its contents are checked when it is opened, since its ids are drafted straight into the model:
    token ids in [0, ``vocab_size``) (default: the vocabulary it was built for) or ``SEPARATOR``,
    suffixes in [0, n). That reads both arrays once (about a second per GB).
    """

    def __init__(self, path: str | Path, tokenizer=None, vocab_size: int | None = None):
        path = Path(path)
        try:
            self.meta = json.loads((path / "meta.json").read_text())
            self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
            self.suffixes = np.load(path / "suffixes.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a freespec datastore ({error}); build one with "
                             f"`freespec datastore build CORPUS -o {path}`") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown or damaged datastore; build it again")
        if tokenizer is not None and self.meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{path} was built with another tokenizer; build it with this model's")
        if vocab_size is None:
            vocab_size = self.meta.get("vocab_size")
            if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
                raise ValueError(f"{path / 'meta.json'}: no valid vocab_size; the datastore is damaged, build it again")
        _check_ids(path / "tokens.npy", self.tokens, SEPARATOR, vocab_size, "token ids")
        _check_ids(path / "suffixes.npy", self.suffixes, 0, len(self.tokens), "suffix positions")
        if len(self.suffixes) != len(self.tokens):
            raise ValueError(f"{path / 'suffixes.npy'}: {len(self.suffixes)} suffixes for {len(self.tokens)} tokens; "
                             "the datastore is damaged, build it again")

    def longest_match(self, context: np.ndarray, max_length: int) -> tuple[int, int, int]:
        return longest_match(self.tokens, self.suffixes, context, max_length)

    def continuations(self, low: int, high: int, offset: int, depth: int, limit: int) -> list[list[int]]:
        """Up to ``limit`` continuations (``depth`` tokens, cut at a document's end) of the suffixes
        ``low..high`` after their first ``offset`` tokens, sampled evenly across the range."""
        count = high - low
        picks = range(low, high) if count <= limit else (low + (i * count) // limit for i in range(limit))
        out = []
        for index in picks:
            start = int(self.suffixes[index]) + offset
            window = np.asarray(self.tokens[start : start + depth]).tolist()
            if SEPARATOR in window:
                window = window[: window.index(SEPARATOR)]
            if window:
                out.append(window)
        return out
