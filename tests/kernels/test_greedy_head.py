"""The exact greedy head (freespec_head_argmax): each input row's first maximum over a Q8_0 or
Q6_K head, computing in fp32 only the rows an integer bound cannot rule out, is the whole head's,
in every build; inputs the bound does not cover are refused (the whole head then runs)."""

import numpy as np
import pytest
import torch

from freespec import Model, kernels
from freespec.kernels import GGMLWeight, abi, backend, random_blocks
from freespec.kernels.backend import MatrixStruct
from freespec.kernels.weights import PackedWeight, repack
from freespec.model.loading import load
from tests.helpers import PROMPTS, model_for, write_gguf


def head(rows: int, columns: int, generator: np.random.Generator, twins: bool = False,
         kind: str = "Q8_0") -> GGMLWeight:
    """A random head [rows, columns] of GGUF blocks of ``kind``; ``twins``: rows 3, rows // 2 and
    the last are one row (equal logits: the first of them is the maximum when they lead)."""
    data = random_blocks(kind, (rows, columns), generator, typical=0.02).reshape(rows, -1)
    if twins:
        data[rows // 2] = data[rows - 1] = data[3]
    return GGMLWeight(kind, data.reshape(-1), (rows, columns))


def greedy_argmax(backend, weight: GGMLWeight | PackedWeight, x: torch.Tensor) -> tuple[int, np.ndarray]:
    struct = MatrixStruct("head", weight)
    bounds = np.empty(weight.shape[0], dtype=np.float32)
    assert backend.library.freespec_head_bounds(struct.pointer, bounds.ctypes.data) == abi.OK
    out = np.full(x.shape[0], -1, dtype=np.int64)
    x = x.contiguous()
    status = backend.library.freespec_head_argmax(struct.pointer, bounds.ctypes.data, x.data_ptr(), x.shape[0],
                                                  out.ctypes.data, None, None, 0, None, None, None)
    return status, out


def greedy_top_k(backend, weight: GGMLWeight | PackedWeight, x: torch.Tensor, k: int) -> tuple[int, ...]:
    """freespec_head_argmax with k: (status, argmax [M], values [M, k], ids [M, k], log normalizer [M])."""
    struct = MatrixStruct("head", weight)
    bounds = np.empty(weight.shape[0], dtype=np.float32)
    assert backend.library.freespec_head_bounds(struct.pointer, bounds.ctypes.data) == abi.OK
    rows = x.shape[0]
    out, values = np.full(rows, -1, dtype=np.int64), np.empty((rows, k), dtype=np.float32)
    ids, normalizer = np.empty((rows, k), dtype=np.int64), np.empty(rows, dtype=np.float32)
    x = x.contiguous()
    status = backend.library.freespec_head_argmax(struct.pointer, bounds.ctypes.data, x.data_ptr(), rows,
                                                  out.ctypes.data, None, None, k, values.ctypes.data,
                                                  ids.ctypes.data, normalizer.ctypes.data)
    return status, out, values, ids, normalizer


def coded_greedy_argmax(backend, weight: GGMLWeight | torch.Tensor, x: torch.Tensor) -> tuple[int, np.ndarray]:
    """The greedy head over int8 codes made of a 16- or 32-bit head (freespec_head_codes), answering
    for the head itself."""
    rows, columns = weight.shape
    exact = MatrixStruct("head", weight)
    codes, scales = torch.empty(rows, columns, dtype=torch.int8), torch.empty(rows, columns // 32)
    bounds, error = np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32)
    status = backend.library.freespec_head_codes(exact.pointer, codes.data_ptr(), scales.data_ptr(),
                                                 bounds.ctypes.data, error.ctypes.data)
    assert status == abi.OK
    coded = MatrixStruct("codes", PackedWeight("q8", codes, scales))
    out = np.full(x.shape[0], -1, dtype=np.int64)
    x = x.contiguous()
    status = backend.library.freespec_head_argmax(coded.pointer, bounds.ctypes.data, x.data_ptr(), x.shape[0],
                                                  out.ctypes.data, exact.pointer, error.ctypes.data, 0, None, None, None)
    return status, out


@pytest.mark.parametrize("kind", ["Q8_0", "Q8_0 packed", "Q6_K"])
@pytest.mark.parametrize("trial", range(12))
def test_the_greedy_head_gives_the_whole_heads_first_maximum(kernel_build, trial, kind):
    """GGUF Q8_0 blocks, the same blocks packed as the AVX2 build packs a head (codes and fp32
    scales apart), and GGUF Q6_K blocks (blocks of 256)."""
    generator = np.random.default_rng(trial)
    block = 256 if kind == "Q6_K" else 32
    rows, columns = int(generator.integers(8, 3000)), block * int(generator.integers(1, 24 if block == 32 else 5))
    packed = kind.endswith("packed")
    weight = head(rows, columns, generator, twins=trial % 2 == 0, kind=kind.split()[0])
    inputs = int(generator.integers(1, 11))  # across the kernel's groups of 4 input rows
    torch.manual_seed(trial)
    x = torch.randn(inputs, columns) * torch.exp(1.5 * torch.randn(inputs, columns))  # outliers, as hidden states have
    if trial % 2 == 0:  # lead with the twins: their logit well above every other row's
        x[0] = torch.from_numpy(weight.dequantize()[3].numpy().copy()) * 100
    status, out = greedy_argmax(kernel_build, repack(weight) if packed else weight, x)
    whole = kernel_build.argmax(kernel_build.linear(x, weight))
    assert status == abi.OK and out.tolist() == whole.tolist()
    if trial % 2 == 0:
        assert out[0] == 3  # the first of equal maxima, as torch.argmax


@pytest.mark.parametrize("kind", ["Q8_0", "Q8_0 packed", "Q6_K"])
@pytest.mark.parametrize("trial", range(6))
def test_the_same_pass_gives_each_rows_top_k_to_within_the_approximation(kernel_build, trial, kind):
    """With k, the greedy head's pass also gives each row's k best outputs by their integer
    approximation and the log of the approximation's softmax normalizer (what Token Recycling
    learns from): the argmax is unchanged, the values are the approximations of those outputs'
    logits (within the codes' error), the outputs hold the whole head's k largest logits to within
    twice that, the normalizer is the logits' to within it, and a row's result has the same bits
    alone as among other rows (heads of several 512-row chunks, which threads take in any order)."""
    generator = np.random.default_rng(100 + trial)
    block = 256 if kind == "Q6_K" else 32
    rows, columns = int(generator.integers(600, 3000)), block * int(generator.integers(1, 24 if block == 32 else 5))
    weight = head(rows, columns, generator, twins=trial % 2 == 0, kind=kind.split()[0])
    torch.manual_seed(trial)
    x = torch.randn(int(generator.integers(2, 9)), columns) * torch.exp(1.5 * torch.randn(1, columns))
    k = int(generator.choice([1, 5, 8]))
    packed = repack(weight) if kind.endswith("packed") else weight
    status, out, values, ids, normalizer = greedy_top_k(kernel_build, packed, x, k)
    whole = kernel_build.linear(x, weight)  # [M, rows]
    assert status == abi.OK and out.tolist() == kernel_build.argmax(whole).tolist()
    logits = whole.double().numpy()
    row_l1 = np.abs(weight.dequantize().numpy().astype(np.float64)).sum(1).max()
    error = row_l1 * x.abs().max(1).values.double().numpy()[:, None] * (1 / 32767 + 1e-4)  # [M, 1] per logit
    assert (np.abs(values - np.take_along_axis(logits, ids, 1)) <= error).all()
    assert (np.diff(values, axis=1) <= 0).all() and all(len(set(row)) == k for row in ids.tolist())
    assert (np.abs(values - -np.sort(-logits, axis=1)[:, :k]) <= 2 * error).all()
    top = logits.max(1, keepdims=True)
    exact = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    assert (np.abs(normalizer - exact) <= error[:, 0] + 1e-5 * np.abs(exact)).all()
    for row in range(x.shape[0]):
        alone = greedy_top_k(kernel_build, packed, x[row : row + 1], k)
        assert [a.tobytes() for a in alone[1:]] == [a[row : row + 1].tobytes() for a in (out, values, ids, normalizer)]


@pytest.mark.skipif(len(kernels.supported_isas()) < 2, reason="needs both kernel builds")
@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K"])
def test_the_top_k_has_the_same_bits_in_both_builds(kind):
    """The integer pass is the same 256-bit code in both builds and the normalizer's exp 8-lane in
    both: a drafter learns the same candidates whichever build runs."""
    generator = np.random.default_rng(7)
    weight = head(1500, 512, generator, kind=kind)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(7)) * 3
    results = [greedy_top_k(kernels.select(isa), weight, x, 8) for isa in kernels.supported_isas()]
    assert results[0][0] == abi.OK
    assert all([a.tobytes() for a in result[1:]] == [a.tobytes() for a in results[0][1:]] for result in results)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "fp32 tensor"])
