"""Statistics of a quantized model on given data: how often each activation quantizer clips, and how its range
compares with the range the data produces at the same site.

An activation quantizer with scale ``s``, zero point ``z`` and integer range ``[qmin, qmax]`` represents exactly
``[(qmin - z) s, (qmax - z) s]`` (:mod:`dgh.quantization.quantizers`). A value outside that interval is clipped
(up to the half step that round-to-nearest would absorb anyway); the *clipping rate* of a site is the fraction of
the values it receives that lie below the lower end (``clip_low``) or above the upper end (``clip_high``). A
calibration set that under-covers a layer gives that layer's quantizer a range narrower than real data needs, which
shows as a high clipping rate on real data.

The values a quantizer receives are read by a forward pre-hook on the quantizer module, which the capture runtime
calls for every site (:mod:`dgh.quantization.capture`). Two views (:class:`ClipMode`):

- ``quantized``: every quantizer on, the model as deployed; each site sees the values produced by the quantized
  layers before it.
- ``float``: every quantizer off (the BN-folded float network, the view in which calibration chose the ranges).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from dgh.env import model_device, resolve_device
from dgh.quantization.capture import iter_quantizers
from dgh.quantization.quantizers import FakeQuantizer
from dgh.stats.calibration import StatsError, check_images


CLIPPING_SITE_MIN = 1e-4
"""A site counts as clipping when more than this fraction of its values fall outside its range."""


class ClipMode(str, Enum):
    """Which values the quantizers are checked against (see the module docstring)."""

    QUANTIZED = "quantized"
    FLOAT = "float"


class SiteClipStats(BaseModel):
    """One activation quantizer (the input, an output, or an internal site) on the data.

    Attributes:
        name: the quantizer's module name in the quantized model (as in ``quantization_report.csv``).
        role: ``input`` | ``activation`` | ``output``.
        bits, signed, symmetric, power_of_two: the quantizer's settings.
        quantized: False when the preset bypasses the quantizer (it never clips then).
        q_low, q_high: the representable range, in the site's units (smallest / largest over channels);
            ``None`` for a quantizer that was never calibrated (bypassed by the preset).
        data_min, data_max: the smallest and largest value the data produced at the site.
        n_values: number of values seen.
        clip_low, clip_high: fraction of the values below ``q_low`` / above ``q_high`` (0 when not quantized).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    role: str
    bits: int
    signed: bool
    symmetric: bool
    power_of_two: bool
    quantized: bool
    q_low: float | None
    q_high: float | None
    data_min: float
    data_max: float
    n_values: int
    clip_low: float
    clip_high: float

    @property
    def clip(self) -> float:
        return self.clip_low + self.clip_high


class QuantizedStats(BaseModel):
    """Per-site clipping of a quantized model on one data set (JSON via ``model_dump_json``).

    Attributes:
        source: free label of the data (``real``, an evaluation folder ...).
        mode: :class:`ClipMode` value.
        n_images: images seen.
        sites: one entry per activation quantizer that the forward pass called, ``named_modules`` order.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    mode: ClipMode
    n_images: int
    sites: list[SiteClipStats]

    def summary(self, prefix: str = "stats.q_") -> dict[str, float]:
        """``<prefix>clip_low`` / ``<prefix>clip_high``: mean clipping rate over the quantized sites (each site
        weighs the same); ``<prefix>clip_max``: the largest per-site rate (low + high); ``<prefix>sites_clipping``:
        sites with a clipping rate above :data:`CLIPPING_SITE_MIN` (default prefix ``stats.q_``)."""
        q = [s for s in self.sites if s.quantized]
        if not q:
            return {}
        return {
            f"{prefix}clip_low": sum(s.clip_low for s in q) / len(q),
            f"{prefix}clip_high": sum(s.clip_high for s in q) / len(q),
            f"{prefix}clip_max": max(s.clip for s in q),
            f"{prefix}sites_clipping": float(sum(1 for s in q if s.clip > CLIPPING_SITE_MIN)),
        }


def quantizer_range(q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``((qmin - z) s, (qmax - z) s)`` of a quantizer: its representable interval, float32 ``(C,)`` or ``(1,)``."""
    s = q.effective_scale().detach().float()
    z = q.zero_point.detach().float()
    return (q.qmin - z) * s, (q.qmax - z) * s


