"""Configuration of the generation engine: one pydantic model, an enum for every choice.

Every switch of ``../shared/docs/method.md`` sections 1-4 is a field here, so that the paper's ablation (each gap's
fix on/off) is a parameter edit. :meth:`GenerationConfig.for_method` builds the named presets:

- ``dgh``: every DGH fix on (global statistics, image pipeline, output stretching loss with last-BN hinges);
- ``batch-bns``: GENIE / DeepInversion style batch-wise statistics, no augmentation mimicry, no output loss;
- ``image-bns``: ZeroQ style image-wise statistics, no augmentation mimicry, no output loss;
- ``noise``: i.i.d. N(0, 1) pixels in normalized space clipped to the valid pixel range, no optimization.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dgh.errors import first_line
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD

# Ratio of the output-loss gradient to the BN-loss gradient at initialization used when a model has no tuned
# lambda_out (dgh.generation.losses.balanced_output_weight). Chosen by label-free measures on efficientnet_lite0
# (32 images x 12 iterations, batch 32; real = 128 calib-det200 images: mean per-image logit range 12.4, 8-bit
# power-of-two MSE logits threshold 16): no output loss -> range 9.8, threshold 8, BN distance 35.9; ratio 0.1 ->
# 11.3, 16, 36.3; ratio 1.0 -> 14.3 (past real), 16, 43.2. 0.1 reaches the real threshold at no BN cost; the
# fixed lambda_out grows relative to the shrinking BN gradient over longer runs, so a larger ratio would overshoot.
DEFAULT_OUTPUT_LOSS_RATIO = 0.1

class GenerationConfigError(ValueError):
    """A generation setting is invalid or does not fit the model. The message is one line."""


class Method(str, Enum):
    """Named presets (method.md, "Methods")."""

    DGH = "dgh"
    BATCH_BNS = "batch-bns"
    IMAGE_BNS = "image-bns"
    NOISE = "noise"


class Statistics(str, Enum):
    """Over which images the BN-input statistics are matched (method.md section 1).

    ``all``: the whole generated set jointly (DGH, memory-bounded moment cache);
    ``batch``: the active batch only (GENIE / DeepInversion); ``image``: each image alone, losses averaged (ZeroQ).
    """

    ALL = "all"
    BATCH = "batch"
    IMAGE = "image"


class OutputLoss(str, Enum):
    """Output distribution stretching loss form (method.md section 3).

    ``paper``: -range + last-BN mean/std hinges (ssi-research/DGH); ``mct``: -range only (Sony MCT); ``none``.
    """

    PAPER = "paper"
    MCT = "mct"
    NONE = "none"


class LastBN(str, Enum):
    """Which BN layer(s) the paper-form hinges of the output loss constrain.

    ``feeding`` (default): for every model output, the last BN layer (in call order) inside the module that
    produces the input of that output layer; for a classifier this is the single last BN, for a multi-level
    detector head one BN per level (the BN that ends each level's neck branch), because each level's output range is
    governed by its own branch. Falls back to ``last`` when no such producer is found.
    ``last``: the single BN layer called last in the forward pass (for YOLO: the P5 branch only).
    """

    FEEDING = "feeding"
    LAST = "last"


class AugmentDraw(str, Enum):
    """Random flip / crop draws: ``batch`` (one draw per batch step, paper code) or ``image`` (one per image)."""

    BATCH = "batch"
    IMAGE = "image"


class LrUnits(str, Enum):
    """In which units ``lr`` (and ``min_lr``) are given.

    ``pixel-range`` (default): relative to the width of the valid pixel range, with the paper's models as the
    reference. The paper's lr 16 is a step in the normalized space of ImageNet-normalized models, whose pixel range
    [0, 1] spans ``mean_c(1 / IMAGENET_STD_c)`` = 4.43 normalized units, so one unit of ``lr`` moves a pixel by 1/4.43
    of its range.
    For a model with another normalization the step is rescaled so that it is the same fraction of that model's
    pixel range: ``lr_eff = lr * mean_c(1 / std_c) / mean_c(1 / IMAGENET_STD_c)`` (:func:`effective_lr`). The factor
    is exactly 1 for ImageNet-normalized models (torchvision, the CIFAR ResNets), 0.226 for YOLO (pixels in [0, 1]
    as is: lr 16 becomes 3.6) and 0.45 for ``(x - 127) / 128`` models (lr 7.2).
    ``normalized``: ``lr`` is used as is in the model's normalized input space (the paper code's literal setting;
    for YOLO that step is 16 times the whole pixel range and every pixel saturates at a clamp bound within a few
    iterations).
    """

    PIXEL_RANGE = "pixel-range"
    NORMALIZED = "normalized"


class InitDistribution(str, Enum):
    """How the canvases are initialized (method.md section 2, "Initialization").

    ``normalized`` (default, the paper code): i.i.d. N(0, 1) per pixel in the model's normalized space, clamped to the
    valid pixel range. For an ImageNet-normalized model these are pixels with ImageNet's per-channel mean and std.
    ``imagenet-pixels``: pixels drawn with ImageNet's per-channel mean and std (``pixel = IMAGENET_MEAN_c +
    IMAGENET_STD_c * z``) and mapped through the model's own normalization, then clamped (:func:`init_affine`). It is
    the same draw as ``normalized`` for ImageNet-normalized models (bit for bit: no affine map is applied), and
    differs for others: for YOLO (pixels in [0, 1] as is) ``normalized`` puts half of the pixels at 0, this one
    about 2.5 % (1.7 / 2.1 / 3.6 % for R / G / B) at 0 and 0.8 % at 1.
    """

    NORMALIZED = "normalized"
    IMAGENET_PIXELS = "imagenet-pixels"


def init_affine(mean: tuple[float, ...], std: tuple[float, ...],
                init: InitDistribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(scale, shift)``, each float32 ``(1, 3, 1, 1)``, such that ``scale * z + shift`` (z ~ N(0, 1)) is
    the initial canvas in normalized space; ``None`` means ``z`` as is (``normalized``, or a model whose normalization
    is ImageNet's). For ``imagenet-pixels``: ``scale = IMAGENET_STD / std``, ``shift = (IMAGENET_MEAN - mean) / std``.
    ``mean``, ``std``: the model's 3 per-channel normalization values in 0-1 pixel units. Not clamped here
    (:func:`dgh.generation.pipeline.init_canvases` clamps).
    """
    if init is InitDistribution.NORMALIZED or (tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD):
        return None
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    im_m = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
    im_s = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1)
    return im_s / s, (im_m - m) / s


