"""Model-loading helpers shared by the registry and every model family: errors, weights files, detection specs.

Detection specs: ``input_size = (imgsz, imgsz)`` (default 640, a multiple of 32); mean 0 / std 1 (RGB in [0, 1]);
``pad`` p = ``round(0.1 * imgsz)`` (64 at 640): YOLO trains with random translation of +-10 % of the image size
(``translate=0.1`` in the YOLOv5/ultralytics default hyper-parameters), the analogue of the crop jitter p models for
classifiers; ``output_loss_weight`` = 1e-5, MCT's default, which MCT's data-generation README used for YOLOv8n. Both
are starting points for the lambda_out sweep (method.md section 3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgh.errors import first_line
from dgh.models.safe_pickle import UnsafeCheckpointError, safe_load_checkpoint
from dgh.models.spec import ModelSpec


class ModelLoadError(ValueError):
    """A model name, weights file or checkpoint could not be used. The message is one actionable line."""


RANDOM_WEIGHTS = "random"  # ``weights=`` value that builds any family with random weights (tests, smoke runs)
DEFAULT_DETECTION_IMGSZ = 640


def load_state_dict_file(path: Path) -> dict:
    """``torch.load(weights_only=True)``; never executes pickled code.

    Raises:
        ModelLoadError: missing file, or not a torch checkpoint.
    """
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path} (pass --weights PATH to an existing checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a checkpoint"
        raise ModelLoadError(f"{path} is not a loadable weights-only torch checkpoint ({first_line(exc)})") from None


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line error naming missing and unexpected keys.

    Raises:
        ModelLoadError: when keys or shapes do not match.
    """
    own = model.state_dict()
    # num_batches_tracked is bookkeeping that some checkpoints (akamaster) omit; keep the model's own.
    state_dict = dict(state_dict)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = own[k]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or bad_shape:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatch: {head(bad_shape)}")
        raise ModelLoadError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def detection_spec(name: str, family: str, imgsz: int | None = None, class_names: tuple[str, ...] = (),
                   num_classes: int = 80, default_weights: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a YOLO detector at ``imgsz`` (see the module docstring for ``pad`` and lambda_out).

    Raises:
        ModelLoadError: ``imgsz`` not a positive multiple of 32.
    """
    imgsz = DEFAULT_DETECTION_IMGSZ if imgsz is None else int(imgsz)
    if imgsz <= 0 or imgsz % 32:
        raise ModelLoadError(f"--imgsz must be a positive multiple of 32 (the largest YOLO stride), got {imgsz}")
    return ModelSpec(
        name=name,
        family=family,
        task="detection",
        input_size=(imgsz, imgsz),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        pad=round(0.1 * imgsz),
        output_loss_weight=1e-5,
        num_classes=len(class_names) or num_classes,
        class_names=tuple(class_names),
        default_weights=default_weights,
    )


def sniff_checkpoint_family(path: str) -> str:
    """``yolov5_classic`` when a ``.pt`` pickles the original YOLOv5 ``models.yolo.Model``, else ``ultralytics``.

    Uses the restricted unpickler, so sniffing runs no checkpoint code.
    """
    if Path(path).suffix.lower() != ".pt" or not Path(path).is_file():
        return "ultralytics"
    try:
        _, replaced = safe_load_checkpoint(path)
    except UnsafeCheckpointError:
        return "ultralytics"
    return "yolov5_classic" if "models.yolo.Model" in replaced else "ultralytics"
