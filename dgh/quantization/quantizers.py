"""Uniform fake quantizers with straight-through gradients.

A :class:`FakeQuantizer` maps a float tensor ``x`` to ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", eq. 1-2). Supported:

- 2 to 8 bits, and 16;
- symmetric signed (``[-2^(b-1), 2^(b-1)-1]``, ``z = 0``), symmetric unsigned (``[0, 2^b - 1]``, ``z = 0``) or
  asymmetric (``[0, 2^b - 1]`` with an integer zero point ``z``);
- per-tensor or per-channel (one scale per index of ``channel_axis``);
- optional power-of-two scales (``s = 2^k``, HPTQ, Habi et al. 2021, arXiv 2109.09113): a symmetric threshold
  ``T = 2^t`` gives ``s = T / 2^(b-1)`` (signed) or ``T / 2^b`` (unsigned), itself a power of two;
- straight-through rounding (Bengio et al. 2013): ``d round(v) / dv = 1``; the clamp passes no gradient outside
  the range. With ``learnable=True`` the scale is an ``nn.Parameter`` and receives the LSQ gradient
  (Esser et al. 2020, arXiv 1902.08153) that autograd derives from the expression above.

Reconstruction hook: ``forward(x, rounding=fn)`` replaces round-to-nearest of ``v = x / s`` by ``fn(v)`` (e.g.
AdaRound's ``floor(v) + h(V)``); zero point, clamp and rescale are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QuantizerError(ValueError):
    """Invalid quantizer settings or parameters. The message is one line."""


SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as ``torch.round``) with an identity (straight-through) gradient."""
    return (torch.round(v) - v).detach() + v


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit integer grid: signed ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.

    Raises:
        QuantizerError: bits not in :data:`SUPPORTED_BITS`.
    """
    if bits not in SUPPORTED_BITS:
        raise QuantizerError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def is_power_of_two(values: torch.Tensor) -> bool:
    """True when every element is exactly ``2^k`` for an integer ``k`` (mantissa 0.5 in ``frexp``)."""
    mantissa, _ = torch.frexp(values.detach().double())
    return bool(torch.all(mantissa == 0.5))


def symmetric_scale(threshold: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Scale of a symmetric quantizer with threshold ``T`` (float tensor, any shape, > 0).

    ``s = T / 2^(b-1)`` when signed (range ``[-T, T - s]``), ``s = T / 2^b`` when unsigned (range ``[0, T - s]``),
    the convention of HPTQ (arXiv 2109.09113, section 3) and MCT.
    """
    return threshold / (2 ** (bits - 1) if signed else 2**bits)


