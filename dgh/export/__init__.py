"""Deployable output: the fake-quantized model as ONNX with QuantizeLinear/DequantizeLinear, checked in onnxruntime.

Public API:

- :func:`export_onnx` (``QuantizedModel`` -> ``model.onnx``) and :func:`export_quantized`
  (``quantized.pt`` or a ``QuantizedModel`` -> ``model.onnx`` with the agreement check), returning
  :class:`ExportedGraph` / :class:`ExportResult`; :func:`export_float_onnx` (the float model, for comparisons);
- :func:`check_agreement` -> :class:`Agreement` (onnxruntime vs the fake-quant model, in quantization steps);
- :class:`OnnxRuntimeModel`, :func:`evaluate_classification_onnx`, :func:`evaluate_coco_onnx`, :class:`Backend`,
  :class:`GraphOptimization`, :func:`read_metadata`.
"""

from dgh.export.api import (
    EXPORT_RECORD_FILE,
    EXPORT_STAGE,
    ONNX_FILE,
    ExportResult,
    export_float_onnx,
    export_quantized,
    export_to_dir,
    random_sample,
)
from dgh.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportedGraph, QuantizerNode, export_onnx
from dgh.export.qdq import ExportError, QuantParams
from dgh.export.runtime import (
    Backend,
    GraphOptimization,
    OnnxRuntimeModel,
    evaluate_classification_onnx,
    evaluate_coco_onnx,
    make_session,
    onnx_model_for,
    read_metadata,
)
from dgh.export.verify import Agreement, AgreementError, TensorAgreement, check_agreement

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_RECORD_FILE",
    "EXPORT_STAGE",
    "MAX_OPSET",
    "MIN_OPSET",
    "ONNX_FILE",
    "Agreement",
    "AgreementError",
    "Backend",
    "ExportError",
    "ExportResult",
    "ExportedGraph",
    "GraphOptimization",
    "OnnxRuntimeModel",
    "QuantParams",
    "QuantizerNode",
    "TensorAgreement",
    "check_agreement",
    "evaluate_classification_onnx",
    "evaluate_coco_onnx",
    "export_float_onnx",
    "export_onnx",
    "export_quantized",
    "export_to_dir",
    "make_session",
    "onnx_model_for",
    "random_sample",
    "read_metadata",
]
