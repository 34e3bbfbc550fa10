"""What each :class:`~dgh.quantization.config.Preset` quantizes, and how (method.md, "Hardware-friendly
quantization"; HPTQ arXiv 2109.09113 for ``pot``; BRECQ/DGH paper code for ``paper``/``academic``)."""

from __future__ import annotations

from dataclasses import dataclass

from dgh.quantization.config import Preset


@dataclass(frozen=True)
class PresetSpec:
    """Quantizer choices of a preset.

    Attributes:
        weight_symmetric: symmetric signed per-channel weights (True) or asymmetric per-channel (False).
        act_symmetric: symmetric per-tensor activations, signed or unsigned by the observed range (True), or
            asymmetric (False).
        act_power_of_two: activation thresholds restricted to ``2^k``.
        quantize_output: the network outputs are quantized.
        first_last_bits: bit-width of the first and last layers' weights and of the network input (None: same as
            the rest).
        bias_correction: default of ``QuantConfig.bias_correction`` (MCT enables it; the paper code has none).
    """

    weight_symmetric: bool
    act_symmetric: bool
    act_power_of_two: bool
    quantize_output: bool
    first_last_bits: int | None
    bias_correction: bool


PRESETS: dict[Preset, PresetSpec] = {
    Preset.POT: PresetSpec(True, True, True, True, None, True),
    Preset.PAPER: PresetSpec(False, False, False, True, None, False),
    Preset.ACADEMIC: PresetSpec(False, False, False, False, 8, False),
}


def preset_spec(preset: Preset | str) -> PresetSpec:
    """The :class:`PresetSpec` of ``preset`` (enum or its string value)."""
    return PRESETS[Preset(preset)]
