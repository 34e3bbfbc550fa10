"""The threads setting: auto rule and application."""

from __future__ import annotations

import pytest
import torch

from dgh.threads import ThreadsError, apply_threads, auto_threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 17.6, 1), (2, 0.0, 2), (2, 0.6, 1), (16, 0.2, 16), (16, 3.4, 13), (16, 40.0, 1), (1, 0.0, 1)],
)
def test_auto_threads_leaves_busy_cores_alone(cores: int, load: float, expected: int) -> None:
    assert auto_threads(cores, load) == expected


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
