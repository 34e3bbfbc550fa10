"""The generation loop (method.md sections 1-4) and the dataset-level BN distance.

One run: N canvases split into B fixed batches; one RAdam (lr 16) and one reduce-on-plateau-with-reset scheduler per
batch; an iteration is a pass over all batches in a fresh random order; fp32 on CPU, fp16 autocast + gradient
scaler on CUDA; every random draw comes from one seeded CPU ``torch.Generator`` so runs are reproducible and a
checkpoint (every K iterations, atomic, with that generator's state) resumes bit-for-bit.

``schedule=synchronous`` (:class:`~dgh.generation.config.Schedule`; required with several processes, see
:mod:`dgh.generation.distributed`): every batch of an iteration steps against the cache of the iteration's start,
draws are keyed by (seed, batch, iteration), and the refreshed moments are exchanged once per iteration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dgh.data.calibration import noise_images
from dgh.env import model_device, resolve_device
from dgh.errors import first_line
from dgh.generation.bn_stats import (
    MomentRecorder,
    bn_targets,
    dataset_moments,
    find_bn_layers,
    global_moments,
    image_moments,
)
from dgh.generation.config import (
    DEFAULT_OUTPUT_LOSS_RATIO,
    Amp,
    GenerationConfig,
    GenerationConfigError,
    Method,
    OutputLoss,
    Schedule,
    Speed,
    Statistics,
    effective_lr,
    init_affine,
)
from dgh.generation.distributed import (
    N_TERMS,
    World,
    check_same_model,
    exchange_rows,
    gather_to_main,
    keyed_generator,
    open_world,
    pack_row,
    row_width,
    shard,
    unpack_row,
    world_size_from_env,
)
from dgh.generation.losses import (
    balanced_output_weight,
    bn_alignment_loss,
    output_stretching_loss,
    std_from_moments,
)
from dgh.generation.output import CHECKPOINT_FILE, library_versions, write_outputs
from dgh.generation.pipeline import ImagePipeline, batch_slices, init_canvases
from dgh.generation.scheduler import ReduceOnPlateauWithReset
from dgh.generation.targets import find_last_bns, flatten_outputs, input_target
from dgh.io import save_torch
from dgh.models.spec import LoadedModel, ModelSpec

Callback = Callable[[int, dict[str, float]], None]


def _cpu_bf16_supported() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_speed(speed: Speed, device: torch.device) -> Speed:
    """``speed`` with ``auto`` resolved (:class:`Speed`): ``fast`` on CUDA and on CPUs with native bf16, else
    ``exact``."""
    if speed is not Speed.AUTO:
        return speed
    return Speed.FAST if device.type == "cuda" or _cpu_bf16_supported() else Speed.EXACT


class GenerationError(ValueError):
    """A run cannot continue (diverged loss, unusable checkpoint). The message is one line."""


@dataclass
class GenerationResult:
    """What :func:`generate_images` returns.

    Attributes:
        images_nchw: float32 ``(N, 3, H, W)`` final views, model-normalized space, CPU.
        loss_terms: final loss terms: ``loss``, ``bn``, ``out`` (means over the last iteration's batches, with the
            training view) and ``bn_distance`` (dataset-level L_BN of the final images, :func:`bn_distance`).
        meta: everything written to meta.json.
        history: one dict per iteration (``iteration``, ``loss``, ``bn``, ``out``, ``lr``).
        out_dir: where the outputs were written, if anywhere.
    """

    images_nchw: torch.Tensor
    loss_terms: dict[str, float]
    meta: dict
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None


def bn_distance(
    model: nn.Module,
    images_nchw: torch.Tensor,
    *,
    spec: ModelSpec | None = None,
    lambda_sigma: float = 10.0,
    std_eps: float = 1e-6,
    input_pseudo_layer: bool = True,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """Dataset-level L_BN (method.md section 3) of a whole image set: the statistics of every BN input are taken
    over all N images at once (float64 accumulation, no augmentation, eval-mode model), then compared with the
    running statistics. Lower = closer to the training data as the BN layers saw it.

    Args:
        model: float model with BN layers, eval mode.
        images_nchw: ``(N, 3, H, W)`` float, the model's normalized input space.
        spec: selects the input pseudo-layer target (:func:`dgh.generation.targets.input_target`); None = 0/1.
        lambda_sigma, std_eps, input_pseudo_layer: as in :class:`GenerationConfig` (paper defaults).
        batch_size: images per forward (memory only; the result does not depend on it beyond float rounding).
        device: defaults to the model's device.

    Returns:
        L_BN as a python float.

    Raises:
        NoBatchNormError: the model has no BN layer.
        ValueError: ``images_nchw`` is not a non-empty (N, 3, H, W) tensor.
    """
    if not isinstance(images_nchw, torch.Tensor) or images_nchw.ndim != 4 or images_nchw.shape[0] == 0:
        shape = tuple(images_nchw.shape) if isinstance(images_nchw, torch.Tensor) else type(images_nchw).__name__
        raise ValueError(f"bn_distance needs a non-empty (N, 3, H, W) tensor, got {shape}")
    layers = find_bn_layers(model)
    dev = resolve_device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    try:
        means, seconds, in_m, in_s = dataset_moments(model, images_nchw, layers, batch_size, dev)
    finally:
        model.train(was_training)
    targets = bn_targets(layers, std_eps, torch.device("cpu"))
    mus = [m for m in means]
    stds = [std_from_moments(m, s, std_eps) for m, s in zip(means, seconds)]
    tg = [type(t)(t.name, t.mean.double(), t.std.double()) for t in targets]
    if input_pseudo_layer:
        it = input_target(spec, std_eps)
        mus.append(in_m)
        stds.append(std_from_moments(in_m, in_s, std_eps))
        tg.append(type(it)(it.name, it.mean.double(), it.std.double()))
    return float(bn_alignment_loss(mus, stds, tg, lambda_sigma))


@dataclass
class _State:
    """Everything a checkpoint holds besides the config."""

    canvases: list[torch.Tensor]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[ReduceOnPlateauWithReset | None]
    scalers: list[torch.amp.GradScaler | None]
    cache_m: list[torch.Tensor]  # per layer (B, C_l); the input pseudo-layer last
    cache_s: list[torch.Tensor]
    generator: torch.Generator
    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


# settings that do not change the images: a checkpoint resumes under other values of them
_RESUME_FREE = ("checkpoint_every", "processes", "process_timeout_s")


def resolve_schedule(config: GenerationConfig, world_size: int) -> Schedule:
    """The run's :class:`Schedule`: ``config.schedule``, or ``sequential`` for one process and ``synchronous`` for
    several when unset.

    Raises:
        GenerationConfigError: ``sequential`` with several processes (its batch order is one global sequence).
    """
    if config.schedule is None:
        return Schedule.SEQUENTIAL if world_size == 1 else Schedule.SYNCHRONOUS
    if config.schedule is Schedule.SEQUENTIAL and world_size > 1:
        raise GenerationConfigError(
            f"schedule=sequential cannot run in {world_size} processes (each step waits for the one before); use "
            "schedule=synchronous or leave it unset"
        )
    return config.schedule


def _resolved_config_dict(config: GenerationConfig, spec: ModelSpec, world_size: int = 1) -> dict:
    """The settings with the registry defaults filled in. ``output_loss_rule`` says how lambda_out is set: ``fixed``
    (``output_loss_weight`` given, or the registry's value) or ``balanced`` (derived from ``output_loss_ratio`` at the
    start of the run; ``output_loss_weight`` is ``None`` here and filled in by :meth:`_Run.balance_output_loss`).
    ``schedule`` is the resolved :class:`Schedule` and ``processes`` the number of processes of the run."""
    d = config.model_dump(mode="json")
    d["schedule"] = resolve_schedule(config, world_size).value
    d["processes"] = world_size
    d["canvas_pad"] = spec.pad if config.canvas_pad is None else config.canvas_pad
    if config.output_loss_weight is not None:
        d["output_loss_rule"], d["output_loss_weight"] = "fixed", config.output_loss_weight
    elif config.output_loss_ratio is None and spec.output_loss_weight is not None:
        d["output_loss_rule"], d["output_loss_weight"] = "fixed", spec.output_loss_weight
    else:
        d["output_loss_rule"], d["output_loss_weight"] = "balanced", None
        d["output_loss_ratio"] = DEFAULT_OUTPUT_LOSS_RATIO if config.output_loss_ratio is None else config.output_loss_ratio
    d["lr_effective"] = effective_lr(config.lr, spec.std, config.lr_units)
    d["min_lr_effective"] = effective_lr(config.min_lr, spec.std, config.lr_units)
    d["plateau_patience"] = (
        max(1, config.iterations // 50) if config.plateau_patience is None else config.plateau_patience
    )
    return d


class _Run:
    """One generation run's fixed context (model, pipeline, targets) and its step functions."""

    def __init__(self, loaded: LoadedModel, config: GenerationConfig, device: torch.device,
                 world: World | None = None) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.model = loaded.model
        self.config = config
        self.device = device
        self.world = world if world is not None else World()
        self.settings = _resolved_config_dict(config, self.spec, self.world.size)
        self.speed = resolve_speed(config.speed, device)
        self.settings["speed"], self.settings["speed_setting"] = self.speed.value, config.speed.value
        self.synchronous = self.settings["schedule"] == Schedule.SYNCHRONOUS.value
        self.layers = find_bn_layers(self.model)
        self.recorder = MomentRecorder(self.layers)
        self.targets = bn_targets(self.layers, config.bn_std_eps, device)
        it = input_target(self.spec, config.bn_std_eps)
        self.input_tgt = type(it)(it.name, it.mean.to(device), it.std.to(device))
        lo, hi = self.spec.pixel_range()
        self.lo, self.hi = lo.to(device), hi.to(device)
        self.init_affine = init_affine(self.spec.mean, self.spec.std, config.init)
        self.pipeline = ImagePipeline(
            out_hw=tuple(self.spec.input_size),
            pad=self.settings["canvas_pad"],
            lo=self.lo,
            hi=self.hi,
            flip=config.flip,
            smoothing=config.smoothing,
            random_crop=config.random_crop,
            clamp=config.clamp,
            per_image=config.augment_draw.value == "image",
            sigma=config.smoothing_sigma,
        )
        self.fast = self.speed is Speed.FAST
        if config.amp is Amp.AUTO:
            self.use_amp = device.type == "cuda" or (self.fast and _cpu_bf16_supported())
        else:
            self.use_amp = config.amp is Amp.ON
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.memory_format = torch.channels_last if self.fast else torch.contiguous_format
        self.lazy_refresh = config.lazy_refresh
        self.lambda_out = float(self.settings["output_loss_weight"] or 0.0)
        self.slices = batch_slices(config.n_images, config.batch_size)
        sizes = torch.tensor([s.stop - s.start for s in self.slices], dtype=torch.float32)
        self.weights = (sizes / sizes.sum()).to(device)
        self.last_bns: list[int] = []
        n_batches = len(self.slices)
        if self.world.size > n_batches:
            raise GenerationConfigError(
                f"{self.world.size} processes but only {n_batches} batch(es) of {config.batch_size} images; use at "
                "most as many processes as batches (lower batch_size or processes)"
            )
        # the batches this process optimizes (all of them in one process)
        self.owned = shard(n_batches, self.world.rank, self.world.size) if self.synchronous else list(range(n_batches))

    def check_input_and_find_last_bns(self) -> None:
        """One forward of one final-view image: a clear error if the model cannot take the input size, the hinge
        layers for the paper-form output loss, and all BN layers called."""
        h, w = self.spec.input_size
        sample = torch.zeros(1, 3, h, w, device=self.device)
        try:
            with self.recorder.active():
                with torch.no_grad():
                    self.model(sample)
        except RuntimeError as exc:
            raise GenerationConfigError(
                f"{self.spec.name} cannot take a {h}x{w} input (check --imgsz / the model's input size): "
                f"{first_line(exc)}"
            ) from None
        self.recorder.check_complete()
        balanced = self.settings["output_loss_rule"] == "balanced"
        if self.config.output_loss is OutputLoss.PAPER and (self.lambda_out > 0 or balanced):
            self.last_bns = find_last_bns(self.model, sample, self.layers, self.config.last_bn)
        if balanced:
            self.balance_output_loss()

    def balance_output_loss(self) -> None:
        """Set lambda_out by the data-free rule (:func:`dgh.generation.losses.balanced_output_weight`): gradient
        norms of L_BN and L_out w.r.t. the first batch of initial canvases, on its final view (no random draw, so the
        run's generator is untouched and a resumed run derives the same value). The BN gradient is scaled by that
        batch's share of the statistics when they are global. No output loss configured: lambda_out = 0."""
        if self.config.output_loss is OutputLoss.NONE or self.config.method is Method.NOISE:
            self.settings["output_loss_weight"] = self.lambda_out = 0.0
            return
        if self.synchronous:
            canvas = self.keyed_initial_canvas(0).to(self.device).requires_grad_(True)
        else:
            gen = torch.Generator().manual_seed(self.config.seed)
            first = self.slices[0]
            canvases = init_canvases(self.config.n_images, self.pipeline.canvas_hw, self.lo.cpu(), self.hi.cpu(), gen,
                             self.init_affine)
            canvas = canvases[first].to(self.device).requires_grad_(True)
        outputs, moments = self.forward_moments(self.pipeline.final_view(canvas))
        batch_stats = self.config.model_copy(update={"statistics": Statistics.BATCH}) \
            if self.config.statistics is Statistics.ALL else self.config
        terms = self._loss_terms(batch_stats, None, 0, outputs, moments, with_output=True)
        (g_bn,) = torch.autograd.grad(terms["bn"].float(), canvas, retain_graph=True)
        (g_out,) = torch.autograd.grad(terms["out"].float(), canvas)
        share = float(self.weights[0]) if self.config.statistics is Statistics.ALL else 1.0
        self.lambda_out = balanced_output_weight(
            share * float(g_bn.norm()), float(g_out.norm()), float(self.settings["output_loss_ratio"])
        )
        self.settings["output_loss_weight"] = self.lambda_out

    def forward_moments(
        self, view_nchw: torch.Tensor, need_outputs: bool = True
    ) -> tuple[list[torch.Tensor], list[tuple]]:
        """Model forward of a view; returns (outputs, per-layer per-image moments incl. the input last).

        ``need_outputs=False`` (statistics only): the forward stops right after the last BN layer and the outputs
        are ``[]``; the moments are the same.
        """
        out = None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            with self.recorder.active(stop_when_complete=not need_outputs):
                out = self.model(view_nchw.contiguous(memory_format=self.memory_format))
        moments = list(self.recorder.moments) + [image_moments(view_nchw)]
        return (flatten_outputs(out) if out is not None else []), moments

    @torch.no_grad()
    def batch_moments(self, canvas_nchw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Batch moments ``(C_l,)`` of every layer (input last) on the final view, no gradient."""
        _, moments = self.forward_moments(self.pipeline.final_view(canvas_nchw), need_outputs=False)
        return [m.mean(0) for m, _ in moments], [s.mean(0) for _, s in moments]

    def loss(self, b: int, state: _State, outputs: list[torch.Tensor], moments: list[tuple]) -> dict[str, torch.Tensor]:
        """Total loss of batch ``b`` and its terms (scalars, float32)."""
        return self._loss_terms(self.config, state, b, outputs, moments, with_output=self.lambda_out > 0)

    def _loss_terms(self, cfg: GenerationConfig, state: _State | None, b: int, outputs: list[torch.Tensor],
                    moments: list[tuple], with_output: bool) -> dict[str, torch.Tensor]:
        """``bn``, ``out`` and ``loss = bn + lambda_out * out`` under ``cfg``'s statistics mode (``state`` holds the
        moment cache, needed for global statistics only)."""
        targets = self.targets + ([self.input_tgt] if cfg.input_pseudo_layer else [])
        mus, stds = [], []
        n_layers = len(self.layers) + (1 if cfg.input_pseudo_layer else 0)
        for i in range(n_layers):
            j = i if i < len(self.layers) else len(moments) - 1  # the input's moments are last
            m_img, s_img = moments[j]
            if cfg.statistics is Statistics.IMAGE:
                mu, sec = m_img, s_img
            elif cfg.statistics is Statistics.BATCH:
                mu, sec = m_img.mean(0), s_img.mean(0)
            else:
                mu, sec = global_moments(state.cache_m[j], state.cache_s[j], self.weights, b, m_img.mean(0), s_img.mean(0))
            mus.append(mu)
            stds.append(std_from_moments(mu, sec, cfg.bn_std_eps))
        l_bn = bn_alignment_loss(mus, stds, targets, cfg.lambda_sigma)
        terms = {"bn": l_bn}
        if cfg.output_loss is not OutputLoss.NONE and with_output:
            hinge_m = [moments[j] for j in self.last_bns] if cfg.output_loss is OutputLoss.PAPER else []
            hinge_t = [self.targets[j] for j in self.last_bns] if cfg.output_loss is OutputLoss.PAPER else []
            l_out = output_stretching_loss(outputs, hinge_m, hinge_t, cfg.hinge_margin, cfg.bn_std_eps)
            terms["out"] = l_out
            terms["loss"] = l_bn + self.lambda_out * l_out
        else:
            terms["out"] = torch.zeros((), device=l_bn.device)
            terms["loss"] = l_bn
        return terms

    def keyed_initial_canvas(self, b: int) -> torch.Tensor:
        """``schedule=synchronous``: batch ``b``'s initial canvases, float32 ``(n_b, 3, H+p, W+p)`` on CPU, drawn
        from a generator keyed by (seed, "init", b) (:func:`dgh.generation.distributed.keyed_generator`)."""
        s = self.slices[b]
        gen = keyed_generator(self.config.seed, "init", b)
        return init_canvases(s.stop - s.start, self.pipeline.canvas_hw, self.lo.cpu(), self.hi.cpu(), gen,
                             self.init_affine)

    def new_state(self) -> _State:
        cfg = self.config
        if self.synchronous:
            return self._new_state_synchronous()
        gen = torch.Generator().manual_seed(cfg.seed)
        canvases_all = init_canvases(cfg.n_images, self.pipeline.canvas_hw, self.lo.cpu(), self.hi.cpu(), gen,
                             self.init_affine)
        # detached slices share one storage on CPU (no second copy of the set); .to() copies on CUDA
        canvases = [canvases_all[s].detach().to(self.device).requires_grad_(True) for s in self.slices]
        state = _State(canvases, [], [], [], [], [], gen)
        self._build_optimizers(state)
        n_entries = len(self.layers) + 1
        cache_m: list[list[torch.Tensor]] = [[] for _ in range(n_entries)]
        cache_s: list[list[torch.Tensor]] = [[] for _ in range(n_entries)]
        if cfg.statistics is Statistics.ALL:
            for canvas in state.canvases:
                ms, ss = self.batch_moments(canvas)
                for j in range(n_entries):
                    cache_m[j].append(ms[j])
                    cache_s[j].append(ss[j])
            state.cache_m = [torch.stack(c) for c in cache_m]
            state.cache_s = [torch.stack(c) for c in cache_s]
        return state

    def _build_optimizers(self, state: _State) -> None:
        cfg = self.config
        lr, min_lr = self.settings["lr_effective"], self.settings["min_lr_effective"]  # LrUnits
        # a None canvas: a batch another process owns (schedule=synchronous)
        state.optimizers = [torch.optim.RAdam([c], lr=lr) if c is not None else None for c in state.canvases]
        state.schedulers = [
            ReduceOnPlateauWithReset(opt, cfg.plateau_factor, self.settings["plateau_patience"], cfg.plateau_threshold, min_lr)
            if cfg.lr_schedule and opt is not None
            else None
            for opt in state.optimizers
        ]
        use_scaler = self.use_amp and self.device.type == "cuda"
        state.scalers = [torch.amp.GradScaler("cuda") if use_scaler and o is not None else None for o in state.optimizers]

    def step(self, b: int, state: _State, refresh: bool = True, generator: torch.Generator | None = None,
             pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None) -> dict[str, float]:
        """One optimization step of batch ``b`` (training view, loss, backward, RAdam, scheduler, cache refresh).

        ``refresh=False`` skips the cache update of batch ``b`` when no later step reads it (the caller knows: a
        single batch, whose own cache entry cancels out of :func:`global_moments`, or the run's last step).
        ``generator``: the training view's draws (default: the run's generator, ``state.generator``).
        ``pending``: store the refreshed moments in ``pending[b]`` instead of the cache (``schedule=synchronous``)."""
        canvas, opt, sched, scaler = state.canvases[b], state.optimizers[b], state.schedulers[b], state.scalers[b]
        view = self.pipeline.train_view(canvas, state.generator if generator is None else generator)
        outputs, moments = self.forward_moments(view)
        terms = self.loss(b, state, outputs, moments)
        loss_value = float(terms["loss"].detach())
        if not math.isfinite(loss_value):
            raise GenerationError(
                f"loss became {loss_value} at iteration {state.iteration + 1}, batch {b} (lr {opt.param_groups[0]['lr']:g});"
                " the run stopped; lower the lr or the output-loss weight, the last checkpoint (if any) is kept"
            )
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            terms["loss"].backward()
            opt.step()
        if self.config.project_canvas:
            with torch.no_grad():
                torch.maximum(torch.minimum(canvas, self.hi, out=canvas), self.lo, out=canvas)
        if sched is not None:
            sched.step(loss_value)
        if self.config.statistics is Statistics.ALL and refresh:
            if not self.lazy_refresh:
                ms, ss = self.batch_moments(canvas.detach())
            else:
                ms = [m.detach().mean(0) for m, _ in moments]
                ss = [s.detach().mean(0) for _, s in moments]
            if pending is not None:
                pending[b] = (ms, ss)
                return {"loss": loss_value, "bn": float(terms["bn"].detach()), "out": float(terms["out"].detach())}
            for j in range(len(ms)):
                state.cache_m[j][b] = ms[j]
                state.cache_s[j][b] = ss[j]
        return {"loss": loss_value, "bn": float(terms["bn"].detach()), "out": float(terms["out"].detach())}

    def final_images(self, state: _State) -> torch.Tensor:
        """Final views of all canvases, float32 ``(N, 3, H, W)`` on CPU, filled batch by batch (no 2x peak)."""
        h, w = self.spec.input_size
        out = torch.empty(self.config.n_images, 3, h, w, dtype=torch.float32)
        with torch.no_grad():
            for s, c in zip(self.slices, state.canvases):
                out[s] = self.pipeline.final_view(c.detach()).float().cpu()
        return out

    # --- schedule=synchronous (one or several processes; dgh.generation.distributed) ---------------------------
    @property
    def channels(self) -> list[int]:
        """``C_l`` of every cache entry (BN layers in order, the input pseudo-layer last)."""
        return [t.mean.numel() for t in self.targets] + [self.input_tgt.mean.numel()]

    def _exchange(self, rows: dict[int, torch.Tensor], failure: str | None) -> torch.Tensor:
        return exchange_rows(self.world, rows, len(self.slices), row_width(self.channels), self.device, failure)

    def _set_cache(self, state: _State, table: torch.Tensor) -> None:
        """Fill the moment cache from a full exchange table ``(B, width)`` (same bits on every process)."""
        per_b = [unpack_row(table[b], self.channels) for b in range(len(self.slices))]
        state.cache_m = [torch.stack([pb[0][j] for pb in per_b]) for j in range(len(self.channels))]
        state.cache_s = [torch.stack([pb[1][j] for pb in per_b]) for j in range(len(self.channels))]

    def _new_state_synchronous(self) -> _State:
        """Keyed initial canvases of this process's batches (None for the others), their optimizers, and the full
        moment cache (each process measures its batches on the final view; one exchange)."""
        n_batches = len(self.slices)
        canvases: list[torch.Tensor | None] = [None] * n_batches
        rows: dict[int, torch.Tensor] = {}
        failure = None
        try:
            for b in self.owned:
                canvases[b] = self.keyed_initial_canvas(b).to(self.device).requires_grad_(True)
                if self.config.statistics is Statistics.ALL:
                    ms, ss = self.batch_moments(canvases[b])
                    rows[b] = pack_row(ms, ss, [0.0] * N_TERMS)
        except Exception as exc:  # noqa: BLE001 - reported to every process, then raised there
            if self.world.size == 1:
                raise
            failure = first_line(exc, 300)
        state = _State(canvases, [], [], [], [], [], torch.Generator().manual_seed(self.config.seed))
        self._build_optimizers(state)
        if self.config.statistics is Statistics.ALL or self.world.size > 1:
            if self.config.statistics is not Statistics.ALL:
                rows = {b: torch.zeros(row_width(self.channels), device=self.device) for b in self.owned}
            table = self._exchange(rows, failure)
            if self.config.statistics is Statistics.ALL:
                self._set_cache(state, table)
        return state

    def iteration_synchronous(self, state: _State) -> dict[str, float]:
        """One iteration under ``schedule=synchronous``: every owned batch steps against the cache as it stood at
        the start (draws keyed by (seed, "step", iteration, batch)); one exchange then brings every process the
        refreshed moments and loss terms of all B batches. Returns the iteration's metrics (means over batches in
        batch order; identical on every process)."""
        n_batches = len(self.slices)
        it = state.iteration
        last = it + 1 == self.config.iterations
        refresh = self.config.statistics is Statistics.ALL and n_batches > 1 and not last
        pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        rows: dict[int, torch.Tensor] = {}
        failure = None
        try:
            for b in self.owned:
                gen = keyed_generator(self.config.seed, "step", it, b)
                t = self.step(b, state, refresh=refresh, generator=gen, pending=pending)
                if b in pending:
                    ms, ss = pending[b]
                elif self.config.statistics is Statistics.ALL:
                    ms, ss = [c[b] for c in state.cache_m], [c[b] for c in state.cache_s]
                else:
                    ms = ss = [torch.zeros(c, device=self.device) for c in self.channels]
                rows[b] = pack_row(ms, ss, [t["loss"], t["bn"], t["out"], state.optimizers[b].param_groups[0]["lr"]])
        except Exception as exc:  # noqa: BLE001 - reported to every process, then raised there
            if self.world.size == 1:
                raise
            failure = f"iteration {it + 1}: {first_line(exc, 300)}"
        table = self._exchange(rows, failure)
        if refresh:
            self._set_cache(state, table)
        terms = [unpack_row(table[b], self.channels)[2] for b in range(n_batches)]
        metrics = {k: sum(t[i] for t in terms) / n_batches for i, k in enumerate(("loss", "bn", "out", "lr"))}
        return metrics

    def checkpoint_synchronous(self, state: _State) -> dict | None:
        """The checkpoint dict (format v1, all B batches) gathered on rank 0; None on the other ranks."""
        mine = {
            b: (state.canvases[b].detach().cpu(), state.optimizers[b].state_dict(),
                state.schedulers[b].state_dict() if state.schedulers[b] is not None else None,
                state.scalers[b].state_dict() if state.scalers[b] is not None else None)
            for b in self.owned
        }
        if self.device.type != "cpu":
            mine = {b: (v[0], _to_cpu(v[1]), v[2], v[3]) for b, v in mine.items()}
        merged = gather_to_main(self.world, mine)
        if merged is None:
            return None
        order = range(len(self.slices))
        return {
            "format": "dgh-generation-checkpoint-v1",
            "model": self.spec.name,
            "settings": self.settings,
            "iteration": state.iteration,
            "canvases": [merged[b][0] for b in order],
            "optimizers": [merged[b][1] for b in order],
            "schedulers": [merged[b][2] for b in order],
            "scalers": [merged[b][3] for b in order],
            "cache_m": [c.cpu() for c in state.cache_m],
            "cache_s": [c.cpu() for c in state.cache_s],
            "generator": state.generator.get_state(),  # unused by this schedule (its draws are keyed)
            "history": state.history,
            "elapsed_s": state.elapsed_s,
        }

    def final_images_synchronous(self, state: _State) -> torch.Tensor | None:
        """Final views of all canvases gathered on rank 0, float32 ``(N, 3, H, W)`` CPU; None on other ranks."""
        with torch.no_grad():
            mine = {b: self.pipeline.final_view(state.canvases[b].detach()).float().cpu() for b in self.owned}
        merged = gather_to_main(self.world, mine)
        if merged is None:
            return None
        h, w = self.spec.input_size
        out = torch.empty(self.config.n_images, 3, h, w, dtype=torch.float32)
        for b, s in enumerate(self.slices):
            out[s] = merged[b]
        return out

    # --- checkpointing -------------------------------------------------------------------------------------------
    def checkpoint_dict(self, state: _State) -> dict:
        return {
            "format": "dgh-generation-checkpoint-v1",
            "model": self.spec.name,
            "settings": self.settings,
            "iteration": state.iteration,
            "canvases": [c.detach().cpu() for c in state.canvases],
            "optimizers": [o.state_dict() for o in state.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in state.schedulers],
            "scalers": [s.state_dict() if s is not None else None for s in state.scalers],
            "cache_m": [c.cpu() for c in state.cache_m],
            "cache_s": [c.cpu() for c in state.cache_s],
            "generator": state.generator.get_state(),
            "history": state.history,
            "elapsed_s": state.elapsed_s,
        }

    def load_state(self, ckpt: dict, path: Path) -> _State:
        if ckpt.get("format") != "dgh-generation-checkpoint-v1":
            raise GenerationError(f"{path} is not a dgh generation checkpoint; delete it or run without --resume")
        mine = {k: v for k, v in self.settings.items() if k not in _RESUME_FREE}
        theirs = {k: v for k, v in ckpt["settings"].items() if k not in _RESUME_FREE}
        theirs.setdefault("schedule", Schedule.SEQUENTIAL.value)  # checkpoints from before the field existed
        theirs.setdefault("speed_setting", theirs.get("speed"))
        if ckpt.get("model") != self.spec.name or mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            what = ", ".join(diff) if diff else f"model {ckpt.get('model')!r}"
            raise GenerationError(
                f"{path} was written with different settings ({what}); resume with the same settings or delete it"
            )
        gen = torch.Generator()
        gen.set_state(ckpt["generator"])
        if len(ckpt["canvases"]) != len(self.slices):
            raise GenerationError(f"{path} holds {len(ckpt['canvases'])} batches, this run has {len(self.slices)}; "
                                  "resume with the same settings or delete it")
        mine_b = set(self.owned)  # schedule=synchronous: this process loads its own batches only
        canvases = [c.to(self.device).requires_grad_(True) if b in mine_b else None
                    for b, c in enumerate(ckpt["canvases"])]
        state = _State(canvases, [], [], [], [], [], gen, ckpt["iteration"], list(ckpt["history"]), ckpt["elapsed_s"])
        self._build_optimizers(state)
        for obj, sd in zip(state.optimizers, ckpt["optimizers"]):
            if obj is not None:
                obj.load_state_dict(sd)
        for obj, sd in zip(state.schedulers, ckpt["schedulers"]):
            if obj is not None and sd is not None:
                obj.load_state_dict(sd)
        for obj, sd in zip(state.scalers, ckpt["scalers"]):
            if obj is not None and sd is not None:
                obj.load_state_dict(sd)
        state.cache_m = [c.to(self.device) for c in ckpt["cache_m"]]
        state.cache_s = [c.to(self.device) for c in ckpt["cache_s"]]
        return state


def _to_cpu(obj):  # noqa: ANN001, ANN202 - nested optimizer state
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _read_checkpoint(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of a generation checkpoint, or a one-line :class:`GenerationError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated zip raises OSError/RuntimeError, a foreign pickle others
        raise GenerationError(f"{path} cannot be read ({first_line(exc, 80)}); it is truncated or not a checkpoint: "
                              "delete it or run without --resume") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("settings"), dict):
        raise GenerationError(f"{path} is not a dgh generation checkpoint; delete it or run without --resume")
    return ckpt


def generate_images(
    loaded: LoadedModel,
    config: GenerationConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate a calibration set from the float model's BN statistics (DGH, arXiv 2410.22110; method.md 1-4).

    Args:
        loaded: the float model (must keep its BN layers) and its spec (input size, normalization, pad p, lambda_out).
        config: all settings (:class:`GenerationConfig`; presets via ``GenerationConfig.for_method``).
        out_dir: when given, writes ``images.pt``, ``meta.json``, ``preview.png`` there, and ``checkpoint.pt``
            every ``config.checkpoint_every`` iterations (removed after a successful run).
        resume: continue from ``out_dir/checkpoint.pt`` if present (bit-for-bit on the same device); otherwise
            start fresh.
        callback: ``callback(iteration, metrics)`` after every iteration (1-based) with ``loss``, ``bn``, ``out``
            (means over the batches of that iteration) and ``lr`` (mean over batches).
        device: ``None``/"auto" = CUDA if present. The model is moved there for the run and moved back after.
        progress: tqdm bar over iterations showing the loss.

    Returns:
        :class:`GenerationResult`; ``images_nchw`` is float32 ``(N, 3, H, W)`` in normalized space.

    Raises:
        NoBatchNormError: the model has no BN layer (fused?).
        GenerationConfigError: the model cannot take its input size, or a setting does not fit.
        GenerationError: the loss became NaN/inf (the last good checkpoint is kept), or a checkpoint does not fit.
        DistributedError: several processes: a process failed, died or did not answer within
            ``config.process_timeout_s`` (one line naming the rank), or they loaded different weights.

    Several processes (:mod:`dgh.generation.distributed`): under ``torchrun`` (``WORLD_SIZE`` > 1) every
    process calls this with the same arguments; rank r optimizes batches r, r+K, ... with ``schedule=synchronous``
    and the exact global moments, exchanged once per iteration. Rank 0 returns the images and writes ``out_dir``;
    the other ranks return ``images_nchw`` of shape ``(0, 3, H, W)``. ``callback`` runs on every rank with the same
    (global) metrics. Checkpoints are gathered on rank 0 and resume at any number of processes.
    """
    if not isinstance(config, GenerationConfig):
        raise GenerationConfigError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config = GenerationConfig.model_validate(config.model_dump())  # re-validate (model_copy(update=) skips it)
    size = world_size_from_env()
    if size == 1 and config.processes > 1:
        raise GenerationConfigError(
            f"processes={config.processes} needs a launch with torchrun (`dgh generate` and the DVC stage do it; "
            "library callers: torchrun --nproc-per-node K ...)"
        )
    if size > 1 and config.processes not in (1, size):
        raise GenerationConfigError(f"processes={config.processes} but this run has {size} processes (torchrun)")
    resolve_schedule(config, size)  # a clear error before any process group
    dev = resolve_device(device)
    with open_world(dev, config.process_timeout_s) as world:
        return _generate(loaded, config, out_dir, resume, callback, world.device(dev), progress, world)


