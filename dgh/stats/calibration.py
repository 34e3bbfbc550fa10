"""Statistics of a calibration set seen through the float model: why a set calibrates well or badly.

One pass over the images (batched, moments in float64, memory independent of N except ``N`` floats of per-image
output ranges) gives:

- **BN alignment** per BN layer and for the input pseudo-layer: the dataset-level L_BN of method.md section 3,
  exactly as :func:`dgh.generation.engine.bn_distance` computes it (same moment accumulation,
  :func:`dgh.generation.bn_stats.dataset_moments`, and the same loss, :func:`dgh.generation.losses.bn_alignment_loss`),
  split into each layer's mean term and std term. The terms of all layers add up to the dataset-level distance.
- **Pixels**: per-channel mean and std in 0..1 pixel units (the normalized input mapped back through the model's
  mean/std), and the fraction of pixels at each clamp bound (within half an 8-bit level of 0 or 1).
- **Output coverage**: per model output tensor (:func:`dgh.generation.targets.flatten_outputs`: the logits of a
  classifier, one raw head level of a detector) the per-image range ``max - min`` over all its elements (the ``r(x)``
  of the output-stretching loss, method.md section 3), its summary, and the set's overall output min and max.
- **Prediction diversity** (classifiers): the histogram of arg-max classes, its entropy in nats and the number of
  distinct classes predicted.

It works for any set (generated, real or noise) because it only reads the images and the float model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dgh.env import model_device, resolve_device
from dgh.generation.bn_stats import NoBatchNormError, bn_targets, dataset_moments, find_bn_layers
from dgh.generation.losses import bn_alignment_loss, std_from_moments
from dgh.generation.targets import flatten_outputs, input_target
from dgh.models.spec import LoadedModel

PIXEL_BOUND_TOL = 0.5 / 255.0
"""A pixel counts as "at a clamp bound" when it lies within half an 8-bit level of 0 or 1 (or beyond): exactly the
pixels that an 8-bit image stores as 0 or 255."""

RANGE_PERCENTILES = (5, 50, 95)
INPUT_LAYER = "input"


class StatsError(ValueError):
    """Bad input to a statistics function (empty set, wrong shape, non-finite values). One line."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BNLayerStats(_Frozen):
    """BN alignment of one layer (or of the input pseudo-layer ``l = 0``, named ``input``).

    Attributes:
        index: ``l``: 0 for the input pseudo-layer, 1..L for the BN layers in ``named_modules`` order.
        name: module name, or ``input``.
        channels: ``C_l``.
        mean_sq: ``||mu_hat_l - mu_l||^2 / C_l`` (normalized-activation units squared).
        std_sq: ``||sigma_hat_l - sigma_l||^2 / C_l``.
        mean_term: this layer's mean share of L_BN: ``mean_sq / (L + 1)``.
        std_term: this layer's std share of L_BN: ``lambda_sigma * std_sq / (L + 1)``.
    """

    index: int
    name: str
    channels: int
    mean_sq: float
    std_sq: float
    mean_term: float
    std_term: float

    @property
    def distance(self) -> float:
        """``mean_term + std_term``: the layer's share of the dataset-level BN distance."""
        return self.mean_term + self.std_term


class PixelStats(_Frozen):
    """Pixel statistics in 0..1 pixel units, per RGB channel (lists of 3) and over all channels.

    Attributes:
        mean, std: per-channel mean and (population) std of the pixels.
        at_low, at_high: per-channel fraction of pixels ``<= tol`` and ``>= 1 - tol``.
        at_low_all, at_high_all: the same over all channels.
        tol: :data:`PIXEL_BOUND_TOL`.
    """

    mean: list[float]
    std: list[float]
    at_low: list[float]
    at_high: list[float]
    at_low_all: float
    at_high_all: float
    tol: float = PIXEL_BOUND_TOL


