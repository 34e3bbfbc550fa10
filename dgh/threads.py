"""The ``threads`` setting: how many intra-op (OpenMP) threads torch uses on the CPU.

Default (``threads`` = 0 or ``None``, "auto"): one thread per core that is not busy right now. Busy cores are
measured over a short window from ``/proc/stat`` (the CPU time other processes used in ``sample_s`` seconds,
divided by the window), not from the load average: a ``dvc repro`` stage starts seconds after the one before it,
whose own work still sits in the 1-minute load average and would make an idle machine look busy. Where
``/proc/stat`` is missing the 1-minute load average is used instead.

Oversubscription is what makes more threads slower: OpenMP barriers spin while the other threads wait for a core.
Measured on the project's 2-core CPU with about 8 other jobs running (load average 17), ResNet-20 forward+backward of
32 CIFAR images: 1.13 s with 1 thread, 8.88 s with 2 threads (7.9x slower). On the same 2 cores idle, 2 threads made
that step 1.7x faster (150 -> 88 ms) and an EfficientNet-Lite0 forward of 16 images 1.4-1.7x faster (1.2-1.5 s ->
0.84-0.90 s). A core counts as busy from 0.25 of it (:func:`auto_threads`), so a light background job already keeps
one thread off it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
BUSY_FROM = 0.25  # a core counts as busy when other processes use at least this share of it


class ThreadsError(ValueError):
    """A thread count that cannot be applied. The message is one line."""


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_jiffies(stat_text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks of the aggregate ``cpu`` line of ``/proc/stat`` (idle = idle + iowait;
    guest time is already inside user/nice and is not counted twice).

    Raises:
        ValueError: no ``cpu`` line.
    """
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            total = sum(ticks)
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def busy_cores(sample_s: float = 0.2, stat_path: Path = PROC_STAT) -> float | None:
    """Cores' worth of CPU time all processes used during the next ``sample_s`` seconds (this process sleeps, so
    it is the others), e.g. 1.0 = one core fully busy. All cores of the machine are counted, not only this
    process's affinity set.

    Returns:
        A float in ``[0, cores]``, or None where ``stat_path`` cannot be read or parsed.
    """
    try:
        busy0, total0 = _cpu_jiffies(stat_path.read_text())
        time.sleep(sample_s)
        busy1, total1 = _cpu_jiffies(stat_path.read_text())
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    n_all = os.cpu_count() or 1
    return n_all * (busy1 - busy0) / (total1 - total0)


def auto_threads(cores: int | None = None, busy: float | None = None) -> int:
    """The auto thread count: ``cores - ceil(busy - 0.25)``, between 1 and ``cores``.

    Args:
        cores: default :func:`available_cores`.
        busy: busy cores right now; default :func:`busy_cores`, or the 1-minute load average where that is None.
            A core used to less than 0.25 (e.g. a ``dvc`` parent waiting for its stage) counts as free.
    """
    n = available_cores() if cores is None else cores
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    taken = max(0, math.ceil(busy - BUSY_FROM))
    return max(1, min(n, n - taken))


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
