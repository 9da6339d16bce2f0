"""A thread done computing hands its OpenMP workers back (freespec.kernels.threads): libgomp stops
every team's spinning once a process holds more OpenMP threads than cores."""

from __future__ import annotations

import torch

from freespec.kernels import release_worker_threads
from tests.helpers import os_threads, wait_for


def test_releasing_ends_the_calling_threads_workers_and_computing_makes_them_again(c_kernels):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        x, weight = torch.randn(64, 256), torch.randn(96, 256)
        expected = c_kernels.linear(x, weight)  # a parallel region: a team of 3 on this thread
        with_team = os_threads()
        release_worker_threads()
        wait_for(lambda: os_threads() == with_team - 2, seconds=5)  # its two workers are gone
        assert torch.equal(c_kernels.linear(x, weight), expected)  # the next region makes them again
        wait_for(lambda: os_threads() == with_team, seconds=5)
    finally:
        torch.set_num_threads(threads)
