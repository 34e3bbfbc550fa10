"""Process-level runtime settings: offline switches and device auto-detection.

Every entry point (CLI, DVC stage, test session) calls :func:`configure_offline` before importing
ultralytics, MLflow or DVC, so that nothing reaches the network at run time.
"""

from __future__ import annotations

import os

import torch

OFFLINE_ENV: dict[str, str] = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_VERBOSE": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}


def configure_offline() -> None:
    """Set the offline environment variables (without overriding values the user set)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def resolve_device(device: str | None = None) -> torch.device:
    """Return ``torch.device(device)``, or CUDA when available and ``device`` is None/"auto", else CPU.

    Raises:
        ValueError: ``device`` is not a device string torch knows (``banana``, ``gpu0``), names an accelerator
            type other than CPU/CUDA, or names CUDA (or a CUDA index) that is not present.
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model with neither."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")
