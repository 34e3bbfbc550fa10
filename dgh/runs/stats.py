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