@pytest.mark.parametrize("trial", range(8))
def test_a_coded_head_gives_the_whole_heads_first_maximum(kernel_build, trial, kind):
    """16- and 32-bit heads through their int8 codes: the codes' own error is in the bound. Odd
    trials draw weights of every exponent alike (most tiny, subnormals and zeros included), whose
    codes are far from the weights."""
    generator = np.random.default_rng(trial)
    rows, columns = int(generator.integers(8, 3000)), 32 * int(generator.integers(1, 24))
    typical = 0.02 if trial % 2 == 0 else None
    ggml_type = "F32" if kind == "fp32 tensor" else kind
    data = random_blocks(ggml_type, (rows, columns), generator, typical=typical, largest=1.0).reshape(rows, -1)
    data[rows // 2] = data[rows - 1] = data[3]  # equal rows: the first of them is the maximum when they lead
    weight = GGMLWeight(ggml_type, data.reshape(-1), (rows, columns))
    if kind == "fp32 tensor":
        weight = torch.from_numpy(weight.dequantize().numpy().copy())
    dense = weight if isinstance(weight, torch.Tensor) else torch.from_numpy(weight.dequantize().numpy().copy())
    torch.manual_seed(trial)
    x = torch.randn(int(generator.integers(1, 11)), columns) * torch.exp(1.5 * torch.randn(1, columns))
    x[0] = dense[3] * 100  # the twins lead
    status, out = coded_greedy_argmax(kernel_build, weight, x)
    whole = kernel_build.argmax(kernel_build.linear(x, weight))
    assert status == abi.OK and out.tolist() == whole.tolist()
    assert typical is None or out[0] == 3  # tiny rows of every exponent need not lead


def test_coded_heads_refuse_weights_that_are_not_finite(kernel_build):
    head = torch.randn(40, 64)
    head[7, 3] = float("nan")
    rows, columns = head.shape
    codes, scales = torch.empty(rows, columns, dtype=torch.int8), torch.empty(rows, columns // 32)
    bounds, error = np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32)
    assert kernel_build.library.freespec_head_codes(MatrixStruct("head", head).pointer, codes.data_ptr(),
                                                    scales.data_ptr(), bounds.ctypes.data,
                                                    error.ctypes.data) == abi.NOT_BOUNDED


def test_only_heads_whose_codes_fit_the_budget_get_codes(monkeypatch):
    head = GGMLWeight("BF16", random_blocks("BF16", (64, 128), np.random.default_rng(0)).reshape(-1), (64, 128))
    assert backend.greedy_head_rows(head, "avx512") == backend.CODED_HEAD_ROWS
    monkeypatch.setattr(backend, "HEAD_CODES_MAX_BYTES", 64 * 128)  # the codes take 9/8 of that
    assert backend.greedy_head_rows(head, "avx512") == 0


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K"])
def test_a_zero_input_ties_every_row_and_gives_the_first(kernel_build, kind):
    weight = head(100, 256, np.random.default_rng(0), kind=kind)
    status, out = greedy_argmax(kernel_build, weight, torch.zeros(2, 256))
    assert status == abi.OK and out.tolist() == [0, 0]


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K"])
@pytest.mark.parametrize("scale", [1e-30, 1e-36, 1e-42])
def test_inputs_near_underflow_give_the_whole_heads_first_maximum(kernel_build, scale, kind):
    """Logits in fp32's denormal range, where rounding errors are absolute: the bound's
    absolute term still covers them."""
    weight = head(500, 256, np.random.default_rng(3), kind=kind)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)) * scale
    status, out = greedy_argmax(kernel_build, weight, x)
    assert status == abi.OK and out.tolist() == kernel_build.argmax(kernel_build.linear(x, weight)).tolist()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inputs_the_bound_does_not_cover_are_refused(kernel_build, bad):
    weight = head(50, 64, np.random.default_rng(1))
    x = torch.randn(2, 64)
    x[1, 7] = bad
    status, out = greedy_argmax(kernel_build, weight, x)
    assert status == abi.NOT_BOUNDED and out.tolist() == [-1, -1]  # nothing written


