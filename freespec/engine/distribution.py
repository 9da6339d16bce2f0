"""The distribution a token is drawn from at one node of a draft tree, and the draw.

Speculative sampling is lossless only if every node's distribution is exactly the one plain
sampling would use after the same tokens. So each node's logits are processed with that node's
own prefix (prompt + generated + its ancestors in the tree, itself included), in the order
transformers' ``generate`` applies its processors: repetition penalty, then temperature, top-k,
top-p, min-p; OpenAI's logit bias comes first, its frequency and presence penalties, which
transformers lacks, right after the repetition penalty, as vLLM applies them, and count the
answer's tokens only. Every
function works on a row at a time or a batch of rows, elementwise or per row, so a node's result
does not depend on which other nodes are verified with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from freespec.engine.sampling import SamplingParams
from freespec.engine.tree import DraftTree


def _penalize(logits: torch.Tensor, penalty: float) -> torch.Tensor:
    # negative logits are multiplied, positive divided: both make the token less likely
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def repetition_penalty(logits: torch.Tensor, prefix: np.ndarray, penalty: float) -> torch.Tensor:
    """[vocab] logits after ``prefix`` (token ids) with every token seen in it penalised once.

    >>> repetition_penalty(torch.tensor([2.0, -1.0, 4.0]), np.array([1, 2, 2]), 2.0).tolist()
    [2.0, -2.0, 2.0]
    """
    if penalty == 1.0:
        return logits
    seen = torch.from_numpy(np.unique(prefix))
    out = logits.clone()
    out[seen] = _penalize(logits[seen], penalty)
    return out


def tree_repetition_penalty(logits: torch.Tensor, context: np.ndarray, tree: DraftTree,
                            penalty: float) -> torch.Tensor:
    """[n, vocab] logits of every node with the penalty for that node's own prefix.

    ``context`` is the prompt and the tokens generated so far; it ends with the root's token.
    Node i's prefix adds its ancestors below the root and itself, so the same token may be
    penalised at one node and not at its sibling.

    >>> tree = DraftTree(np.array([0, 1, 2]), np.array([-1, 0, 0]))  # root 0 with children 1 and 2
    >>> tree_repetition_penalty(torch.full((3, 3), 3.0), np.array([0]), tree, 3.0).tolist()
    [[1.0, 3.0, 3.0], [1.0, 1.0, 3.0], [1.0, 3.0, 1.0]]
    """
    if penalty == 1.0:
        return logits
    out = logits.clone()
    seen = torch.from_numpy(np.unique(context))
    out[:, seen] = _penalize(logits[:, seen], penalty)
    rows, ancestors = np.nonzero(tree.ancestor_mask)  # node i, each of its ancestors (itself included)
    rows, columns = torch.from_numpy(rows), torch.from_numpy(tree.tokens[ancestors])
    out[rows, columns] = _penalize(logits[rows, columns], penalty)  # from the raw logits: once per token
    return out


def biased(logits: torch.Tensor, logit_bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """[..., vocab] logits plus OpenAI's ``logit_bias`` ((token id, bias) pairs), in float32.

    >>> biased(torch.zeros(1, 3), ((2, -100.0),)).tolist()
    [[0.0, 0.0, -100.0]]
    """
    if not logit_bias:
        return logits
    tokens = torch.tensor([token for token, _ in logit_bias])
    out = logits.clone()
    out[..., tokens] = logits[..., tokens] + torch.tensor([bias for _, bias in logit_bias], dtype=logits.dtype)
    return out


def _answer_penalties(counts: np.ndarray, frequency: float, presence: float) -> torch.Tensor:
    """[k] what tokens seen ``counts`` [k] (>= 1) times in the answer lose: count x frequency +
    presence, in float32, the same operations wherever a count is penalised (so a node's logits
    in a tree get the bits plain decoding gives them)."""
    amounts = counts.astype(np.float32) * np.float32(frequency) + np.float32(presence)
    return torch.from_numpy(amounts)


def answer_penalties(logits: torch.Tensor, answer: np.ndarray, frequency: float, presence: float) -> torch.Tensor:
    """[vocab] logits less OpenAI's penalties for the tokens of ``answer`` (the generated ones).

    >>> answer_penalties(torch.tensor([2.0, 1.0, 0.5]), np.array([2, 2, 0]), 0.5, 0.25).tolist()
    [1.25, 1.0, -0.75]
    """
    if frequency == 0.0 and presence == 0.0 or not len(answer):
        return logits
    tokens, counts = np.unique(answer, return_counts=True)
    out = logits.clone()
    out[torch.from_numpy(tokens)] = logits[torch.from_numpy(tokens)] - _answer_penalties(counts, frequency, presence)
    return out


def tree_answer_penalties(logits: torch.Tensor, answer: np.ndarray, tree: DraftTree, frequency: float,
                          presence: float) -> torch.Tensor:
    """[n, vocab] every node's logits less OpenAI's penalties for the answer before it: ``answer``
    (generated so far, ending with the root's token once there is one) and the node's ancestors
    below the root, itself included.

    >>> tree = DraftTree(np.array([0, 1, 1]), np.array([-1, 0, 1]))  # root 0, then 1, then 1 again
    >>> tree_answer_penalties(torch.zeros(3, 2), np.array([1]), tree, 1.0, 0.0).tolist()
    [[0.0, -1.0], [0.0, -2.0], [0.0, -3.0]]
    """
    if frequency == 0.0 and presence == 0.0:
        return logits
    out = logits.clone()
    tokens, counts = np.unique(answer, return_counts=True)
    if len(tokens):
        columns = torch.from_numpy(tokens)
        out[:, columns] = logits[:, columns] - _answer_penalties(counts, frequency, presence)
    seen = dict(zip(tokens.tolist(), counts.tolist()))
    for node in range(1, len(tree)):
        path = tree.tokens[np.flatnonzero(tree.ancestor_mask[node])[1:]]  # below the root, itself included
        extra, more = np.unique(path, return_counts=True)
        total = np.array([seen.get(token, 0) for token in extra.tolist()]) + more
        columns = torch.from_numpy(extra)
        out[node, columns] = logits[node, columns] - _answer_penalties(total, frequency, presence)
    return out


def penalties(logits: torch.Tensor, context: np.ndarray, answer_start: int, params: SamplingParams) -> torch.Tensor:
    """[vocab] the logits after ``context`` with the logit bias, then the penalties, in
    :func:`tree_penalties`' order: the repetition penalty (the whole context), then the frequency
    and presence penalties (the answer: ``context[answer_start:]``)."""
    logits = repetition_penalty(biased(logits, params.logit_bias), context, params.repetition_penalty)
    return answer_penalties(logits, context[answer_start:], params.frequency_penalty, params.presence_penalty)


def tree_penalties(logits: torch.Tensor, context: np.ndarray, answer_start: int, tree: DraftTree,
                   params: SamplingParams) -> torch.Tensor:
    """[n, vocab] every node's logits with the logit bias, then the penalties for its own prefix:
    the repetition penalty (prompt and answer), then the frequency and presence penalties (the
    answer: ``context[answer_start:]`` and the node's path)."""
    logits = tree_repetition_penalty(biased(logits, params.logit_bias), context, tree, params.repetition_penalty)
    return tree_answer_penalties(logits, context[answer_start:], tree, params.frequency_penalty,
                                 params.presence_penalty)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits after temperature, top-k, top-p and min-p; removed tokens are -inf.

    The same operations as transformers' warpers, in the same order, so the distribution is the
    one ``generate(do_sample=True, ...)`` samples from.

    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> warp(logits, SamplingParams(temperature=0.5, top_k=3)).tolist()
    [[4.0, 2.0, 0.0, -inf]]
    >>> warp(logits, SamplingParams(temperature=1.0, top_p=0.8)).tolist()  # 0.64 + 0.24 reach 0.8
    [[2.0, 1.0, -inf, -inf]]
    >>> warp(logits, SamplingParams(temperature=1.0, min_p=0.3)).tolist()  # e^-1 >= 0.3 > e^-2
    [[2.0, 1.0, -inf, -inf]]
    """
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    if params.min_p:
        probs = torch.softmax(logits, dim=-1)
        remove = probs < params.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        logits = logits.masked_fill(remove, -float("inf"))
    return logits


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] the distribution to sample from, given already penalised logits (temperature > 0).

    >>> target_probs(torch.tensor([0.0, 0.0, -float("inf")]), SamplingParams(temperature=1.0)).tolist()
    [0.5, 0.5, 0.0]
    """
    return torch.softmax(warp(logits, params), dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from [vocab] ``probs`` by inverting the CDF at one uniform number.

    Exactly one uniform per call, whatever ``probs`` is: the walk over a tree then consumes one per
    emitted token, like plain sampling, so with a seed speculative output equals plain output.
    Tokens of probability 0 are never drawn. Probabilities that are not finite, or sum to 0, are
    refused rather than drawn from: a temperature so close to 0 that the logits overflow makes them
    NaN, and inverting a NaN CDF would always give the last token.

    >>> draw(torch.tensor([0.0, 1.0, 0.0]), torch.Generator().manual_seed(0))
    1
    """
    cdf = np.cumsum(probs.numpy(), dtype=np.float64)  # [vocab]
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):  # a NaN or inf anywhere reaches the sum
        raise ValueError("cannot sample: the token probabilities are not finite or all 0 (a temperature too "
                         "close to 0 overflows the logits: use 0 for greedy decoding)")
    u = torch.rand(1, dtype=torch.float64, generator=generator).item()
    token = int(np.searchsorted(cdf, u * total, side="right"))
    if token == len(cdf):  # u * total rounded up to the total
        token = int(np.flatnonzero(probs.numpy()).max())
    return token
