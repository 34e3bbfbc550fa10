"""Run an exported ONNX model with onnxruntime behind the PyTorch forward contract, and evaluate it.

:class:`OnnxRuntimeModel` is an ``nn.Module`` whose forward feeds the input to an onnxruntime session, so the
accuracy code in :mod:`dgh.evaluation` scores the exported file itself with the same data pipeline, decode and NMS as
the PyTorch models: classification returns logits ``(N, num_classes)``, detection the list of raw per-level maps.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from dgh.evaluation.classification import evaluate_classification
from dgh.evaluation.coco import evaluate_coco
from dgh.export.qdq import ExportError
from dgh.models.spec import LoadedModel, ModelSpec


class Backend(str, Enum):
    """Which runtime produces an evaluation figure: the PyTorch model (float or fake-quant) or onnxruntime on the
    exported ``model.onnx``."""

    pytorch = "pytorch"
    onnxruntime = "onnxruntime"


class GraphOptimization(str, Enum):
    """onnxruntime graph optimization level.

    ``none`` (the default here) runs the graph as written: float convolutions between QuantizeLinear/DequantizeLinear
    pairs, the fake-quant arithmetic up to float accumulation order. ``all`` (onnxruntime's own default) fuses QDQ
    groups into integer kernels (``QLinearConv`` with an int32-rounded bias and a requantization multiplier) and
    re-lays out convolutions: several times faster, but it rounds differently from the fake-quant model about 100x
    more often (measured on ResNet-20 W4A8: top-1 77.13 with ``all``, 77.27 with ``none``, 77.28 fake-quant
    PyTorch, 10,000 CIFAR-10 test images)."""

    none = "none"
    basic = "basic"
    extended = "extended"
    all = "all"

    def ort_level(self) -> ort.GraphOptimizationLevel:
        return {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.value]


DEFAULT_OPTIMIZATION = GraphOptimization.none


def session_options(threads: int | None = None,
                    optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> ort.SessionOptions:
    """Session options: ``threads`` intra-op threads (default ``torch.get_num_threads()``), the given graph
    optimization level, warnings only."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = GraphOptimization(optimization).ort_level()
    opts.log_severity_level = 3
    return opts


def make_session(model: str | Path | bytes, threads: int | None = None,
                 optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> ort.InferenceSession:
    """An onnxruntime session on ``model`` (``.onnx`` path or serialized bytes), CUDA when its provider is installed,
    else CPU."""
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, sess_options=session_options(threads, optimization), providers=_providers())


def _providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime with an ``nn.Module`` forward.

    Args:
        path: the ``.onnx`` file (from :func:`~dgh.export.onnx_export.export_onnx`).
        as_list: return a list of tensors (detectors: one raw map per level) instead of the single output tensor.
        threads: intra-op threads (default ``torch.get_num_threads()``).
        optimization: onnxruntime graph optimization level (:class:`GraphOptimization`).

    Forward: ``(N, C, H, W)`` float tensor (any device; copied to the host) -> float32 tensor(s) on the input's
    device. ``.to()``/``.eval()`` are accepted and change nothing (the session runs where onnxruntime placed it:
    CUDA when its provider is installed, else CPU).

    Raises:
        ExportError: missing/invalid file (at construction), or an input whose shape the graph does not accept
            (at forward).
    """

    def __init__(self, path: str | Path, as_list: bool = False, threads: int | None = None,
                 optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> None:
        super().__init__()
        p = Path(path)
        if p.is_dir():
            p = p / "model.onnx"
        if not p.is_file():
            raise ExportError(f"ONNX model not found: {p} (run `dgh export` first)")
        try:
            self.session = make_session(p, threads, optimization)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {p}: {str(exc).splitlines()[0][:200]}") from None
        self.path = p
        self.as_list = as_list
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)  # symbolic dims are strings
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - tensor or list of tensors
        shape = list(x.shape)
        fixed = [(i, d) for i, d in enumerate(self.input_shape) if isinstance(d, int)]
        if len(shape) != len(self.input_shape) or any(shape[i] != d for i, d in fixed):
            raise ExportError(f"{self.path.name} takes input {self.input_shape}, got {shape} "
                              "(export at the evaluation image size)")
        feed = {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        outs = [torch.from_numpy(o).to(x.device) for o in self.session.run(self.output_names, feed)]
        return outs if self.as_list else outs[0]


def onnx_model_for(loaded: LoadedModel, path: str | Path, threads: int | None = None,
                   optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> OnnxRuntimeModel:
    """:class:`OnnxRuntimeModel` with the output structure of ``loaded`` (a list for detectors)."""
    return OnnxRuntimeModel(path, as_list=loaded.spec.task == "detection", threads=threads, optimization=optimization)


def evaluate_classification_onnx(path: str | Path, spec: ModelSpec, data_dir: str | Path, limit: int | None = None,
                                 batch_size: int = 256, progress: bool = True, num_workers: int | None = None,
                                 threads: int | None = None,
                                 optimization: GraphOptimization = DEFAULT_OPTIMIZATION,
                                 class_layout: str = "names") -> dict:
    """Top-1/top-5 of the exported classifier on an ImageFolder, run by onnxruntime (same preprocessing and
    metrics as :func:`dgh.evaluation.evaluate_classification`; returns its dict plus ``"backend": "onnxruntime"``).

    Raises:
        ExportError: missing/unloadable file or an input size the graph does not take.
        DatasetError: see :func:`dgh.evaluation.evaluate_classification`.
    """
    model = OnnxRuntimeModel(path, as_list=False, threads=threads, optimization=optimization)
    metrics = evaluate_classification(model, spec, data_dir, limit=limit, batch_size=batch_size, device="cpu",
                                      progress=progress, num_workers=num_workers, amp=False, class_layout=class_layout)
    return {**metrics, "backend": Backend.onnxruntime.value, "ort_optimization": GraphOptimization(optimization).value}


def evaluate_coco_onnx(path: str | Path, loaded: LoadedModel, images_dir: str | Path,
                       annotations: str | Path | None = None, labels: str | Path | None = None,
                       imgsz: int | None = None, batch_size: int = 16, progress: bool = True,
                       num_workers: int | None = None, limit: int | None = None, threads: int | None = None,
                       optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> dict:
    """COCO mAP of the exported detector run by onnxruntime: its raw per-level outputs go through
    ``loaded.decode`` and the same NMS and pycocotools evaluation as :func:`dgh.evaluation.evaluate_coco` (returns its
    dict plus ``"backend": "onnxruntime"``).

    Raises:
        ExportError: missing/unloadable file, or ``imgsz`` different from the exported input size.
        DatasetError / ValueError: see :func:`dgh.evaluation.evaluate_coco`.
    """
    model = OnnxRuntimeModel(path, as_list=True, threads=threads, optimization=optimization)
    size = model.input_shape[-1]
    if imgsz is not None and isinstance(size, int) and int(imgsz) != size:
        raise ExportError(f"{model.path.name} was exported at {size}x{size}; evaluate with --imgsz {size}")
    metrics = evaluate_coco(model, loaded, images_dir, annotations=annotations, labels=labels,
                            imgsz=imgsz or (size if isinstance(size, int) else None), batch_size=batch_size,
                            device="cpu", progress=progress, num_workers=num_workers, amp=False, limit=limit)
    return {**metrics, "backend": Backend.onnxruntime.value, "ort_optimization": GraphOptimization(optimization).value}


def read_metadata(path: str | Path) -> dict:
    """The ``dgh.*`` ``metadata_props`` of an exported file, JSON values decoded (``dgh.quantizers`` is a list of
    dicts with ``name, kind, role, bits, qmin, qmax, container, granularity, power_of_two, tensor``)."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out
