"""The OpenMP worker threads the kernels (and torch) compute with.

Each thread that runs a parallel region gets a team of OpenMP workers of its own, which spin
between regions so that the next region starts at once. libgomp stops that spinning for every
team as soon as the process holds more OpenMP threads than it has cores: each region then wakes
its workers from sleep, and a decoding step runs a hundred regions. Measured on two cores: a
server whose model had computed on the loading thread (calibration) before its generation thread
took over decoded 4x slower (64 tokens at 44 against 186 tokens/s). So a thread that is done
computing hands its team back.
"""

from __future__ import annotations

import ctypes
import os

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: the threads go, the runtime stays ready


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(threads: int) -> int:
    """``threads`` if it is 1 .. :func:`usable_cpus`, else ValueError: more OpenMP threads than
    CPUs make every parallel region wait for a descheduled thread (a 1,000-thread SmolLM2 decoded
    0.3 tokens/s on two cores)."""
    cpus = usable_cpus()
    if not 1 <= threads <= cpus:
        raise ValueError(f"threads must be 1 to {cpus} (the CPUs this process may use), got {threads}")
    return threads


def release_worker_threads() -> None:
    """End the calling thread's OpenMP workers (made again if it computes later, in about a
    millisecond). A no-op outside a libgomp process or on a libgomp without
    ``omp_pause_resource_all`` (GCC < 9)."""
    try:
        pause = ctypes.CDLL("libgomp.so.1").omp_pause_resource_all
    except (OSError, AttributeError):
        return
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    pause(_OMP_PAUSE_SOFT)
