"""AdaRound: learned up/down rounding of weights (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020, arXiv 2004.10568), on plain tensors.

The pieces, each with its source:

- :func:`rectified_sigmoid` ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` with ``zeta = 1.1``,
  ``gamma = -0.1`` (AdaRound eq. 23).
- :func:`init_rounding_logits`: ``V`` is initialized so that ``h(V)`` equals the fractional part of ``w / s``, i.e.
  the soft-rounded weight starts at the float weight (as in the BRECQ reference code, ``init_alpha``).
- :func:`rounding_regularizer` ``f_reg(V) = sum(1 - |2 h(V) - 1| ** beta)`` (AdaRound eq. 24).
- :class:`BetaSchedule`: beta annealed linearly from 20 to 2 after a warm-up of 20 % of the iterations, during
  which the regularizer is off (AdaRound section 4; BRECQ code ``LinearTempDecay``).
- :func:`reconstruction_loss`: squared error summed over the channel axis, averaged over the batch and the spatial
  positions (BRECQ code ``lp_loss`` with p = 2).
- :class:`AdaRoundWeight`: the fake-quantized weight ``s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)``,
  soft during optimization and hard (``h in {0, 1}``, ``V >= 0`` rounds up) afterwards.
- :func:`optimize_rounding`: the optimization loop shared by single-layer AdaRound and BRECQ block reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dgh.quantization.quantizers import fake_quantize

ZETA = 1.1
GAMMA = -0.1


class AdaRoundError(ValueError):
    """Bad input to AdaRound (shapes, bit ranges, iteration counts). The message is one line."""


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, AdaRound eq. 23 (zeta 1.1, gamma -0.1).

    Args:
        v: rounding logits, any shape, float.

    Returns:
        Tensor of the same shape with values in [0, 1].
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding_logits(weight_over_scale: torch.Tensor) -> torch.Tensor:
    """Logits ``V`` with ``h(V) = w/s - floor(w/s)``, the inverse of :func:`rectified_sigmoid`.

    Args:
        weight_over_scale: ``w / s`` in units of quantization steps, any shape, float.

    Returns:
        float32 tensor of the same shape (finite: the fractional part lies in [0, 1) and h's pre-clip range is
        (-0.1, 1.1)).
    """
    rest = weight_over_scale - torch.floor(weight_over_scale)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)``, AdaRound eq. 24; zero exactly when every ``h(V)`` is 0 or 1.

    Args:
        v: rounding logits, any shape.
        beta: the annealed exponent (> 0).

    Returns:
        Scalar tensor (sum over all elements).
    """
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """Linear annealing of the regularizer exponent beta (AdaRound section 4, BRECQ code ``LinearTempDecay``).

    For iteration ``t`` of ``total_iters``: during the warm-up ``t < warmup * total_iters`` the regularizer is off
    (:meth:`__call__` returns ``None``); afterwards ``beta = end + (start - end) * max(0, 1 - r)`` with
    ``r = (t - warmup * total_iters) / ((1 - warmup) * total_iters)``.
    """

    total_iters: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def __call__(self, t: int) -> float | None:
        """Beta at iteration ``t`` (0-based), or ``None`` during the warm-up."""
        start_decay = self.warmup * self.total_iters
        if t < start_decay:
            return None
        rel = (t - start_decay) / max(self.total_iters - start_decay, 1e-12)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over axis 1 (channels / features), mean over all other axes (BRECQ ``lp_loss``, p=2).

    Args:
        output, target: same shape ``(N, C, ...)``.

    Returns:
        Scalar tensor.

    Raises:
        AdaRoundError: shapes differ.
    """
    if output.shape != target.shape:
        raise AdaRoundError(f"reconstruction output shape {tuple(output.shape)} != target {tuple(target.shape)}")
    if output.dim() == 1:
        return (output - target).pow(2).mean()
    return (output - target).pow(2).sum(1).mean()


class AdaRoundWeight(nn.Module):
    """Weight fake quantization with learned rounding.

    ``w_hat = s * (clamp(floor(w / s) + h + z, qmin, qmax) - z)`` where ``h = h(V)`` (soft, in [0, 1]) while
    optimizing and ``h = 1[V >= 0]`` (hard) afterwards (AdaRound eq. 22 with an asymmetric zero point).

    Args:
        weight: float weight, e.g. ``(C_out, C_in, kH, kW)`` or ``(C_out, C_in)``.
        scale: step size, positive, broadcastable to ``weight`` (per-channel: ``(C_out, 1, 1, 1)``; per-tensor:
            a scalar).
        zero_point: integer-valued offset broadcastable to ``weight`` (0 for symmetric quantizers).
        qmin, qmax: integer range, e.g. -8, 7 (signed 4-bit) or 0, 15 (unsigned 4-bit).

    Raises:
        AdaRoundError: non-positive or non-finite scale, qmin >= qmax, or scale not broadcastable to weight.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | float = 0.0,
        qmin: int = -8,
        qmax: int = 7,
    ) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = torch.as_tensor(scale, dtype=torch.float32, device=weight.device).detach()
        zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=weight.device).detach()
        if qmin >= qmax:
            raise AdaRoundError(f"qmin ({qmin}) must be below qmax ({qmax})")
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise AdaRoundError("AdaRound needs a finite, positive weight scale")
        try:
            torch.broadcast_shapes(scale.shape, weight.shape)
            torch.broadcast_shapes(zero_point.shape, weight.shape)
        except RuntimeError:
            raise AdaRoundError(
                f"scale {tuple(scale.shape)} / zero point {tuple(zero_point.shape)} do not broadcast to weight "
                f"{tuple(weight.shape)}"
            ) from None
        self.qmin, self.qmax = int(qmin), int(qmax)
        w_over_s = weight / scale
        self.register_buffer("weight_floor", torch.floor(w_over_s))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.logits = nn.Parameter(init_rounding_logits(w_over_s))
        self.soft = True

    def rounding(self) -> torch.Tensor:
        """``h``: the soft ``h(V)`` in [0, 1] when ``self.soft``, else the hard 0/1 rounding (float, weight shape)."""
        if self.soft:
            return rectified_sigmoid(self.logits)
        return (self.logits >= 0).to(self.weight_floor.dtype)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight, float32, the weight's shape (differentiable in ``logits`` when soft)."""
        q = torch.clamp(self.weight_floor + self.rounding() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def nearest_quantize(weight: torch.Tensor, scale: torch.Tensor, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest fake quantization ``s * (clamp(round(w / s) + z, qmin, qmax) - z)`` (same shapes as
    :class:`AdaRoundWeight`); the baseline AdaRound is compared against."""
    scale = torch.as_tensor(scale, dtype=weight.dtype, device=weight.device)
    zero_point = torch.as_tensor(zero_point, dtype=weight.dtype, device=weight.device)
    return fake_quantize(weight, scale, zero_point, qmin, qmax, rounding=torch.round)


@dataclass(frozen=True)
class RoundingOptimization:
    """Hyper-parameters of one reconstruction unit (a layer or a block); defaults are the BRECQ / DGH paper code's.

    Attributes:
        iters: optimizer steps for the rounding (paper code: 20,000).
        batch_size: calibration images per step (32).
        reg_weight: weight of the rounding regularizer (0.01; 0.1 for MobileNetV2).
        lr: Adam learning rate of the rounding logits (1e-3, BRECQ code default).
        beta_start, beta_end, warmup: :class:`BetaSchedule` (20, 2, 0.2).
        act_lr: Adam learning rate of the activation step sizes learned jointly (4e-4, DGH paper code), with cosine
            decay to 0 over ``iters``.
    """

    iters: int = 20000
    batch_size: int = 32
    reg_weight: float = 0.01
    lr: float = 1e-3
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    act_lr: float = 4e-4


def optimize_rounding(
    forward: Callable[[torch.Tensor], torch.Tensor],
    rounding: Sequence[AdaRoundWeight],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    opt: RoundingOptimization,
    act_scales: Sequence[nn.Parameter] = (),
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "adaround",
) -> dict[str, float]:
    """Minimize ``reconstruction_loss(forward(x), y) + reg_weight * sum_k f_reg(V_k)`` over the rounding logits
    (and optionally activation step sizes), then switch every :class:`AdaRoundWeight` to hard rounding.

    AdaRound eq. 25 (layer) / BRECQ eq. 9 (block). The rounding logits use Adam(lr); ``act_scales`` use a second
    Adam(act_lr) with cosine decay (LSQ-style step-size learning as in the BRECQ / DGH code).

    Args:
        forward: maps a batch of ``inputs`` to the unit's output using the soft-rounded weights (it must call the
            :class:`AdaRoundWeight` modules).
        rounding: the :class:`AdaRoundWeight` modules of the unit (their ``logits`` are optimized).
        inputs: ``(N, ...)`` unit inputs (quantized-model activations), float32, on the compute device.
        targets: ``(N, ...)`` float-model outputs of the unit.
        opt: hyper-parameters.
        act_scales: learnable activation step sizes (positive scalars/tensors), or empty.
        generator: CPU random generator for the batch draws (seeded by the caller for determinism).
        progress: show a tqdm bar.
        desc: bar label.

    Returns:
        ``{"rec_loss": final batch reconstruction loss, "reg_loss": final regularizer value (unweighted)}``.

    Raises:
        AdaRoundError: ``iters < 0``, empty inputs, or inputs/targets of different lengths.
    """
    if opt.iters < 0:
        raise AdaRoundError(f"iterations must be >= 0, got {opt.iters}")
    n = inputs.shape[0]
    if n == 0 or targets.shape[0] != n:
        raise AdaRoundError(f"need as many targets as inputs (> 0), got {n} inputs and {targets.shape[0]} targets")
    for r in rounding:
        r.soft = True
    params = [r.logits for r in rounding]
    optimizers: list[torch.optim.Optimizer] = []
    schedulers = []
    if params:
        optimizers.append(torch.optim.Adam(params, lr=opt.lr))
    if act_scales:
        a_opt = torch.optim.Adam(list(act_scales), lr=opt.act_lr)
        optimizers.append(a_opt)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=max(opt.iters, 1), eta_min=0.0))
    schedule = BetaSchedule(opt.iters, opt.beta_start, opt.beta_end, opt.warmup)
    bs = min(opt.batch_size, n)
    rec = reg = torch.zeros(())
    bar = tqdm(range(opt.iters), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for t in bar:
        idx = torch.randint(0, n, (bs,), generator=generator).to(inputs.device)
        with torch.enable_grad():
            out = forward(inputs[idx])
            rec = reconstruction_loss(out, targets[idx])
            beta = schedule(t)
            if beta is None or not rounding:
                reg = torch.zeros((), device=out.device)
            else:
                reg = sum(rounding_regularizer(r.logits, beta) for r in rounding)
            loss = rec + opt.reg_weight * reg
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
        for o in optimizers:
            o.step()
        for s in schedulers:
            s.step()
        if act_scales:
            with torch.no_grad():
                for a in act_scales:
                    a.clamp_(min=1e-8)
        if progress and t % 100 == 0:
            bar.set_postfix(rec=f"{rec.item():.4g}", reg=f"{float(reg):.4g}")
    for r in rounding:
        r.soft = False
        r.logits.requires_grad_(False)
    return {"rec_loss": float(rec.detach()), "reg_loss": float(reg.detach()) if torch.is_tensor(reg) else float(reg)}