class OutputStats(_Frozen):
    """Coverage of one model output tensor (a classifier's logits, or one raw detection head level).

    Attributes:
        index: position in :func:`flatten_outputs` order.
        shape: per-image shape (e.g. ``[10]`` logits, ``[255, 40, 40]`` a head level).
        range_mean, range_std, range_min, range_max: summary of the per-image range ``r(x) = max - min``.
        range_percentiles: ``{"p5": .., "p50": .., "p95": ..}`` of the per-image ranges (linear interpolation).
        out_min, out_max: the smallest and largest output value over the whole set.
        ranges: the per-image ranges, image order (for histograms).
    """

    index: int
    shape: list[int]
    range_mean: float
    range_std: float
    range_min: float
    range_max: float
    range_percentiles: dict[str, float]
    out_min: float
    out_max: float
    ranges: list[float] = Field(repr=False)

    @property
    def name(self) -> str:
        return f"out{self.index}"


class PredictionStats(_Frozen):
    """Diversity of a classifier's predictions on the set.

    Attributes:
        counts: images predicted as each class (arg-max of the logits), length = number of classes.
        entropy_nats: ``-sum_k p_k ln p_k`` of ``p = counts / N`` (natural log, nats; 0 ln 0 = 0).
        max_entropy_nats: ``ln(min(N, K))``, the largest entropy N images over K classes can reach.
        distinct: number of classes predicted at least once.
    """

    counts: list[int]
    entropy_nats: float
    max_entropy_nats: float
    distinct: int


class CalibrationStats(_Frozen):
    """Everything :func:`calibration_set_stats` measures (JSON: ``model_dump_json()`` / ``model_validate_json``).

    Attributes:
        model: registry name of the model.
        source: free label of the set (``dgh``, ``real``, ``noise``, a set id ...).
        n_images: N.
        image_hw: ``[H, W]``.
        lambda_sigma, std_eps, input_pseudo_layer: the L_BN settings used (method.md section 3).
        bn_distance: dataset-level L_BN; ``None`` when the model has no BN layer.
        bn_layers: per-layer terms (input pseudo-layer first when included); empty without BN layers.
        pixels: :class:`PixelStats`.
        outputs: one :class:`OutputStats` per model output tensor.
        predictions: :class:`PredictionStats` for classifiers, else ``None``.
    """

    model: str
    source: str
    n_images: int
    image_hw: list[int]
    lambda_sigma: float
    std_eps: float
    input_pseudo_layer: bool
    bn_distance: float | None
    bn_layers: list[BNLayerStats]
    pixels: PixelStats
    outputs: list[OutputStats]
    predictions: PredictionStats | None

    @property
    def output_range_mean(self) -> float:
        """Mean per-image range summed over output tensors (``r(x)`` of method.md section 3, averaged over images)."""
        return float(sum(o.range_mean for o in self.outputs))

    def summary(self, reference: CalibrationStats | None = None) -> dict[str, float]:
        """Scalar summaries named ``stats.*`` (MLflow metric names; absent entries are undefined for this set).

        ``stats.bn_distance``, ``stats.bn_mean_part`` / ``stats.bn_std_part`` (sums of the mean / std terms),
        ``stats.clip_low`` / ``stats.clip_high`` (fractions of pixels at the bounds), ``stats.output_range`` (mean
        per-image output range, summed over outputs), ``stats.output_min`` / ``stats.output_max``,
        ``stats.pred_entropy`` (nats), ``stats.pred_distinct``; with ``reference`` (the real set of the same
        model): ``stats.output_range_ratio`` = this set's mean output range / the reference's.
        """
        out: dict[str, float] = {}
        if self.bn_distance is not None:
            out["stats.bn_distance"] = self.bn_distance
            out["stats.bn_mean_part"] = sum(layer.mean_term for layer in self.bn_layers)
            out["stats.bn_std_part"] = sum(layer.std_term for layer in self.bn_layers)
        out["stats.clip_low"] = self.pixels.at_low_all
        out["stats.clip_high"] = self.pixels.at_high_all
        out["stats.output_range"] = self.output_range_mean
        out["stats.output_min"] = min(o.out_min for o in self.outputs)
        out["stats.output_max"] = max(o.out_max for o in self.outputs)
        if reference is not None and reference.output_range_mean > 0:
            out["stats.output_range_ratio"] = self.output_range_mean / reference.output_range_mean
        if self.predictions is not None:
            out["stats.pred_entropy"] = self.predictions.entropy_nats
            out["stats.pred_distinct"] = float(self.predictions.distinct)
        return out


