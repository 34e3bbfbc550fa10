"""Lean inference forward of a calibrated :class:`~dgh.quantization.capture.QuantizedModel`.

The reference forward computes every fake quantization as autograd-friendly out-of-place ops
(:func:`~dgh.quantization.quantizers.fake_quantize`: ``x / s``, ``round``, ``round - v``, ``+ v``, ``+ z``, clamp,
``- z``, ``* s``: eight full-size passes and temporaries per site) and re-quantizes every weight on every call. Once
calibration is done and no gradient is needed, the same numbers come out of far less work:

- **weights** are fake-quantized once and cached (the cache entry is keyed by the weight and quantizer tensors'
  identity and in-place version counters, and by the quantizer settings, so any later change invalidates it);
- **activations** are fake-quantized by one fused op: :func:`fused_fake_quantize` (the reference op sequence done in
  place on one buffer) or, with ``compile=True``, a ``torch.compile`` kernel of the same expression (one pass).

Both are bit-identical to the reference (module docstring of :func:`fused_fake_quantize` for the argument); the
sites, their order and the activation fusion stay those of the capture runtime, because the lean forward *is* the
eager forward of the same modules, with only the quantizers' arithmetic swapped for the duration of the call. The
module hierarchy, parameter sharing and everything BRECQ relies on are untouched: the wrapper holds the very
``QuantizedModel`` it was given, and any later change to it (reconstruction, bias correction) is seen by the next
call.

What remains is the capture runtime's Python interception (module hooks and a ``TorchFunctionMode`` seeing every
op). :func:`traced_lean_forward` removes it too: the lean forward recorded once with ``torch.jit.trace`` and
replayed (same ATen ops, same bits; a frozen snapshot); :class:`ReplayQuantizedModel` does that on the first batch
of an evaluation and falls back to the lean forward whenever the replay does not apply.

Whenever gradients are enabled, a quantizer has a rounding function (AdaRound), or its input requires grad, the
reference arithmetic runs, so the lean forward is safe under training too (it is simply not faster there).

Measured with ``python benchmarks/quantize.py`` (the ratio to the float model, same run).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dgh.quantization.capture import QuantizedModel, iter_quantizers
from dgh.quantization.quantizers import FakeQuantizer

FakeQuantFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def fused_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` in place on one new buffer (no autograd).

    Bit-identical to :func:`dgh.quantization.quantizers.fake_quantize` without a rounding function: the reference
    rounds with ``round_ste(v) = (round(v) - v) + v``, and ``round(v) - v`` is exact in IEEE arithmetic (both are
    within a factor 2 of each other when ``|v| >= 0.5``, Sterbenz lemma; ``round(v) = 0`` otherwise), so adding ``v``
    back returns ``round(v)`` exactly, except that a ``-0.0`` becomes ``+0.0``, which the following ``+ z`` (also
    ``+0.0`` for symmetric quantizers) does here too. The remaining ops are the same ops in the same order. The one
    exception is an infinite input: ``(round(v) - v) + v`` is NaN there, this op clamps it to the range end (a
    finite model's activations are never infinite).

    Args:
        x: float tensor, any shape; not modified.
        scale, zero_point: broadcastable against ``x`` (``()`` per-tensor, or shaped along the channel axis), dtype of
            ``x``.
        qmin, qmax: the integer range.

    Returns:
        A new tensor like ``x``.
    """
    t = torch.div(x, scale)
    t.round_()
    t.add_(zero_point)
    t.clamp_(qmin, qmax)
    t.sub_(zero_point)
    return t.mul_(scale)


