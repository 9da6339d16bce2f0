"""The kernel backends: choosing one, batch invariance, top-k, the tree layout, and the guard
that keeps arrays C would misread from reaching it."""

import ctypes
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from freespec import kernels
from freespec.kernels import abi, build
from freespec.kernels.weights import BLOCK


def test_kernel_is_built_here():
    # CI machines have gcc and AVX2; the fallback would silently lose batch invariance.
    assert kernels.select().batch_invariant


def test_old_builds_are_pruned_to_the_most_recently_used_sparing_recent_ones(tmp_path):
    """Each new set of sources compiles a new library; the cache keeps the 8 last used."""
    now = time.time()
    ages = {f"kernels-{n:016x}.so": (n + 1) * 86400.0 for n in range(11)}  # one a day, 1 to 11 days old
    ages["kernels-recent.so"] = 60.0
    ages["other.txt"] = 100 * 86400.0  # not a build
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    build.prune(tmp_path, keep=4)
    kept = sorted(path.name for path in tmp_path.iterdir())
    # the recent one and the three newest days stay; a build used in the last 10 minutes always would
    assert kept == ["kernels-0000000000000000.so", "kernels-0000000000000001.so", "kernels-0000000000000002.so",
                    "kernels-recent.so", "other.txt"]
    for name in ("kernels-0000000000000000.so", "kernels-0000000000000001.so"):
        os.utime(tmp_path / name, (now - 30, now - 30))  # used minutes ago, as by other processes
    build.prune(tmp_path, keep=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "kernels-0000000000000000.so", "kernels-0000000000000001.so", "kernels-recent.so", "other.txt"]


def test_a_build_is_chosen_by_argument_or_environment_and_a_bad_one_is_named():
    assert kernels.select("avx2").isa == "avx2" and kernels.select("avx2") is kernels.select("avx2")
    assert kernels.select("torch").isa == "torch" and not kernels.select("torch").batch_invariant
    assert build.requested_isa({"FREESPEC_KERNEL_ISA": "avx2"}) == "avx2"
    assert build.requested_isa({"FREESPEC_NO_KERNEL": "1", "FREESPEC_KERNEL_ISA": "avx2"}) == "torch"
    assert build.requested_isa({}) == kernels.supported_isas()[0]
    with pytest.raises(ValueError, match="FREESPEC_KERNEL_ISA must be avx2 or avx512, not 'sse'"):
        build.requested_isa({"FREESPEC_KERNEL_ISA": "sse"})
    with pytest.raises(ValueError, match="unknown kernel build 'sse': expected one of avx512, avx2, torch"):
        kernels.select("sse")


@pytest.mark.parametrize("flags, isas", [
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw"}, ["avx512", "avx2"]),
    ({"avx2", "fma", "f16c", "avx512f"}, ["avx2"]),  # the AVX-512 build signs IQ codes with AVX-512BW
    ({"avx2", "fma"}, []),
])
def test_the_builds_a_cpu_runs_follow_its_flags(monkeypatch, flags, isas):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(flags))
    assert build.supported_isas() == isas


@pytest.mark.parametrize("k", [8, 37, 64, 576])
def test_kernel_matches_torch_and_is_batch_invariant(k, kernel_build):
    torch.manual_seed(0)
    x, w, b = torch.randn(70, k), torch.randn(53, k), torch.randn(53)
    full = kernel_build.linear(x[:40], w, b)
    torch.testing.assert_close(full, F.linear(x[:40], w, b), rtol=1e-5, atol=1e-4)
    for rows in (1, 2, 3, 7, 13, 40):
        # any row, computed in any batch, gives the same bits
        assert torch.equal(kernel_build.linear(x[:rows], w, b), full[:rows])
    assert torch.equal(kernel_build.linear(x[5:6], w, b)[0], full[5])
    assert torch.equal(kernel_build.linear(x, w)[:40], kernel_build.linear(x[:40], w))  # invariant at any size
    assert kernel_build.linear(torch.empty(0, k), w).shape == (0, 53)  # no rows: no kernel call