def test_heads_of_other_kinds_are_refused(kernel_build):
    weight = GGMLWeight("Q4_0", random_blocks("Q4_0", (40, 64), np.random.default_rng(2)), (40, 64))
    struct = MatrixStruct("head", weight)
    bounds = np.empty(40, dtype=np.float32)
    assert kernel_build.library.freespec_head_bounds(struct.pointer, bounds.ctypes.data) == abi.BAD_MATRIX


@pytest.mark.parametrize("head_type", ["Q8_0", "Q6_K", "BF16", "F32"])
@pytest.mark.parametrize("drafter", ["none", "lookup", "suffix", "recycling", "suffix+recycling"])
def test_greedy_decoding_with_the_greedy_head_equals_the_whole_head(tmp_path, kernel_build, drafter, head_type):
    """A tiny Llama whose head is Q8_0, Q6_K (a Q4_K_M file's), BF16 or F32 (through int8 codes):
    the same tokens with the greedy head on and off, and with it on, a pass of up to
    ``greedy_head_rows`` rows never runs the whole head (longer passes run it), Token Recycling's
    included: it learns its candidates from the same pass."""
    types = {"default": "Q8_0", "output": head_type}
    path = write_gguf(tmp_path / "model.gguf", model_for("llama", types), types)
    outputs = []
    for greedy_head in (True, False):
        model = Model(load(path), budget=4, kernels=kernel_build)
        decoder = model.runner._decoder
        assert decoder.greedy_head  # GGUF blocks in the AVX-512 build, packed in the AVX2 one
        decoder.greedy_head = greedy_head
        whole_heads = []
        head_logits = decoder.head_logits
        decoder.head_logits = lambda hidden: whole_heads.append(len(hidden)) or head_logits(hidden)
        outputs.append([model.generate(prompt_ids=prompt, drafter=drafter, max_new_tokens=40).token_ids
                        for prompt in PROMPTS])
        if decoder.greedy_head:
            assert all(rows > decoder.greedy_head_rows for rows in whole_heads)
            assert drafter != "none" or not whole_heads
    assert outputs[0] == outputs[1]


