"""How one :class:`~dgh.quantization.quantizers.FakeQuantizer` becomes ONNX QuantizeLinear/DequantizeLinear nodes.

A fake quantizer computes ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` (Jacob et al. 2018, eq. 1-2). ONNX
``QuantizeLinear`` computes ``saturate(round(x / s) + z)`` with round half to even and saturation to the range of the
output type, and ``DequantizeLinear`` computes ``(q - z) * s`` (ONNX operator specification, QuantizeLinear-13/21,
DequantizeLinear-13/21). The two agree exactly when the integer range of the container type equals
``[qmin, qmax]``. The containers used here:

- signed ``b <= 8`` bits: ``int8``; unsigned or asymmetric ``b <= 8`` bits: ``uint8``;
- ``b = 16``: ``int16`` / ``uint16`` (ONNX opset 21 or later).

A narrower range than the container (``b < 8``, e.g. 4-bit ``[-8, 7]`` in an ``int8``) is made exact by a float
``Clip`` to ``[(qmin - z) s, (qmax - z) s]`` in front of ``QuantizeLinear``: division by ``s > 0`` is monotone and
``round((n s) / s) = n`` for the small integers ``n`` involved, so
``round(clip(x, (qmin-z)s, (qmax-z)s) / s) + z = clamp(round(x / s) + z, qmin, qmax)``.

Weights are not quantized at run time: their integers ``clamp(round(w / s) + z, qmin, qmax)`` are stored as an
initializer of the container type, followed by ``DequantizeLinear`` with ``axis`` = the quantizer's channel axis
(0 = output channels for conv/linear weights). Scales are stored as float32 exactly as the quantizer holds them, so a
power-of-two scale stays an exact power of two.

The autograd functions below compute in PyTorch exactly what the fake quantizer computes (so tracing gives the same
numbers) and tell the TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``) which ONNX nodes to
emit through their ``symbolic`` static methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgh.quantization.quantizers import FakeQuantizer, fake_quantize


class ExportError(ValueError):
    """A model or quantizer that cannot be written to ONNX as QDQ. The message is one line."""


# ONNX TensorProto element types (onnx.TensorProto.{INT8, UINT8, INT16, UINT16})
ONNX_INT8, ONNX_UINT8, ONNX_INT16, ONNX_UINT16 = 3, 2, 5, 4


@dataclass(frozen=True)
class QuantParams:
    """The fixed parameters of one quantizer, ready for ONNX.

    Attributes:
        name: the quantizer's module name in the quantized model (``model.layer1.0.conv1.output_quantizer``).
        scale: ``C`` step sizes ``s`` (``C = 1`` per-tensor), float32 values held as Python floats (exact).
        zero_point: ``C`` integer zero points ``z``.
        qmin, qmax: the integer range of the quantizer.
        bits: bit-width.
        signed: signed integer container (``int8``/``int16``) or unsigned (``uint8``/``uint16``).
        axis: the channel axis for per-channel quantizers, else ``None``.
    """

    name: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    qmin: int
    qmax: int
    bits: int
    signed: bool
    axis: int | None

    @property
    def container_dtype(self) -> torch.dtype:
        """The torch integer type holding the quantized values (``int8``, ``uint8``, ``int16``; see module docstring)."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        if self.signed:
            return torch.int16
        raise ExportError(f"{self.name}: unsigned 16-bit needs uint16, which torch cannot hold as a constant")

    @property
    def container_range(self) -> tuple[int, int]:
        """``(min, max)`` of :attr:`container_dtype`."""
        info = torch.iinfo(self.container_dtype)
        return int(info.min), int(info.max)

    @property
    def narrow(self) -> bool:
        """True when ``[qmin, qmax]`` is narrower than the container range (a ``Clip`` is needed for activations)."""
        return (self.qmin, self.qmax) != self.container_range

    def scale_tensor(self) -> torch.Tensor:
        """``(C,)`` float32 scales."""
        return torch.tensor(self.scale, dtype=torch.float32)

    def zero_point_tensor(self) -> torch.Tensor:
        """``(C,)`` float32 zero points (integer-valued)."""
        return torch.tensor(self.zero_point, dtype=torch.float32)

    def onnx_scale(self) -> torch.Tensor:
        """Scale constant: a 0-d float32 tensor per-tensor, ``(C,)`` per-channel."""
        s = self.scale_tensor()
        return s.reshape(()) if self.axis is None else s

    def onnx_zero_point(self) -> torch.Tensor:
        """Zero-point constant of the container type, shaped like :meth:`onnx_scale`."""
        z = torch.tensor(self.zero_point, dtype=self.container_dtype)
        return z.reshape(()) if self.axis is None else z

    def clip_bounds(self) -> tuple[float, float]:
        """Float32 bounds ``((qmin - z) s, (qmax - z) s)`` of a per-tensor quantizer."""
        s = self.scale_tensor()[0]
        z = float(self.zero_point[0])
        return float((self.qmin - z) * s), float((self.qmax - z) * s)

    def broadcast(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Reshape ``(C,)`` ``values`` to broadcast against ``like`` along :attr:`axis` (0-d per-tensor)."""
        if self.axis is None:
            return values.reshape(())
        shape = [1] * like.dim()
        shape[self.axis] = -1
        return values.reshape(shape)


def quant_params(name: str, q: FakeQuantizer) -> QuantParams:
    """Read the fixed parameters of a calibrated quantizer.

    Raises:
        ExportError: the quantizer was never calibrated, its zero point is not an integer inside ``[qmin, qmax]``,
            or it needs a container this exporter does not write (unsigned 16-bit).
    """
    if not q.initialized:
        raise ExportError(f"{name}: quantizer was never calibrated (no scale); quantize the model first")
    scale = q.effective_scale().detach().float().cpu().reshape(-1)
    zp_float = q.zero_point.detach().double().cpu().reshape(-1)
    if not torch.equal(zp_float, torch.round(zp_float)):
        raise ExportError(f"{name}: zero point is not an integer ({zp_float.tolist()[:4]})")
    zero_point = zp_float.long()
    if bool((zero_point < q.qmin).any()) or bool((zero_point > q.qmax).any()):
        raise ExportError(f"{name}: zero point outside the integer range [{q.qmin}, {q.qmax}]")
    if zero_point.numel() != scale.numel():
        zero_point = zero_point.expand(scale.numel())
    params = QuantParams(name, tuple(float(v) for v in scale), tuple(int(v) for v in zero_point), q.qmin, q.qmax,
                         q.bits, bool(q.signed), q.channel_axis)
    params.container_dtype  # noqa: B018 - raises for unsupported containers before any export work
    return params


def integer_weight(params: QuantParams, weight: torch.Tensor, rounding=None) -> torch.Tensor:  # noqa: ANN001
    """The stored integers ``clamp(round(w / s) + z, qmin, qmax)`` of a weight, in the container type.

    Args:
        params: the weight quantizer's parameters (per-channel along ``params.axis``).
        weight: float weight, e.g. ``(C_out, C_in, kH, kW)``.
        rounding: optional ``v -> integer-valued v`` replacing round-to-nearest (learned AdaRound rounding).
    """
    with torch.no_grad():
        w = weight.detach().float().cpu()
        s = params.broadcast(params.scale_tensor(), w)
        z = params.broadcast(params.zero_point_tensor(), w)
        v = w / s
        v_int = torch.round(v) if rounding is None else rounding(v)
        q = torch.clamp(v_int + z, params.qmin, params.qmax)
    return q.to(params.container_dtype)


def _const(g, value: torch.Tensor):  # noqa: ANN001, ANN202
    return g.op("Constant", value_t=value)


class ActivationQDQ(torch.autograd.Function):
    """``x -> [Clip] -> QuantizeLinear -> DequantizeLinear`` for a per-tensor (or per-channel) activation quantizer.

    ``forward(x (any float shape), params: QuantParams)`` returns the fake-quantized ``x`` (float32, same shape).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, params: QuantParams) -> torch.Tensor:  # noqa: ANN001
        s = params.broadcast(params.scale_tensor(), x).to(x.device, x.dtype)
        z = params.broadcast(params.zero_point_tensor(), x).to(x.device, x.dtype)
        with torch._C.DisableTorchFunction():
            return fake_quantize(x, s, z, params.qmin, params.qmax)

    @staticmethod
    def symbolic(g, x, params: QuantParams):  # noqa: ANN001, ANN205
        if params.narrow:
            if params.axis is not None:
                raise ExportError(f"{params.name}: per-channel activation quantizers below 8 bits are not exported")
            lo, hi = params.clip_bounds()
            x = g.op("Clip", x, _const(g, torch.tensor(lo, dtype=torch.float32)),
                     _const(g, torch.tensor(hi, dtype=torch.float32)))
        scale = _const(g, params.onnx_scale())
        zp = _const(g, params.onnx_zero_point())
        kwargs = {} if params.axis is None else {"axis_i": params.axis}
        q = g.op("QuantizeLinear", x, scale, zp, **kwargs)
        return g.op("DequantizeLinear", q, scale, zp, **kwargs)


class WeightDQ(torch.autograd.Function):
    """A stored integer weight followed by ``DequantizeLinear`` (per-channel along ``params.axis``).

    ``forward(weight, values, params)``: ``values`` are the stored integers (container type, the weight's shape,
    computed once by :func:`integer_weight`); returns ``(values - z) * s`` in ``weight``'s dtype (the fake-quantized
    weight). The symbolic emits ``DequantizeLinear(values, scale, zero_point, axis)`` and ignores the float ``weight``,
    so the float weight is not stored in the ONNX file.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, values: torch.Tensor, params: QuantParams) -> torch.Tensor:  # noqa: ANN001
        with torch._C.DisableTorchFunction():
            v = values.to(weight.device, torch.float32)
            s = params.broadcast(params.scale_tensor(), v).to(weight.device)
            z = params.broadcast(params.zero_point_tensor(), v).to(weight.device)
            return ((v - z) * s).to(weight.dtype)

    @staticmethod
    def symbolic(g, weight, values, params: QuantParams):  # noqa: ANN001, ANN205
        kwargs = {} if params.axis is None else {"axis_i": params.axis}
        return g.op("DequantizeLinear", values, _const(g, params.onnx_scale()), _const(g, params.onnx_zero_point()),
                    **kwargs)
