"""Quantized drop-in subclasses of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``.

Each carries:

- ``weight_quantizer``: a per-channel (axis 0 = output channel) :class:`~dgh.quantization.quantizers.FakeQuantizer`;
- ``weight_rounding``: ``None`` (round to nearest) or a callable/module ``v -> integer-valued v`` used instead of
  rounding ``v = w / s`` (AdaRound, Nagel et al. 2020). ``quantized_weight()`` applies it;
- ``output_quantizer``: the activation quantizer of this layer's output *site*. The capture runtime
  (:mod:`dgh.quantization.capture`) applies it where integer hardware materializes the result: after a following
  activation function when there is one, otherwise right at the output.

The forward computes the layer with the fake-quantized weight; the output quantization is applied by the runtime,
so the module stays usable on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgh.quantization.quantizers import FakeQuantizer


class _QuantWeightMixin:
    weight: nn.Parameter
    weight_quantizer: FakeQuantizer
    output_quantizer: FakeQuantizer
    weight_rounding: nn.Module | None

    def _init_quant(self) -> None:
        self.weight_quantizer = FakeQuantizer(
            channel_axis=0, num_channels=self.weight.shape[0], role="weight"
        )
        self.output_quantizer = FakeQuantizer(role="activation")
        self.weight_rounding = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (same shape/dtype as ``weight``), using ``weight_rounding`` when set."""
        return self.weight_quantizer(self.weight, rounding=self.weight_rounding)


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


QUANT_LAYER_TYPES = (QuantConv1d, QuantConv2d, QuantLinear)


def to_quant_layer(module: nn.Module) -> nn.Module:
    """A quantized copy of a float ``Conv1d``/``Conv2d``/``Linear`` (same weights, device, dtype; a zero bias is added
    when the float layer has none); any other module is returned unchanged."""
    if isinstance(module, QUANT_LAYER_TYPES):
        return module
    new: nn.Module
    if type(module) is nn.Conv2d or (isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d)):
        new = QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, True, module.padding_mode,
        )
    elif isinstance(module, nn.Conv1d):
        new = QuantConv1d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, True, module.padding_mode,
        )
    elif isinstance(module, nn.Linear):
        new = QuantLinear(module.in_features, module.out_features, True)
    else:
        return module
    new.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        # always a bias (zero when the float layer has none), so that bias correction keeps the state-dict layout
        new.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(new.bias))
    new.weight.requires_grad_(module.weight.requires_grad)
    new.bias.requires_grad_(module.weight.requires_grad)
    new.train(module.training)
    return new
