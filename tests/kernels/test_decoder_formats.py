"""A tiny Llama whose matrices are of every kind (ggml block types, 16-bit, fp32, packed blocks,
stacked parts of mixed types, a quantized embedding tied to the output head): the one-call C
decoder and the per-operation pass give the bits of the same model with its weights dequantized,
and a token's row does not depend on the pass it is computed in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freespec import kernels
from freespec.kernels import (
    GGMLWeight,
    Heads,
    Linear,
    ModelWeights,
    PackedWeight,
    RMSNorm,
    Stacked,
)
from freespec.kernels.weights import DecoderLayer, dense

HIDDEN, INTERMEDIATE, VOCAB, CAPACITY = 256, 512, 64, 32
HEADS = Heads(heads=4, kv_heads=2, dim=64, scale=64 ** -0.5)
Q_ROWS, KV_ROWS = HEADS.heads * HEADS.dim, HEADS.kv_heads * HEADS.dim


def ggml(name: str, rows: int, columns: int, generator: np.random.Generator) -> GGMLWeight:
    """Random blocks whose weights have a standard deviation near 1 / sqrt(columns), like a
    trained model's, so that every layer moves the hidden state."""
    seed, target = int(generator.integers(1 << 31)), columns ** -0.5

    def draw(typical: float) -> GGMLWeight:
        data = kernels.random_blocks(name, (rows, columns), np.random.default_rng(seed), typical=typical)
        return GGMLWeight(name, data, (rows, columns))

    return draw(target * target / float(draw(target).dequantize().std()))


def norm(generator: np.random.Generator, width: int = HIDDEN) -> RMSNorm:
    return RMSNorm(torch.from_numpy(generator.uniform(0.5, 1.5, width).astype(np.float32)), 1e-5)


