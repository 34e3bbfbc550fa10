"""Hardware-friendly post-training quantization: every layer, the input and the outputs fake-quantized.

Public API:

- :class:`QuantConfig`, :class:`Preset` (``pot`` | ``paper`` | ``academic``), :class:`Algorithm`
  (``minmax`` | ``mse`` | ``adaround`` | ``brecq``).
- ``quantize_model(loaded, calib_images_nchw, config, device=None, progress=True) -> QuantizedModel``.
- ``save_quantized(qmodel, path, meta=None)``, ``load_quantized(loaded, path) -> QuantizedModel``,
  ``write_quantization_report(qmodel, csv_path)``.
- ``set_quant_state(qmodel, weights: bool, activations: bool)``.

For reconstruction (AdaRound / BRECQ, :mod:`dgh.quantization.reconstruction`):

- Quantized layers (:class:`QuantConv2d`, :class:`QuantConv1d`, :class:`QuantLinear`,
  :class:`QuantConvTranspose2d`, :class:`QuantConvTranspose1d`, generated ``Quant<Name>`` classes for conv
  subclasses with their own forward; tuple :data:`QUANT_LAYER_TYPES`) are subclasses of the torch layers with
  ``.weight_quantizer`` (:class:`FakeQuantizer`, per output channel: axis 0, axis 1 for transposed convs, see
  ``.weight_out_channels_first()``; ``.scale`` ``(C_out,)``, ``.zero_point``,
  ``.qmin``, ``.qmax``, ``.channel_axis``, ``.to_integer_domain(w) = w / s`` broadcast),
  ``.weight_rounding`` (``None`` = round to nearest; set a module/callable ``v -> rounded v`` of ``v = w / s`` to
  substitute AdaRound's ``floor(v) + h(V)``; zero point, clamp and rescale are applied by the quantizer),
  ``.quantized_weight()`` and ``.output_quantizer`` (the layer's output-site activation quantizer).
- Activation quantizers: :class:`FakeQuantizer` with ``.make_learnable()`` (scale becomes an ``nn.Parameter``, LSQ
  gradient; power-of-two scales are projected with a straight-through ``2^round(log2 s)``). They live on the module
  that owns the op: ``<layer>.output_quantizer``, ``<module>.act_quantizers[<op><k>]``, ``QuantizedModel.input_quantizer``.
- :func:`set_quant_state` switches weight and activation quantization independently.
- Calling any submodule of the quantized model on its own applies the same quantizers as in the full forward
  (:mod:`dgh.quantization.capture`); a pending output at the submodule boundary is quantized there.
- :func:`save_quantized` bakes a set ``weight_rounding`` into the stored weights, so files reload exactly without
  the rounding module.
"""

from dgh.quantization.api import (
    CalibrationError,
    QuantizedFileError,
    bake_weight_rounding,
    load_quantized,
    quantization_report_rows,
    quantize_model,
    read_quantized_file,
    save_quantized,
    write_quantization_report,
)
from dgh.quantization.capture import (
    CaptureError,
    QuantizedModel,
    build_quantized_model,
    check_supported_modules,
    iter_quantizers,
)
from dgh.quantization.config import Algorithm, Preset, QuantConfig, QuantConfigError
from dgh.quantization.fold import FoldError, fold_batch_norms
from dgh.quantization.layers import (
    QUANT_LAYER_TYPES,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantLinear,
)
from dgh.quantization.quantizers import FakeQuantizer, QuantizerError, is_power_of_two
from dgh.quantization.state import set_quant_state

__all__ = [
    "QUANT_LAYER_TYPES",
    "Algorithm",
    "CalibrationError",
    "CaptureError",
    "FakeQuantizer",
    "FoldError",
    "Preset",
    "QuantConfig",
    "QuantConfigError",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantizedFileError",
    "QuantizedModel",
    "QuantizerError",
    "bake_weight_rounding",
    "build_quantized_model",
    "check_supported_modules",
    "fold_batch_norms",
    "is_power_of_two",
    "iter_quantizers",
    "load_quantized",
    "quantization_report_rows",
    "quantize_model",
    "read_quantized_file",
    "save_quantized",
    "set_quant_state",
    "write_quantization_report",
]
