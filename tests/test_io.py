"""Atomic output: nothing half-written on failure, and ordinary file permissions on success."""

from __future__ import annotations

import os
import stat

import pytest

from dgh.io import atomic_write, write_json, write_text


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.txt"
    write_text("old", path)

    class Boom(Exception):
        pass

    def explode(_tmp):
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, explode)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # the temporary file is gone


def test_atomic_write_uses_umask_permissions(tmp_path):
    """mkstemp creates 0600 files; outputs must get the mode any ``open(..., "w")`` would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    path = write_json({"a": 1}, tmp_path / "m.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
