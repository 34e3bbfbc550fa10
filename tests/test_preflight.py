"""Preflight checks: output folder writability and space, one run per output folder, --set conflicts."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
from pathlib import Path

import pytest

from dgh.preflight import PreflightError, check_output_dir, lock_path, merge_settings, output_lock


def test_output_dir_created_and_probe_removed(tmp_path: Path) -> None:
    out = check_output_dir(tmp_path / "a" / "b", need_bytes=1000)
    assert out.is_dir() and list(out.iterdir()) == []


def test_existing_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PreflightError, match="is an existing file"):
        check_output_dir(f)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is a read-only place on Linux only")
def test_read_only_place_is_refused() -> None:
    with pytest.raises(PreflightError, match="cannot be created|not writable"):
        check_output_dir("/sys/dgh-test-out")


def test_not_enough_space_is_refused(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(PreflightError, match="only .* GiB are free"):
        check_output_dir(tmp_path / "o", need_bytes=free + 2**30)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_device_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the probe write fails with ENOSPC (simulated by writing into /dev/full)."""
    import os

    real_open = os.open

    def open_full(path, flags, mode=0o777):  # noqa: ANN001, ANN202
        return real_open("/dev/full", os.O_WRONLY) if ".dgh-write-probe" in str(path) else real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_full)
    with pytest.raises(PreflightError, match="no space left"):
        check_output_dir(tmp_path / "o")


def _hold(out: str, ready, release) -> None:  # noqa: ANN001 - multiprocessing Events
    with output_lock(out):
        ready.set()
        release.wait(30)


def test_second_run_on_the_same_out_is_refused(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path / "o"), ready, release))
    other.start()
    try:
        assert ready.wait(30)
        with pytest.raises(PreflightError, match="another dgh run is writing to --out"):
            with output_lock(tmp_path / "o"):
                pass
        with output_lock(tmp_path / "other"):  # another folder: free
            pass
    finally:
        release.set()
        other.join(30)
    with output_lock(tmp_path / "o"):  # released when the first run ends
        pass
    assert not lock_path(tmp_path / "o").is_relative_to(tmp_path)  # nothing written into the output folder


def test_set_conflicts() -> None:
    assert merge_settings({"lr": 0.001}, {"lr": None, "iterations": 5}) == {"lr": 0.001, "iterations": 5}
    assert merge_settings({"lr": 16}, {"lr": 16.0}) == {"lr": 16.0}  # the same value twice is fine
    with pytest.raises(PreflightError, match=r"--set lr=0.001 conflicts with --lr 16"):
        merge_settings({"lr": 0.001}, {"lr": 16.0})
    with pytest.raises(PreflightError, match=r"--set iterations=1 conflicts with --iters 1000"):
        merge_settings({"iterations": 1}, {"iterations": 1000}, {"iterations": "--iters"})
