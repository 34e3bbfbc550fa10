"""Calibration-set and quantized-model statistics into a folder (used by ``dgh stats``, ``dgh generate`` and the DVC
stage ``stats``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dgh.io import write_text
from dgh.models import LoadedModel
from dgh.quantization import load_quantized
from dgh.stats import CalibrationStats, ClipMode, QuantizedStats, calibration_set_stats, quantized_model_stats
from dgh.stats.outputs import StatsFile, make_stats_file, write_stats
from dgh.stats.plots import plot_clipping
from dgh.stats.quant_outputs import QUANT_STATS_FILE as EXPERIMENT_STATS_FILE
from dgh.stats.quant_outputs import QuantStatsFile, make_quant_stats_file

QUANT_STATS_FILE = "quant_stats.json"
CLIP_PLOT_FILE = "quant_clipping.png"


def stats_to_dir(
    loaded: LoadedModel,
    images_nchw: torch.Tensor,
    out_dir: str | Path,
    *,
    source: str = "",
    reference: CalibrationStats | None = None,
    batch_size: int = 128,
    device: str | None = None,
    plots: bool = True,
) -> StatsFile:
    """Statistics of one calibration set (:func:`dgh.stats.calibration_set_stats`, paper L_BN settings) written into
    ``out_dir``: ``stats.json``, ``stats_layers.csv``, ``stats_output_ranges.csv`` and the figures
    (:func:`dgh.stats.outputs.write_stats`).

    Args:
        images_nchw: float32 ``(N, 3, H, W)`` in the model's normalized space.
        reference: statistics of the model's real set (stored next to this set's; ``stats.output_range_ratio``).
        device: ``None``/``auto`` = CUDA when present.

    Raises:
        StatsError: bad images, or a reference of another model.
    """
    stats = calibration_set_stats(loaded, images_nchw, source=source, batch_size=batch_size,
                                  device=device if device not in (None, "") else "auto")
    write_stats(out_dir, stats, reference=reference, plots=plots)
    return make_stats_file(stats, reference)


def quant_stats_to_dir(
    loaded: LoadedModel,
    quantized: str | Path,
    images_nchw: torch.Tensor,
    out_dir: str | Path,
    *,
    source: str = "",
    mode: ClipMode = ClipMode.QUANTIZED,
    batch_size: int = 64,
    device: str | None = None,
    plots: bool = True,
) -> QuantizedStats:
    """Per-site clipping rates of a saved quantized model (``quantized.pt`` of ``dgh quantize``) on ``images_nchw``,
    written as ``quant_stats.json`` (and ``quant_clipping.png``) into ``out_dir``.

    Raises:
        QuantizedFileError: the file does not fit the model. StatsError: bad images.
    """
    qmodel = load_quantized(loaded, quantized, device=device if device not in (None, "") else "auto")
    qs = quantized_model_stats(qmodel, images_nchw, source=source, mode=mode, batch_size=batch_size)
    out = Path(out_dir)
    write_text(qs.model_dump_json(indent=1) + "\n", out / QUANT_STATS_FILE)
    if plots:
        plot_clipping({Path(quantized).name or "quantized": qs}, out / CLIP_PLOT_FILE)
    return qs


def experiment_stats_to_dir(
    loaded: LoadedModel,
    quantized: str | Path,
    calib_images_nchw: torch.Tensor,
    eval_images_nchw: torch.Tensor,
    out_dir: str | Path,
    *,
    experiment: str,
    model: str,
    calib_set: str,
    calib_source: str,
    setting: str,
    batch_size: int = 32,
    device: str | None = None,
) -> QuantStatsFile:
    """Per-site clipping of a quantized experiment (every quantizer on, as deployed) on its calibration images and
    on evaluation images, written into ``out_dir`` as ``quant_stats.json``
    (:class:`dgh.stats.quant_outputs.QuantStatsFile`) and ``quant_clipping.png`` (both on one chart). The quantized
    model is loaded, never changed or saved.

    Args:
        calib_images_nchw, eval_images_nchw: float32 ``(N, 3, H, W)``, the model's normalized space.
        experiment, model, calib_set, calib_source, setting: stored in the file (params.yaml ids).

    Raises:
        QuantizedFileError: the file does not fit the model. StatsError: bad images.
    """
    qmodel = load_quantized(loaded, quantized, device=device if device not in (None, "") else "auto")
    calib = quantized_model_stats(qmodel, calib_images_nchw, source="calibration set", batch_size=batch_size)
    ev = quantized_model_stats(qmodel, eval_images_nchw, source="evaluation images", batch_size=batch_size)
    doc = make_quant_stats_file(experiment, model, calib_set, calib_source, setting, calib, ev)
    out = Path(out_dir)
    write_text(doc.model_dump_json(indent=1) + "\n", out / EXPERIMENT_STATS_FILE)
    plot_clipping({"calibration set": calib, "evaluation images": ev}, out / CLIP_PLOT_FILE,
                  title=f"{experiment}: clipping rate per activation quantizer")
    return doc
