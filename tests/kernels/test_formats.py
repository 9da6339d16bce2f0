"""Weights in a ggml type multiplied in their own layout: the same bits as the fp32 kernel on the
matrix ggml's formulas dequantize, for every row count (batch-invariant), and clear errors for bad
input."""

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from freespec import kernels
from freespec.kernels import abi

ROW_COUNTS = range(1, 34)  # every path: 1-4 rows in registers, buffered, partial tiles
BLOCK_COLUMNS = (32, 96, 256, 320)  # one block, fewer than 256, a K-quant's super-block, not a multiple of 256
SUPER_BLOCK_COLUMNS = (256, 768)
HALF_COLUMNS = (8, 37, 100, 256)  # fewer than a vector, and tails of every length
COLUMNS_BY_BLOCK = {1: HALF_COLUMNS, 32: BLOCK_COLUMNS, 256: SUPER_BLOCK_COLUMNS}  # weights a block -> row lengths
CASES = [(kind.name, k) for kind in kernels.SUPPORTED_TYPES for k in COLUMNS_BY_BLOCK[GGML_QUANT_SIZES[kind][0]]]
"""Every type the kernels read, at the row lengths its blocks allow."""


def weight_bytes(kind: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks [rows, row_bytes] with the corner cases in the first rows: a row of
    zero bytes (zero scales and codes), a row of the largest codes, a row of zero codes."""
    generator = np.random.default_rng(seed)
    data = kernels.random_blocks(kind, (rows, columns), generator)
    data[0] = 0
    if kind in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.F32):
        return data
    for row, code in ((1, 0xFF), (2, 0x00)):
        if row < rows:
            data[row] = kernels.random_blocks(kind, (1, columns), generator, code_byte=code)[0]
    return data


def test_random_blocks_cover_negative_zero_and_subnormal_scales():
    halves = kernels.random_blocks("F16", (64, 256), np.random.default_rng(0)).view(np.float16)
    assert np.isfinite(halves).all() and (halves < 0).any() and (halves == 0).any()
    assert ((halves != 0) & (np.abs(halves) < np.float16(6.1e-5))).any()  # fp16 subnormals


@pytest.mark.parametrize("name,columns", CASES)
def test_kernel_equals_the_fp32_kernel_on_the_dequantized_matrix_bitwise(name, columns, kernel_build):
    kind = kernels.ggml_type(name)
    rows = 13  # two blocks of six rows and one left over
    weight = kernels.GGMLWeight(kind, weight_bytes(kind, rows, columns), (rows, columns))
    dense = weight.dequantize()  # [13, K] fp32, gguf's formulas
    assert torch.equal(dense, torch.from_numpy(quants.dequantize(weight.data, kind).reshape(rows, columns)))
    torch.manual_seed(0)
    x = torch.randn(max(ROW_COUNTS), columns)
    alone = torch.cat([kernel_build.linear(x[i:i + 1], weight) for i in range(len(x))])  # [33, 13] a row a call
    for count in ROW_COUNTS:
        out = kernel_build.linear(x[:count], weight)
        assert out.shape == (count, rows) and out.dtype == torch.float32
        assert torch.equal(out, kernel_build.linear(x[:count], dense)), f"{name} K={columns} M={count}"
        assert torch.equal(out, alone[:count]), f"{name} K={columns} M={count}: not batch-invariant"


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "BF16"])
@pytest.mark.parametrize("rows", [1, 6, 7])  # only the leftover path, exactly one block, one block and one row
def test_every_row_split_gives_the_same_bits(name, rows, c_kernels):
    kind = kernels.ggml_type(name)
    columns = 512
    weight = kernels.GGMLWeight(kind, weight_bytes(kind, rows, columns, seed=1), (rows, columns))
    x = torch.randn(9, columns)
    assert torch.equal(c_kernels.linear(x, weight), c_kernels.linear(x, weight.dequantize()))


@pytest.mark.parametrize("name,columns", [("Q8_0", 4128), ("Q4_K", 4352), ("Q6_K", 1536), ("F16", 4133), ("BF16", 1040)])
def test_long_rows_taken_in_chunks_give_the_whole_rows_bits(name, columns, kernel_build):
    """Many input rows over weight rows longer than 1024 columns (AVX-512) or 4096 (AVX2) go
    through the kernels in column chunks of 512 and groups of 64 inputs (with a 16-bit tail after
    them): the same bits as one row at a time, and as the fp32 kernel's whole-row tiles on the
    dequantized matrix."""
    kind = kernels.ggml_type(name)
    rows = 7  # one block of six rows and one left over
    weight = kernels.GGMLWeight(kind, weight_bytes(kind, rows, columns, seed=2), (rows, columns))
    dense = weight.dequantize()
    torch.manual_seed(1)
    x = torch.randn(130, columns)
    alone = torch.cat([kernel_build.linear(x[i:i + 1], weight) for i in range(len(x))])
    for count in (5, 13, 16, 64, 65, 130):
        out = kernel_build.linear(x[:count], weight)
        assert torch.equal(out, alone[:count]), f"{name} K={columns} M={count}: not batch-invariant"
        assert torch.equal(out, kernel_build.linear(x[:count], dense)), f"{name} K={columns} M={count}"


def test_blocks_quantized_by_gguf_multiply_like_their_dequantized_form(c_kernels):
    torch.manual_seed(0)
    values = (torch.randn(20, 512) * 0.05).numpy()
    x = torch.randn(5, 512)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"):
        kind = kernels.ggml_type(name)
        weight = kernels.GGMLWeight(kind, quants.quantize(values, kind), (20, 512))
        expected = c_kernels.linear(x, torch.from_numpy(quants.dequantize(quants.quantize(values, kind), kind)))
        assert torch.equal(c_kernels.linear(x, weight), expected), name


def test_bias_is_added_and_no_rows_give_an_empty_result(c_kernels):
    weight = kernels.GGMLWeight("Q8_0", weight_bytes(GGMLQuantizationType.Q8_0, 7, 64), (7, 64))
    x, bias = torch.randn(3, 64), torch.randn(7)
    assert torch.equal(c_kernels.linear(x, weight, bias), c_kernels.linear(x, weight) + bias)
    assert c_kernels.linear(x[:0], weight).shape == (0, 7)


def test_gguf_file_tensors_multiply_in_place_from_the_memory_map(tmp_path, c_kernels):
    """The loader's path: a GGUF file read by gguf's memory-mapped reader, each tensor's bytes
    handed over as they lie in the file (never copied, never dequantized)."""
    path = tmp_path / "weights.gguf"
    writer = GGUFWriter(path, "llama")
    shapes = {"Q4_K": (7, 512), "Q5_K": (6, 256), "Q6_K": (5, 256), "Q4_0": (9, 96), "Q5_0": (4, 64),
              "Q8_0": (8, 160), "F16": (3, 40), "BF16": (2, 64), "F32": (3, 24)}
    for name, (rows, columns) in shapes.items():
        kind = kernels.ggml_type(name)
        writer.add_tensor(name, weight_bytes(kind, rows, columns), raw_dtype=kind)  # the bytes [rows, row_bytes]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = GGUFReader(path)  # read-only np.memmap
    assert len(reader.tensors) == len(shapes)
    for tensor in reader.tensors:
        columns, rows = (int(size) for size in tensor.shape)  # ggml order: fastest dimension first
        weight = kernels.GGMLWeight(tensor.tensor_type, tensor.data, (rows, columns))
        assert np.shares_memory(weight.data, tensor.data)  # the file's pages, not a copy
        x = torch.randn(4, columns)
        assert torch.equal(c_kernels.linear(x, weight), c_kernels.linear(x, weight.dequantize())), tensor.name


def test_torch_tensors_and_any_dtype_are_viewed_not_copied(c_kernels):
    data = torch.from_numpy(weight_bytes(GGMLQuantizationType.Q4_K, 3, 256))
    weight = kernels.GGMLWeight(12, data, (3, 256))  # a ggml type id works too
    assert weight.type == GGMLQuantizationType.Q4_K and weight.data.ctypes.data == data.data_ptr()
    assert weight.nbytes == 3 * 144
    bf16 = torch.randn(5, 48).to(torch.bfloat16)  # a safetensors bf16 matrix as it is
    weight = kernels.GGMLWeight("bf16", bf16, (5, 48))
    assert weight.data.ctypes.data == bf16.data_ptr()
    assert torch.equal(weight.dequantize(), bf16.float())
    x = torch.randn(2, 48)
    assert torch.equal(c_kernels.linear(x, weight), c_kernels.linear(x, bf16.float()))


def test_torch_backend_multiplies_the_dequantized_matrix():
    weight = kernels.GGMLWeight("Q5_K", weight_bytes(GGMLQuantizationType.Q5_K, 4, 256), (4, 256))
    x = torch.randn(3, 256)
    expected = (x.double() @ weight.dequantize().double().T).float()
    out = kernels.select("torch").linear(x, weight)
    assert out.shape == (3, 4) and torch.allclose(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind,data,shape,message", [
    ("Q9_9", np.zeros((1, 18), np.uint8), (1, 32), "unknown GGUF tensor type 'Q9_9'"),
    (99, np.zeros((1, 18), np.uint8), (1, 32), "unknown GGUF tensor type 99"),
    ("MXFP4", np.zeros((1, 17), np.uint8), (1, 32), "MXFP4 is not supported"),
    ("Q4_K", np.zeros((1, 72), np.uint8), (1, 128), "whole blocks of 256 weights; 128 is not"),
    ("Q4_0", np.zeros((2, 18), np.uint8), (2, 64), "takes 72 bytes, the data holds 36"),
    ("Q8_0", np.zeros((2, 68), np.uint8)[:, ::2], (2, 32), "C-contiguous"),
    ("F16", [0, 1], (1, 1), "numpy array or torch tensor"),
    ("F32", np.zeros(4, np.float32), (0, 4), "positive sizes"),
    ("F32", np.zeros(4, np.float32), 4, "positive sizes"),
])
def test_bad_weights_are_refused_in_one_line(kind, data, shape, message):
    with pytest.raises(ValueError, match=message) as error:
        kernels.GGMLWeight(kind, data, shape)
    assert "\n" not in str(error.value)


def test_bad_inputs_are_refused_before_the_kernel_runs(c_kernels):
    weight = kernels.GGMLWeight("Q4_0", np.zeros((2, 36), np.uint8), (2, 64))
    for x in (torch.zeros(3, 32), torch.zeros(3, 64, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"linear input: the kernel needs a contiguous torch.float32 tensor "
                                             r"of shape \[3, 64\]"):
            c_kernels.linear(x, weight)


def test_the_c_dispatcher_refuses_matrices_it_cannot_read_without_touching_memory(c_kernels):
    def status(matrix: abi.Matrix) -> int:
        return c_kernels.library.freespec_linear(ctypes.byref(matrix), None, None, 1)

    assert status(abi.Matrix(kind=99, N=1, K=32)) == abi.BAD_MATRIX
    assert status(abi.Matrix(kind=int(GGMLQuantizationType.MXFP4), N=1, K=32)) == abi.BAD_MATRIX
    parts = (abi.Matrix * 2)(abi.Matrix(kind=0, N=2, K=32), abi.Matrix(kind=0, N=3, K=64))
    assert status(abi.Matrix(kind=abi.STACKED, N=5, K=32, parts=parts, num_parts=2)) == abi.BAD_MATRIX  # K
    parts[1].K = 32
    assert status(abi.Matrix(kind=abi.STACKED, N=6, K=32, parts=parts, num_parts=2)) == abi.BAD_MATRIX  # N
    assert status(abi.Matrix(kind=abi.STACKED, N=5, K=32, parts=None, num_parts=2)) == abi.BAD_MATRIX
    parts[1].kind = abi.STACKED
    assert status(abi.Matrix(kind=abi.STACKED, N=5, K=32, parts=parts, num_parts=2)) == abi.BAD_MATRIX  # nested


def mixed_parts(columns: int = 256) -> tuple:
    """One part of each kind a Stacked may hold: Q4_K q, Q6_K k and Q8_0 v (a Q4_K_M file's
    mix), an fp32 tensor, a BF16 matrix and packed q4 blocks; row counts not multiples of six."""
    generator = np.random.default_rng(3)
    ggml = [kernels.GGMLWeight(name, kernels.random_blocks(name, (rows, columns), generator, largest=0.05),
                               (rows, columns)) for name, rows in (("Q4_K", 13), ("Q6_K", 7), ("Q8_0", 5), ("BF16", 4))]
    packed = kernels.PackedWeight("q4", torch.randint(0, 256, (8, columns // 2), dtype=torch.uint8),
                                  (torch.rand(8, columns // 32, 2) * 0.01).half().float())  # exact: fp16 scales
    return (*ggml[:3], torch.randn(3, columns), ggml[3], packed)


def test_a_stacked_matrix_gives_the_bits_of_one_matrix_of_all_its_rows(kernel_build):
    stacked = kernels.Stacked(mixed_parts())
    dense = torch.cat([kernels.weights.dense(part) for part in stacked.parts])  # [40, 256]
    assert stacked.shape == (40, 256) and torch.equal(stacked.dense, dense)
    assert stacked.parts[5].nbytes == 8 * 128 + 8 * 8 * 2 * 4  # packed q4: codes and scales
    assert stacked.nbytes == sum(part.nbytes for part in stacked.parts)
    torch.manual_seed(0)
    x, bias = torch.randn(14, 256), torch.randn(40)  # up to the fp32 part's wider tiles (M > 12)
    alone = torch.cat([kernel_build.linear(x[i:i + 1], stacked, bias) for i in range(len(x))])
    for count in range(1, len(x) + 1):
        out = kernel_build.linear(x[:count], stacked, bias)
        assert torch.equal(out, kernel_build.linear(x[:count], dense, bias)), count
        assert torch.equal(out, alone[:count]), f"M={count}: not batch-invariant"
    assert torch.equal(kernels.select("torch").linear(x, stacked), torch.mm(dense, x.t()).t())


def test_stacked_parts_are_checked():
    q4_k = kernels.GGMLWeight("Q4_K", np.zeros((2, 144), np.uint8), (2, 256))
    with pytest.raises(ValueError, match="at least one part"):
        kernels.Stacked(())
    with pytest.raises(ValueError, match=r"the same number of columns, got \[128, 256\]"):
        kernels.Stacked((q4_k, torch.zeros(2, 128)))
    with pytest.raises(ValueError, match="not Stacked"):
        kernels.Stacked((q4_k, kernels.Stacked((q4_k,))))
    with pytest.raises(ValueError, match="weight part 1: the kernel needs a contiguous torch.float32 tensor"):
        kernels.select().linear(torch.zeros(1, 256), kernels.Stacked((q4_k, torch.zeros(2, 256, dtype=torch.float64))))


@pytest.mark.parametrize("name", [kind.name for kind in kernels.SUPPORTED_TYPES])
def test_embedding_rows_are_the_dequantized_rows(name, c_kernels):
    kind = kernels.ggml_type(name)
    columns = 256
    table = kernels.GGMLWeight(kind, weight_bytes(kind, 11, columns), (11, columns))
    tokens = torch.tensor([3, 0, 10, 3, 1, 2], dtype=torch.int64)
    expected = table.dequantize()[tokens]  # [6, 256]
    for backend in (c_kernels, kernels.select("torch")):
        rows = backend.embed(table, tokens)
        assert rows.shape == (6, columns) and torch.equal(rows, expected), backend
        assert backend.embed(table, tokens[:0]).shape == (0, columns)


def test_embedding_rows_of_every_other_kind(c_kernels):
    tokens = torch.tensor([39, 0, 13, 20, 25, 34, 12], dtype=torch.int64)  # a row of each part and its edges
    for table in (kernels.Stacked(mixed_parts()), *mixed_parts()[3:]):
        expected = kernels.weights.dense(table)[tokens[tokens < table.shape[0]]]
        assert torch.equal(c_kernels.embed(table, tokens[tokens < table.shape[0]]), expected), repr(table)


def test_embedding_token_ids_outside_the_table_are_refused(c_kernels):
    table = kernels.GGMLWeight("Q8_0", weight_bytes(GGMLQuantizationType.Q8_0, 4, 32), (4, 32))
    for backend in (c_kernels, kernels.select("torch")):
        with pytest.raises(ValueError, match=r"token ids must lie in 0 .. 3, got -1 .. 4"):
            backend.embed(table, torch.tensor([-1, 4]))
        with pytest.raises(ValueError, match=r"token ids must be int64 \[n\]"):
            backend.embed(table, torch.tensor([[1]]))


def test_the_iq_grids_are_ggmls():
    """iq_grids.h holds the grids gguf-py dequantizes IQ3_XXS, IQ3_S (4 bytes an entry), IQ2_XXS,
    IQ2_XS, IQ2_S (8 bytes) and, times 8, IQ1_S and IQ1_M (8 bytes) with."""
    import re
    from pathlib import Path

    text = (Path(kernels.__file__).parent / "csrc" / "iq_grids.h").read_text()
    grids = {"iq3xxs_grid": quants.IQ3_XXS, "iq3s_grid": quants.IQ3_S, "iq2xxs_grid": quants.IQ2_XXS,
             "iq2xs_grid": quants.IQ2_XS, "iq2s_grid": quants.IQ2_S, "iq1s_grid_x8": quants.IQ1_S}
    for name, kind in grids.items():
        body = re.search(name + r"\[\d+\] = \{(.*?)\};", text, re.S).group(1)
        words = [int(word, 16) for word in re.findall(r"0x([0-9a-f]+)", body)]
        if kind.grid is None:
            kind.init_grid()
        width = kind.grid_shape[1]  # weights an entry: bytes of a word
        entries = np.array([list(word.to_bytes(width, "little")) for word in words], dtype=np.uint8).view(np.int8)
        times = 8 if name.endswith("_x8") else 1
        assert np.array_equal(entries, (times * kind.grid.reshape(-1, width)).astype(np.int8)), name


def test_supported_types_match_gguf_block_sizes():
    for kind in kernels.SUPPORTED_TYPES:
        block_size, block_bytes = GGML_QUANT_SIZES[kind]
        assert kernels.row_bytes(kind, 4 * 256) == 4 * 256 // block_size * block_bytes


@pytest.mark.parametrize("name,columns", [("Q4_1", 96), ("Q8_0", 96), ("Q4_1", 320), ("Q8_0", 32)])
def test_repacked_blocks_are_the_same_weights_and_give_the_same_bits(name, columns, c_kernels):
    kind = kernels.ggml_type(name)
    rows = 13
    weight = kernels.GGMLWeight(kind, weight_bytes(kind, rows, columns, seed=3), (rows, columns))
    packed = kernels.weights.repack(weight)
    assert isinstance(packed, kernels.PackedWeight) and packed.kind == ("q4" if name == "Q4_1" else "q8")
    assert torch.equal(packed.dense, weight.dequantize())
    torch.manual_seed(1)
    x = torch.randn(9, columns)
    for count in range(1, 10):
        assert torch.equal(c_kernels.linear(x[:count], packed), c_kernels.linear(x[:count], weight)), count
    assert torch.equal(c_kernels.embed(packed, torch.arange(rows)), c_kernels.embed(weight, torch.arange(rows)))


def test_repack_keeps_other_kinds_and_repacks_stacked_parts(c_kernels):
    from freespec.kernels.weights import repack

    q4 = kernels.GGMLWeight("Q4_1", weight_bytes(GGMLQuantizationType.Q4_1, 6, 64), (6, 64))
    q6 = kernels.GGMLWeight("Q6_K", weight_bytes(GGMLQuantizationType.Q6_K, 6, 256), (6, 256))
    assert repack(q6) is q6
    stacked = repack(kernels.Stacked([q4, kernels.GGMLWeight("Q8_0", weight_bytes(GGMLQuantizationType.Q8_0, 2, 64),
                                                                 (2, 64))]))
    assert [type(part).__name__ for part in stacked.parts] == ["PackedWeight", "PackedWeight"]
    x = torch.randn(3, 64)
    assert torch.equal(c_kernels.linear(x, stacked), c_kernels.linear(x, kernels.Stacked([q4.dequantize(),
                                                                                          stacked.parts[1].dense])))
