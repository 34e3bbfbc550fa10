"""Checks a command runs before its long work: the output folder is writable, no other run writes to it, and no
setting is given twice with different values.

Each failure is a :class:`PreflightError` (a ``ValueError``: the CLI prints one line and exits with status 2).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

# Headroom on top of a command's own size estimate: meta.json, previews, reports, and the atomic writer's
# temporary copy of the largest file while it is renamed into place.
DISK_HEADROOM_BYTES = 64 * 2**20


class PreflightError(ValueError):
    """An output path, a lock or a pair of settings that makes the command fail later. One line."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_output_dir(path: str | os.PathLike, *, option: str = "--out", need_bytes: int = 0) -> Path:
    """Create ``path`` (with parents) and prove it is writable with enough free space, before any work.

    A probe file is created, written, flushed to disk (``fsync``) and removed, so read-only mounts, permissions,
    quota and a full disk show up now instead of after the run.

    Args:
        path: the output folder.
        option: the option name for messages.
        need_bytes: the command's estimate of what it will write (bytes); :data:`DISK_HEADROOM_BYTES` is added.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        PreflightError: ``path`` is an existing file, cannot be created, is not writable, or its file system has
            less free space than needed.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{option} {out} is an existing file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreflightError(f"{option} {out} cannot be created ({exc.strerror or exc}); pass a writable folder") from None
    probe = out / f".dgh-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PreflightError(f"{option} {out}: no space left on the device") from None
        raise PreflightError(f"{option} {out} is not writable ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(out).free
    need = int(need_bytes) + DISK_HEADROOM_BYTES if need_bytes else 0
    if need and free < need:
        raise PreflightError(f"{option} {out}: the run writes about {_gib(need)} but only {_gib(free)} are free")
    return out


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output folder: in the temporary folder, named by a hash of the folder's absolute path,
    so the output folder itself (a DVC output) holds nothing but the results."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / "dgh-locks" / f"{key}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole command; a second command on the same folder fails at once.

    Raises:
        PreflightError: another process holds the lock.
    """
    lock_file = lock_path(out)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PreflightError(f"another dgh run is writing to {option} {out} (lock {lock_file}); wait for it to "
                             "finish or choose another folder") from None
    try:
        yield
    finally:
        lock.release()


def merge_settings(set_fields: Mapping[str, Any], options: Mapping[str, Any],
                   option_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge ``--set KEY=VALUE`` fields with the command's own options (``None`` = option not given).

    A key given both ways with different values is an error, never a silent choice; the same value twice is fine.

    Args:
        set_fields: parsed ``--set`` pairs (``{"lr": 0.001}``).
        options: ``{field: value or None}`` of the dedicated options.
        option_names: ``{field: "--option-name"}`` for messages (default ``--field-with-dashes``).

    Returns:
        the union: ``set_fields`` plus every option that was given.

    Raises:
        PreflightError: a conflict, naming both sources.
    """
    names = dict(option_names or {})
    merged = dict(set_fields)
    for key, value in options.items():
        if value is None:
            continue
        if key in set_fields and set_fields[key] != value:
            flag = names.get(key, "--" + key.replace("_", "-"))
            shown = getattr(value, "value", value)
            raise PreflightError(f"--set {key}={set_fields[key]!r} conflicts with {flag} {shown!r}; give it once")
        merged[key] = value
    return merged