def _generate(loaded: LoadedModel, config: GenerationConfig, out_dir: str | Path | None, resume: bool,
              callback: Callback | None, dev: torch.device, progress: bool, world: World) -> GenerationResult:
    """:func:`generate_images` in one process of ``world``."""
    out_path = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_path / CHECKPOINT_FILE if out_path is not None else None
    model = loaded.model
    home = model_device(model)
    t0 = time.perf_counter()
    if config.method is Method.NOISE:
        images = noise_images(loaded, config.n_images, config.seed)
        history: list[dict[str, float]] = []
        terms: dict[str, float] = {}
        settings = _resolved_config_dict(config, loaded.spec, world.size)
        elapsed_before = 0.0
    else:
        model.eval().to(dev)
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        channels_last = False
        for p, _ in grad_flags:  # the images are the only parameters (method.md, notation)
            p.requires_grad_(False)
        try:
            run = _Run(loaded, config, dev, world)
            check_same_model(world, model)
            if run.fast:
                model.to(memory_format=torch.channels_last)
                channels_last = True
            run.check_input_and_find_last_bns()
            state = None
            if resume and ckpt_path is not None and ckpt_path.is_file():
                state = run.load_state(_read_checkpoint(ckpt_path), ckpt_path)
            if state is None:
                state = run.new_state()
            elapsed_before = state.elapsed_s
            t_loop = time.perf_counter()
            bar = tqdm(
                total=config.iterations, initial=state.iteration, disable=not progress or not world.is_main,
                desc="generate", unit="it"
            )

            def end_iteration(metrics: dict[str, float]) -> None:
                """Count the iteration, record it, report it, and checkpoint every ``checkpoint_every`` iterations
                (not after the last one: the outputs are written instead)."""
                state.iteration += 1
                state.history.append({"iteration": state.iteration, **metrics})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", bn=f"{metrics['bn']:.4g}")
                if callback is not None:
                    callback(state.iteration, dict(metrics))
                every = config.checkpoint_every
                if ckpt_path is not None and every > 0 and state.iteration % every == 0:
                    state.elapsed_s = elapsed_before + time.perf_counter() - t_loop
                    if state.iteration < config.iterations:
                        # synchronous: gathered on rank 0 (None on the other ranks)
                        ckpt = run.checkpoint_synchronous(state) if run.synchronous else run.checkpoint_dict(state)
                        if ckpt is not None:
                            save_torch(ckpt, ckpt_path)

            try:
                while run.synchronous and state.iteration < config.iterations:
                    end_iteration(run.iteration_synchronous(state))
                while state.iteration < config.iterations:
                    order = torch.randperm(len(state.canvases), generator=state.generator).tolist()
                    sums = {"loss": 0.0, "bn": 0.0, "out": 0.0}
                    last_iteration = state.iteration + 1 == config.iterations
                    for b in order:
                        # a refresh is read only by later steps of other batches (global_moments)
                        refresh = len(order) > 1 and not (last_iteration and b == order[-1])
                        step_terms = run.step(b, state, refresh=refresh)
                        for k in sums:
                            sums[k] += step_terms[k] / len(order)
                    lrs = [o.param_groups[0]["lr"] for o in state.optimizers]
                    end_iteration({**sums, "lr": sum(lrs) / len(lrs)})
            finally:
                bar.close()
            images = run.final_images_synchronous(state) if run.synchronous else run.final_images(state)
            history = state.history
            terms = {k: v for k, v in history[-1].items() if k in ("loss", "bn", "out")} if history else {}
            settings = run.settings
            if images is None:  # a process other than rank 0: rank 0 holds the images and writes the outputs
                h, w = loaded.spec.input_size
                images = torch.empty(0, 3, h, w)
            elif world.is_main:
                terms["bn_distance"] = bn_distance(
                    model,
                    images,
                    spec=loaded.spec,
                    lambda_sigma=config.lambda_sigma,
                    std_eps=config.bn_std_eps,
                    input_pseudo_layer=config.input_pseudo_layer,
                    batch_size=max(config.batch_size, 1),
                    device=dev,
                )
            settings["last_bn_layers"] = [run.layers[i][0] for i in run.last_bns]
            settings["num_bn_layers"] = len(run.layers)
        finally:
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            model.to(home)
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
    if config.method is Method.NOISE:
        try:
            terms["bn_distance"] = bn_distance(model, images, spec=loaded.spec, batch_size=config.batch_size)
        except ValueError:
            pass  # noise needs no BN layer; the distance is then undefined
    wall = elapsed_before + time.perf_counter() - t0
    meta = {
        "model": loaded.spec.name,
        "weights": loaded.weights,
        "task": loaded.spec.task,
        "method": config.method.value,
        "seed": config.seed,
        "settings": settings,
        "images_shape": list(images.shape),
        "normalization": {"mean": list(loaded.spec.mean), "std": list(loaded.spec.std)},
        "final_loss_terms": terms,
        "wall_time_s": round(wall, 3),
        "device": str(dev),
        "amp": bool(config.method is not Method.NOISE and run.use_amp),
        "versions": library_versions(),
    }
    if world.size > 1:
        meta["rank"] = world.rank
    if out_path is not None and world.is_main:
        write_outputs(out_path, images, meta, loaded.spec)
        if ckpt_path is not None:
            ckpt_path.unlink(missing_ok=True)
    return GenerationResult(images_nchw=images, loss_terms=terms, meta=meta, history=history, out_dir=out_path)