def fused_fake_quantize_symmetric(
    x: torch.Tensor, scale: torch.Tensor, scale_value: float, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """:func:`fused_fake_quantize` for a per-tensor quantizer with zero point 0, in four passes instead of six:
    ``t = x / s``, ``round``, ``clamp``, then ``t = 0 + s * t`` (one ``add`` with ``alpha``).

    Bit-identical to the reference ``(clamp(round(x / s) + 0, qmin, qmax) - 0) * s``: ``round`` and ``clamp`` commute
    with ``+ 0`` except for the sign of a zero (``-0.0 + 0 = +0.0``), ``- 0`` changes nothing, and ``0 + s * t`` is
    ``s * t`` with a ``-0.0`` turned into ``+0.0`` whether the kernel rounds the product first or uses a fused
    multiply-add (adding an exact zero to the exact product rounds once either way). Checked on ties, signed zeros
    and NaN by the tests. Like :func:`fused_fake_quantize` (and unlike the reference, whose straight-through
    ``(round(v) - v) + v`` makes ``±inf`` a NaN), an infinite input is clamped to the range end.

    Args:
        x: float32 tensor, any shape; not modified.
        scale: ``()`` float32 tensor ``s > 0``.
        scale_value: ``float(scale)``.
        zero: ``()`` float32 tensor ``0.0`` on ``x``'s device.
        qmin, qmax: the integer range.

    Returns:
        A new tensor like ``x``.
    """
    t = torch.div(x, scale)
    t.round_()
    t.clamp_(qmin, qmax)
    return torch.add(zero, t, alpha=scale_value, out=t)


def _fake_quantize_expression(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The reference expression without the straight-through detach (same value), for ``torch.compile``."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def compiled_fake_quantize() -> FakeQuantFn:
    """A ``torch.compile``d (dynamic shapes) version of the fake-quant expression: one fused pass (a C++/OpenMP
    kernel on CPU, Triton on CUDA). Division stays a division, rounding is half-to-even, so the result is
    bit-identical to :func:`fused_fake_quantize` (checked by the tests). The first call compiles (seconds to a
    minute; cached on disk by inductor afterwards)."""
    return torch.compile(_fake_quantize_expression, dynamic=True)


def _weight_key(q: FakeQuantizer, w: torch.Tensor) -> tuple:
    """Everything the fake-quantized weight depends on: tensor identities and in-place version counters, and the
    quantizer's settings."""
    return (
        id(w), w._version, w.dtype, w.device, id(q.scale), q.scale._version, id(q.zero_point), q.zero_point._version,
        q.bits, q.signed, q.symmetric, q.power_of_two, q.learnable, q.enabled, q.bypass, q.channel_axis,
    )


class LeanQuantizedModel(nn.Module):
    """Inference-only fast forward around a calibrated :class:`QuantizedModel` (see the module docstring).

    Args:
        qmodel: the calibrated quantized model; held (not copied) as ``.qmodel``.
        compile: fake-quantize activations with :func:`compiled_fake_quantize` instead of :func:`fused_fake_quantize`.

    Forward: the same contract and the same output bits as ``qmodel`` (e.g. ``(N, 3, H, W)`` float32 -> logits
    ``(N, K)`` or raw detection maps).

    Raises:
        TypeError: ``qmodel`` is not a :class:`QuantizedModel`.
    """

    def __init__(self, qmodel: QuantizedModel, compile: bool = False) -> None:
        super().__init__()
        if not isinstance(qmodel, QuantizedModel):
            raise TypeError(f"lean forward needs a QuantizedModel, got {type(qmodel).__name__}")
        self.qmodel = qmodel
        self.compile = compile
        self._fq: FakeQuantFn = compiled_fake_quantize() if compile else fused_fake_quantize
        self._weight_cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._act_cache: dict[int, tuple[tuple, tuple]] = {}
        self._active = False

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled() or self._active:
            return self.qmodel(x, *args, **kwargs)
        with self._fused_quantizers():
            return self.qmodel(x, *args, **kwargs)


    # ------------------------------------------------------------------------------------------ quantizers
    def _weight_forward(self, q: FakeQuantizer) -> Callable[..., torch.Tensor]:
        reference = FakeQuantizer.forward.__get__(q)
        cache = self._weight_cache

        def forward(w: torch.Tensor, rounding: Callable | None = None) -> torch.Tensor:
            if rounding is not None or w.requires_grad and torch.is_grad_enabled():
                return reference(w, rounding)
            key = _weight_key(q, w)
            hit = cache.get(id(q))
            if hit is not None and hit[0] == key:
                return hit[1]
            out = reference(w)
            cache[id(q)] = (key, out)
            return out

        return forward

    def _activation_forward(self, q: FakeQuantizer) -> Callable[..., torch.Tensor]:
        reference = FakeQuantizer.forward.__get__(q)
        fq = self._fq
        cache = self._act_cache
        symmetric_ok = not self.compile

        def parameters(x: torch.Tensor) -> tuple:
            """Broadcast scale and zero point for ``x`` (cached like the weights; in a trace they are constants),
            plus ``float(s)`` and a zero tensor when :func:`fused_fake_quantize_symmetric` applies."""
            key = (_weight_key(q, q.scale), x.dim(), x.dtype, x.device)
            hit = cache.get(id(q))
            if hit is not None and hit[0] == key:
                return hit[1]
            scale = q.broadcast(q.effective_scale(), x).to(x.dtype)
            zp = q.broadcast(q.zero_point, x).to(x.dtype)
            sym = None
            if symmetric_ok and x.dtype == torch.float32 and scale.dim() == 0 and not bool(torch.any(zp != 0)):
                sym = (float(scale), torch.zeros((), dtype=x.dtype, device=x.device))
            cache[id(q)] = (key, (scale, zp, sym))
            return scale, zp, sym

        def forward(x: torch.Tensor, rounding: Callable | None = None) -> torch.Tensor:
            if not q.enabled or q.bypass:
                return x
            if rounding is not None or not q.initialized or x.requires_grad:
                return reference(x, rounding)
            with torch._C.DisableTorchFunction():  # the quantizer's arithmetic is never a capture site
                scale, zp, sym = parameters(x)
                if sym is not None:
                    return fused_fake_quantize_symmetric(x, scale, sym[0], sym[1], q.qmin, q.qmax)
                return fq(x, scale, zp, q.qmin, q.qmax)

        return forward

    @contextmanager
    def _fused_quantizers(self) -> Iterator[None]:
        """For the duration of one call, give every quantizer of ``qmodel`` an instance-level ``forward`` (weights:
        cached; activations: fused), then remove it again so that the class's reference forward is back."""
        quantizers = [q for _, q in iter_quantizers(self.qmodel)]
        self._active = True
        try:
            for q in quantizers:
                q.forward = self._weight_forward(q) if q.role == "weight" else self._activation_forward(q)
            yield
        finally:
            for q in quantizers:
                q.__dict__.pop("forward", None)
            self._active = False


class ReplayQuantizedModel(nn.Module):
    """Evaluation forward: :func:`traced_lean_forward` traced on the first no-grad call's batch, replayed for every
    later batch of the same per-image shape, dtype and device (other shapes, or grad mode, run the lean forward).
    If the trace does not reproduce the reference bit for bit, the lean forward is used throughout. For a model
    that stays fixed during the evaluation (the replay is a snapshot).
    """

    def __init__(self, qmodel: QuantizedModel, compile: bool = False) -> None:
        super().__init__()
        self.lean = LeanQuantizedModel(qmodel, compile=compile)
        self._replay: torch.jit.ScriptModule | None = None
        self._key: tuple | None = None
        self.replay_failed = False

    def forward(self, x: torch.Tensor, *args, **kwargs):
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if torch.is_grad_enabled() or args or kwargs or self.replay_failed:
            return self.lean(x, *args, **kwargs)
        if self._replay is None:
            try:
                self._replay = traced_lean_forward(self.lean.qmodel, x)
                self._key = key
            except (ReplayError, RuntimeError):
                self.replay_failed = True
                return self.lean(x)
        return self._replay(x) if key == self._key else self.lean(x)


COMPILE_MIN_PIXELS = 1e9
"""Evaluations reading at least this many input pixels (images x H x W) use the compiled lean forward
(:func:`compile_pays_off`). Basis, measured on the project's 2-core CPU (``benchmarks/quantize.py``, loaded
machine): ``torch.compile`` of the fake-quant kernel costs 20-60 s on its first call (7-25 s with inductor's disk
cache warm) and saves about 0.2-0.4 of the float forward time; a float ResNet-20 forward reads about 1e6 input
pixels per second on one core, so the compile pays off from roughly 1e8-3e8 pixels for that model (lighter
per-pixel ImageNet models need more). 1e9 keeps CIFAR-10 (1e7 pixels) eager and compiles for the ImageNet
validation set at 224 (2.5e9) and COCO val2017 at 640 (2e9)."""


def compile_pays_off(n_images: int, input_hw: tuple[int, int], device: torch.device | str = "cpu") -> bool:
    """Whether an evaluation of ``n_images`` inputs of ``input_hw`` pixels should use ``compile=True``: always on
    CUDA (the Triton kernel compiles in seconds and the eager ops are launch-bound there), on CPU from
    :data:`COMPILE_MIN_PIXELS` input pixels on."""
    if torch.device(device).type == "cuda":
        return True
    return n_images * input_hw[0] * input_hw[1] >= COMPILE_MIN_PIXELS


def lean_forward_model(qmodel: QuantizedModel, compile: bool = False) -> LeanQuantizedModel:
    """The fast inference forward of ``qmodel`` (same outputs, bit for bit): see :class:`LeanQuantizedModel`.

    Use it wherever the quantized model is only evaluated (accuracy, mAP, float-target passes); keep ``qmodel``
    itself for anything that trains it.
    """
    return LeanQuantizedModel(qmodel, compile=compile).eval()


class ReplayError(ValueError):
    """A traced replay of the lean forward does not reproduce the reference outputs. The message is one line."""


def _flat_outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def traced_lean_forward(qmodel: QuantizedModel, example_nchw: torch.Tensor) -> torch.jit.ScriptModule:
    """The lean forward recorded once with ``torch.jit.trace`` and replayed without Python: no module hooks, no
    ``TorchFunctionMode`` interception, the same ATen ops in the same order, so the same output bits.

    A *snapshot* for inference only: weights, scales and the graph are frozen at trace time (a later change to
    ``qmodel`` is not seen; trace again), and data-dependent control flow is fixed to the path ``example_nchw`` took.
    The lean forward runs once before the trace, so the fake-quantized weights and every quantizer's broadcast scale
    are cached and recorded as constants: the replay re-quantizes no weight, and an activation site costs the four
    passes of :func:`fused_fake_quantize_symmetric` (six of :func:`fused_fake_quantize` for asymmetric or
    per-channel quantizers).

    Measured (pot W8A8, one thread, 2-core CPU shared with other jobs at load average 6.5-12): ``python
    benchmarks/quantize.py --no-compile --repeats 7`` (wall time, min of 7 interleaved rounds): YOLOv5n at 320, batch
    8: 0.97x the float model (1.09x the BN-folded float model), lean forward 1.25x, reference 2.29x; ResNet-20, batch
    64: 0.97x float (1.04x BN-folded), lean 1.52x, reference 1.96x. Same process, this thread's CPU time, against
    the replay as it was before the constants (weights re-quantized on every call): YOLOv5n 1.06x -> 0.98x float,
    ResNet-20 1.11x -> 1.01x.

    Args:
        qmodel: calibrated quantized model.
        example_nchw: one input batch ``(n, 3, H, W)`` float32 on the model's device.

    Raises:
        ReplayError: the replay of ``example_nchw`` (and of its first image alone, a different batch size) is not
            bit-identical to ``qmodel``'s output.
    """
    lean = lean_forward_model(qmodel)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning about shape-dependent python values; checked below
        lean(example_nchw)  # fills the weight and quantizer-parameter caches: the trace records them as constants
        traced = torch.jit.trace(lean, example_nchw, check_trace=False, strict=False)
        for x in (example_nchw, example_nchw[:1]):
            ref, out = _flat_outputs(qmodel(x)), _flat_outputs(traced(x))
            same = len(ref) == len(out) and all(
                torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)) for a, b in zip(ref, out)
            )
            if not same:
                raise ReplayError(f"the traced replay differs from the reference on a batch of {x.shape[0]}; "
                                  "use lean_forward_model instead")
    return traced