def mixed_model() -> ModelWeights:
    """Six layers, each matrix of another kind; q/k/v and gate/up stacked from mixed types as
    a Q4_K_M (or Q2_K, Q3_K_M, IQ2, IQ3, IQ4) GGUF stores them; the Q6_K embedding is also the output head."""
    g = np.random.default_rng(7)
    packed = PackedWeight("q8", torch.randint(-128, 128, (HIDDEN, HIDDEN), dtype=torch.int8),
                          (torch.rand(HIDDEN, HIDDEN // 32) * 0.001).half().float())  # fp16 scales: exact
    matrices = [
        (Stacked((ggml("Q4_K", Q_ROWS, HIDDEN, g), ggml("Q4_K", KV_ROWS, HIDDEN, g), ggml("Q6_K", KV_ROWS, HIDDEN, g))),
         ggml("Q5_0", HIDDEN, Q_ROWS, g),
         Stacked((ggml("Q4_K", INTERMEDIATE, HIDDEN, g), ggml("Q5_K", INTERMEDIATE, HIDDEN, g))),
         ggml("Q6_K", HIDDEN, INTERMEDIATE, g)),
        (ggml("BF16", Q_ROWS + 2 * KV_ROWS, HIDDEN, g), packed,
         Stacked((ggml("Q4_0", INTERMEDIATE, HIDDEN, g), ggml("Q4_1", INTERMEDIATE, HIDDEN, g))),
         ggml("Q8_0", HIDDEN, INTERMEDIATE, g)),
        (Stacked((ggml("F16", Q_ROWS, HIDDEN, g), torch.randn(2 * KV_ROWS, HIDDEN) / HIDDEN ** 0.5)),
         ggml("F32", HIDDEN, Q_ROWS, g), ggml("Q5_1", 2 * INTERMEDIATE, HIDDEN, g),
         ggml("Q5_K", HIDDEN, INTERMEDIATE, g)),
        (Stacked((ggml("Q3_K", Q_ROWS, HIDDEN, g), ggml("Q2_K", KV_ROWS, HIDDEN, g),
                  ggml("IQ4_XS", KV_ROWS, HIDDEN, g))),
         ggml("IQ4_NL", HIDDEN, Q_ROWS, g),
         Stacked((ggml("Q2_K", INTERMEDIATE, HIDDEN, g), ggml("Q3_K", INTERMEDIATE, HIDDEN, g))),
         ggml("IQ4_XS", HIDDEN, INTERMEDIATE, g)),
        (Stacked((ggml("IQ3_XXS", Q_ROWS, HIDDEN, g), ggml("IQ3_S", 2 * KV_ROWS, HIDDEN, g))),
         ggml("IQ3_S", HIDDEN, Q_ROWS, g),
         Stacked((ggml("IQ3_XXS", INTERMEDIATE, HIDDEN, g), ggml("IQ3_S", INTERMEDIATE, HIDDEN, g))),
         ggml("IQ3_XXS", HIDDEN, INTERMEDIATE, g)),
        (Stacked((ggml("IQ2_XXS", Q_ROWS, HIDDEN, g), ggml("IQ2_XS", KV_ROWS, HIDDEN, g), ggml("IQ2_S", KV_ROWS, HIDDEN, g))),
         ggml("IQ2_XS", HIDDEN, Q_ROWS, g),
         Stacked((ggml("IQ2_S", INTERMEDIATE, HIDDEN, g), ggml("IQ2_XXS", INTERMEDIATE, HIDDEN, g))),
         ggml("IQ2_S", HIDDEN, INTERMEDIATE, g)),
        (Stacked((ggml("IQ1_S", Q_ROWS, HIDDEN, g), ggml("IQ1_M", 2 * KV_ROWS, HIDDEN, g))),
         ggml("TQ2_0", HIDDEN, Q_ROWS, g),
         Stacked((ggml("IQ1_M", INTERMEDIATE, HIDDEN, g), ggml("TQ1_0", INTERMEDIATE, HIDDEN, g))),
         ggml("IQ1_S", HIDDEN, INTERMEDIATE, g)),
    ]
    layers = [DecoderLayer(norm(g), Linear(qkv, torch.randn(Q_ROWS + 2 * KV_ROWS) * 0.1), Linear(o), norm(g),
                           Linear(up), Linear(down), gated=True) for qkv, o, up, down in matrices]
    embed = ggml("Q6_K", VOCAB, HIDDEN, g)
    return ModelWeights(embed, None, layers, norm(g), Linear(embed), HEADS, "silu")


def dequantized(weights: ModelWeights) -> ModelWeights:
    """The same model with every matrix in fp32 (ggml's formulas)."""
    layers = [DecoderLayer(layer.attn_norm, Linear(dense(layer.qkv.weight), layer.qkv.bias), Linear(dense(layer.o.weight)),
                           layer.mlp_norm, Linear(dense(layer.up.weight)), Linear(dense(layer.down.weight)), gated=True)
              for layer in weights.layers]
    embed = dense(weights.embed)
    return ModelWeights(embed, None, layers, weights.final_norm, Linear(embed), weights.heads, weights.activation)


def rotary_tables(positions: int = CAPACITY) -> tuple[torch.Tensor, torch.Tensor]:
    inverse = 1.0 / 10000 ** (torch.arange(0, HEADS.dim, 2, dtype=torch.float32) / HEADS.dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=1)  # [positions, dim]
    return angles.cos(), angles.sin()


class Pass:
    """Runs passes of one model with one backend over its own KV cache: through the one-call
    decoder, or one operation at a time (the runner's per-operation pass on the backend's ops)."""

    def __init__(self, backend: kernels.Kernels, weights: ModelWeights, one_call: bool):
        self.backend, self.weights = backend, weights
        self.decoder = backend.decoder(weights) if one_call else None
        assert (self.decoder is not None) == one_call
        shape = (len(weights.layers), HEADS.kv_heads, CAPACITY, HEADS.dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.cos, self.sin = rotary_tables()

    def __call__(self, tokens: list[int], past: int, tree_mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
        tokens, rows = torch.tensor(tokens), torch.tensor(positions)
        if self.decoder is not None:
            sequence = kernels.PassSequence(self.keys, self.values, past, tree_mask)
            return self.decoder(tokens, rows, [sequence], [(self.cos, self.sin, rows)])
        backend, weights = self.backend, self.weights
        attention = backend.attention(past, tree_mask, HEADS)
        rotation = (self.cos[rows], self.sin[rows])
        h = backend.embed(weights.embed, tokens)  # [n, hidden]
        for index, layer in enumerate(weights.layers):
            normed = F.rms_norm(h, (HIDDEN,), layer.attn_norm.weight, layer.attn_norm.eps)
            attended = attention(backend.linear(normed, layer.qkv.weight, layer.qkv.bias), self.keys[index],
                                 self.values[index], rotation)
            h = h + backend.linear(attended, layer.o.weight)
            normed = F.rms_norm(h, (HIDDEN,), layer.mlp_norm.weight, layer.mlp_norm.eps)
            gate, up = backend.linear(normed, layer.up.weight).chunk(2, dim=-1)
            h = h + backend.linear(F.silu(gate) * up, layer.down.weight)
        return F.rms_norm(h, (HIDDEN,), weights.final_norm.weight, weights.final_norm.eps)

    def causal(self, tokens: list[int], past: int = 0) -> torch.Tensor:
        n = len(tokens)
        return self(tokens, past, torch.ones(n, n, dtype=torch.bool).tril(), list(range(past, past + n)))


TOKENS = [5, 63, 0, 17, 17, 42, 8, 31, 2]
# a draft tree over TOKENS: node i's parent (-1: the root's parent is the committed prefix)
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 5]


def tree_mask(parents: list[int]) -> tuple[torch.Tensor, list[int]]:
    """[n, n] bool (a node sees its ancestors and itself) and each node's depth."""
    n = len(parents)
    mask, depths = torch.zeros(n, n, dtype=torch.bool), []
    for node in range(n):
        ancestor, depth = node, 0
        while ancestor >= 0:
            mask[node, ancestor] = True
            ancestor, depth = parents[ancestor], depth + 1
        depths.append(depth - 1)
    return mask, depths


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "per op"])
def test_every_matrix_kind_gives_the_bits_of_its_dequantized_model(one_call, kernel_build):
    weights = mixed_model()
    quantized, reference = Pass(kernel_build, weights, one_call), Pass(kernel_build, dequantized(weights), one_call)
    hidden = quantized.causal(TOKENS)  # [9, hidden]
    assert torch.isfinite(hidden).all()
    assert torch.equal(hidden, reference.causal(TOKENS))
    assert torch.equal(quantized.keys, reference.keys) and torch.equal(quantized.values, reference.values)
    # the tied head: the quantized embedding as the output matrix
    assert torch.equal(kernel_build.linear(hidden, weights.lm_head.weight),
                       kernel_build.linear(hidden, reference.weights.lm_head.weight))


def test_the_one_call_decoder_and_the_per_operation_pass_agree(c_kernels):
    weights = mixed_model()
    one_call, per_op = Pass(c_kernels, weights, True).causal(TOKENS), Pass(c_kernels, weights, False).causal(TOKENS)
    assert torch.allclose(one_call, per_op, rtol=1e-4, atol=1e-4)  # torch's norms round differently


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "per op"])
def test_a_tokens_row_is_the_same_in_a_pass_of_one_of_nine_and_in_a_tree(one_call, kernel_build):
    weights = mixed_model()
    chained = Pass(kernel_build, weights, one_call)
    together = chained.causal(TOKENS)  # one pass of nine
    alone = Pass(kernel_build, weights, one_call)
    for index, token in enumerate(TOKENS):  # nine passes of one, each after the rows of the last
        assert torch.equal(alone.causal([token], past=index)[0], together[index]), f"token {index}"
    # a tree after a committed prefix: each node's row is its path decoded one token at a time
    prefix = [9, 10, 11]
    treed = Pass(kernel_build, weights, one_call)
    treed.causal(prefix)
    mask, depths = tree_mask(PARENTS)
    rows = treed(TOKENS, len(prefix), mask, [len(prefix) + depth for depth in depths])
    for node in range(len(TOKENS)):
        path, ancestor = [], node
        while ancestor >= 0:
            path.insert(0, TOKENS[ancestor])
            ancestor = PARENTS[ancestor]
        single = Pass(kernel_build, weights, one_call)
        single.causal(prefix)
        for depth, token in enumerate(path):
            row = single.causal([token], past=len(prefix) + depth)[0]
        assert torch.equal(row, rows[node]), f"node {node}"


def test_the_decoder_refuses_a_matrix_of_the_wrong_shape(c_kernels):
    weights = mixed_model()
    weights.layers[1].o = Linear(weights.layers[1].up.weight)
    with pytest.raises(ValueError, match=r"o: expected a \[256, 256\] matrix, got \[1024, 256\]"):
        c_kernels.decoder(weights)
