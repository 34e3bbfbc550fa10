"""Outputs of a generation run: ``images.pt``, ``meta.json``, ``preview.png`` (all written atomically)."""

from __future__ import annotations

import io
import platform
import sys
from pathlib import Path

import torch
import torchvision

import dgh
from dgh.io import IMAGES_FILE, save_images, write_bytes, write_json
from dgh.models.spec import ModelSpec

META_FILE = "meta.json"
PREVIEW_FILE = "preview.png"
CHECKPOINT_FILE = "checkpoint.pt"


def library_versions() -> dict[str, str]:
    """Versions of python, torch, torchvision, dgh and (when imported) ultralytics."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dgh": dgh.__version__,
    }
    if "ultralytics" in sys.modules:
        versions["ultralytics"] = getattr(sys.modules["ultralytics"], "__version__", "?")
    return versions


def preview_png(images_nchw: torch.Tensor, spec: ModelSpec, max_images: int | None = None) -> bytes:
    """PNG bytes of a grid of the first images, denormalized to [0, 1] pixels and clamped.

    ``max_images`` defaults to 64 for inputs up to 64 px and 16 above (keeps the preview small for 640 px YOLO).
    """
    if max_images is None:
        max_images = 64 if max(images_nchw.shape[-2:]) <= 64 else 16
    x = spec.denormalize(images_nchw[:max_images].detach().float().cpu()).clamp(0, 1)
    buf = io.BytesIO()
    torchvision.utils.save_image(x, buf, format="png", nrow=8, padding=2)
    return buf.getvalue()


def write_outputs(out_dir: str | Path, images_nchw: torch.Tensor, meta: dict, spec: ModelSpec) -> dict[str, Path]:
    """Write ``images.pt`` (:func:`dgh.io.save_images`: float32 ``(N, 3, H, W)`` normalized space), ``meta.json`` and
    ``preview.png`` into ``out_dir`` (created). Each file is atomic; ``images.pt`` is written last-but-one and
    ``meta.json`` last, so a present ``meta.json`` means a complete set."""
    out = Path(out_dir)
    paths = {
        "preview": write_bytes(preview_png(images_nchw, spec), out / PREVIEW_FILE),
        "images": save_images(images_nchw, out / IMAGES_FILE),
    }
    paths["meta"] = write_json(meta, out / META_FILE)
    return paths