# ------------------------------------------------------------------------------------------- pure functions
def entropy_nats(counts: Sequence[int] | torch.Tensor) -> float:
    """Shannon entropy ``-sum p ln p`` (nats) of a histogram of non-negative counts, with ``0 ln 0 = 0``.

    Raises:
        StatsError: negative counts, or all counts zero.
    """
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if bool((c < 0).any()) or float(c.sum()) <= 0:
        raise StatsError("entropy needs non-negative counts with a positive total")
    p = c[c > 0] / c.sum()
    return float(-(p * p.log()).sum())


def prediction_stats(counts: Sequence[int] | torch.Tensor) -> PredictionStats:
    """:class:`PredictionStats` of a class histogram ``counts`` (length K, total N > 0)."""
    c = torch.as_tensor(counts, dtype=torch.int64).flatten()
    n = int(c.sum())
    return PredictionStats(
        counts=[int(v) for v in c.tolist()],
        entropy_nats=entropy_nats(c),
        max_entropy_nats=math.log(min(n, c.numel())),
        distinct=int((c > 0).sum()),
    )


def bn_layer_stats(
    means: Sequence[torch.Tensor],
    stds: Sequence[torch.Tensor],
    targets: Sequence,
    names: Sequence[str],
    lambda_sigma: float,
) -> list[BNLayerStats]:
    """Per-layer terms of ``L_BN`` (method.md section 3) from dataset-level statistics.

    Args:
        means, stds: per layer ``(C_l,)`` float64 dataset mean and ``sqrt(var + eps)``.
        targets: per layer :class:`dgh.generation.bn_stats.BNTarget` (float64 tensors).
        names: per layer name; the list order defines ``index``.

    Returns:
        One :class:`BNLayerStats` per layer; ``sum(mean_term + std_term)`` equals
        :func:`dgh.generation.losses.bn_alignment_loss` of the same inputs up to float64 rounding.
    """
    n = len(targets)
    layers = []
    for i, (m, s, t, name) in enumerate(zip(means, stds, targets, names, strict=True)):
        mean_sq = float(((m - t.mean.to(m)) ** 2).mean())
        std_sq = float(((s - t.std.to(s)) ** 2).mean())
        layers.append(
            BNLayerStats(
                index=i,
                name=name,
                channels=int(m.numel()),
                mean_sq=mean_sq,
                std_sq=std_sq,
                mean_term=mean_sq / n,
                std_term=lambda_sigma * std_sq / n,
            )
        )
    return layers


