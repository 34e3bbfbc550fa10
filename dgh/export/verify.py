"""Agreement between the exported ONNX model (run by onnxruntime) and the fake-quant PyTorch model.

Both run the same input. Every activation quantizer's dequantized output (the input, every activation site, every
model output) is compared tensor by tensor: the difference is measured in quantization steps of that quantizer,
``max |y_onnx - y_torch| / s`` (an integer for a per-tensor quantizer up to float rounding, since both values lie
on the grid ``(q - z) s``). The float arithmetic between quantizers (convolution accumulation order, the
activation functions' kernels) is not bit-identical across runtimes, so a value that lies within a rounding error
of a rounding boundary ``(k + 1/2) s`` can land on either neighbour: a one-step difference is expected, more is an
error.
"""

from __future__ import annotations

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


class AgreementError(ExportError):
    """onnxruntime and the fake-quant model differ by more than one quantization step. The message is one line."""


@dataclass
class TensorAgreement:
    """One quantized tensor: its label, role, step ``s``, and the largest difference in steps (``max_steps``) and
    the fraction of elements that differ (``frac_differing``)."""

    name: str
    role: str
    step: float
    max_steps: float
    frac_differing: float


@dataclass
class Agreement:
    """Result of :func:`check_agreement` (see there for the two comparisons).

    Attributes:
        max_output_steps: free-running: largest difference at the model outputs, in steps of each output's
            quantizer (0 = equal).
        max_local_steps: teacher-forced: largest difference over every quantized tensor, in steps.
        max_output_abs: free-running: largest absolute difference at the outputs (units of the outputs).
        frac_output_differing: free-running: largest fraction of differing elements over the outputs.
        first_differing: free-running: the first tensor (forward order) with any difference, or ``None``.
        first_over: the first tensor above the tolerance, or ``None``.
        n_images: number of sample images.
        free_running, teacher_forced: per quantized tensor, forward order.
    """

    max_output_steps: float
    max_local_steps: float
    max_output_abs: float
    frac_output_differing: float
    first_differing: str | None
    first_over: str | None
    n_images: int
    free_running: list[TensorAgreement] = field(default_factory=list)
    teacher_forced: list[TensorAgreement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no tensor is above the tolerance."""
        return self.first_over is None

    def summary(self) -> dict:
        """Plain-typed summary for JSON/MLflow (without the per-tensor lists)."""
        return {"max_output_steps": self.max_output_steps, "max_local_steps": self.max_local_steps,
                "max_output_abs": self.max_output_abs, "frac_output_differing": self.frac_output_differing,
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
        frac = float((diff > 0).float().mean()) if diff.numel() else 0.0
        out.append(TensorAgreement(q.name, q.role, step, round(steps, 3), frac))
    return out


def check_agreement(qmodel: QuantizedModel, graph: ExportedGraph, sample_nchw: torch.Tensor,
                    max_steps: float = MAX_STEPS, max_output_steps: float | None = None,
                    raise_on_error: bool = True,
                    optimization: GraphOptimization = DEFAULT_OPTIMIZATION) -> Agreement:
    """Run ``sample_nchw`` through onnxruntime (the exported file) and through ``qmodel``; compare every quantized
    tensor in steps of its quantizer, twice:

    - *free-running*: both models run on their own; differences propagate (a one-step difference at one layer moves
      the accumulators of the next layer and can push other values across a rounding boundary), so in a deep
      network they grow with depth. Reported as :attr:`Agreement.max_output_steps` (at the model outputs).
    - *teacher-forced*: each quantizer's output in PyTorch is recorded and then replaced by onnxruntime's value, so
      every quantized tensor is computed by both runtimes from the same quantized inputs. Any difference above one
      step there is a real mismatch of the exported graph (:attr:`Agreement.max_local_steps`).

    Args:
        qmodel: the fake-quant model that was exported (run on its own device, results compared on the CPU).
        graph: what :func:`~dgh.export.onnx_export.export_onnx` returned for it.
        sample_nchw: ``(N, C, H, W)`` float32 input in the model's normalized space.
        max_steps: tolerated teacher-forced difference per tensor (1 step, see the module docstring).
        max_output_steps: when given, also a bound on the free-running difference at the outputs.
        raise_on_error: raise :class:`AgreementError` when a bound is exceeded.
        optimization: onnxruntime graph optimization level, as used for evaluation.

    Returns:
        :class:`Agreement`.

    Raises:
        AgreementError: (when ``raise_on_error``) a teacher-forced difference above ``max_steps`` (or a free-running
            output difference above ``max_output_steps``); the message names the first tensor above the bound and
            the first tensor that differs at all.
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
    max_out = max((t.max_steps for t in out_rows), default=0.0)
    first_over = next((t.name for t in local if t.max_steps > max_steps + 1e-6), None)
    if first_over is None and max_output_steps is not None:
        first_over = next((t.name for t in out_rows if t.max_steps > max_output_steps + 1e-6), None)
    result = Agreement(
        max_output_steps=max_out, max_local_steps=max((t.max_steps for t in local), default=0.0),
        max_output_abs=max((t.max_steps * t.step for t in out_rows), default=0.0),
        frac_output_differing=max((t.frac_differing for t in out_rows), default=0.0),
        first_differing=next((t.name for t in free if t.max_steps > 0), None),
        first_over=first_over, n_images=int(x.shape[0]), free_running=free, teacher_forced=local)
    if raise_on_error and not result.ok:
        raise AgreementError(
            f"onnxruntime and the fake-quant model differ by more than the tolerance at {first_over} "
            f"(teacher-forced max {result.max_local_steps:g} steps, outputs {max_out:g} steps); first tensor that "
            f"differs: {result.first_differing}")
    return result


def _output_agreement(qmodel: QuantizedModel, graph: ExportedGraph, x: torch.Tensor, acts: list[QuantizerNode],
                      optimization: GraphOptimization) -> list[TensorAgreement]:
    """Free-running model outputs: the plain exported file (no extra graph outputs, so onnxruntime fuses as in
    evaluation) against the fake-quant model's outputs, in steps of each output quantizer (absolute difference with
    step 1 for an output without a quantizer)."""
    session = make_session(graph.path, threads=1, optimization=optimization)
    onnx_out = session.run(graph.output_names, {graph.input_name: x.numpy()})
    dev = next(iter(qmodel.parameters())).device
    with torch.no_grad():
        torch_out = _flatten(qmodel(x.to(dev)))
    by_tensor = {q.dq_output: q for q in acts}
    rows = []
    for name, o_val, t_val in zip(graph.output_names, onnx_out, torch_out):
        q = by_tensor.get(name)
        step = _step(q) if q is not None else 1.0
        diff = (torch.from_numpy(np.asarray(o_val)) - t_val.detach().float().cpu()).abs()
        rows.append(TensorAgreement(q.name if q is not None else name, "output", step,
                                    round(float((diff / step).max()), 3), float((diff > 0).float().mean())))
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
