"""Calibration-set and quantized-model statistics: why a calibration set works or fails.

- :func:`calibration_set_stats` -> :class:`CalibrationStats`: per-layer BN alignment (the split of the dataset-level
  L_BN), pixel statistics and clamp fractions, output coverage, prediction diversity.
- :func:`quantized_model_stats` -> :class:`QuantizedStats`: per-site clipping rate and data range of a quantized
  model's activation quantizers; :func:`compare_thresholds`: its ranges against a real-calibrated model's.
- :mod:`dgh.stats.outputs` / :mod:`dgh.stats.quant_outputs`: the files and MLflow records of both.
- :mod:`dgh.stats.plots`: matplotlib figures of both (imported separately: matplotlib is only needed there).
"""

from dgh.stats.calibration import (
    PIXEL_BOUND_TOL,
    BNLayerStats,
    CalibrationStats,
    OutputStats,
    PixelStats,
    PredictionStats,
    StatsError,
    calibration_set_stats,
    entropy_nats,
    pixel_fractions_at_bounds,
    prediction_stats,
)
from dgh.stats.quantized import (
    ClipMode,
    QuantizedStats,
    SiteClipStats,
    SiteThresholds,
    clip_counts,
    compare_thresholds,
    quantized_model_stats,
    quantizer_range,
    threshold_summary,
)

__all__ = [
    "PIXEL_BOUND_TOL",
    "BNLayerStats",
    "CalibrationStats",
    "ClipMode",
    "OutputStats",
    "PixelStats",
    "PredictionStats",
    "QuantizedStats",
    "SiteClipStats",
    "SiteThresholds",
    "StatsError",
    "calibration_set_stats",
    "clip_counts",
    "compare_thresholds",
    "entropy_nats",
    "pixel_fractions_at_bounds",
    "prediction_stats",
    "quantized_model_stats",
    "quantizer_range",
    "threshold_summary",
]