def pixel_fractions_at_bounds(pixels_01_nchw: torch.Tensor, tol: float = PIXEL_BOUND_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel counts of pixels ``<= tol`` and ``>= 1 - tol``.

    Args:
        pixels_01_nchw: ``(n, C, H, W)`` pixels in 0..1 units (not necessarily clamped).

    Returns:
        ``(low, high)``: ``(C,)`` int64 counts.
    """
    low = (pixels_01_nchw <= tol).sum(dim=(0, 2, 3))
    high = (pixels_01_nchw >= 1.0 - tol).sum(dim=(0, 2, 3))
    return low.to(torch.int64), high.to(torch.int64)


def _range_summary(index: int, shape: list[int], ranges: torch.Tensor, out_min: float, out_max: float) -> OutputStats:
    r = ranges.double()
    q = torch.quantile(r, torch.tensor([p / 100 for p in RANGE_PERCENTILES], dtype=torch.float64))
    return OutputStats(
        index=index,
        shape=shape,
        range_mean=float(r.mean()),
        range_std=float(r.std(unbiased=False)),
        range_min=float(r.min()),
        range_max=float(r.max()),
        range_percentiles={f"p{p}": float(v) for p, v in zip(RANGE_PERCENTILES, q.tolist())},
        out_min=out_min,
        out_max=out_max,
        ranges=[float(f"{v:.7g}") for v in r.tolist()],
    )


class _Accumulator:
    """Per-batch pixel and output statistics, fed by a forward hook on the model root."""

    def __init__(self, mean_c: torch.Tensor, std_c: torch.Tensor, classify: bool) -> None:
        self.mean_c, self.std_c, self.classify = mean_c, std_c, classify
        self.n = 0
        self.pix_sum = torch.zeros(3, dtype=torch.float64)
        self.pix_sq = torch.zeros(3, dtype=torch.float64)
        self.at_low = torch.zeros(3, dtype=torch.int64)
        self.at_high = torch.zeros(3, dtype=torch.int64)
        self.pix_per_image = 0
        self.ranges: list[list[torch.Tensor]] = []
        self.mins: list[float] = []
        self.maxs: list[float] = []
        self.shapes: list[list[int]] = []
        self.counts: torch.Tensor | None = None

    def hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0].detach().double()
        px = x * self.std_c.to(x.device) + self.mean_c.to(x.device)
        self.n += x.shape[0]
        self.pix_per_image = x.shape[2] * x.shape[3]
        self.pix_sum += px.sum(dim=(0, 2, 3)).cpu()
        self.pix_sq += (px * px).sum(dim=(0, 2, 3)).cpu()
        lo, hi = pixel_fractions_at_bounds(px)
        self.at_low += lo.cpu()
        self.at_high += hi.cpu()
        outs = flatten_outputs(output)
        if not self.ranges:
            self.ranges = [[] for _ in outs]
            self.mins = [math.inf] * len(outs)
            self.maxs = [-math.inf] * len(outs)
            self.shapes = [list(z.shape[1:]) for z in outs]
        if len(outs) != len(self.ranges):
            raise StatsError(f"the model returned {len(outs)} outputs, earlier batches {len(self.ranges)}")
        for k, z in enumerate(outs):
            flat = z.detach().float().flatten(1)
            mx, mn = flat.amax(1), flat.amin(1)
            self.ranges[k].append((mx - mn).double().cpu())
            self.mins[k] = min(self.mins[k], float(mn.min()))
            self.maxs[k] = max(self.maxs[k], float(mx.max()))
        if self.classify:
            logits = outs[0].detach()
            if logits.ndim != 2:
                raise StatsError(f"a classifier must return (N, classes) logits, got {tuple(logits.shape)}")
            c = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1])
            self.counts = c if self.counts is None else self.counts + c

    def pixels(self) -> PixelStats:
        total = float(self.n * self.pix_per_image)
        mean = self.pix_sum / total
        var = (self.pix_sq / total - mean * mean).clamp_min(0.0)
        low = self.at_low.double() / total
        high = self.at_high.double() / total
        return PixelStats(
            mean=mean.tolist(),
            std=var.sqrt().tolist(),
            at_low=low.tolist(),
            at_high=high.tolist(),
            at_low_all=float(low.mean()),
            at_high_all=float(high.mean()),
        )

    def outputs(self) -> list[OutputStats]:
        return [
            _range_summary(k, self.shapes[k], torch.cat(self.ranges[k]), self.mins[k], self.maxs[k])
            for k in range(len(self.ranges))
        ]


def check_images(images_nchw: object, image_hw: Sequence[int] | None = None) -> None:
    """Raise :class:`StatsError` unless ``images_nchw`` is a non-empty finite float ``(N, 3, H, W)`` tensor (of
    size ``image_hw`` when given)."""
    if not isinstance(images_nchw, torch.Tensor):
        raise StatsError(f"images must be a tensor, got {type(images_nchw).__name__}")
    if images_nchw.ndim != 4 or images_nchw.shape[0] == 0 or images_nchw.shape[1] != 3:
        raise StatsError(f"images must be a non-empty (N, 3, H, W) tensor, got shape {tuple(images_nchw.shape)}")
    if not images_nchw.is_floating_point() or not bool(torch.isfinite(images_nchw).all()):
        raise StatsError("images must be finite floats in the model's normalized space")
    if image_hw is not None and tuple(images_nchw.shape[-2:]) != tuple(image_hw):
        raise StatsError(f"images are {tuple(images_nchw.shape[-2:])}, the model takes {tuple(image_hw)}")


def calibration_set_stats(
    loaded: LoadedModel,
    images_nchw: torch.Tensor,
    *,
    source: str = "",
    lambda_sigma: float = 10.0,
    std_eps: float = 1e-6,
    input_pseudo_layer: bool = True,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> CalibrationStats:
    """Statistics of a calibration set seen through the float model (see the module docstring).

    Args:
        loaded: the float model (with its BN layers, if any) and its spec (normalization, task).
        images_nchw: ``(N, 3, H, W)`` float, the model's normalized input space (as ``images.pt`` holds it and as
            :func:`dgh.data.calibration.load_calibration_set` returns it for real and noise sets).
        source: a label stored in the result.
        lambda_sigma, std_eps, input_pseudo_layer: L_BN settings (method.md section 3; paper defaults), as in
            :func:`dgh.generation.engine.bn_distance`.
        batch_size: images per forward (memory only: results do not depend on it beyond float rounding).
        device: ``None`` = the model's device; ``"auto"`` = CUDA when present.

    Returns:
        :class:`CalibrationStats`; ``bn_distance`` equals ``bn_distance(loaded.model, images_nchw, spec=...)`` for
        the same settings and ``batch_size``.

    Raises:
        StatsError: bad images (empty, wrong shape or size, non-finite), ``batch_size < 1``, or a classifier whose
            output is not ``(N, classes)`` logits.
    """
    check_images(images_nchw, loaded.spec.input_size)
    if batch_size < 1:
        raise StatsError(f"batch_size must be >= 1, got {batch_size}")
    spec = loaded.spec
    model = loaded.model
    try:
        layers = find_bn_layers(model)
    except NoBatchNormError:
        layers = []
    dev = resolve_device(device) if device is not None else model_device(model)
    home = model_device(model)
    mean_c = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std_c = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    acc = _Accumulator(mean_c, std_c, classify=spec.task == "classification")
    was_training = model.training
    model.eval().to(dev)
    handle = model.register_forward_hook(acc.hook)
    try:
        means, seconds, in_m, in_s = dataset_moments(model, images_nchw, layers, batch_size, dev)
    finally:
        handle.remove()
        model.train(was_training)
        model.to(home)
    bn_total: float | None = None
    bn_layers: list[BNLayerStats] = []
    if layers:
        # the lists of bn_distance: BN layers in named_modules order, then the input pseudo-layer
        cpu = torch.device("cpu")
        targets = [type(t)(t.name, t.mean.double(), t.std.double()) for t in bn_targets(layers, std_eps, cpu)]
        mus = list(means)
        stds = [std_from_moments(m, s, std_eps) for m, s in zip(means, seconds)]
        names = [name for name, _ in layers]
        if input_pseudo_layer:
            it = input_target(spec, std_eps)
            targets.append(type(it)(INPUT_LAYER, it.mean.double(), it.std.double()))
            mus.append(in_m)
            stds.append(std_from_moments(in_m, in_s, std_eps))
            names.append(INPUT_LAYER)
        bn_total = float(bn_alignment_loss(mus, stds, targets, lambda_sigma))
        if input_pseudo_layer:  # listed as l = 0, method.md's notation
            mus, stds, targets, names = ([v[-1], *v[:-1]] for v in (mus, stds, targets, names))
        bn_layers = bn_layer_stats(mus, stds, targets, names, lambda_sigma)
    return CalibrationStats(
        model=spec.name,
        source=source,
        n_images=int(images_nchw.shape[0]),
        image_hw=[int(v) for v in images_nchw.shape[-2:]],
        lambda_sigma=lambda_sigma,
        std_eps=std_eps,
        input_pseudo_layer=input_pseudo_layer,
        bn_distance=bn_total,
        bn_layers=bn_layers,
        pixels=acc.pixels(),
        outputs=acc.outputs(),
        predictions=prediction_stats(acc.counts) if acc.counts is not None else None,
    )
