"""AdaRound core on plain tensors (Nagel et al. 2020): known-target layer, hard rounding, one-step bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgh.quantization.adaround import (
    AdaRoundError,
    AdaRoundWeight,
    BetaSchedule,
    RoundingOptimization,
    init_rounding_logits,
    nearest_quantize,
    optimize_rounding,
    reconstruction_loss,
    rectified_sigmoid,
    rounding_regularizer,
)


def _linear_problem(seed: int = 0, n: int = 512, c_in: int = 32, c_out: int = 16):
    """A linear layer, calibration inputs and its exact float output; signed 4-bit per-channel symmetric grid."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, generator=g) * 0.2
    bias = torch.randn(c_out, generator=g) * 0.1
    # correlated inputs (as real activations are): that is where choosing the rounding direction pays off
    mix = torch.randn(c_in, c_in, generator=g) / c_in**0.5
    x = torch.randn(n, c_in, generator=g) @ mix + 0.5
    y = F.linear(x, weight, bias)
    scale = weight.abs().amax(1, keepdim=True) / 7.0
    return weight, bias, x, y, scale


def test_rectified_sigmoid_init_reproduces_fractional_part():
    w_over_s = torch.tensor([-2.75, -0.5, 0.0, 0.3, 1.999, 5.5])
    h = rectified_sigmoid(init_rounding_logits(w_over_s))
    torch.testing.assert_close(h, w_over_s - torch.floor(w_over_s), atol=1e-5, rtol=0)
    # so the soft-rounded weight starts exactly at the float weight (inside the grid range)
    weight = torch.tensor([[0.11, -0.23, 0.05, 0.31]])
    r = AdaRoundWeight(weight, torch.tensor([[0.05]]), 0.0, -8, 7)
    torch.testing.assert_close(r(), weight, atol=1e-6, rtol=0)


def test_regularizer_is_zero_at_hard_values_and_maximal_at_half():
    big = torch.tensor([-50.0, 50.0])  # h = 0 and h = 1 after the clip
    assert rounding_regularizer(big, 2.0).item() == 0.0
    half = init_rounding_logits(torch.tensor([0.5]))  # h = 0.5
    assert rounding_regularizer(half, 20.0).item() == pytest.approx(1.0, abs=1e-5)


def test_beta_schedule_warmup_then_linear_20_to_2():
    s = BetaSchedule(total_iters=1000)
    assert s(0) is None and s(199) is None
    assert s(200) == pytest.approx(20.0)
    assert s(600) == pytest.approx(11.0)  # half-way through the decay
    assert s(1000) == pytest.approx(2.0)


def test_adaround_linear_beats_nearest_and_ends_hard():
    weight, bias, x, y, scale = _linear_problem()
    nearest_w = nearest_quantize(weight, scale, 0.0, -8, 7)
    mse_nearest = reconstruction_loss(F.linear(x, nearest_w, bias), y).item()

    r = AdaRoundWeight(weight, scale, 0.0, -8, 7)
    opt = RoundingOptimization(iters=1500, batch_size=64, reg_weight=0.01, lr=1e-2)
    optimize_rounding(
        lambda xb: F.linear(xb, r(), bias), [r], x, y, opt, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert r.soft is False
    h = r.rounding()
    assert set(h.unique().tolist()) <= {0.0, 1.0}  # hard 0/1 rounding at the end
    mse_ada = reconstruction_loss(F.linear(x, r(), bias), y).item()
    assert mse_ada < 0.8 * mse_nearest, (mse_ada, mse_nearest)
    # the regularizer drove the soft variables to (almost) 0/1, so hard rounding changed little
    soft = rectified_sigmoid(r.logits)
    assert ((soft > 0.05) & (soft < 0.95)).float().mean().item() < 0.05
    # every hard-rounded weight is on the grid and within one step of the float weight
    q = r() / scale
    torch.testing.assert_close(q, torch.round(q), atol=1e-4, rtol=0)
    assert ((r() - weight).abs() <= scale + 1e-6).all()


def test_soft_rounded_weights_stay_within_one_step_of_nearest():
    weight, bias, x, y, scale = _linear_problem(seed=1)
    r = AdaRoundWeight(weight, scale, 0.0, -8, 7)
    with torch.no_grad():
        r.logits.add_(torch.randn(r.logits.shape, generator=torch.Generator().manual_seed(3)) * 10)
    nearest_w = nearest_quantize(weight, scale, 0.0, -8, 7)
    assert ((r() - nearest_w).abs() <= scale + 1e-6).all()
    # and in the middle of an optimization
    opt = RoundingOptimization(iters=100, batch_size=32, lr=1e-1)
    seen = []

    def fwd(xb):
        w = r()
        seen.append(((w - nearest_w).abs() / scale).max().item())
        return F.linear(xb, w, bias)

    optimize_rounding(fwd, [r], x, y, opt, generator=torch.Generator().manual_seed(0), progress=False)
    assert max(seen) <= 1.0 + 1e-5


def test_asymmetric_zero_point_and_clamp():
    weight = torch.tensor([[-1.0, -0.26, 0.0, 0.49, 3.0]])
    scale, zp = torch.tensor([[0.1]]), torch.tensor([[5.0]])  # unsigned 4-bit, grid -0.5 .. 1.0
    r = AdaRoundWeight(weight, scale, zp, 0, 15)
    r.soft = False
    w = r()
    assert w.min().item() == pytest.approx(-0.5) and w.max().item() == pytest.approx(1.0)
    torch.testing.assert_close(nearest_quantize(weight, scale, zp, 0, 15)[0, 2], torch.tensor(0.0))


def test_bad_inputs_raise_one_line_value_errors():
    with pytest.raises(AdaRoundError, match="positive"):
        AdaRoundWeight(torch.ones(2, 2), torch.tensor([[0.0], [1.0]]))
    with pytest.raises(AdaRoundError, match="qmin"):
        AdaRoundWeight(torch.ones(2, 2), torch.ones(2, 1), 0.0, 3, 3)
    with pytest.raises(AdaRoundError, match="broadcast"):
        AdaRoundWeight(torch.ones(2, 2), torch.ones(3, 1))
    with pytest.raises(ValueError, match="targets"):
        r = AdaRoundWeight(torch.ones(2, 2), torch.ones(2, 1))
        optimize_rounding(lambda x: x, [r], torch.ones(4, 2), torch.ones(3, 2), RoundingOptimization(iters=1))
