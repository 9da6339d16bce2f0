"""benchmarks/kernel_ab.py: two kernel builds in one process, a git revision's against the working tree's."""

import subprocess
from pathlib import Path

import pytest
import torch

import freespec
from freespec.api import Model
from freespec.kernels.backend import CKernels
from tests.helpers import load_benchmark

REPOSITORY = Path(__file__).resolve().parents[2]


def load_script():
    return load_benchmark("kernel_ab")


def committed_kernels_are_the_working_trees() -> bool:
    changed = subprocess.run(["git", "-C", str(REPOSITORY), "diff", "--quiet", "HEAD", "--",
                              "freespec/kernels/csrc"], capture_output=True)
    return changed.returncode == 0


def test_a_revisions_build_runs_beside_the_working_trees_with_the_same_bits(tiny_model_dir, c_kernels, tmp_path):
    """HEAD's sources compiled apart (the working tree's own, on a clean checkout) give the same
    logits pass by pass, and the table has a row per size with both builds' times."""
    if not isinstance(c_kernels, CKernels) or not committed_kernels_are_the_working_trees():
        pytest.skip("needs the C kernels and committed kernel sources")
    kernel_ab = load_script()
    base = CKernels(kernel_ab.build_revision("HEAD", c_kernels.isa, tmp_path), c_kernels.isa)
    loaded = freespec.load(str(tiny_model_dir)).loaded
    runners = {"base": Model(loaded, kernels=base).runner, "working tree": Model(loaded, kernels=c_kernels).runner}
    rows = kernel_ab.paired_costs(runners, [1, 3], rounds=2, batch=1, cached=12)
    assert [row["q"] for row in rows] == [1, 3]
    assert all(row["same_bits"] and row["base"] > 0 and row["working tree"] > 0 and row["ratio"] > 0 for row in rows)
    x = torch.randn(2, 64)
    weight = torch.randn(7, 64)
    assert torch.equal(base.linear(x, weight), c_kernels.linear(x, weight))


def test_a_revision_without_the_kernels_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"kernel_ab: no freespec/kernels/csrc/freespec.h at 'no-such-revision'"):
        load_script().build_revision("no-such-revision", "avx2", tmp_path)


def test_a_header_is_compared_without_its_comments():
    declarations = load_script()._declarations
    assert declarations(b"/* one */ int f(int x); // two\n") == declarations(b"int f(int x);")
    assert declarations(b"int f(int x);") != declarations(b"int f(long x);")