@pytest.mark.parametrize("vocab", [5, 8, 1000, 49157])
def test_top_k_matches_torch(vocab, c_kernels):
    torch.manual_seed(0)
    logits = torch.randn(7, vocab) * 3
    logits[3] = 0.5  # a row of ties: the first index wins, like torch.argmax
    logits[4, [2, vocab - 1]] = 100.0
    k = min(8, vocab)
    values, ids, normalizer = (torch.from_numpy(array) for array in c_kernels.top_k(logits, k))
    expected_values, _ = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(logits.gather(1, ids), values)  # ids point at those values, each once
    assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.equal(ids[:, 0], torch.argmax(logits, dim=-1))
    assert torch.equal(torch.from_numpy(c_kernels.argmax(logits)), torch.argmax(logits, dim=-1))
    assert ids[3].tolist() == list(range(k))
    torch.testing.assert_close(normalizer, torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_the_tree_layout_has_one_home_in_c(n, c_kernels):
    """The C layout is what the attention kernel reads: each row's visible tokens ascending,
    padded with n, their count, and whether the mask is causal (a prefill chunk)."""
    heads = kernels.Heads(2, 1, 8, 0.5)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masks = [causal, causal & (torch.rand(n, n, generator=torch.Generator().manual_seed(n)) < 0.5)
             | torch.eye(n, dtype=torch.bool)]
    for mask in masks:
        attention = c_kernels.attention(3, mask, heads)
        expected_nodes = torch.where(mask, torch.arange(n), n).sort(dim=1).values
        assert torch.equal(attention._nodes, expected_nodes) and torch.equal(attention._count, mask.sum(dim=1))
        assert attention._causal == int(torch.equal(mask, causal))


@pytest.mark.parametrize("heads, kv_heads, dim, window", [(9, 3, 64, None), (4, 1, 256, 24), (6, 3, 128, None),
                                                          (8, 2, 64, None), (15, 5, 64, 30)])
def test_a_row_attends_to_the_same_bits_in_a_prefill_chunk_a_chain_or_alone_on_any_threads(heads, kv_heads, dim,
                                                                                          window, c_kernels):
    """A row's attention has one set of bits whether a prefill chunk's causal path computes it, a
    chain of draft rows or a decoding step, and whatever the threads: also with KV heads that do
    not share evenly among them (SmolLM2's 3 on two threads, Gemma 3's one of 256 columns) and
    sliding windows."""
    geometry = kernels.Heads(heads, kv_heads, dim, dim**-0.5)
    total = 44  # a 41-token chunk (the causal path: 32 rows or more), then a chain of 3, or 3 steps of 1
    generator = torch.Generator().manual_seed(dim + kv_heads)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim, generator=generator)
    positions = torch.arange(total)

    def attend(splits: list[int]) -> torch.Tensor:
        keys, values = torch.zeros(kv_heads, total, dim), torch.zeros(kv_heads, total, dim)
        outputs, past = [], 0
        for n in splits:
            attention = c_kernels.attention(past, torch.ones(n, n, dtype=torch.bool).tril(), geometry,
                                            positions[past : past + n])
            outputs.append(attention(qkv[past : past + n], keys, values, window=window))
            past += n
        return torch.cat(outputs)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = attend([total])  # one causal chunk
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert torch.equal(attend([total - 3, 3]), expected), f"a chain of 3 on {count} threads"
            assert torch.equal(attend([total - 3, 1, 1, 1]), expected), f"single rows on {count} threads"
    finally:
        torch.set_num_threads(threads)


def test_the_guard_refuses_arrays_c_would_misread(c_kernels):
    """A wrong width read past the weights (a segfault) and fp16 bits were read as fp32: every
    array now passes dtype, shape and contiguity checks before C sees its address."""
    weight = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"linear input: .* shape \[3, 64\], got a .* shape \[3, 65\]"):
        c_kernels.linear(torch.randn(3, 65), weight)
    with pytest.raises(ValueError, match="linear input: the kernel needs a contiguous torch.float32 tensor"):
        c_kernels.linear(torch.randn(3, 64).half(), weight)
    with pytest.raises(ValueError, match="weight: .* got a non-contiguous torch.float32 tensor of shape \\[8, 64\\]"):
        c_kernels.linear(torch.randn(3, 64), torch.randn(64, 8).t())
    with pytest.raises(ValueError, match="logits: .* got a torch.float16 tensor"):
        c_kernels.argmax(torch.randn(2, 50).half())
    heads = kernels.Heads(2, 1, 8, 0.5)
    attention = c_kernels.attention(0, torch.ones(2, 2, dtype=torch.bool).tril(), heads)
    keys, values = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match=r"qkv: .* shape \[2, 32\]"):
        attention(torch.randn(2, 24), keys, values)
    with pytest.raises(ValueError, match="cache overflow: 2 rows needed, capacity 1"):
        attention(torch.randn(2, 32), keys[:, :1].contiguous(), values[:, :1].contiguous())
    with pytest.raises(ValueError, match="tree mask: .* got a torch.float32 tensor"):
        c_kernels.attention(0, torch.ones(2, 2), heads)


