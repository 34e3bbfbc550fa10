"""Switch the fake quantizers of a quantized model on and off (weights and activations independently)."""

from __future__ import annotations

from torch import nn

from dgh.quantization.capture import iter_quantizers


def set_quant_state(qmodel: nn.Module, weights: bool, activations: bool) -> None:
    """Switch weight quantizers and activation (incl. input/output) quantizers on or off, in place.

    Quantizers bypassed by the preset (e.g. the float output of ``academic``) stay bypassed.
    """
    for _, q in iter_quantizers(qmodel):
        q.enabled = weights if q.role == "weight" else activations