def asymmetric_scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric ``bits``-bit quantizer covering ``[lo, hi]``.

    The range is first widened to contain 0 (so that 0 is exact), then ``s = (hi - lo) / (2^b - 1)`` and
    ``z = round(-lo / s)`` (Jacob et al. 2018, section 2.1; BRECQ ``UniformAffineQuantizer``). Shapes broadcast.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    return scale, zero_point


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    rounding: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with straight-through rounding.

    ``scale`` and ``zero_point`` broadcast against ``x``. ``rounding(v)`` replaces ``round_ste(v)`` when given.
    """
    v = x / scale
    v_int = round_ste(v) if rounding is None else rounding(v)
    return (torch.clamp(v_int + zero_point, qmin, qmax) - zero_point) * scale


class FakeQuantizer(nn.Module):
    """A uniform fake quantizer (see the module docstring for the formula and its sources).

    Args:
        bits: bit-width, one of :data:`SUPPORTED_BITS`.
        symmetric: zero point fixed at 0 (True) or a learned integer zero point (False, range ``[0, 2^b-1]``).
        signed: symmetric only: signed integer range (True) or unsigned ``[0, 2^b-1]`` (False).
        channel_axis: ``None`` for per-tensor, else the axis of ``x`` that carries one scale per index
            (0 for conv/linear weights ``(C_out, ...)``).
        num_channels: number of scales when per-channel.
        power_of_two: the scale must be ``2^k`` (symmetric only); :meth:`set_threshold` rounds it up and a learnable
            scale is projected with a straight-through ``2^round(log2 s)``.
        learnable: the scale is an ``nn.Parameter`` (LSQ-style training); otherwise a buffer.

    Attributes (all float32 tensors of shape ``(num_channels,)`` or ``(1,)``):
        scale: step size ``s`` in the units of ``x``.
        zero_point: integer-valued ``z`` stored as float.
        qmin, qmax: python ints, the integer range.
        enabled: runtime switch (see ``set_quant_state``); a disabled quantizer is the identity.
        bypass: fixed by the preset (e.g. the float network output of the ``academic`` preset); also the identity.
        initialized: False until :meth:`set_threshold` / :meth:`set_range` / ``load_state_dict`` gave parameters.
        role: free-form tag (``weight``, ``activation``, ``input``, ``output``) used by the report.

    Raises:
        QuantizerError: invalid combination (e.g. power-of-two and asymmetric), or forward before initialization.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        signed: bool = True,
        channel_axis: int | None = None,
        num_channels: int = 1,
        power_of_two: bool = False,
        learnable: bool = False,
        role: str = "activation",
    ) -> None:
        super().__init__()
        self.configure(bits, symmetric=symmetric, signed=signed, power_of_two=power_of_two)
        self.channel_axis = channel_axis
        self.learnable = learnable
        self.role = role
        self.enabled = True
        self.bypass = False
        self.initialized = False
        n = num_channels if channel_axis is not None else 1
        scale = torch.ones(n)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(n))

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def qmin(self) -> int:
        return integer_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.signed)[1]

    @property
    def is_per_channel(self) -> bool:
        return self.channel_axis is not None

    def configure(self, bits: int, *, symmetric: bool, signed: bool, power_of_two: bool) -> None:
        """Set the integer grid: the one place ``bits``, ``symmetric``, ``signed`` and ``power_of_two`` change.

        ``signed`` applies to symmetric quantizers only (asymmetric ones use ``[0, 2^b-1]``). The scale and zero point
        are kept; set them afterwards with :meth:`set_threshold` / :meth:`set_range`.

        Raises:
            QuantizerError: power-of-two with an asymmetric grid, or an unsupported bit-width.
        """
        if power_of_two and not symmetric:
            raise QuantizerError("power-of-two scales need a symmetric quantizer")
        signed = bool(signed) if symmetric else False
        integer_range(bits, signed)
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.signed = signed
        self.power_of_two = bool(power_of_two)

    def set_signed(self, signed: bool) -> None:
        """Symmetric quantizers only: choose the signed or unsigned integer range."""
        if self.symmetric:
            self.signed = signed

    def _assign(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale = scale.detach().to(self.scale.device, torch.float32).reshape(-1)
        zero_point = zero_point.detach().to(self.zero_point.device, torch.float32).reshape(-1)
        if scale.numel() != self.scale.numel():
            raise QuantizerError(f"expected {self.scale.numel()} scales, got {scale.numel()}")
        if not torch.all(torch.isfinite(scale)) or not torch.all(scale > 0):
            raise QuantizerError("quantizer scales must be finite and > 0")
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point.expand_as(self.zero_point))
        self.initialized = True

    def set_threshold(self, threshold: torch.Tensor | float) -> None:
        """Symmetric: set ``s`` from threshold ``T`` (``(C,)`` or scalar, > 0). Power-of-two rounds ``T`` up to ``2^k``.

        Raises:
            QuantizerError: asymmetric quantizer, or a non-positive threshold.
        """
        if not self.symmetric:
            raise QuantizerError("set_threshold needs a symmetric quantizer; use set_range")
        t = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1).clamp(min=1e-8)
        if self.power_of_two:
            t = torch.pow(2.0, torch.ceil(torch.log2(t)))
        self._assign(symmetric_scale(t, self.bits, self.signed), torch.zeros_like(t))

    def set_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        """Asymmetric: cover ``[lo, hi]`` (see :func:`asymmetric_scale_zero_point`). Symmetric: ``T = max|lo|,|hi|``."""
        lo_t = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi_t = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        if self.symmetric:
            self.set_threshold(torch.maximum(lo_t.abs(), hi_t.abs()))
            return
        self._assign(*asymmetric_scale_zero_point(lo_t, hi_t, self.bits))

    def threshold(self) -> torch.Tensor:
        """Symmetric threshold ``T`` (``s * 2^(b-1)`` signed, ``s * 2^b`` unsigned); asymmetric: ``(qmax - z) * s``."""
        s = self.scale.detach()
        if self.symmetric:
            return s * (2 ** (self.bits - 1) if self.signed else 2**self.bits)
        return (self.qmax - self.zero_point) * s

    # ----------------------------------------------------------------------------------------------- forward
    def broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a ``(C,)``/``(1,)`` parameter so that it broadcasts against ``x`` along :attr:`channel_axis`."""
        if self.channel_axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    def effective_scale(self) -> torch.Tensor:
        """The scale used in forward: for learnable power-of-two, ``2^round(log2 s)`` with straight-through grad."""
        if self.learnable and self.power_of_two:
            return torch.pow(2.0, round_ste(torch.log2(self.scale.clamp(min=1e-12))))
        return self.scale

    def forward(
        self, x: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Fake-quantize ``x`` (any float shape); identity when disabled or bypassed.

        Raises:
            QuantizerError: enabled but never initialized.
        """
        if not self.enabled or self.bypass:
            return x
        if not self.initialized:
            raise QuantizerError("quantizer used before calibration (no scale set)")
        # the quantizer's own arithmetic is never a quantization site of the capture runtime
        with torch._C.DisableTorchFunction():
            scale = self.broadcast(self.effective_scale(), x).to(x.dtype)
            zp = self.broadcast(self.zero_point, x).to(x.dtype)
            return fake_quantize(x, scale, zp, self.qmin, self.qmax, rounding)

    def to_integer_domain(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` broadcast along the channel axis (AdaRound initializes its rounding logits from this)."""
        return x / self.broadcast(self.effective_scale(), x)

    # ------------------------------------------------------------------------------------- serialization
    def get_extra_state(self) -> dict:
        """Plain-typed settings saved in ``state_dict`` (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "bits": int(self.bits),
            "symmetric": bool(self.symmetric),
            "signed": bool(self.signed),
            "channel_axis": self.channel_axis,
            "power_of_two": bool(self.power_of_two),
            "learnable": bool(self.learnable),
            "bypass": bool(self.bypass),
            "initialized": bool(self.initialized),
            "role": str(self.role),
        }

    def set_extra_state(self, state: dict) -> None:
        """Restore the settings written by :meth:`get_extra_state` (buffers are restored by ``load_state_dict``)."""
        self.configure(int(state["bits"]), symmetric=bool(state["symmetric"]), signed=bool(state["signed"]),
                       power_of_two=bool(state["power_of_two"]))
        self.channel_axis = state["channel_axis"]
        self.bypass = bool(state["bypass"])
        self.initialized = bool(state["initialized"])
        self.role = str(state["role"])
        if bool(state["learnable"]) != self.learnable:
            self.make_learnable(bool(state["learnable"]))

    def make_learnable(self, learnable: bool = True) -> None:
        """Turn the scale into an ``nn.Parameter`` (LSQ) or back into a buffer, keeping its effective value (a
        power-of-two quantizer's learned scale is projected to ``2^round(log2 s)``, as its forward used it)."""
        value = self.effective_scale().detach().clone()
        del self.scale
        if learnable:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.learnable = learnable

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        sign = "signed" if self.signed else "unsigned"
        ch = f"per-channel(axis={self.channel_axis})" if self.is_per_channel else "per-tensor"
        pot = ", pot" if self.power_of_two else ""
        return f"{self.bits}b {kind} {sign} {ch}{pot}, enabled={self.enabled}, bypass={self.bypass}"


def pot_exponent(scale: torch.Tensor) -> torch.Tensor:
    """``log2(scale)`` as float; integer-valued exactly when the scale is a power of two."""
    return torch.log2(scale.detach().double())


__all__ = [
    "SUPPORTED_BITS",
    "FakeQuantizer",
    "QuantizerError",
    "asymmetric_scale_zero_point",
    "fake_quantize",
    "integer_range",
    "is_power_of_two",
    "pot_exponent",
    "round_ste",
    "symmetric_scale",
]
