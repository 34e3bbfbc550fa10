"""Orchestration shared by the ``dgh`` commands (:mod:`dgh.cli`) and the DVC stages (:mod:`dgh.pipeline`).

One module per step, so that each DVC stage imports (and so depends on) only the library it runs:

- :func:`dgh.runs.generate.generate_to_dir`: generation config -> ``images.pt``, ``meta.json``, ``preview.png``,
  ``losses.json`` in a folder.
- :func:`dgh.runs.quantize.quantize_to_dir`: calibration images + quant config -> ``quantized.pt``,
  ``quantization_report.csv``, ``meta.json`` in a folder.
- :func:`dgh.runs.evaluate.evaluate_to_file`: a float or quantized model on classification or detection data ->
  ``metrics.json``.

Device strings (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) are passed through unchanged; the library resolves them
(:func:`dgh.env.resolve_device`).
"""
