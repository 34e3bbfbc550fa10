"""Known-answer tests of dgh.stats: BN-distance split, pixel clamp fractions, output coverage, prediction entropy,
quantizer clipping rates, and the figures."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from dgh.generation.engine import bn_distance
from dgh.models.spec import LoadedModel, ModelSpec
from dgh.quantization.capture import build_quantized_model, discover_sites, iter_quantizers
from dgh.quantization.quantizers import FakeQuantizer
from dgh.stats import (
    PIXEL_BOUND_TOL,
    CalibrationStats,
    ClipMode,
    StatsError,
    calibration_set_stats,
    clip_counts,
    compare_thresholds,
    entropy_nats,
    prediction_stats,
    quantized_model_stats,
    threshold_summary,
)
from dgh.stats.plots import plot_bn_layers, plot_clipping, plot_output_ranges, plot_setting

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBNNet(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear with non-trivial running statistics."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ChannelMeanLogits(nn.Module):
    """No BN: logits = per-channel spatial mean (3 classes), so the predicted class is the brightest channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class TwoLevels(nn.Module):
    """A detector-like model returning two 'head levels': channel 0 and 2 x channels 1-2."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, :1], 2 * x[:, 1:]]


def _spec(task: str = "classification", num_classes: int = 3) -> ModelSpec:
    return ModelSpec(name="tiny", family="test", task=task, input_size=(8, 8), num_classes=num_classes)


def _loaded(model: nn.Module, task: str = "classification") -> LoadedModel:
    return LoadedModel(spec=_spec(task), model=model.eval())


def _images(n: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 1.3 + 0.2


# -------------------------------------------------------------------------------------------- BN distance
def test_layer_terms_add_up_to_engine_bn_distance() -> None:
    loaded = _loaded(TinyBNNet())
    x = _images(10)
    for lambda_sigma, pseudo in ((10.0, True), (1.0, False)):
        st = calibration_set_stats(loaded, x, lambda_sigma=lambda_sigma, input_pseudo_layer=pseudo, batch_size=4)
        ref = bn_distance(loaded.model, x, spec=loaded.spec, lambda_sigma=lambda_sigma, input_pseudo_layer=pseudo,
                          batch_size=4)
        assert st.bn_distance == ref  # same moments, same loss code
        total = sum(layer.mean_term + layer.std_term for layer in st.bn_layers)
        assert total == pytest.approx(ref, rel=1e-12)
        assert len(st.bn_layers) == 2 + int(pseudo)
        assert [layer.index for layer in st.bn_layers] == list(range(len(st.bn_layers)))
        assert (st.bn_layers[0].name == "input") == pseudo
        summary = st.summary()
        assert summary["stats.bn_mean_part"] + summary["stats.bn_std_part"] == pytest.approx(ref, rel=1e-12)


def test_layer_terms_match_brute_force_and_do_not_depend_on_batch_size() -> None:
    loaded = _loaded(TinyBNNet())
    x = _images(9)
    eps, lam = 1e-6, 10.0
    st = calibration_set_stats(loaded, x, batch_size=4, std_eps=eps, lambda_sigma=lam)
    st_one = calibration_set_stats(loaded, x, batch_size=9, std_eps=eps, lambda_sigma=lam)
    # the forward is float32 (per-image moments float32, accumulated in float64): batch-size changes move only the
    # float32 rounding of the activations (~1e-7 relative)
    assert st_one.bn_distance == pytest.approx(st.bn_distance, rel=1e-6)
    # brute force: BN inputs of all images at once, float64
    model = loaded.model.double()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0])) for n, m in
             (("bn1", model.bn1), ("bn2", model.bn2))]
    with torch.no_grad():
        model(x.double())
    for h in hooks:
        h.remove()
    model.float()
    n_layers = 3
    by_name = {layer.name: layer for layer in st.bn_layers}
    for name, bn in (("bn1", model.bn1), ("bn2", model.bn2)):
        a = seen[name]
        mu = a.mean((0, 2, 3))
        sd = torch.sqrt(a.var((0, 2, 3), unbiased=False) + eps)
        t_sd = torch.sqrt(bn.running_var.double() + eps)
        mean_sq = float(((mu - bn.running_mean.double()) ** 2).mean())
        std_sq = float(((sd - t_sd) ** 2).mean())
        assert by_name[name].channels == bn.num_features
        assert by_name[name].mean_sq == pytest.approx(mean_sq, rel=1e-6)
        assert by_name[name].std_sq == pytest.approx(std_sq, rel=1e-6)
        assert by_name[name].mean_term == pytest.approx(mean_sq / n_layers, rel=1e-6)
        assert by_name[name].std_term == pytest.approx(lam * std_sq / n_layers, rel=1e-6)
    # the input pseudo-layer: target mean 0, std sqrt(1 + eps) (ImageNet normalization); the target is stored in
    # float32 like every BN target, so agreement is to float32 rounding
    xi = x.double()
    mu = xi.mean((0, 2, 3))
    sd = torch.sqrt(xi.var((0, 2, 3), unbiased=False) + eps)
    assert by_name["input"].mean_sq == pytest.approx(float((mu**2).mean()), rel=1e-9)
    assert by_name["input"].std_sq == pytest.approx(float(((sd - math.sqrt(1 + eps)) ** 2).mean()), rel=1e-6)


# ----------------------------------------------------------------------------------------------- pixels
def test_clamp_fractions_and_pixel_moments_on_a_constructed_set() -> None:
    g = torch.Generator().manual_seed(3)
    pix = torch.rand(4, 3, 8, 8, generator=g) * 0.8 + 0.1  # strictly inside (0.1, 0.9)
    flat = pix.view(4, 3, -1)
    flat[0, 0, :10] = 0.0  # channel 0: 10 black pixels
    flat[1, 1, :5] = 1.0  # channel 1: 5 white pixels
    flat[2, 2, :3] = 0.001  # channel 2: 3 pixels within half an 8-bit level of 0 (count as low)
    flat[3, 2, :2] = 0.003  # ... and 2 just outside it (do not count)
    flat[3, 0, :4] = 1.0 - 0.5 * PIXEL_BOUND_TOL  # channel 0: 4 near-white pixels
    spec = _spec()
    st = calibration_set_stats(_loaded(TinyBNNet()), spec.normalize(pix), batch_size=3)
    per_channel = 4 * 8 * 8
    assert st.pixels.at_low == pytest.approx([10 / per_channel, 0.0, 3 / per_channel], abs=1e-12)
    assert st.pixels.at_high == pytest.approx([4 / per_channel, 5 / per_channel, 0.0], abs=1e-12)
    assert st.pixels.at_low_all == pytest.approx(13 / (3 * per_channel), abs=1e-12)
    assert st.pixels.at_high_all == pytest.approx(9 / (3 * per_channel), abs=1e-12)
    p64 = pix.double()
    assert st.pixels.mean == pytest.approx(p64.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert st.pixels.std == pytest.approx(p64.std((0, 2, 3), unbiased=False).tolist(), abs=1e-6)
    assert st.summary()["stats.clip_low"] == st.pixels.at_low_all


# ------------------------------------------------------------------------------------ outputs, predictions
def test_entropy_of_known_histograms() -> None:
    assert entropy_nats([4, 2, 2, 0]) == pytest.approx(1.5 * math.log(2), rel=1e-14)
    assert entropy_nats([5, 5, 5, 5]) == pytest.approx(math.log(4), rel=1e-14)
    assert entropy_nats([0, 7, 0]) == 0.0
    p = prediction_stats([4, 2, 2, 0])
    assert (p.distinct, p.counts) == (3, [4, 2, 2, 0])
    assert p.max_entropy_nats == pytest.approx(math.log(4))
    with pytest.raises(StatsError):
        entropy_nats([0, 0])
    with pytest.raises(StatsError):
        entropy_nats([3, -1])


def test_predictions_and_output_ranges_of_a_classifier() -> None:
    # 8 images; image i's brightest channel is its class: classes [0,0,0,0,1,1,2,2]
    classes = [0, 0, 0, 0, 1, 1, 2, 2]
    x = torch.zeros(8, 3, 8, 8)
    for i, c in enumerate(classes):
        x[i] = torch.tensor([0.1 * i, -0.2, 0.05]).view(3, 1, 1)
        x[i, c] += 2.0
    st = calibration_set_stats(_loaded(ChannelMeanLogits()), x, batch_size=3)
    assert st.bn_distance is None and st.bn_layers == []
    assert st.predictions.counts == [4, 2, 2]
    assert st.predictions.entropy_nats == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert st.predictions.distinct == 3
    logits = x.mean((2, 3))
    ranges = (logits.amax(1) - logits.amin(1)).double()
    out = st.outputs[0]
    assert out.shape == [3]
    assert out.ranges == pytest.approx(ranges.tolist(), rel=1e-6)
    assert out.range_mean == pytest.approx(float(ranges.mean()), rel=1e-6)
    assert out.range_percentiles["p50"] == pytest.approx(float(ranges.median() + ranges.sort().values[4]) / 2, rel=1e-6)
    assert (out.out_min, out.out_max) == (pytest.approx(float(logits.min())), pytest.approx(float(logits.max())))
    summary = st.summary(reference=st)
    assert summary["stats.output_range_ratio"] == pytest.approx(1.0)
    assert summary["stats.pred_entropy"] == st.predictions.entropy_nats


def test_detector_outputs_per_level() -> None:
    x = _images(5)
    st = calibration_set_stats(_loaded(TwoLevels(), task="detection"), x, batch_size=2)
    assert st.predictions is None
    assert [o.shape for o in st.outputs] == [[1, 8, 8], [2, 8, 8]]
    for o, z in zip(st.outputs, (x[:, :1], 2 * x[:, 1:])):
        flat = z.flatten(1)
        assert o.ranges == pytest.approx((flat.amax(1) - flat.amin(1)).tolist(), rel=1e-6)
        assert o.out_min == pytest.approx(float(z.min())) and o.out_max == pytest.approx(float(z.max()))
    assert st.output_range_mean == pytest.approx(st.outputs[0].range_mean + st.outputs[1].range_mean)


def test_json_round_trip_and_bad_input() -> None:
    loaded = _loaded(TinyBNNet())
    st = calibration_set_stats(loaded, _images(4), source="noise")
    again = CalibrationStats.model_validate_json(st.model_dump_json())
    assert again == st
    with pytest.raises(StatsError, match="non-empty"):
        calibration_set_stats(loaded, torch.zeros(0, 3, 8, 8))
    with pytest.raises(StatsError, match="model takes"):
        calibration_set_stats(loaded, torch.zeros(2, 3, 9, 8))
    with pytest.raises(StatsError, match="finite"):
        calibration_set_stats(loaded, torch.full((2, 3, 8, 8), float("nan")))


# -------------------------------------------------------------------------------------------- clipping
def test_clip_counts_of_a_known_quantizer() -> None:
    q = FakeQuantizer(bits=4, symmetric=True, signed=True)
    q.set_threshold(2.0)  # s = 2 / 8 = 0.25, integers [-8, 7]: representable [-2, 1.75]
    x = torch.arange(-300, 301, dtype=torch.float32) / 100  # -3.00 .. 3.00 step 0.01
    assert clip_counts(q, x) == (100, 125)  # -3.00..-2.01 and 1.76..3.00
    qa = FakeQuantizer(bits=8, symmetric=False)
    qa.set_range(-1.0, 3.0)  # s = 4/255, z = round(255/4) = 64: [-64 s, 191 s] = [-1.0039, 2.996]
    s = 4 / 255
    lo, hi = -64 * s, 191 * s
    y = torch.linspace(-2, 4, 1001)
    assert clip_counts(qa, y) == (int((y < lo).sum()), int((y > hi).sum()))
    assert int((y < lo).sum()) == 167  # y_k = -2 + 0.006 k < -1.00392 for k <= 166


def _tiny_quantized(input_threshold: float) -> nn.Module:
    model = TinyBNNet().eval()
    example = torch.zeros(1, 3, 8, 8)
    qmodel = build_quantized_model(model, example)
    discover_sites(qmodel, example)
    for name, q in iter_quantizers(qmodel):
        if q.role == "weight":
            q.set_threshold(torch.full_like(q.scale, 100.0))
        else:
            q.bits = 8
            q.set_threshold(1000.0)
    qmodel.input_quantizer.bits = 4
    qmodel.input_quantizer.set_threshold(input_threshold)
    return qmodel


def test_quantized_model_clipping_rates_on_known_data() -> None:
    qmodel = _tiny_quantized(2.0)  # input site: representable [-2, 1.75]
    x = ((torch.arange(384, dtype=torch.float32) - 192) / 64).view(2, 3, 8, 8)  # -3 .. 2.984375 step 1/64
    before = {n: q.enabled for n, q in iter_quantizers(qmodel)}
    for mode in ClipMode:
        qs = quantized_model_stats(qmodel, x, source="known", mode=mode, batch_size=1)
        sites = {s.name: s for s in qs.sites}
        inp = sites["input_quantizer"]
        assert (inp.q_low, inp.q_high) == (-2.0, 1.75)
        assert inp.n_values == 384
        assert inp.clip_low == pytest.approx(64 / 384)  # -3 .. -2 - 1/64: 64 values
        assert inp.clip_high == pytest.approx(79 / 384)  # 1.765625 .. 2.984375: 79 values
        assert (inp.data_min, inp.data_max) == (-3.0, 2.984375)
        others = [s for s in qs.sites if s.name != "input_quantizer"]
        assert len(others) >= 4 and all(s.clip == 0.0 for s in others)  # +-1000 covers everything
        summary = qs.summary()
        assert summary["stats.q_clip_max"] == pytest.approx(143 / 384)
        assert summary["stats.q_clip_low"] == pytest.approx(64 / 384 / len(qs.sites))
        assert summary["stats.q_sites_clipping"] == 1.0
    assert {n: q.enabled for n, q in iter_quantizers(qmodel)} == before  # switches restored


def test_quantized_mode_sees_the_quantized_input() -> None:
    # with the input quantized to [-2, 1.75], the first conv's output in quantized mode is computed from clipped
    # input; in float mode from the raw input: the conv output ranges therefore differ
    qmodel = _tiny_quantized(2.0)
    x = ((torch.arange(384, dtype=torch.float32) - 192) / 64).view(2, 3, 8, 8)
    q_sites = {s.name: s for s in quantized_model_stats(qmodel, x, mode=ClipMode.QUANTIZED).sites}
    f_sites = {s.name: s for s in quantized_model_stats(qmodel, x, mode=ClipMode.FLOAT).sites}
    conv1 = "model.conv1.output_quantizer"
    assert conv1 in q_sites
    assert q_sites[conv1].data_max != pytest.approx(f_sites[conv1].data_max, rel=1e-3)


def test_thresholds_against_a_reference_model_with_known_ranges() -> None:
    # the same tiny model quantized twice: the input quantizer (4 bit, signed symmetric) at threshold 2 and at 8;
    # every other site at 1000 in both. Representable upper ends: 2 * 7/8 and 8 * 7/8 -> log2 ratio exactly -2.
    x = _images(2)
    narrow = quantized_model_stats(_tiny_quantized(2.0), x)
    real = quantized_model_stats(_tiny_quantized(8.0), x)
    sites = compare_thresholds(narrow, real)
    by_name = {s.name: s for s in sites}
    inp = by_name["input_quantizer"]
    assert (inp.q_high, inp.ref_q_high) == (1.75, 7.0)
    assert (inp.q_low, inp.ref_q_low) == (-2.0, -8.0)
    assert inp.log2_high == -2.0 and inp.log2_low == -2.0
    others = [s for s in sites if s.name != "input_quantizer"]
    assert others and all(s.log2_high == 0.0 for s in others)
    assert [s.name for s in sites] == [s.name for s in narrow.sites if s.quantized]
    summary = threshold_summary(sites)
    assert summary["stats.q_thr_log2_min"] == -2.0 and summary["stats.q_thr_log2_max"] == 0.0
    assert summary["stats.q_thr_log2_mean"] == pytest.approx(-2.0 / len(sites))
    assert (summary["stats.q_sites_narrower"], summary["stats.q_sites_wider"]) == (1.0, 0.0)
    flipped = threshold_summary(compare_thresholds(real, narrow))
    assert (flipped["stats.q_thr_log2_max"], flipped["stats.q_sites_wider"]) == (2.0, 1.0)
    other_model = quantized_model_stats(_tiny_quantized(2.0), x).model_copy(update={"sites": []})
    with pytest.raises(StatsError, match="share no"):
        compare_thresholds(narrow, other_model)


# ---------------------------------------------------------------------------------------------- figures
def test_plots_write_pngs(tmp_path) -> None:
    loaded = _loaded(TinyBNNet())
    a = calibration_set_stats(loaded, _images(6, seed=1), source="real")
    b = calibration_set_stats(loaded, _images(6, seed=2) * 3, source="dgh")
    for fn, name in ((plot_bn_layers, "bn.png"), (plot_output_ranges, "ranges.png")):
        path = fn({"real": a, "dgh": b}, tmp_path / name)
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
    qmodel = _tiny_quantized(2.0)
    qs = quantized_model_stats(qmodel, _images(3))
    with Image.open(plot_clipping({"dgh": qs}, tmp_path / "clip.png")) as im:
        assert im.format == "PNG"
    real = quantized_model_stats(_tiny_quantized(8.0), _images(3))
    cmp = {"dgh": compare_thresholds(qs, real), "real": compare_thresholds(real, real)}
    with Image.open(plot_setting({"dgh": qs, "real": real}, cmp, tmp_path / "setting.png")) as im:
        assert im.format == "PNG" and im.size[0] > 300
    other = calibration_set_stats(_loaded(ChannelMeanLogits()), _images(2))
    with pytest.raises(StatsError):
        plot_bn_layers({"x": other}, tmp_path / "none.png")
