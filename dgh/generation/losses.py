"""Losses of method.md section 3: BN alignment ``L_BN`` and the output distribution stretching loss ``L_out``, and
the data-free rule that sets the weight lambda_out of ``L_out`` for models without a tuned value.

All inputs are float32 (or float64) tensors; every function is pure.

The lambda_out rule (:func:`balanced_output_weight`). The images are optimized with RAdam, which is invariant to a
common scale of the loss: only the *direction* of the gradient, i.e. the ratio of the output-loss gradient to the
BN-loss gradient, matters. The paper's fixed per-model weights (3e-7 for ResNet-18 ...) therefore carry each model's
units: on EfficientNet-Lite0, lambda_out = 3e-7 gives an output-loss gradient 2e-7 times the BN-loss gradient at
initialization, i.e. no stretching at all. The rule instead fixes that ratio: with ``g_bn`` and ``g_out`` the
gradient norms (w.r.t. the images) of ``L_BN`` and of ``L_out`` on the first batch of initial images (no real data),
``lambda_out = ratio * g_bn / g_out``; ``g_bn`` is taken as the gradient that reaches one batch through the global
statistics (the batch's share ``n_b / N`` of the batch-statistics gradient, method.md section 1), so the balance
the optimizer sees does not depend on how many batches the images are split into.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgh.generation.bn_stats import BNTarget


def std_from_moments(mean: torch.Tensor, second: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(max(E[a^2] - mean^2, 0) + eps)`` elementwise (eps = ``bn_std_eps``; floored at 1e-12 so that the
    gradient stays finite when eps is 0 and a channel is constant)."""
    var = (second - mean * mean).clamp_min(0.0)
    return torch.sqrt((var + eps).clamp_min(1e-12))


def bn_layer_term(mean: torch.Tensor, std: torch.Tensor, target: BNTarget, lambda_sigma: float) -> torch.Tensor:
    """One layer's ``||mu_hat - mu||^2 / C + lambda_sigma * ||sigma_hat - sigma||^2 / C``.

    Args:
        mean, std: ``(C,)`` (global / batch statistics) or ``(n, C)`` (image-wise; the per-image terms are averaged
            over images, ZeroQ style).
        target: running statistics, ``(C,)``.

    Returns:
        A scalar tensor.
    """
    t_mean = target.mean.to(mean)
    t_std = target.std.to(std)
    term = ((mean - t_mean) ** 2).mean(-1) + lambda_sigma * ((std - t_std) ** 2).mean(-1)
    return term.mean()


def bn_alignment_loss(
    means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], targets: Sequence[BNTarget], lambda_sigma: float
) -> torch.Tensor:
    """``L_BN = (1/(L+1)) sum_l [||mu_hat_l - mu_l||^2 / C_l + lambda_sigma ||sigma_hat_l - sigma_l||^2 / C_l]``
    (method.md section 3); pass the input pseudo-layer as one more entry of the sequences.

    Raises:
        ValueError: sequences of different lengths or empty.
    """
    if not (len(means) == len(stds) == len(targets)) or not targets:
        raise ValueError(f"bn_alignment_loss needs equal non-empty lists, got {len(means)}/{len(stds)}/{len(targets)}")
    total = sum(bn_layer_term(m, s, t, lambda_sigma) for m, s, t in zip(means, stds, targets))
    return total / len(targets)


def output_range(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image output range summed over output tensors: ``r(x) = sum_k [max(z_k(x)) - min(z_k(x))]``.

    Args:
        outputs: model outputs, each ``(n, ...)`` (classifier logits ``(n, classes)``; detector raw head levels
            ``(n, C_i, H_i, W_i)``).

    Returns:
        ``(n,)`` float32.
    """
    total = None
    for z in outputs:
        flat = z.float().flatten(1)
        r = flat.amax(1) - flat.amin(1)
        total = r if total is None else total + r
    return total


def hinge_penalties(
    mean_img: torch.Tensor, sq_img: torch.Tensor, target: BNTarget, margin: float, eps: float
) -> torch.Tensor:
    """Paper-code last-BN hinges per image: ``max(0, ||mu_L(x) - mu_L||^2/C - margin)
    + max(0, ||s_L(x) - sigma_L||^2/C - margin)`` where ``mu_L(x)``, ``s_L(x)`` are the image's per-channel spatial
    mean and std of the BN input.

    Args:
        mean_img, sq_img: ``(n, C)`` per-image first and second moments of the last BN layer's input.

    Returns:
        ``(n,)``.
    """
    s_img = std_from_moments(mean_img, sq_img, eps)
    c_mu = (((mean_img - target.mean.to(mean_img)) ** 2).mean(1) - margin).clamp_min(0.0)
    c_sigma = (((s_img - target.std.to(s_img)) ** 2).mean(1) - margin).clamp_min(0.0)
    return c_mu + c_sigma


def output_stretching_loss(
    outputs: Sequence[torch.Tensor],
    hinge_moments: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    hinge_targets: Sequence[BNTarget] = (),
    margin: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``L_out = mean_x [ -r(x) + sum_j c_j(x) ]`` (method.md section 3, ODSL).

    With ``hinge_moments`` empty this is MCT's form (range only). ``hinge_moments[j]`` are the per-image moments
    ``(mean_img, sq_img)`` of the j-th "last BN" layer's input and ``hinge_targets[j]`` its running statistics;
    each distinct last-BN layer contributes its hinges once.

    Returns:
        A scalar tensor (to be multiplied by lambda_out).
    """
    per_image = -output_range(outputs)
    for (m, s), t in zip(hinge_moments, hinge_targets, strict=True):
        per_image = per_image + hinge_penalties(m, s, t, margin, eps)
    return per_image.mean()


def balanced_output_weight(grad_bn_norm: float, grad_out_norm: float, ratio: float) -> float:
    """lambda_out such that ``lambda_out * grad_out_norm = ratio * grad_bn_norm`` (module docstring).

    Args:
        grad_bn_norm: L2 norm of d L_BN / d images (> 0), already scaled by the batch's share of the statistics.
        grad_out_norm: L2 norm of d L_out / d images (> 0).
        ratio: wanted ratio of the output-loss gradient to the BN-loss gradient (> 0).

    Returns:
        lambda_out as a python float.

    Raises:
        ValueError: a norm that is not finite and positive, or ``ratio`` <= 0.
    """
    for name, v in (("BN-loss gradient norm", grad_bn_norm), ("output-loss gradient norm", grad_out_norm)):
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"cannot balance the output loss: the {name} at initialization is {v}")
    if not ratio > 0:
        raise ValueError(f"output-loss gradient ratio must be > 0, got {ratio}")
    return float(ratio * grad_bn_norm / grad_out_norm)
