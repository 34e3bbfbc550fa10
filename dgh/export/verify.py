"""Agreement between the exported ONNX model (run by onnxruntime) and the fake-quant PyTorch model.

Both run the same input. Every activation quantizer's dequantized output (the input, every activation site, every
model output) is compared tensor by tensor: the difference is measured in quantization steps of that quantizer,
``max |y_onnx - y_torch| / s`` (an integer for a per-tensor quantizer up to float rounding, since both values lie
on the grid ``(q - z) s``).

Why the two runtimes do not agree bit for bit (measured on ResNet-20, YOLOv5n and EfficientNet-Lite0 W8A8 pot,
``docs/export.md``): the float arithmetic between quantizers is not bit-identical across runtimes. The weight scales
are per-channel and not powers of two and the bias is a float, so a convolution's sum is rounded in float32 in an
order that depends on the kernel (oneDNN/ATen in PyTorch, MLAS in onnxruntime; the sigmoid of SiLU is another kernel
too). A value within a float rounding error (about 1e-7 relative) of a rounding boundary ``(k + 1/2) s`` can then
land on either neighbour: one step, on at most 2.7e-5 of a tensor's elements (docs/export.md).
Example (ResNet-20, ``layer1.0.conv2``): exact
sum 24.49999957 steps, PyTorch 24.5 (rounds to 24), onnxruntime 24.5000038 (rounds to 25).

Those one-step flips propagate: a changed input moves every accumulator that reads it by ``w * s_in``, which can be
several output steps, so a free-running comparison grows with depth (at the outputs of YOLOv5n: up to 13 steps on
about half of the elements). This is not a property of the export: the same fake-quant PyTorch model run with its
other convolution kernel (oneDNN off on the CPU, cuDNN off on CUDA) differs from itself by the same amount (YOLOv5n:
12 steps on 47 % of the output elements, and its COCO mAP on val2017-128 moves from 0.2829 to 0.2798, while
onnxruntime gives 0.2794). :func:`check_agreement` therefore

- *checks* layer-locally (teacher forcing: every quantized tensor computed by both runtimes from the same quantized
  inputs): at most one step anywhere, and one-step flips only as rarely as near-ties occur (at most
  :data:`MAX_LOCAL_FRACTION` of a tensor's elements plus :data:`MAX_LOCAL_EXTRA` elements). A systematic mismatch
  (another rounding mode on exact ties, a scale or zero point off, a missing clip, a wrong bias) exceeds one of the
  two bounds; the error names the first such tensor and the first tensor that differs at all;
- *reports* the free-running difference at the outputs next to the float-order reference, PyTorch against itself
  with its other kernels (:attr:`Agreement.reference_output_steps`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from dgh.export.onnx_export import ExportedGraph, QuantizerNode
from dgh.export.qdq import ExportError
from dgh.export.runtime import DEFAULT_OPTIMIZATION, GraphOptimization, make_session
from dgh.quantization.capture import QuantizedModel, iter_quantizers
from dgh.quantization.quantizers import FakeQuantizer

MAX_STEPS = 1.0
MAX_LOCAL_FRACTION = 1e-3  # near-tie flips measured at <= 2.7e-5 of a tensor's elements (docs/export.md)
MAX_LOCAL_EXTRA = 2  # plus this many elements, so that one flip in a tiny tensor (8 x 10 logits) is no error


class AgreementError(ExportError):
    """onnxruntime and the fake-quant model differ by more than one quantization step. The message is one line."""


@dataclass
class TensorAgreement:
    """One quantized tensor: its label, role, step ``s``, the largest difference in steps (``max_steps``), the
    fraction of elements that differ (``frac_differing``), their number (``n_differing``) and the tensor's size
    (``numel``)."""

    name: str
    role: str
    step: float
    max_steps: float
    frac_differing: float
    n_differing: int = 0
    numel: int = 0

    def over(self, max_steps: float, max_fraction: float | None) -> bool:
        """More than ``max_steps`` apart, or (with ``max_fraction``) more elements differing than near-ties explain:
        ``n_differing > max_fraction * numel + MAX_LOCAL_EXTRA``."""
        if self.max_steps > max_steps + 1e-6:
            return True
        return max_fraction is not None and self.n_differing > max_fraction * self.numel + MAX_LOCAL_EXTRA


@dataclass
class Agreement:
    """Result of :func:`check_agreement` (see there for the two comparisons).

    Attributes:
        max_output_steps: free-running: largest difference at the model outputs, in steps of each output's
            quantizer (0 = equal).
        max_local_steps: teacher-forced: largest difference over every quantized tensor, in steps.
        max_local_fraction: teacher-forced: largest fraction of differing elements over the quantized tensors.
        max_output_abs: free-running: largest absolute difference at the outputs (units of the outputs).
        frac_output_differing: free-running: largest fraction of differing elements over the outputs.
        first_differing: free-running: the first tensor (forward order) with any difference, or ``None``.
        first_over: the first tensor above the tolerance, or ``None``.
        n_images: number of sample images.
        reference_output_steps: float-order reference: the fake-quant PyTorch model against itself run with its
            other convolution kernels (oneDNN off on the CPU, cuDNN off on CUDA), largest output difference in steps
            (``None`` when not measured). The free-running figure is expected to be of this size.
        reference_frac_differing: the same reference, largest fraction of differing output elements.
        free_running, teacher_forced: per quantized tensor, forward order.
    """

    max_output_steps: float
    max_local_steps: float
    max_output_abs: float
    frac_output_differing: float
    first_differing: str | None
    first_over: str | None
    n_images: int
    max_local_fraction: float = 0.0
    reference_output_steps: float | None = None
    reference_frac_differing: float | None = None
    free_running: list[TensorAgreement] = field(default_factory=list)
    teacher_forced: list[TensorAgreement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no tensor is above the tolerance."""
        return self.first_over is None

    def summary(self) -> dict:
        """Plain-typed summary for JSON/MLflow (without the per-tensor lists)."""
        return {"max_output_steps": self.max_output_steps, "max_local_steps": self.max_local_steps,
                "max_local_fraction": self.max_local_fraction,
                "max_output_abs": self.max_output_abs, "frac_output_differing": self.frac_output_differing,
                "reference_output_steps": self.reference_output_steps,
                "reference_frac_differing": self.reference_frac_differing,
                "first_differing": self.first_differing, "first_over_tolerance": self.first_over,
                "n_images": self.n_images, "ok": self.ok}