def effective_lr(lr: float, std: tuple[float, ...], units: LrUnits) -> float:
    """The optimizer's learning rate in the model's normalized input space for ``lr`` given in ``units``.

    Args:
        lr: learning rate as configured.
        std: the model's per-channel normalization std (0-1 pixel units), e.g. ``ModelSpec.std``.
        units: see :class:`LrUnits`.

    Returns:
        ``lr`` for ``normalized``; ``lr * mean(1/std) / mean(1/IMAGENET_STD)`` for ``pixel-range``.

    Raises:
        GenerationConfigError: a std is not positive.
    """
    if units is LrUnits.NORMALIZED:
        return float(lr)
    if not std or min(std) <= 0:
        raise GenerationConfigError(f"normalization std must be positive to scale the learning rate, got {tuple(std)}")
    width = sum(1.0 / s for s in std) / len(std)
    reference = sum(1.0 / s for s in IMAGENET_STD) / len(IMAGENET_STD)
    return float(lr) * width / reference


class Speed(str, Enum):
    """``exact``: the algorithm of method.md as written, fp32 on CPU, contiguous tensors. ``fast``: the same
    algorithm with channels-last memory format and, with ``amp=auto``, bf16 autocast of the model forward on CPUs
    with native bf16 (AVX512-BF16/AMX); BN statistics (fp32 accumulation), losses, images and optimizer stay fp32.
    Speed and dataset-level BN distance of both: benchmarks/generation.py. See also ``lazy_refresh``.

    ``auto``: ``fast`` where it wins, i.e. on CUDA and on CPUs with native bf16, else ``exact``. Without bf16 (e.g. an
    AVX2-only CPU) ``fast`` is only channels-last fp32, which measured slower than ``exact``: EfficientNet-Lite0,
    32 images x 12 iterations, 155 s against 133 s (benchmarks/fast_mode_accuracy.py). The run records the
    resolved value in its settings (``speed``) and the requested one (``speed_setting``)."""

    EXACT = "exact"
    FAST = "fast"
    AUTO = "auto"