def test_a_batchs_greedy_steps_share_one_greedy_head_and_keep_their_answers(tmp_path, kernel_build):
    """A batched pass (the server's) runs one exact greedy head over the rows of the steps that
    read only maxima and top candidates (greedy verification; Token Recycling learns from its
    top-k), and the whole head for the others (sampling, a repetition penalty): every answer is
    the one the request gets alone."""
    from freespec.engine.batch import Batch, Running

    path = write_gguf(tmp_path / "model.gguf", model_for("llama", "Q8_0"), "Q8_0")
    model = Model(load(path), budget=3, kernels=kernel_build)
    drafters = ["none", "lookup", "suffix", "none", "recycling", "lookup"]
    sampling = [{}, {}, {}, {"temperature": 0.8, "seed": 3}, {}, {"repetition_penalty": 1.3}]
    requests = [dict(prompt_ids=prompt, drafter=drafter, max_new_tokens=30, **options)
                for prompt, drafter, options in zip(PROMPTS * 3, drafters, sampling, strict=True)]
    alone = [model.fork().generate(**request).token_ids for request in requests]
    decoder = model.runner._decoder
    greedy_rows, with_top_k = [], []
    head_argmax, head_argmax_top_k = decoder.head_argmax, decoder.head_argmax_top_k
    decoder.head_argmax = lambda hidden: greedy_rows.append(len(hidden)) or head_argmax(hidden)
    decoder.head_argmax_top_k = lambda hidden, k: (greedy_rows.append(len(hidden)) or with_top_k.append(k)
                                                   or head_argmax_top_k(hidden, k))
    running, batch = [Running(model.fork().stream(**request)) for request in requests], Batch(prefill_rows=32)
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    assert [request.error for request in running] == [None] * len(requests)
    assert [request.generation.token_ids for request in running] == alone
    assert max(greedy_rows) >= 4 and set(with_top_k) == {8}  # recycling's rows among the others