def _with_intermediate_outputs(path: Path, names: list[str]) -> bytes:
    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _torch_activations(qmodel: QuantizedModel, x: torch.Tensor,
                       forced: list[torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Run the fake-quant model once and record each active activation quantizer's output in call order.

    With ``forced`` (one tensor per activation-quantizer call, in call order), each quantizer's output is recorded
    and then *replaced* by the forced tensor, so every later op computes from the forced values (teacher forcing).
    """
    names = {id(q): n for n, q in iter_quantizers(qmodel)}
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hook(mod: FakeQuantizer, args, out):  # noqa: ANN001
        if not mod.enabled or mod.bypass or mod.role == "weight":
            return None
        # copies: the model may modify a quantizer's output in place afterwards (``out += identity``)
        calls.append((names[id(mod)], out.detach().float().cpu().clone()))
        if forced is None or len(calls) > len(forced):
            return None
        return forced[len(calls) - 1].to(out.device, out.dtype).reshape(out.shape).clone()

    for _, q in iter_quantizers(qmodel):
        handles.append(q.register_forward_hook(hook))
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _compare(torch_calls: list[tuple[str, torch.Tensor]], onnx_values: list[torch.Tensor],
             acts: list[QuantizerNode]) -> list[TensorAgreement]:
    if len(torch_calls) != len(acts):
        raise ExportError(f"the model called {len(torch_calls)} activation quantizers, the ONNX graph has {len(acts)}")
    out = []
    for (t_name, t_val), o_val, q in zip(torch_calls, onnx_values, acts):
        if t_name != q.name.split("#")[0]:
            raise ExportError(f"quantizer order differs: torch called {t_name}, the graph has {q.name}")
        diff = (o_val.reshape(t_val.shape) - t_val).abs()
        step = _step(q)
        steps = float((diff / step).max()) if diff.numel() else 0.0
        n_diff = int((diff > 0).sum())
        frac = n_diff / diff.numel() if diff.numel() else 0.0
        out.append(TensorAgreement(q.name, q.role, step, round(steps, 3), frac, n_diff, int(diff.numel())))
    return out


def check_agreement(qmodel: QuantizedModel, graph: ExportedGraph, sample_nchw: torch.Tensor,
                    max_steps: float = MAX_STEPS, max_output_steps: float | None = None,
                    raise_on_error: bool = True,
                    optimization: GraphOptimization = DEFAULT_OPTIMIZATION,
                    max_local_fraction: float | None = MAX_LOCAL_FRACTION,
                    reference: bool = True) -> Agreement:
    """Run ``sample_nchw`` through onnxruntime (the exported file) and through ``qmodel``; compare every quantized
    tensor in steps of its quantizer, twice (see the module docstring for why they differ):

    - *teacher-forced* (the check): each quantizer's output in PyTorch is recorded and then replaced by
      onnxruntime's value, so every quantized tensor is computed by both runtimes from the same quantized inputs
      (a layer-local comparison). A difference above ``max_steps``, or one-step differences on more elements than
      near-ties explain (``max_local_fraction``), is a real mismatch of the exported graph.
    - *free-running* (reported): both models run on their own and differences propagate;
      :attr:`Agreement.max_output_steps` at the model outputs, next to the float-order reference
      (:attr:`Agreement.reference_output_steps`: PyTorch against itself with its other convolution kernels).

    Args:
        qmodel: the fake-quant model that was exported (run on its own device, results compared on the CPU).
        graph: what :func:`~dgh.export.onnx_export.export_onnx` returned for it.
        sample_nchw: ``(N, C, H, W)`` float32 input in the model's normalized space.
        max_steps: tolerated teacher-forced difference per tensor (1 step).
        max_output_steps: when given, also a bound on the free-running difference at the outputs.
        raise_on_error: raise :class:`AgreementError` when a bound is exceeded.
        optimization: onnxruntime graph optimization level, as used for evaluation. ``all`` replaces float convs
            between QDQ pairs by integer kernels (``QLinearConv``: int32 bias, fixed-point requantization) that round
            differently on 0.1-1 % of a tensor's elements (measured: ResNet-20 W4A8 0.76 %, YOLOv5n head 0.14 %),
            still within one step: the fraction bound reports that as a mismatch (it is one, of the arithmetic);
            pass ``max_local_fraction=None`` to bound only the steps.
        max_local_fraction: tolerated teacher-forced fraction of differing elements per tensor (plus
            :data:`MAX_LOCAL_EXTRA` elements); ``None`` = no bound.
        reference: also measure the float-order reference (one more forward of ``qmodel``).

    Returns:
        :class:`Agreement`.

    Raises:
        AgreementError: (when ``raise_on_error``) a bound exceeded; the message names the first tensor over a bound
            and the first tensor that differs at all (free-running).
        ExportError: the traced quantizer calls do not match the exported graph.
    """
    x = sample_nchw.detach().float().cpu()
    dev = next(iter(qmodel.parameters())).device
    acts = [q for q in graph.quantizers if q.kind == "activation"]
    wanted = [q.dq_output for q in acts]
    session = make_session(_with_intermediate_outputs(graph.path, wanted), threads=1, optimization=optimization)
    onnx_values = [torch.from_numpy(np.asarray(v)) for v in session.run(wanted, {graph.input_name: x.numpy()})]
    free = _compare(_torch_activations(qmodel, x.to(dev)), onnx_values, acts)
    local = _compare(_torch_activations(qmodel, x.to(dev), forced=onnx_values), onnx_values, acts)
    out_rows = _output_agreement(qmodel, graph, x, acts, optimization)
    ref_rows = _reference_agreement(qmodel, graph, x, acts) if reference else None
    max_out = max((t.max_steps for t in out_rows), default=0.0)
    first_over = next((t.name for t in local if t.over(max_steps, max_local_fraction)), None)
    if first_over is None and max_output_steps is not None:
        first_over = next((t.name for t in out_rows if t.max_steps > max_output_steps + 1e-6), None)
    result = Agreement(
        max_output_steps=max_out, max_local_steps=max((t.max_steps for t in local), default=0.0),
        max_output_abs=max((t.max_steps * t.step for t in out_rows), default=0.0),
        frac_output_differing=max((t.frac_differing for t in out_rows), default=0.0),
        first_differing=next((t.name for t in free if t.max_steps > 0), None),
        first_over=first_over, n_images=int(x.shape[0]),
        max_local_fraction=max((t.frac_differing for t in local), default=0.0),
        reference_output_steps=None if ref_rows is None else max((t.max_steps for t in ref_rows), default=0.0),
        reference_frac_differing=None if ref_rows is None else max((t.frac_differing for t in ref_rows), default=0.0),
        free_running=free, teacher_forced=local)
    if raise_on_error and not result.ok:
        bad = next((t for t in local if t.name == first_over), None)
        detail = (f"{bad.max_steps:g} steps on {bad.n_differing} of {bad.numel} elements" if bad is not None
                  else f"outputs {max_out:g} steps")
        raise AgreementError(
            f"onnxruntime and the fake-quant model differ beyond the tolerance at {first_over} ({detail}; "
            f"tolerance {max_steps:g} step on near-ties only); first tensor that differs: {result.first_differing}")
    return result


def _output_agreement(qmodel: QuantizedModel, graph: ExportedGraph, x: torch.Tensor, acts: list[QuantizerNode],
                      optimization: GraphOptimization) -> list[TensorAgreement]:
    """Free-running model outputs: the plain exported file (no extra graph outputs, so onnxruntime fuses as in
    evaluation) against the fake-quant model's outputs, in steps of each output quantizer (absolute difference with
    step 1 for an output without a quantizer)."""
    session = make_session(graph.path, threads=1, optimization=optimization)
    onnx_out = [torch.from_numpy(np.asarray(o)) for o in session.run(graph.output_names, {graph.input_name: x.numpy()})]
    return _rows(graph, acts, onnx_out, _forward(qmodel, x))


def _reference_agreement(qmodel: QuantizedModel, graph: ExportedGraph, x: torch.Tensor,
                         acts: list[QuantizerNode]) -> list[TensorAgreement]:
    """Float-order reference: the fake-quant model's outputs with its other convolution kernels against its
    outputs with the default ones, in steps of each output quantizer (the spread that float summation order alone
    causes; see the module docstring)."""
    default = _forward(qmodel, x)
    with alternate_kernels(next(iter(qmodel.parameters())).device):
        other = _forward(qmodel, x)
    return _rows(graph, acts, other, default)


@contextlib.contextmanager
def alternate_kernels(device: torch.device | str):
    """PyTorch with its other float convolution kernels: oneDNN (mkldnn) off on the CPU, cuDNN off on CUDA (ATen's
    native kernels then run, summing in another order). The same model, the same quantizers."""
    backend = torch.backends.cudnn if torch.device(device).type == "cuda" else torch.backends.mkldnn
    previous = backend.enabled
    backend.enabled = False
    try:
        yield
    finally:
        backend.enabled = previous


def _forward(qmodel: QuantizedModel, x: torch.Tensor) -> list[torch.Tensor]:
    dev = next(iter(qmodel.parameters())).device
    with torch.no_grad():
        return [t.detach().float().cpu() for t in _flatten(qmodel(x.to(dev)))]


def _rows(graph: ExportedGraph, acts: list[QuantizerNode], values: list[torch.Tensor],
          reference: list[torch.Tensor]) -> list[TensorAgreement]:
    by_tensor = {q.dq_output: q for q in acts}
    rows = []
    for name, o_val, t_val in zip(graph.output_names, values, reference):
        q = by_tensor.get(name)
        step = _step(q) if q is not None else 1.0
        diff = (o_val.reshape(t_val.shape) - t_val).abs()
        n_diff = int((diff > 0).sum())
        rows.append(TensorAgreement(q.name if q is not None else name, "output", step,
                                    round(float((diff / step).max()), 3), n_diff / max(diff.numel(), 1), n_diff,
                                    int(diff.numel())))
    return rows


def _flatten(out) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flatten(o)]


def _step(q: QuantizerNode) -> float:
    """The smallest step of a quantizer (per-channel: the smallest channel scale, a conservative denominator)."""
    return float(min(q.params.scale)) if q.params.scale else math.nan
