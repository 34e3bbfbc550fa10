"""Threshold selection: min/max and MSE search over candidate thresholds (power-of-two candidates under ``pot``).

- Min/max: the observed range (symmetric: ``T = max|x|``; power-of-two: the smallest ``2^k >= max|x|``).
- MSE: among candidate quantizers, the one minimizing ``mean((x - Q(x))^2)`` (HPTQ, arXiv 2109.09113, section 3.3,
  "threshold selection by error minimization"; BRECQ code ``UniformAffineQuantizer`` with ``scale_method='mse'``).
  Candidates:
    - symmetric, power-of-two: ``T = 2^k`` for ``k = kmax, kmax - 1, ..., kmax - 15`` with ``2^kmax >= max|x|``;
    - symmetric: ``T = a * max|x|`` for ``a`` on a uniform grid of (0, 1] (weights: of [0.2, 1]);
    - asymmetric: ``[a * min, a * max]`` for the same grid of ``a`` (BRECQ's joint shrink).
- Weights: per output channel; the search is vectorized over channels.

Calibration memory is bounded: :class:`ActivationObserver` keeps, per site, the exact running min/max and a uniform
random subsample (with replacement) of at most ``samples_per_site`` values (drawn per batch,
proportionally), never all activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dgh.quantization.quantizers import (
    asymmetric_scale_zero_point,
    fake_quantize,
    integer_range,
    symmetric_scale,
)


@dataclass
class SiteStats:
    """Running statistics of one activation site: exact ``min``/``max`` and a bounded subsample (1-D float32, CPU)."""

    min: float = math.inf
    max: float = -math.inf
    samples: list[torch.Tensor] = field(default_factory=list)
    n_seen: int = 0
    largest_batch_numel: int = 0

    def sample_tensor(self) -> torch.Tensor:
        """The subsample plus the exact min and max (so that a clipping candidate always pays for the extremes)."""
        if not self.samples:
            return torch.zeros(1)
        return torch.cat([*self.samples, torch.tensor([self.min, self.max], dtype=torch.float32)])


class ActivationObserver:
    """Callable ``(site_name, quantizer, x)`` for the observe phase of the capture runtime.

    Args:
        samples_per_batch: values drawn uniformly at random (with replacement) from each full-size observed tensor
            larger than that; a smaller tensor at the same site (the last, partial batch) gets a proportionally
            smaller draw, so every calibration image weighs the same in the MSE search.
        seed: seed of the sampling generator (reproducible calibration).
    """

    def __init__(self, samples_per_batch: int, seed: int = 0) -> None:
        self.samples_per_batch = max(1, int(samples_per_batch))
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, SiteStats] = {}

    def __call__(self, name: str, quantizer, x: torch.Tensor) -> None:
        st = self.stats.setdefault(name, SiteStats())
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        st.min = min(st.min, float(lo))
        st.max = max(st.max, float(hi))
        st.n_seen += flat.numel()
        st.largest_batch_numel = max(st.largest_batch_numel, flat.numel())
        n_draw = math.ceil(self.samples_per_batch * flat.numel() / st.largest_batch_numel)
        if flat.numel() > n_draw:
            idx = torch.randint(flat.numel(), (n_draw,), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        st.samples.append(flat.cpu())


def _mse_per_candidate(
    x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, qmin: int, qmax: int, chunk: int = 16
) -> torch.Tensor:
    """``mean((x - Q_m(x))^2)`` for each candidate m. ``x`` 1-D; ``scales``/``zero_points`` ``(M,)``; returns ``(M,)``."""
    errs = []
    for i in range(0, scales.numel(), chunk):
        s = scales[i : i + chunk, None]
        z = zero_points[i : i + chunk, None]
        q = fake_quantize(x[None, :], s, z, qmin, qmax, rounding=torch.round)
        errs.append((q - x[None, :]).pow(2).mean(1))
    return torch.cat(errs)


def pot_candidates(max_abs: float, n: int = 16) -> torch.Tensor:
    """``2^k`` for ``k = kmax, ..., kmax - n + 1``, ``kmax = ceil(log2(max_abs))`` (float64 exact powers of two)."""
    kmax = math.ceil(math.log2(max(max_abs, 1e-12)))
    return torch.pow(2.0, torch.arange(kmax, kmax - n, -1, dtype=torch.float64))


def search_symmetric_threshold(
    samples: torch.Tensor, max_abs: float, bits: int, signed: bool, power_of_two: bool, n_candidates: int = 100
) -> float:
    """MSE-optimal symmetric threshold ``T`` for the values ``samples`` (1-D float).

    Returns:
        ``T`` (> 0, a power of two when ``power_of_two``). A zero tensor gives ``T = 1`` (its error is 0 anyway).
    """
    if max_abs <= 0:
        return 1.0
    qmin, qmax = integer_range(bits, signed)
    if power_of_two:
        cands = pot_candidates(max_abs).float()
    else:
        cands = torch.linspace(1.0 / n_candidates, 1.0, n_candidates) * max_abs
    scales = symmetric_scale(cands, bits, signed)
    err = _mse_per_candidate(samples.float(), scales, torch.zeros_like(scales), qmin, qmax)
    return float(cands[int(torch.argmin(err))])


def search_asymmetric_range(
    samples: torch.Tensor, lo: float, hi: float, bits: int, n_candidates: int = 100
) -> tuple[float, float]:
    """MSE-optimal ``[a*lo, a*hi]`` over a uniform grid of ``a`` in (0, 1] (BRECQ joint shrink)."""
    alphas = torch.linspace(1.0 / n_candidates, 1.0, n_candidates)
    los = torch.as_tensor(min(lo, 0.0)) * alphas
    his = torch.as_tensor(max(hi, 0.0)) * alphas
    if float(his[-1] - los[-1]) <= 0:
        return 0.0, 1.0
    scales, zps = asymmetric_scale_zero_point(los, his, bits)
    err = _mse_per_candidate(samples.float(), scales, zps, 0, 2**bits - 1)
    best = int(torch.argmin(err))
    return float(los[best]), float(his[best])


def minmax_threshold(max_abs: float, power_of_two: bool) -> float:
    """Min/max threshold: ``max|x|`` (rounded up to ``2^k`` under power-of-two); 1 for an all-zero tensor."""
    if max_abs <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(max_abs)) if power_of_two else max_abs


WEIGHT_GRID_MIN = 0.2  # smallest weight-threshold shrink factor searched (4-bit optima lie well above it)


def weight_thresholds_symmetric(
    weight: torch.Tensor, bits: int, method: str = "mse", n_candidates: int = 50
) -> torch.Tensor:
    """Per-output-channel symmetric signed threshold ``T_c`` of ``weight`` ``(C, ...)``; returns ``(C,)`` float32.

    ``method``: ``minmax`` (``T_c = max|w_c|``) or ``mse`` (``T_c = a_c * max|w_c|``, ``a_c`` on a grid of [0.2, 1]).
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    max_abs = w.abs().amax(1).clamp(min=1e-8)
    if method == "minmax":
        return max_abs
    qmin, qmax = integer_range(bits, True)
    best_err = torch.full_like(max_abs, math.inf)
    best_t = max_abs.clone()
    for a in torch.linspace(WEIGHT_GRID_MIN, 1.0, n_candidates).tolist():
        t = max_abs * a
        s = symmetric_scale(t, bits, True)[:, None]
        err = (fake_quantize(w, s, 0.0, qmin, qmax, rounding=torch.round) - w).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_t = torch.where(better, t, best_t)
    return best_t


def weight_ranges_asymmetric(
    weight: torch.Tensor, bits: int, method: str = "mse", n_candidates: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric range ``(lo_c, hi_c)`` of ``weight`` ``(C, ...)``; each ``(C,)`` float32.

    ``method``: ``minmax`` (observed per-channel min/max) or ``mse`` (joint shrink ``[a*lo, a*hi]`` per channel).
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    lo = w.amin(1).clamp(max=0.0)
    hi = w.amax(1).clamp(min=0.0)
    if method == "minmax":
        return lo, hi
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    qmax = 2**bits - 1
    for a in torch.linspace(WEIGHT_GRID_MIN, 1.0, n_candidates).tolist():
        l_a, h_a = lo * a, hi * a
        s, z = asymmetric_scale_zero_point(l_a, h_a, bits)
        s, z = s[:, None], z[:, None]
        err = (fake_quantize(w, s, z, 0, qmax, rounding=torch.round) - w).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, l_a, best_lo)
        best_hi = torch.where(better, h_a, best_hi)
    return best_lo, best_hi
