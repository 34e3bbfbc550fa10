"""Atomic file output: write to a temporary file in the same folder, then ``os.replace``.

A killed process therefore never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` on a temporary path next to ``path``, then rename it to ``path``.

    Parent folders are created. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, _DEFAULT_FILE_MODE)  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` atomically. Saved through a file object, so the archive holds no file name and the same
    ``obj`` gives the same bytes (a path would embed the temporary file's random name)."""

    def write(p: Path) -> None:
        with p.open("wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write a binary file atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


# ------------------------------------------------------------------------------------------- images.pt format
IMAGES_FILE = "images.pt"


class ImagesFileError(ValueError):
    """An ``images.pt`` file is missing or does not hold an ``(N, 3, H, W)`` float tensor. One line."""


def save_images(images_nchw: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a calibration set as ``images.pt``: a bare float32 ``(N, 3, H, W)`` CPU contiguous tensor in the model's
    normalized input space (``torch.save``, atomic). The one writer of the format; :func:`load_images` reads it.

    Raises:
        ImagesFileError: ``images_nchw`` is not 4-D with 3 channels.
    """
    if images_nchw.ndim != 4 or images_nchw.shape[1] != 3:
        raise ImagesFileError(f"images must be (N, 3, H, W), got {tuple(images_nchw.shape)}")
    return save_torch(images_nchw.detach().to("cpu", torch.float32).contiguous(), path)


def load_images(path: str | os.PathLike) -> torch.Tensor:
    """Read an ``images.pt`` written by :func:`save_images` (``weights_only`` load, nothing executed).

    Returns:
        float32 ``(N, 3, H, W)`` on the CPU, normalized space.

    Raises:
        ImagesFileError: missing file, not loadable, or not an ``(N, 3, H, W)`` floating-point tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagesFileError(f"images file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not an images file"
        raise ImagesFileError(f"{path} is not a loadable images tensor file ({type(exc).__name__})") from None
    if not isinstance(obj, torch.Tensor) or obj.ndim != 4 or obj.shape[1] != 3 or not obj.is_floating_point():
        what = (f"a {str(obj.dtype).removeprefix('torch.')} tensor of shape {tuple(obj.shape)}"
                if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}")
        raise ImagesFileError(f"{path} holds {what}, not an (N, 3, H, W) float images tensor in the model's "
                              "normalized space")
    return obj.float()
