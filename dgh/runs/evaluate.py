"""Evaluate a float or quantized model into ``metrics.json`` (used by ``dgh evaluate-*`` and the DVC stages)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dgh.data.classification import ClassLayout
from dgh.evaluation import evaluate_classification, evaluate_coco
from dgh.export import Backend, onnx_model_for
from dgh.io import write_json
from dgh.layout import QUANTIZED_FILE
from dgh.models import LoadedModel
from dgh.quantization import load_quantized


class EvaluationInputError(ValueError):
    """The evaluation inputs are inconsistent (e.g. both or neither label source). One line."""


@dataclass(frozen=True)
class ClassificationData:
    """An ImageFolder (ImageNet val layout), an optional image limit (deterministic class-balanced subset) and the
    batch size."""

    data: Path
    limit: int | None = None
    batch_size: int = 256
    class_layout: ClassLayout = ClassLayout.NAMES


@dataclass(frozen=True)
class DetectionData:
    """An image folder and exactly one of ``labels`` (YOLO txt folder) or ``annotations`` (COCO instances json);
    ``imgsz`` the square network input in pixels (``None``: the model's)."""

    images: Path
    labels: Path | None = None
    annotations: Path | None = None
    imgsz: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.annotations is None):
            raise EvaluationInputError("pass exactly one of annotations (COCO json) or labels (YOLO label folder)")


def model_to_evaluate(loaded: LoadedModel, quantized: str | Path | None) -> nn.Module:
    """The float model (``quantized`` None) or the quantized model saved at ``quantized`` (a ``quantized.pt`` or the
    folder holding one).

    Raises:
        FileNotFoundError: no ``quantized.pt`` there.
    """
    if quantized is None:
        return loaded.model
    path = Path(quantized)
    path = path / QUANTIZED_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (pass the output folder of `dgh quantize`)")
    return load_quantized(loaded, str(path))


def evaluate_to_file(
    loaded: LoadedModel,
    data: ClassificationData | DetectionData,
    metrics_out: str | Path,
    *,
    quantized: str | Path | None = None,
    record: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool = True,
    backend: Backend | str = Backend.pytorch,
    onnx: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the float model or the one in ``quantized`` and write ``metrics_out`` (JSON).

    Classification (:class:`ClassificationData`): ``top1``, ``top5`` (percent), ``n_images``.
    Detection (:class:`DetectionData`): ``map`` (mAP@[.5:.95], 0-1), ``map50`` (0-1), ``n_images``.
    The file holds those metrics, ``backend`` (``pytorch``, or ``onnxruntime`` when ``backend`` is onnxruntime: the
    exported ``onnx`` file is run by onnxruntime on the CPU, see :mod:`dgh.export.runtime`), then ``record`` and
    ``seconds`` (wall time).

    Returns:
        the metrics (without ``record``/``seconds``).
    """
    t0 = time.perf_counter()
    backend = Backend(backend)
    if backend == Backend.onnxruntime:
        if onnx is None:
            raise EvaluationInputError("--backend onnxruntime needs the exported model (--onnx model.onnx or its folder)")
        net = onnx_model_for(loaded, onnx)
        device = "cpu"  # the session copies to the host itself
    else:
        net = model_to_evaluate(loaded, quantized)
    if isinstance(data, ClassificationData):
        metrics = evaluate_classification(net, loaded.spec, str(data.data), limit=data.limit,
                                          batch_size=data.batch_size, device=device, progress=progress,
                                          class_layout=data.class_layout)
    else:
        metrics = evaluate_coco(net, loaded, str(data.images),
                                annotations=str(data.annotations) if data.annotations else None,
                                labels=str(data.labels) if data.labels else None, imgsz=data.imgsz,
                                batch_size=data.batch_size, device=device, progress=progress)
    metrics = {**metrics, "backend": backend.value}
    write_json({**metrics, **(record or {}), "seconds": round(time.perf_counter() - t0, 2)}, metrics_out)
    return metrics