def clip_counts(q: FakeQuantizer, x: torch.Tensor) -> tuple[int, int]:
    """Numbers of elements of ``x`` below / above the quantizer's representable interval (per channel along its
    ``channel_axis`` when per-channel).

    Args:
        q: an initialized :class:`FakeQuantizer`.
        x: any float tensor of the shape the quantizer takes.
    """
    lo, hi = quantizer_range(q)
    with torch._C.DisableTorchFunction():  # plain arithmetic, also inside the capture runtime's function mode
        lo_b = q.broadcast(lo.to(x.device), x)
        hi_b = q.broadcast(hi.to(x.device), x)
        return int((x < lo_b).sum()), int((x > hi_b).sum())


class _SiteCounter:
    def __init__(self) -> None:
        self.n = 0
        self.low = 0
        self.high = 0
        self.min = math.inf
        self.max = -math.inf


@torch.no_grad()
def quantized_model_stats(
    qmodel: nn.Module,
    images_nchw: torch.Tensor,
    *,
    source: str = "",
    mode: ClipMode = ClipMode.QUANTIZED,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> QuantizedStats:
    """Per-site clipping rate and data range of every activation quantizer of ``qmodel`` on ``images_nchw``.

    Args:
        qmodel: a calibrated :class:`dgh.quantization.QuantizedModel` (``quantize_model`` / ``load_quantized``).
        images_nchw: ``(N, 3, H, W)`` float in the model's normalized input space.
        source: label stored in the result.
        mode: :class:`ClipMode`. The model's quantizer switches are restored afterwards.
        batch_size: images per forward (memory only).
        device: ``None`` = the model's device.

    Returns:
        :class:`QuantizedStats`.

    Raises:
        StatsError: bad images or ``batch_size``; a quantizer that is on but not calibrated.
    """
    check_images(images_nchw)
    if batch_size < 1:
        raise StatsError(f"batch_size must be >= 1, got {batch_size}")
    acts = [(n, q) for n, q in iter_quantizers(qmodel) if q.role != "weight"]
    for name, q in acts:
        if not q.initialized and not q.bypass:
            raise StatsError(f"activation quantizer {name} is not calibrated (quantize the model first)")
    counters = {name: _SiteCounter() for name, _ in acts}

    def make_hook(name: str, q: FakeQuantizer):
        c = counters[name]

        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            with torch._C.DisableTorchFunction():
                c.n += x.numel()
                lo, hi = torch.aminmax(x.detach())
                c.min = min(c.min, float(lo))
                c.max = max(c.max, float(hi))
            if q.initialized and not q.bypass:
                lo, hi = clip_counts(q, x)
                c.low += lo
                c.high += hi

        return hook

    saved = {name: q.enabled for name, q in iter_quantizers(qmodel)}
    on = mode is ClipMode.QUANTIZED
    for _, q in iter_quantizers(qmodel):
        q.enabled = on
    dev = resolve_device(device) if device is not None else model_device(qmodel)
    home = model_device(qmodel)
    was_training = qmodel.training
    qmodel.eval().to(dev)
    handles = [q.register_forward_pre_hook(make_hook(name, q)) for name, q in acts]
    try:
        for start in range(0, images_nchw.shape[0], batch_size):
            qmodel(images_nchw[start : start + batch_size].to(dev, torch.float32))
    finally:
        for h in handles:
            h.remove()
        for name, q in iter_quantizers(qmodel):
            q.enabled = saved[name]
        qmodel.train(was_training)
        qmodel.to(home)
    sites = []
    for name, q in acts:
        c = counters[name]
        if c.n == 0:
            continue  # a quantizer this forward never calls
        quantized = bool(q.initialized and not q.bypass)
        q_low = q_high = None
        if q.initialized:
            lo, hi = quantizer_range(q)
            q_low, q_high = float(lo.min()), float(hi.max())
        sites.append(
            SiteClipStats(
                name=name,
                role=q.role,
                bits=int(q.bits),
                signed=bool(q.signed),
                symmetric=bool(q.symmetric),
                power_of_two=bool(q.power_of_two),
                quantized=quantized,
                q_low=q_low,
                q_high=q_high,
                data_min=c.min,
                data_max=c.max,
                n_values=c.n,
                clip_low=c.low / c.n,
                clip_high=c.high / c.n,
            )
        )
    return QuantizedStats(source=source, mode=mode, n_images=int(images_nchw.shape[0]), sites=sites)


class SiteThresholds(BaseModel):
    """The range of one activation quantizer next to the range the real-calibrated model chose for the same site.

    Attributes:
        name: the quantizer's module name (the same in both models: same model, same quantization setting).
        q_low, q_high: this model's representable range (:func:`quantizer_range`, smallest / largest over channels).
        ref_q_low, ref_q_high: the reference (real-calibrated) model's.
        log2_high: ``log2(q_high / ref_q_high)`` when both are positive, else ``None``: -1 means half the real
            range's upper end, +1 twice it; power-of-two thresholds give whole numbers.
        log2_low: ``log2(q_low / ref_q_low)`` when both are negative (a signed site), else ``None``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    q_low: float
    q_high: float
    ref_q_low: float
    ref_q_high: float
    log2_high: float | None
    log2_low: float | None


def _log2_ratio(a: float, b: float) -> float | None:
    if a > 0 and b > 0 or a < 0 and b < 0:
        return math.log2(a / b)
    return None


def compare_thresholds(stats: QuantizedStats, reference: QuantizedStats) -> list[SiteThresholds]:
    """Per site, this model's range against the reference model's (:class:`SiteThresholds`), in the order of
    ``stats.sites``; sites that are not quantized (or not calibrated) in either model are left out.

    Raises:
        StatsError: the two share no quantized site (different models or settings).
    """
    ref = {s.name: s for s in reference.sites if s.quantized and s.q_high is not None}
    out = []
    for s in stats.sites:
        r = ref.get(s.name)
        if r is None or not s.quantized or s.q_high is None or s.q_low is None:
            continue
        out.append(SiteThresholds(name=s.name, q_low=s.q_low, q_high=s.q_high, ref_q_low=r.q_low, ref_q_high=r.q_high,
                                  log2_high=_log2_ratio(s.q_high, r.q_high), log2_low=_log2_ratio(s.q_low, r.q_low)))
    if not out:
        raise StatsError("the quantized model and its reference share no quantized activation site")
    return out


def threshold_summary(sites: list[SiteThresholds]) -> dict[str, float]:
    """Scalars of :func:`compare_thresholds`: ``stats.q_thr_log2_mean`` / ``_min`` / ``_max`` of ``log2_high``
    over the sites that have it, ``stats.q_sites_narrower`` / ``stats.q_sites_wider``: sites whose upper end lies
    below / above the real-calibrated one (``|log2_high| > 1e-6``)."""
    v = [s.log2_high for s in sites if s.log2_high is not None]
    if not v:
        return {}
    return {
        "stats.q_thr_log2_mean": sum(v) / len(v),
        "stats.q_thr_log2_min": min(v),
        "stats.q_thr_log2_max": max(v),
        "stats.q_sites_narrower": float(sum(1 for x in v if x < -1e-6)),
        "stats.q_sites_wider": float(sum(1 for x in v if x > 1e-6)),
    }
