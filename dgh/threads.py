"""The ``threads`` setting: how many intra-op (OpenMP) threads torch uses on the CPU.

Default (``threads`` = ``None`` or 0, "auto"): one thread per core that is not already busy, i.e.
``max(1, cores - round(1-minute load average))``, capped at the core count. Oversubscription is what makes more
threads slower: OpenMP barriers spin while the other threads wait for a core. Measured on the project's 2-core CPU
with about 8 other jobs running (load average 17), ResNet-20 forward+backward of 32 CIFAR images: 1.13 s with 1
thread, 8.88 s with 2 threads (7.9x slower); on an idle multi-core machine (e.g. a GPU box) auto uses all cores.
"""

from __future__ import annotations

import os

import torch


class ThreadsError(ValueError):
    """A thread count that cannot be applied. The message is one line."""


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads(cores: int | None = None, load_average: float | None = None) -> int:
    """The auto thread count: ``max(1, cores - round(load_average))``, at most ``cores``.

    Args:
        cores: default :func:`available_cores`.
        load_average: 1-minute load average; default ``os.getloadavg()[0]`` (0 where the OS has none).
    """
    n = available_cores() if cores is None else cores
    if load_average is None:
        try:
            load_average = os.getloadavg()[0]
        except (AttributeError, OSError):
            load_average = 0.0
    return max(1, min(n, n - round(load_average)))


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    Args:
        threads: a positive count, or ``None``/0 for :func:`auto_threads`.

    Raises:
        ThreadsError: a negative count.
    """
    if threads is not None and threads < 0:
        raise ThreadsError(f"threads must be >= 1, or 0/None for auto; got {threads}")
    n = auto_threads() if not threads else int(threads)
    torch.set_num_threads(n)
    return n
