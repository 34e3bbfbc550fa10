"""The threads setting: auto rule, the busy-core measure, and application."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dgh.params import ParamsError, parse_params
from dgh.threads import ThreadsError, _cpu_jiffies, apply_threads, auto_threads, busy_cores


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [
        (2, 17.6, 1),   # heavily loaded: one thread
        (2, 0.0, 2),    # idle: every core
        (2, 0.2, 2),    # a dvc parent waiting for its stage is not a busy core
        (2, 0.3, 1),    # from a quarter of a core on, it is
        (2, 1.0, 1),
        (16, 0.2, 16),
        (16, 3.4, 12),  # 3.4 busy -> 4 cores taken
        (16, 40.0, 1),
        (1, 0.0, 1),
    ],
)
def test_auto_threads_leaves_busy_cores_alone(cores: int, busy: float, expected: int) -> None:
    assert auto_threads(cores, busy) == expected


def test_cpu_jiffies_reads_the_aggregate_line() -> None:
    text = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1\n"
    busy, total = _cpu_jiffies(text)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 0
    assert busy == total - 800 - 20  # idle and iowait are not busy
    with pytest.raises(ValueError, match="cpu"):
        _cpu_jiffies("intr 1\n")


def test_busy_cores_is_none_when_unreadable_or_unchanged(tmp_path: Path) -> None:
    assert busy_cores(0.0, tmp_path / "missing") is None
    frozen = tmp_path / "stat"
    frozen.write_text("cpu  1 0 0 9 0 0 0 0 0 0\n")
    assert busy_cores(0.0, frozen) is None  # no ticks passed: no measurement, not "idle"
    real = busy_cores(0.05)
    if Path("/proc/stat").is_file():
        assert real is not None and 0.0 <= real <= (os.cpu_count() or 1) + 1e-9


def test_apply_threads_sets_torch_and_rejects_negative() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        n = apply_threads(None)
        assert n == torch.get_num_threads() and n >= 1
        with pytest.raises(ThreadsError, match="threads must be"):
            apply_threads(-2)
    finally:
        torch.set_num_threads(before)


def test_params_threads_field() -> None:
    assert parse_params({}).threads == 0  # auto
    assert parse_params({"threads": 2}).threads == 2
    with pytest.raises(ParamsError, match="threads"):
        parse_params({"threads": -1})
