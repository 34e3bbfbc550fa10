"""One call from ``quantized.pt`` to a checked ``model.onnx``, and the float model's ONNX for comparison."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dgh.export.onnx_export import DEFAULT_OPSET, INPUT_NAME, ExportedGraph, FlatOutputs, export_onnx
from dgh.export.qdq import ExportError
from dgh.export.runtime import DEFAULT_OPTIMIZATION, GraphOptimization
from dgh.export.verify import Agreement, check_agreement
from dgh.io import write_bytes, write_json
from dgh.models.spec import LoadedModel
from dgh.quantization.api import load_quantized
from dgh.quantization.capture import QuantizedModel

DEFAULT_SAMPLE_IMAGES = 8
ONNX_FILE = "model.onnx"
EXPORT_STAGE = "export"  # the pipeline stage, and its folder stages/export/<exp-id>/
EXPORT_RECORD_FILE = "export.json"


@dataclass
class ExportResult:
    """:class:`ExportedGraph` plus the onnxruntime agreement measured right after writing it."""

    graph: ExportedGraph
    agreement: Agreement

    def summary(self) -> dict:
        """Plain-typed record for ``export.json`` and MLflow: file, size, QDQ counts, agreement."""
        return {"path": str(self.graph.path), "size_bytes": self.graph.size_bytes, "opset": self.graph.opset,
                "outputs": self.graph.output_names, **self.graph.counts(), "agreement": self.agreement.summary()}


def random_sample(loaded: LoadedModel, shape: list[int], n_images: int = DEFAULT_SAMPLE_IMAGES,
                  seed: int = 0) -> torch.Tensor:
    """``(n_images, C, H, W)`` float32 images uniform over the model's valid pixel range (normalized space), for the
    agreement check when no real images are given."""
    lo, hi = loaded.spec.pixel_range()
    u = torch.rand(n_images, *shape[1:], generator=torch.Generator().manual_seed(seed))
    return lo + (hi - lo) * u


def export_quantized(loaded: LoadedModel, quantized: QuantizedModel | str | Path, out_path: str | Path,
                     sample_nchw: torch.Tensor | None = None, opset: int = DEFAULT_OPSET,
                     optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> ExportResult:
    """Export a quantized model (object or ``quantized.pt``) to ``out_path`` and check it in onnxruntime.

    Args:
        loaded: the float model the quantized file was made from (architecture only).
        quantized: a :class:`QuantizedModel` or the path of ``quantized.pt`` (or its folder).
        out_path: the ``model.onnx`` to write (atomically; removed again when the check fails).
        sample_nchw: ``(N, C, H, W)`` images in the model's normalized space for the check (e.g. a few calibration
            images); default :func:`random_sample`.
        opset: ONNX opset (>= 13).
        optimization: onnxruntime graph optimization level of the check (as used for evaluation).

    Returns:
        :class:`ExportResult`.

    Raises:
        QuantizedFileError: unreadable ``quantized.pt`` or one made for another architecture.
        ExportError: see :func:`~dgh.export.onnx_export.export_onnx`.
        AgreementError: onnxruntime and the fake-quant model differ by more than one step (the file is removed).
    """
    qmodel = quantized if isinstance(quantized, QuantizedModel) else load_quantized(loaded, quantized, device="cpu")
    shape = list(getattr(qmodel, "example_shape", []) or [1, 3, *loaded.spec.input_size])
    if sample_nchw is None:
        sample_nchw = random_sample(loaded, shape)
    if list(sample_nchw.shape[1:]) != shape[1:]:
        raise ExportError(f"sample images have shape {list(sample_nchw.shape[1:])}, the model takes {shape[1:]}")
    graph = export_onnx(qmodel, out_path, torch.zeros(shape), opset=opset)
    try:
        agreement = check_agreement(qmodel, graph, sample_nchw, optimization=optimization)
    except Exception:
        graph.path.unlink(missing_ok=True)
        raise
    return ExportResult(graph, agreement)


def export_float_onnx(model: nn.Module, out_path: str | Path, example_nchw: torch.Tensor,
                      opset: int = DEFAULT_OPSET) -> Path:
    """The float model as ONNX (same exporter, input name and dynamic batch axis as the QDQ export), for size and
    speed comparisons. Outputs are flattened like the QDQ export's (``output`` or ``output_<i>``).

    Raises:
        ExportError: the exporter fails (first line of its message).
    """
    wrapper = FlatOutputs(model).eval()
    example = example_nchw[:1].detach().float().cpu()
    with torch.no_grad():
        n_outputs = len(wrapper(example))
    names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=names, dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]})
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"float ONNX export failed: {str(exc).strip().splitlines()[0][:200]}") from None
    return write_bytes(buf.getvalue(), out_path)


def export_to_dir(loaded: LoadedModel, quantized: QuantizedModel | str | Path, out_dir: str | Path,
                  sample_nchw: torch.Tensor | None = None, opset: int = DEFAULT_OPSET,
                  optimization: GraphOptimization = DEFAULT_OPTIMIZATION, record: dict | None = None) -> dict:
    """:func:`export_quantized` into ``out_dir/model.onnx`` plus ``out_dir/export.json`` (``record``, then
    :meth:`ExportResult.summary`: size, opset, outputs, QDQ counts, the agreement in steps).

    Returns:
        the dict written to ``export.json``.

    Raises:
        see :func:`export_quantized` (nothing is left in ``out_dir`` on error).
    """
    out = Path(out_dir)
    result = export_quantized(loaded, quantized, out / ONNX_FILE, sample_nchw=sample_nchw, opset=opset,
                              optimization=optimization)
    summary = {**(record or {}), **result.summary(), "path": ONNX_FILE,
               "ort_optimization": GraphOptimization(optimization).value}
    write_json(summary, out / EXPORT_RECORD_FILE)
    return summary
