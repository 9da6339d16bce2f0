"""The model's log-probabilities of the tokens a request emits, and of the likeliest alternatives.

They are the model's own: the log-softmax of its logits at the position that chose each token,
before temperature, penalties and top-k/top-p/min-p (vLLM's default, "raw" log-probabilities), so
they are the same whatever the sampling options. Each is computed from one row of logits in
float64, a row at a time, and the kernels give a row the same bits whatever else is in its pass:
a token's log-probabilities are the same bits whether it was decoded alone, accepted from a
draft tree or batched beside other requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # the most alternatives a token reports (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token: its log-probability and the ``top`` likeliest tokens at its position
    (id, log-probability), likeliest first, the lower id first among equals."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def row_logprobs(logits: np.ndarray) -> np.ndarray:
    """[vocab] logits → [vocab] float64 log-probabilities (log-softmax).

    >>> np.exp(row_logprobs(np.array([0.0, np.log(3.0)], np.float32))).round(6).tolist()
    [0.25, 0.75]
    """
    values = logits.astype(np.float64)
    largest = values.max()
    return values - (largest + np.log(np.exp(values - largest).sum()))


def token_logprobs(logits: np.ndarray, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The log-probability of ``tokens[i]`` under row i of ``logits`` [len(tokens), vocab], with the
    ``top`` likeliest tokens of that row (0: none).

    >>> rows = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]], np.float32))
    >>> [(entry.token, round(entry.logprob, 4), [t for t, _ in entry.top]) for entry in token_logprobs(rows, [2, 2], 2)]
    [(2, -1.3863, [0, 1]), (2, -0.3567, [2, 1])]
    """
    entries = []
    for row, token in zip(logits, tokens):
        values = row_logprobs(np.asarray(row))
        best: tuple[tuple[int, float], ...] = ()
        if top:
            count = min(top, len(values))
            threshold = np.partition(values, len(values) - count)[len(values) - count]
            ids = np.flatnonzero(values >= threshold)  # every tie with the count-th, so ties resolve by id
            ids = ids[np.lexsort((ids, -values[ids]))][:count]
            best = tuple((int(i), float(values[i])) for i in ids)
        entries.append(TokenLogprob(int(token), float(values[token]), best))
    return entries


def check_top(top: object) -> int | None:
    """``top`` as the number of alternatives to report per token (None: no log-probabilities);
    ValueError unless it is None or an integer in [0, MAX_TOP]."""
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 0 <= top <= MAX_TOP:
        raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP}] (alternatives per token), "
                         f"got {top!r}")
    return int(top)
