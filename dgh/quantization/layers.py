"""Quantized drop-in subclasses of ``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose1d/2d`` and ``nn.Linear``.

Each carries:

- ``weight_quantizer``: a per-output-channel :class:`~dgh.quantization.quantizers.FakeQuantizer`. The output-channel
  axis of the weight is 0 for conv/linear (``(C_out, C_in/groups, *k)``, ``(out, in)``) and 1 for transposed convs
  (``(C_in, C_out, *k)``, ``groups == 1``); :meth:`weight_out_channels_first` gives the weight with that axis first;
- ``weight_rounding``: ``None`` (round to nearest) or a callable/module ``v -> integer-valued v`` used instead of
  rounding ``v = w / s`` (AdaRound, Nagel et al. 2020). ``quantized_weight()`` applies it;
- ``output_quantizer``: the activation quantizer of this layer's output *site*. The capture runtime
  (:mod:`dgh.quantization.capture`) applies it where integer hardware materializes the result: after a following
  activation function when there is one, otherwise right at the output.

The forward computes the layer with the fake-quantized weight; the output quantization is applied by the runtime,
so the module stays usable on its own.

A subclass of a torch layer with its own ``forward`` (TensorFlow-style "same" padding: timm's ``Conv2dSame`` /
``Conv2dSameExport``, the lukemelas EfficientNet ``Conv2dStaticSamePadding``) keeps that forward: its quantized
version is a generated class ``Quant<Name>`` (bases: the quantized layer, then the original class) whose forward runs
the original forward with the fake-quantized weight in place of ``weight`` (:func:`to_quant_layer`). The original
forward must hand ``self.weight`` unchanged to the conv/linear op; the capture runtime checks this and refuses a
layer that transforms its weight first (e.g. weight standardization).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dgh.quantization.quantizers import FakeQuantizer


class UnsupportedLayerError(ValueError):
    """A layer that cannot be quantized faithfully (e.g. a grouped transposed conv). The message is one line."""


class _QuantWeightMixin:
    weight: nn.Parameter
    weight_quantizer: FakeQuantizer
    output_quantizer: FakeQuantizer
    weight_rounding: nn.Module | None
    weight_channel_axis: int = 0

    def _init_quant(self) -> None:
        axis = self.weight_channel_axis
        self.weight_quantizer = FakeQuantizer(
            channel_axis=axis, num_channels=self.weight.shape[axis], role="weight"
        )
        self.output_quantizer = FakeQuantizer(role="activation")
        self.weight_rounding = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (same shape/dtype as ``weight``), using ``weight_rounding`` when set."""
        return self.weight_quantizer(self.weight, rounding=self.weight_rounding)

    def weight_out_channels_first(self) -> torch.Tensor:
        """``weight`` with the output-channel axis first, ``(C_out, ...)`` (a view; the weight itself for axis 0)."""
        axis = self.weight_channel_axis
        return self.weight if axis == 0 else self.weight.movedim(axis, 0)

    def weight_error_output_shift(self, delta_weight: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
        """``E[(W_q - W) x]`` per output channel, ``(C_out,)``, from ``delta_weight = W_q - W`` (weight layout) and the
        per-input-channel mean ``input_mean`` ``(C_in,)`` (padding and borders ignored). Used by weight bias
        correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2)."""
        if isinstance(self, nn.Linear):
            return delta_weight @ input_mean
        if isinstance(self, nn.modules.conv._ConvTransposeNd):
            # every input pixel scatters all kernel taps; an output pixel receives on average prod(k)/prod(stride)
            taps = delta_weight.sum(dim=tuple(range(2, delta_weight.dim())))  # (C_in, C_out)
            stride = 1
            for s in self.stride:
                stride *= s
            return (taps * input_mean[:, None]).sum(0) / stride
        groups = self.groups
        cin_g = delta_weight.shape[1]
        per_out_in = input_mean.view(groups, cin_g).repeat_interleave(delta_weight.shape[0] // groups, 0)
        return (delta_weight.sum(dim=tuple(range(2, delta_weight.dim()))) * per_out_in).sum(1)


@contextmanager
def _weight_replaced(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module.weight`` reads ``weight`` (a plain tensor) instead of the parameter; the parameter
    is put back on exit. The same swap ``torch.func.functional_call`` performs, without re-entering ``__call__``
    (so forward hooks run once)."""
    params = module._parameters
    saved = params["weight"]
    params["weight"] = weight
    try:
        yield
    finally:
        params["weight"] = saved


class _FloatForwardWithQuantizedWeight:
    """Mixin: ``forward`` is ``_float_forward`` (a float layer class's forward) run with ``quantized_weight()`` in
    place of ``weight`` (during the call ``self.weight`` is that tensor; the capture runtime checks that the
    conv/linear op receives exactly it)."""

    _float_forward: Callable

    def forward(self, *args, **kwargs):
        qw = self.quantized_weight()
        with _weight_replaced(self, qw):
            return type(self)._float_forward(self, *args, **kwargs)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight. Input/output ``(N, C, H, W)`` float32."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight. Input/output ``(N, C, L)`` float32."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with a fake-quantized weight. Input ``(..., in_features)``, output ``(..., out_features)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConvTranspose2d(_FloatForwardWithQuantizedWeight, _QuantWeightMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (``groups == 1``) with a fake-quantized weight ``(C_in, C_out, kH, kW)``, one scale per
    output channel (weight axis 1). Forward as ``nn.ConvTranspose2d`` (``output_size`` supported)."""

    weight_channel_axis = 1
    _float_forward = nn.ConvTranspose2d.forward

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()


class QuantConvTranspose1d(_FloatForwardWithQuantizedWeight, _QuantWeightMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` (``groups == 1``) with a fake-quantized weight ``(C_in, C_out, k)``, one scale per
    output channel (weight axis 1)."""

    weight_channel_axis = 1
    _float_forward = nn.ConvTranspose1d.forward

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()


QUANT_LAYER_TYPES = (QuantConv1d, QuantConv2d, QuantLinear, QuantConvTranspose1d, QuantConvTranspose2d)
# float layer types that to_quant_layer replaces (subclasses included)
FLOAT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)

_PLAIN: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
}


def _float_base(module: nn.Module) -> type | None:
    """The torch layer class among :data:`FLOAT_LAYER_TYPES` that ``module`` is an instance of (most derived)."""
    for base in type(module).__mro__:
        if base in _PLAIN:
            return base
    return None


def has_own_forward(module: nn.Module) -> bool:
    """True when ``module``'s class is a subclass of a torch conv/linear class that overrides ``forward`` (or the
    conv's ``_conv_forward``), i.e. swapping it for the plain quantized layer would change what it computes."""
    base = _float_base(module)
    if base is None or type(module) is base:
        return False
    cls = type(module)
    if cls.forward is not base.forward:
        return True
    return getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None)


@functools.cache
def _quant_subclass(cls: type) -> type:
    """``Quant<cls>``: bases (original-forward mixin, plain quantized layer of cls's torch base, ``cls``); cached so
    that every instance of one float class gets the same generated class."""
    base = next(b for b in cls.__mro__ if b in _PLAIN)
    plain = _PLAIN[base]
    return type(
        f"Quant{cls.__name__}",
        (_FloatForwardWithQuantizedWeight, plain, cls),
        {"_float_forward": cls.forward, "__module__": __name__, "__doc__": (
            f"{cls.__module__}.{cls.__qualname__} with a fake-quantized weight; runs the original forward.")},
    )


def check_supported_layer(module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` for a layer :func:`to_quant_layer` cannot quantize faithfully (a
    transposed conv with ``groups > 1``); anything else passes."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1:
        raise UnsupportedLayerError(
            f"{type(module).__name__} with groups={module.groups} is not supported (per-output-channel weight "
            "quantization of a grouped transposed conv); use groups=1"
        )


def to_quant_layer(module: nn.Module) -> nn.Module:
    """A quantized copy of a float ``Conv1d``/``Conv2d``/``ConvTranspose1d``/``ConvTranspose2d``/``Linear`` (same
    weights, device, dtype; a zero bias is added when the float layer has none); any other module is returned
    unchanged.

    A subclass with its own forward (:func:`has_own_forward`) becomes a ``Quant<Name>`` copy that keeps its class
    attributes, submodules (e.g. a padding module) and forward (see the module docstring).

    Raises:
        UnsupportedLayerError: a transposed conv with ``groups > 1``.
    """
    if isinstance(module, QUANT_LAYER_TYPES):
        return module
    base = _float_base(module)
    if base is None:
        return module
    check_supported_layer(module)
    new: nn.Module
    if has_own_forward(module):
        new = copy.deepcopy(module)
        new.__class__ = _quant_subclass(type(module))
        new._init_quant()
        new.to(device=module.weight.device)
        if new.bias is None:
            new.bias = nn.Parameter(torch.zeros(new.weight.shape[new.weight_channel_axis], device=new.weight.device,
                                                dtype=new.weight.dtype))
    else:
        if base is nn.Linear:
            new = QuantLinear(module.in_features, module.out_features, True)
        elif base in (nn.ConvTranspose1d, nn.ConvTranspose2d):
            new = _PLAIN[base](
                module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.output_padding, module.groups, True, module.dilation, module.padding_mode,
            )
        else:
            new = _PLAIN[base](
                module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, True, module.padding_mode,
            )
        new.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            # always a bias (zero when the float layer has none), so that bias correction keeps the state-dict layout
            new.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(new.bias))
    new.weight.requires_grad_(module.weight.requires_grad)
    new.bias.requires_grad_(module.weight.requires_grad)
    new.train(module.training)
    return new