def test_packed_weights_refuse_layouts_the_kernel_would_misread():
    codes, scales = torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, 2)
    assert kernels.PackedWeight("q4", codes, scales).shape == (4, 64)
    with pytest.raises(ValueError, match="unknown block kind 'q5'"):
        kernels.PackedWeight("q5", codes, scales)
    with pytest.raises(ValueError, match="q4 blocks need torch.uint8 codes and float32 scales"):
        kernels.PackedWeight("q4", codes.float(), scales)
    with pytest.raises(ValueError, match=r"q4 scales \[4, 2\] do not fit a \[4, 64\] matrix"):
        kernels.PackedWeight("q4", codes, scales[..., 0].contiguous())
    with pytest.raises(ValueError, match="q8 blocks need torch.int8 codes"):
        kernels.PackedWeight("q8", codes, torch.zeros(4, 1))
    assert kernels.PackedWeight("q8", torch.zeros(4, BLOCK, dtype=torch.int8), torch.zeros(4, 1)).shape == (4, 32)


def _header_functions() -> dict[str, int]:
    """Each function the header declares, with its number of parameters."""
    header = re.sub(r"/\*.*?\*/", "", build.SOURCES[0].read_text(), flags=re.S)
    return {name: len(parameters.split(",")) for name, parameters in
            re.findall(r"^\w[\w ]*?\b(freespec_\w+)\(([^)]*)\);", header, flags=re.M)}


def test_the_ctypes_declarations_mirror_the_header(tmp_path):
    """Argument counts, struct fields, their order and their offsets agree with the C compiler's."""
    declared = {name: len(arguments) for name, (_, arguments) in abi.SIGNATURES.items()}
    assert _header_functions() == declared
    structs = (abi.Matrix, abi.DecoderLayer, abi.DecoderSequence, abi.DecoderPass)
    lines = [f'printf("%zu\\n", sizeof({s.__name__}));' for s in structs]
    lines += [f'printf("%zu\\n", offsetof({s.__name__}, {field}));' for s in structs for field, _ in s._fields_]
    program = "#include <stddef.h>\n#include <stdio.h>\n#include \"freespec.h\"\nint main(void) {\n" \
              + "\n".join(lines) + "\nreturn 0;\n}\n"
    (tmp_path / "layout.c").write_text(program)
    subprocess.run(["gcc", "-std=c11", "-I", str(build.SOURCES[0].parent), str(tmp_path / "layout.c"), "-o",
                    str(tmp_path / "layout")], check=True)
    printed = [int(line) for line in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                                                    check=True).stdout.split()]
    offsets = [getattr(s, field).offset for s in structs for field, _ in s._fields_]
    assert printed == [ctypes.sizeof(s) for s in structs] + offsets


def test_a_failed_allocation_in_the_decoder_is_a_memory_error():
    """The decoder's scratch (here 256 MB of attention scores) was never NULL-checked: under a
    memory limit the pass wrote through a NULL pointer. Now nothing is written and Python
    raises MemoryError; the runner stays usable."""
    script = textwrap.dedent("""
        import resource
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig
        from freespec import kernels
        from freespec.model.loading import from_transformers
        from freespec.model.runner import ModelRunner

        config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=64, num_key_value_heads=64, max_position_embeddings=2048)
        loaded = from_transformers(AutoModelForCausalLM.from_config(config).eval(), None, "tiny", pack=False)
        runner = ModelRunner(loaded.config, loaded.weights, kernels.select())
        assert runner._decoder is not None
        n = 1024  # scores: n tokens x 64 heads x n keys x 4 bytes = 256 MB
        runner.reset(n)
        mask = torch.ones(n, n, dtype=torch.bool)
        tokens, positions = torch.arange(n) % 64, torch.arange(n)
        runner.forward(tokens[:4], positions[:4], mask[:4, :4])  # warm: tables, thread pool
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (96 << 20), resource.RLIM_INFINITY))
        try:
            runner.forward(tokens, positions, mask)
        except MemoryError as error:
            print("MemoryError:", error)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(runner.logits(runner.forward(tokens[:4], positions[:4], mask[:4, :4])).shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemoryError: the decoder pass: the kernel could not allocate its scratch memory" in result.stdout
    assert "torch.Size([4, 64])" in result.stdout
