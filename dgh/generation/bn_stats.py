"""BatchNorm discovery, input-moment hooks, and the three statistics modes (method.md section 1).

Notation: for BN layer ``l`` with ``C_l`` channels, ``a_l`` is its *input* ``(n, C_l, H_l, W_l)``. A hook reduces it
right away to per-image, per-channel first and second moments over (H, W):
``mean_img = a.mean((2, 3))`` and ``sq_img = (a * a).mean((2, 3))``, both ``(n, C_l)`` float32. Everything else
(batch moments, global moments, per-image std for the hinges) derives from these, so no activation is kept alive.

Statistics are keyed by module object, never by call order: YOLO calls its BN layers in a different order than
``model.modules()`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dgh.generation.config import GenerationConfigError

try:  # torchvision detection backbones use FrozenBatchNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency
    FrozenBatchNorm2d = ()  # type: ignore[assignment,misc]


class NoBatchNormError(GenerationConfigError):
    """The model has no BatchNorm layer, so there are no statistics to match."""


BN_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,) + (
    (FrozenBatchNorm2d,) if isinstance(FrozenBatchNorm2d, type) else ()
)


@dataclass(frozen=True)
class BNTarget:
    """Running statistics of one BN layer, float32 ``(C,)`` tensors: ``mean`` = running_mean and
    ``std`` = sqrt(running_var + eps) (method.md section 3; eps = ``bn_std_eps``)."""

    name: str
    mean: torch.Tensor
    std: torch.Tensor


def find_bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All BatchNorm layers (``_BatchNorm`` subclasses and ``FrozenBatchNorm2d``) as ``(name, module)``,
    in ``named_modules`` order.

    Raises:
        NoBatchNormError: when there is none (a fused/folded model), naming the likely cause.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    if not layers:
        raise NoBatchNormError(
            f"{type(model).__name__} has no BatchNorm layer (was it fused for inference? generation needs the "
            "unfused float model with its BN running statistics)"
        )
    for name, m in layers:
        if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
            raise NoBatchNormError(f"BatchNorm layer {name!r} tracks no running statistics (track_running_stats=False)")
    return layers


def bn_targets(layers: list[tuple[str, nn.Module]], std_eps: float, device: torch.device) -> list[BNTarget]:
    """Running mean and ``sqrt(running_var + std_eps)`` of each layer, float32 on ``device``."""
    out = []
    for name, m in layers:
        rm = m.running_mean.detach().float().to(device)
        rv = m.running_var.detach().float().to(device)
        out.append(BNTarget(name, rm, torch.sqrt(rv.clamp_min(0) + std_eps)))
    return out


class _ImageMoments(torch.autograd.Function):
    """``(mean(a), mean(a^2))`` over (H, W) with a fused backward.

    Forward, contiguous (NCHW) input: two reductions and no full-size temporary (``mean(a^2) = ||a||_2^2 / HW`` via
    ``vector_norm``), with fp32 accumulation for bf16/fp16 input. Channels-last input (``speed=fast``): strided
    (H, W) reductions are slow there, so the tensor is read as ``(n, HW, C)`` (a free view of NHWC memory), cast to
    fp32 once and reduced over its middle axis (same moments up to float rounding; 3-7x faster on bf16 CIFAR-size
    activations). Backward: ``dL/da = g_mean / HW + a * (2 g_sq / HW)``, one ``addcmul``, instead of autograd's
    chain of full-size mul/div/expand ops (the hooks' main cost; benchmarks/generation.py).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        n, c, h, w = a.shape
        hw = h * w
        if not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            rows = a.permute(0, 2, 3, 1).reshape(n, hw, c).to(acc)  # (n, HW, C), one fp32 copy
            mean = rows.mean(1)
            sq = rows.square_().mean(1) if rows.data_ptr() != a.data_ptr() else rows.square().mean(1)
        else:
            mean = a.mean(dim=(2, 3), dtype=acc)
            sq = torch.linalg.vector_norm(a, ord=2, dim=(2, 3), dtype=acc).square_().div_(hw)
        ctx.save_for_backward(a)
        return mean, sq

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor | None, g_sq: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        (a,) = ctx.saved_tensors
        hw = a.shape[2] * a.shape[3]
        n, c = a.shape[:2]
        base = (g_mean / hw if g_mean is not None else a.new_zeros(n, c, dtype=torch.float32)).view(n, c, 1, 1)
        if g_sq is None:
            return base.to(a.dtype).expand_as(a).clone()
        scale = (g_sq * (2.0 / hw)).view(n, c, 1, 1)
        return torch.addcmul(base.to(a.dtype), a, scale.to(a.dtype))


def image_moments(a_nchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel first and second moments over (H, W), in float32 (float64 if the input is).

    Args:
        a_nchw: ``(n, C, H, W)``, any float dtype and memory format.

    Returns:
        ``(mean_img, sq_img)``, each ``(n, C)``: ``mean(a)`` and ``mean(a**2)`` over H, W; differentiable.
    """
    if not a_nchw.requires_grad:
        with torch.no_grad():
            return _ImageMoments.forward(_NoCtx(), a_nchw)
    return _ImageMoments.apply(a_nchw)


class _NoCtx:
    """Stand-in ctx for a no-grad call of ``_ImageMoments.forward``."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


class AllMomentsRecorded(Exception):
    """Raised by a :class:`MomentRecorder` hook under ``active(stop_when_complete=True)`` as soon as every layer's
    moments are recorded, to end a forward pass whose remaining layers (and output) are not needed."""


class MomentRecorder:
    """Forward hooks on BN layers that store each layer's per-image moments of its input.

    Use as ``with recorder.active(): model(x)``; afterwards ``recorder.moments[i]`` is ``(mean_img, sq_img)``
    for the i-th layer of ``layers`` (keyed by module, so call order does not matter), and ``recorder.call_order``
    lists layer indices in the order they were called.

    ``with recorder.active(stop_when_complete=True): model(x)`` stops the forward with :class:`AllMomentsRecorded`
    right after the last BN layer ran (the context manager swallows it): a statistics-only pass skips the layers
    behind the last BN layer (the head), with the same moments.

    Raises (from :meth:`check_complete`):
        GenerationConfigError: some BN layer was not called by the forward pass.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self._index = {id(m): i for i, (_, m) in enumerate(layers)}
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self.call_order: list[int] = []
        self._stop_when_complete = False

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        i = self._index[id(module)]
        if self.moments[i] is None:  # a BN module reused twice in one forward: keep the first call
            self.moments[i] = image_moments(inputs[0])
            self.call_order.append(i)
            if self._stop_when_complete and len(self.call_order) == len(self.layers):
                raise AllMomentsRecorded

    @contextmanager
    def active(self, stop_when_complete: bool = False) -> Iterator[MomentRecorder]:
        """Register the hooks, clear previous moments, and remove the hooks on exit (see the class docstring for
        ``stop_when_complete``)."""
        self.moments = [None] * len(self.layers)
        self.call_order = []
        self._stop_when_complete = stop_when_complete
        handles = [m.register_forward_hook(self._hook) for _, m in self.layers]
        try:
            yield self
        except AllMomentsRecorded:
            if not stop_when_complete:
                raise
        finally:
            self._stop_when_complete = False
            for h in handles:
                h.remove()

    def check_complete(self) -> None:
        missing = [self.layers[i][0] for i, v in enumerate(self.moments) if v is None]
        if missing:
            raise GenerationConfigError(
                f"{len(missing)} BatchNorm layer(s) were not called by the forward pass (e.g. {missing[0]!r}); "
                "their statistics cannot be matched"
            )


def global_moments(
    cached_m: torch.Tensor,
    cached_s: torch.Tensor,
    weights: torch.Tensor,
    active: int,
    live_m: torch.Tensor,
    live_s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset-level mean and second moment of one BN layer from cached per-batch moments plus the live batch.

    method.md section 1: ``mu = sum_b w_b m_b`` and ``E[a^2] = sum_b w_b s_b`` with ``w_b`` = batch b's element
    count / total (so unequal batch sizes are exact), where batch ``active`` contributes its *live* moments
    (carrying gradient) and every other batch its cached, detached moments.

    Args:
        cached_m, cached_s: ``(B, C)`` cached batch moments (no gradient).
        weights: ``(B,)`` batch weights summing to 1.
        active: index of the live batch.
        live_m, live_s: ``(C,)`` moments of the live batch (may require grad).

    Returns:
        ``(mu, second)``, each ``(C,)``. The variance is ``second - mu**2``.
    """
    w = weights.to(cached_m.dtype).unsqueeze(1)
    others_m = (w * cached_m).sum(0) - w[active] * cached_m[active]
    others_s = (w * cached_s).sum(0) - w[active] * cached_s[active]
    return others_m + w[active, 0] * live_m, others_s + w[active, 0] * live_s


@torch.no_grad()
def dataset_moments(
    model: nn.Module,
    images_nchw: torch.Tensor,
    layers: list[tuple[str, nn.Module]],
    batch_size: int = 256,
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Exact dataset-level BN-input moments over all images, accumulated in float64 batch by batch.

    Args:
        images_nchw: ``(N, 3, H, W)`` float, normalized space (the model input as is; no augmentation); cast to
            the dtype of the model's parameters.

    Returns:
        ``(means, seconds, input_mean, input_second)``: per BN layer ``(C_l,)`` float64 mean and E[a^2] over
        (images, H, W), and the same for the input image ``(3,)``.
    """
    first = next(iter(model.parameters()), torch.empty(0))
    device = device or first.device
    dtype = first.dtype if first.is_floating_point() else torch.float32
    rec = MomentRecorder(layers)
    sums_m = [None] * len(layers)
    sums_s = [None] * len(layers)
    in_m = torch.zeros(images_nchw.shape[1], dtype=torch.float64)
    in_s = torch.zeros_like(in_m)
    n_total = images_nchw.shape[0]
    for start in range(0, n_total, batch_size):
        x = images_nchw[start : start + batch_size].to(device=device, dtype=dtype)
        with rec.active():
            model(x)
        rec.check_complete()
        w = x.shape[0] / n_total
        m0, s0 = image_moments(x.double())
        in_m += m0.sum(0).cpu() / n_total
        in_s += s0.sum(0).cpu() / n_total
        for i, mom in enumerate(rec.moments):
            mm = mom[0].double().mean(0).cpu() * w
            ss = mom[1].double().mean(0).cpu() * w
            sums_m[i] = mm if sums_m[i] is None else sums_m[i] + mm
            sums_s[i] = ss if sums_s[i] is None else sums_s[i] + ss
    return sums_m, sums_s, in_m, in_s
