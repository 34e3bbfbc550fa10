"""DGH data generation (arXiv 2410.22110; ``../shared/docs/method.md`` sections 1-4) and its baselines.

Public API:

- :class:`GenerationConfig` (+ enums :class:`Method`, :class:`Statistics`, :class:`OutputLoss`, :class:`LastBN`,
  :class:`AugmentDraw`, :class:`Speed`, :class:`Amp`); presets via ``GenerationConfig.for_method(method, **overrides)``.
- :func:`generate_images` -> :class:`GenerationResult`; writes ``images.pt``, ``meta.json``, ``preview.png``.
- :func:`bn_distance`: dataset-level L_BN of an image set (no augmentation).
- Errors (all ``ValueError``): :class:`GenerationConfigError`, :class:`NoBatchNormError`, :class:`GenerationError`,
  :class:`DistributedError` (several processes: :mod:`dgh.generation.distributed`).
"""

from dgh.generation.bn_stats import NoBatchNormError, find_bn_layers
from dgh.generation.config import (
    Amp,
    AugmentDraw,
    GenerationConfig,
    GenerationConfigError,
    LastBN,
    Method,
    OutputLoss,
    Schedule,
    Speed,
    Statistics,
)
from dgh.generation.distributed import DistributedError
from dgh.generation.engine import (
    GenerationError,
    GenerationResult,
    bn_distance,
    generate_images,
)

__all__ = [
    "Amp",
    "AugmentDraw",
    "DistributedError",
    "GenerationConfig",
    "GenerationConfigError",
    "GenerationError",
    "GenerationResult",
    "LastBN",
    "Method",
    "NoBatchNormError",
    "OutputLoss",
    "Schedule",
    "Speed",
    "Statistics",
    "bn_distance",
    "find_bn_layers",
    "generate_images",
]