class Amp(str, Enum):
    """Mixed precision: ``auto`` = fp16 autocast + gradient scaler on CUDA; on CPU fp32, except bf16 autocast with
    ``speed=fast`` where the CPU has native bf16; ``on`` (CPU: bf16); ``off`` (fp32 everywhere)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Schedule(str, Enum):
    """In which order the B batches of one iteration are updated (method.md section 4, "one iteration").

    ``sequential`` (the paper code; the single-process default): a fresh random order each iteration, every step sees
    the moments that the steps before it refreshed; all draws come from one seeded generator consumed in order.
    ``synchronous``: every batch of an iteration steps against the moment cache as it stood when the iteration began,
    and the refreshed moments replace the cache together at its end (cached moments of the other batches are at
    most one iteration old); every random draw (init, flip, crop) is keyed by (seed, global batch index, iteration),
    so the result does not depend on the number of processes. Required, and the default, with several processes
    (:mod:`dgh.generation.distributed`).
    """

    SEQUENTIAL = "sequential"
    SYNCHRONOUS = "synchronous"


class GenerationConfig(BaseModel):
    """Every setting of one generation run. Defaults are the paper code's (method.md "Defaults").

    Attributes:
        method: the preset this config was built from (recorded in meta.json; ``noise`` skips optimization).
        n_images: N, number of images to generate (>= 1).
        iterations: n_iter; one iteration = one pass over all batches in a fresh random order.
        batch_size: n, a memory knob; the last batch may be smaller (batches are weighted by size).
        seed: seeds the initialization, batch order and augmentation draws.
        lr: RAdam learning rate (paper: 16), in the units ``lr_units`` names.
        lr_units: see :class:`LrUnits` (default: relative to the pixel range, ImageNet normalization as reference).
        statistics: see :class:`Statistics`.
        lambda_sigma: weight of the std term in L_BN (paper 10, MCT 1).
        bn_std_eps: target std is ``sqrt(running_var + bn_std_eps)``; also added to the generated variance
            (paper 1e-6; MCT 0).
        input_pseudo_layer: include layer 0 (the input image) in L_BN.
        output_loss: see :class:`OutputLoss`.
        output_loss_weight: lambda_out, fixed. ``None``: ``output_loss_ratio`` if set, else the model registry's value
            (``ModelSpec.output_loss_weight``: the paper's per-model values), else the data-free rule with
            :data:`DEFAULT_OUTPUT_LOSS_RATIO` (:func:`dgh.generation.losses.balanced_output_weight`).
        output_loss_ratio: derive lambda_out from this ratio of the output-loss gradient to the BN-loss gradient at
            initialization (:func:`dgh.generation.losses.balanced_output_weight`; no real data). Exclusive with
            ``output_loss_weight``.
        hinge_margin: margin of the last-BN hinge penalties (paper 0.5).
        last_bn: see :class:`LastBN`.
        canvas_pad: p in pixels, the canvas is (H+p, W+p); ``None`` takes ``ModelSpec.pad``; 0 = no canvas.
        flip, smoothing, random_crop, clamp: image-pipeline parts (method.md section 2), each switchable.
        init: see :class:`InitDistribution`.
        project_canvas: after every optimizer step, clamp the canvas itself to the valid pixel range (projected
            gradient descent). The paper clamps only the view, with a straight-through gradient, so a canvas pixel can
            drift outside the range, where its view stays pinned at a bound: on yolov5n, 22 % of the blue canvas
            values are below -0.5 (their view shows pure 0) after 40 iterations. Off by default (the paper code).
        smoothing_sigma: sigma of the 3x3 Gaussian kernel (paper 1.25).
        augment_draw: see :class:`AugmentDraw`.
        lr_schedule: reduce-on-plateau-with-reset per batch (method.md section 4); off = constant lr.
        plateau_factor, plateau_threshold, min_lr: scheduler settings (0.5, relative 1e-4, 1e-4); ``min_lr`` is in
            the units of ``lr``.
        plateau_patience: bad iterations tolerated before a reduction; ``None`` = max(1, iterations // 50).
        speed: see :class:`Speed`.
        lazy_refresh: skip the no-grad refresh forward after each step (method.md section 1); the batch's cache entry
            takes the detached moments of the training view just computed instead (one step stale, augmented view).
            Saves one forward per step; off by default: on resnet20_cifar10 (128 images x 30 iterations) it raised
            the dataset-level BN distance 0.85 -> 1.05 and lowered W4A4 top-1 70.0 -> 67.4.
        amp: see :class:`Amp`.
        checkpoint_every: K; with an ``out_dir``, a resumable checkpoint is written every K iterations (0 = never).
        schedule: see :class:`Schedule`; ``None`` = ``sequential`` in one process, ``synchronous`` in several.
        processes: how many processes ``dgh generate`` / the DVC stage start (``torchrun --nproc-per-node``; one GPU
            each on CUDA). Under an outside ``torchrun`` the launcher's world size counts and 1 here is ignored.
            Does not change the images (with ``schedule=synchronous``); not part of a checkpoint's identity.
        process_timeout_s: seconds every collective of a multi-process run may wait for the slowest process before
            the run ends with a one-line error (a dead or hung rank). Must exceed one iteration's compute per rank.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_assignment=True)

    method: Method = Method.DGH
    n_images: int = Field(1024, ge=1)
    iterations: int = Field(1000, ge=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    lr: float = Field(16.0, gt=0)
    lr_units: LrUnits = LrUnits.PIXEL_RANGE
    statistics: Statistics = Statistics.ALL
    lambda_sigma: float = Field(10.0, ge=0)
    bn_std_eps: float = Field(1e-6, ge=0)
    input_pseudo_layer: bool = True
    output_loss: OutputLoss = OutputLoss.PAPER
    output_loss_weight: float | None = Field(None, ge=0)
    output_loss_ratio: float | None = Field(None, gt=0)
    hinge_margin: float = Field(0.5, ge=0)
    last_bn: LastBN = LastBN.FEEDING
    canvas_pad: int | None = Field(None, ge=0)
    flip: bool = True
    smoothing: bool = True
    smoothing_sigma: float = Field(1.25, gt=0)
    random_crop: bool = True
    clamp: bool = True
    init: InitDistribution = InitDistribution.NORMALIZED
    project_canvas: bool = False
    augment_draw: AugmentDraw = AugmentDraw.BATCH
    lr_schedule: bool = True
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_threshold: float = Field(1e-4, ge=0)
    plateau_patience: int | None = Field(None, ge=0)
    min_lr: float = Field(1e-4, ge=0)
    speed: Speed = Speed.EXACT
    lazy_refresh: bool = False
    amp: Amp = Amp.AUTO
    checkpoint_every: int = Field(50, ge=0)
    schedule: Schedule | None = None
    processes: int = Field(1, ge=1)
    process_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.min_lr > self.lr:
            raise GenerationConfigError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        if self.output_loss_weight is not None and self.output_loss_ratio is not None:
            raise GenerationConfigError("set either output_loss_weight (fixed lambda_out) or output_loss_ratio (derived), not both")
        if self.processes > 1 and self.schedule is Schedule.SEQUENTIAL:
            raise GenerationConfigError(
                f"schedule=sequential cannot run in {self.processes} processes (each step waits for the one before); "
                "use schedule=synchronous or leave it unset"
            )
        n_batches = -(-self.n_images // self.batch_size)
        if self.method is not Method.NOISE and self.processes > n_batches:
            raise GenerationConfigError(
                f"processes={self.processes} but only {n_batches} batch(es) of {self.batch_size} images "
                f"(n_images {self.n_images}); each process needs at least one batch: lower processes or batch_size"
            )
        return self

    @classmethod
    def for_method(cls, method: Method | str, **overrides: Any) -> GenerationConfig:
        """The preset of ``method`` (dgh | batch-bns | image-bns | noise), with ``overrides`` applied on top.

        Overrides whose value is ``None`` are ignored, so CLI options left unset keep the preset's value
        (use ``canvas_pad``/``output_loss_weight`` without an override to take the registry default).

        Raises:
            GenerationConfigError: unknown method or invalid override.
        """
        try:
            method = Method(method)
        except ValueError:
            names = ", ".join(m.value for m in Method)
            raise GenerationConfigError(f"unknown generation method {method!r}; choose one of {names}") from None
        preset: dict[str, Any] = {"method": method}
        if method in (Method.BATCH_BNS, Method.IMAGE_BNS):
            preset.update(
                statistics=Statistics.BATCH if method is Method.BATCH_BNS else Statistics.IMAGE,
                output_loss=OutputLoss.NONE,
                canvas_pad=0,
                flip=False,
                smoothing=False,
                random_crop=False,
                clamp=False,
            )
        preset.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(preset) - set(cls.model_fields))
        if unknown:
            raise GenerationConfigError(f"unknown generation setting(s): {', '.join(unknown)}")
        try:
            return cls(**preset)
        except GenerationConfigError:
            raise
        except ValueError as exc:  # pydantic.ValidationError
            raise GenerationConfigError(f"invalid generation setting: {first_line(exc, 300)}") from None
