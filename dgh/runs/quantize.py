"""Quantize a model into a folder (used by ``dgh quantize`` and the DVC stage ``quantize``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dgh.io import write_json
from dgh.layout import META_FILE, QUANT_REPORT_FILE, QUANTIZED_FILE
from dgh.models import LoadedModel
from dgh.quantization import QuantConfig, QuantizedModel, quantize_model, save_quantized, write_quantization_report


def quantize_to_dir(
    loaded: LoadedModel,
    calib_images_nchw: torch.Tensor,
    config: QuantConfig,
    out_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[QuantizedModel, dict[str, Any]]:
    """Calibrate ``loaded`` on ``calib_images_nchw`` (float32 ``(N, 3, H, W)``, normalized space) with ``config``
    and write ``quantized.pt``, ``quantization_report.csv`` and ``meta.json`` into ``out_dir``.

    ``meta.json`` holds ``meta`` plus ``n_calib``, ``quant`` (the config as JSON) and ``seconds`` (wall time of the
    calibration); the same dict is embedded in ``quantized.pt``.

    Returns:
        the quantized model and the meta dict written.

    Raises:
        the errors of :func:`dgh.quantization.quantize_model` (all ``ValueError``).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    qmodel = quantize_model(loaded, calib_images_nchw, config, device=device, progress=progress)
    record = {**(meta or {}), "n_calib": int(calib_images_nchw.shape[0]), "quant": config.to_json_dict(),
              "seconds": round(time.perf_counter() - t0, 2)}
    save_quantized(qmodel, out / QUANTIZED_FILE, meta=record)
    write_quantization_report(qmodel, out / QUANT_REPORT_FILE)
    write_json(record, out / META_FILE)
    return qmodel, record
