"""Known-answer tests of dgh.quantization (tiny models built in code, random weights, a handful of images)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dgh.models import load_model
from dgh.quantization import (
    Algorithm,
    CalibrationError,
    FakeQuantizer,
    Preset,
    QuantConfig,
    QuantizedFileError,
    fold_batch_norms,
    is_power_of_two,
    iter_quantizers,
    load_quantized,
    quantize_model,
    save_quantized,
    set_quant_state,
    write_quantization_report,
)
from dgh.quantization.quantizers import integer_range
from dgh.quantization.thresholds import (
    pot_candidates,
    search_asymmetric_range,
    search_symmetric_threshold,
    weight_thresholds_symmetric,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync overhead


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


@pytest.fixture(scope="module")
def resnet20():
    loaded = load_model("resnet20_cifar10", "random")
    _randomize_bn(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def calib_images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- quantizers
def test_pot_scales_are_exact_powers_of_two():
    for signed in (True, False):
        for bits in (4, 8):
            q = FakeQuantizer(bits=bits, signed=signed, power_of_two=True)
            for t in (0.013, 0.5, 1.0, 3.7, 100.2):
                q.set_threshold(t)
                assert is_power_of_two(q.scale)
                # threshold rounded up: 2^ceil(log2 t)
                assert float(q.threshold()) == 2.0 ** math.ceil(math.log2(t))
    assert not is_power_of_two(torch.tensor([0.3]))


@pytest.mark.parametrize("symmetric,signed,per_channel", [(True, True, False), (True, False, False),
                                                          (False, False, False), (True, True, True),
                                                          (False, False, True)])
def test_quantize_dequantize_error_at_most_half_a_step(symmetric, signed, per_channel):
    g = torch.Generator().manual_seed(2)
    c = 5
    q = FakeQuantizer(bits=4, symmetric=symmetric, signed=signed, channel_axis=0 if per_channel else None,
                      num_channels=c)
    if symmetric:
        q.set_threshold(torch.rand(c if per_channel else 1, generator=g) + 0.5)
    else:
        q.set_range(-torch.rand(c if per_channel else 1, generator=g), torch.rand(c if per_channel else 1, generator=g) + 1)
    s = q.broadcast(q.scale, torch.zeros(c, 100))
    z = q.broadcast(q.zero_point, torch.zeros(c, 100))
    lo, hi = (q.qmin - z) * s, (q.qmax - z) * s
    x = lo + (hi - lo) * torch.rand(c, 100, generator=g)
    err = (q(x) - x).abs()
    assert torch.all(err <= s / 2 + 1e-6)
    # outputs lie on the integer grid
    grid = q(x) / s + z
    assert torch.allclose(grid, grid.round(), atol=1e-4)
    assert grid.min() >= q.qmin - 1e-4 and grid.max() <= q.qmax + 1e-4


def test_integer_ranges():
    assert integer_range(8, True) == (-128, 127)
    assert integer_range(8, False) == (0, 255)
    assert integer_range(4, True) == (-8, 7)
    with pytest.raises(ValueError):
        integer_range(9, True)


def test_straight_through_gradient_and_learnable_scale():
    q = FakeQuantizer(bits=4, signed=True, learnable=True)
    q.set_threshold(1.0)
    x = torch.tensor([-3.0, -0.4, 0.1, 0.3, 2.5], requires_grad=True)
    q(x).sum().backward()
    # identity inside [-T, T - s], zero outside (s = 1/8)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ thresholds
def _brute_force_mse(x, cands, bits, signed):
    errs = []
    for t in cands:
        q = FakeQuantizer(bits=bits, signed=signed)
        q.set_threshold(float(t))
        errs.append(float((q(x) - x).pow(2).mean()))
    return errs


def test_mse_search_matches_brute_force_pot():
    torch.manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))  # heavy tail: clipping pays off
    x[0] = 40.0  # a far outlier: min/max would waste the range on it
    max_abs = float(x.abs().max())
    cands = pot_candidates(max_abs)
    errs = _brute_force_mse(x, cands, 4, True)
    best = float(cands[int(torch.tensor(errs).argmin())])
    got = search_symmetric_threshold(x, max_abs, 4, True, power_of_two=True)
    assert got == best
    assert got < 2.0 ** math.ceil(math.log2(max_abs))  # it does clip


def test_mse_search_matches_brute_force_uniform_grid_and_asymmetric():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(4)).abs() ** 1.5
    max_abs = float(x.abs().max())
    n = 50
    cands = torch.linspace(1.0 / n, 1.0, n) * max_abs
    errs = _brute_force_mse(x, cands, 3, False)
    got = search_symmetric_threshold(x, max_abs, 3, False, power_of_two=False, n_candidates=n)
    assert got == pytest.approx(float(cands[int(torch.tensor(errs).argmin())]), rel=1e-6)
    # asymmetric: the chosen range is the brute-force optimum of the shrink grid
    lo, hi = float(x.min()) - 1.0, float(x.max())
    alphas = torch.linspace(1.0 / n, 1.0, n)
    best, best_err = None, math.inf
    for a in alphas.tolist():
        q = FakeQuantizer(bits=3, symmetric=False)
        q.set_range(lo * a, hi * a)
        e = float((q(x - 1.0) - (x - 1.0)).pow(2).mean())
        if e < best_err:
            best, best_err = (lo * a, hi * a), e
    got_lo, got_hi = search_asymmetric_range(x - 1.0, lo, hi, 3, n_candidates=n)
    assert (got_lo, got_hi) == pytest.approx(best, rel=1e-5)


def test_weight_per_channel_mse_matches_brute_force():
    w = torch.randn(3, 8, 3, 3, generator=torch.Generator().manual_seed(5))
    w[1] *= 10
    w[2, 0, 0, 0] = 30.0
    t = weight_thresholds_symmetric(w, 4, "mse", n_candidates=40)
    for c in range(3):
        cands = torch.linspace(0.2, 1.0, 40) * w[c].abs().max()
        errs = _brute_force_mse(w[c].reshape(-1), cands, 4, True)
        assert float(t[c]) == pytest.approx(float(cands[int(torch.tensor(errs).argmin())]), rel=1e-5)
    assert weight_thresholds_symmetric(w, 4, "minmax").tolist() == pytest.approx(w.abs().amax((1, 2, 3)).tolist())


# ----------------------------------------------------------------------------------------------- folding
class _FoldNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1, bias=True)  # conv with bias
        self.b3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.nn.functional.relu6(self.b2(self.dw(x)))
        return self.b3(self.c3(x))


def test_bn_folding_matches_unfolded_and_keeps_float_model():
    net = _FoldNet().eval()
    _randomize_bn(net, seed=7)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    folded, pairs = fold_batch_norms(net, x[:1])
    assert sorted(pairs) == [("c1", "b1"), ("c3", "b3"), ("dw", "b2")]
    assert isinstance(net.b1, nn.BatchNorm2d) and isinstance(folded.b1, nn.Identity)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ------------------------------------------------------------------------------------------ whole models
def test_w16a16_reproduces_float(resnet20, calib_images):
    qm = quantize_model(resnet20, calib_images, QuantConfig(preset="paper", w_bits=16, a_bits=16, bias_correction=False),
                        progress=False)
    x = calib_images  # the calibrated range: only rounding error, no clipping
    with torch.no_grad():
        ref, out = resnet20.model(x), qm(x)
    # 16-bit steps are ~range/65535 per tensor; 40 quantizers in series stay far below 1e-3 of the logit range
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    set_quant_state(qm, weights=False, activations=False)
    with torch.no_grad():
        assert (qm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()  # quantization off == folded float


def test_resnet20_coverage_counts(resnet20, calib_images):
    qm = quantize_model(resnet20, calib_images, QuantConfig(preset="pot"), progress=False)
    quantizers = dict(iter_quantizers(qm))
    weights = [n for n, q in quantizers.items() if q.role == "weight"]
    acts = {n: q for n, q in quantizers.items() if q.role != "weight"}
    assert len(weights) == 20  # 19 convs + linear
    adds = [n for n in acts if n.endswith("act_quantizers.add0")]
    assert len(adds) == 9  # one residual add per BasicBlock
    assert "input_quantizer" in acts
    assert "model.act_quantizers.avgpool0" in acts  # pooled features
    assert acts["model.linear.output_quantizer"].role == "output"  # logits
    conv_outputs = [n for n in acts if n.endswith("output_quantizer")]
    assert len(conv_outputs) == 20
    assert len(acts) == 1 + 20 + 9 + 1
    assert all(q.initialized and not q.bypass for q in quantizers.values())
    # pot: per-tensor activations with power-of-two scales; post-ReLU sites unsigned
    assert all(is_power_of_two(q.scale) and not q.is_per_channel for q in acts.values())
    assert not acts["model.layer1.0.conv1.output_quantizer"].signed  # conv -> BN -> ReLU: quantized after ReLU
    assert acts["model.layer1.0.conv2.output_quantizer"].signed  # conv -> BN -> add: before the add, signed
    # weights symmetric per-channel, signed
    wq = quantizers[weights[0]]
    assert wq.symmetric and wq.signed and wq.is_per_channel


def test_submodule_alone_applies_same_quantizers(resnet20, calib_images):
    qm = quantize_model(resnet20, calib_images, QuantConfig(preset="paper", w_bits=4, a_bits=4), progress=False)
    block = qm.model.layer2[1]
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone()))
    h2 = block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        qm(calib_images[:2])
    h1.remove()
    h2.remove()
    with torch.no_grad():
        alone = block(seen["in"])
    assert torch.equal(alone, seen["out"])
    # and activation quantization really acts inside the block
    set_quant_state(qm, weights=True, activations=False)
    with torch.no_grad():
        assert not torch.equal(block(seen["in"]), alone)


def test_quantized_file_round_trip(resnet20, calib_images, tmp_path):
    for preset in (Preset.POT, Preset.ACADEMIC):
        qm = quantize_model(resnet20, calib_images, QuantConfig(preset=preset, w_bits=4, a_bits=8), progress=False)
        path = save_quantized(qm, tmp_path / preset.value / "quantized.pt", meta={"calib": "random"})
        payload = torch.load(path, weights_only=True)  # tensors and plain types only
        assert payload["config"]["preset"] == preset.value and payload["config"]["w_bits"] == 4
        fresh = load_model("resnet20_cifar10", "random")  # random weights: everything must come from the file
        re = load_quantized(fresh, path.parent)
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(re(x), qm(x))
        csv = write_quantization_report(re, tmp_path / preset.value / "quantization_report.csv")
        lines = csv.read_text().splitlines()
        assert len(lines) == 1 + 51
        assert lines[0].startswith("name,kind,role,bits,signed")
    # academic: first/last weights 8 bit, output float (bypassed)
    q = dict(iter_quantizers(re))
    assert q["model.conv1.weight_quantizer"].bits == 8 and q["model.linear.weight_quantizer"].bits == 8
    assert q["model.layer1.0.conv1.weight_quantizer"].bits == 4
    assert q["model.linear.output_quantizer"].bypass


def test_bad_inputs_raise_clear_errors(resnet20, tmp_path):
    with pytest.raises(CalibrationError, match="empty"):
        quantize_model(resnet20, torch.zeros(0, 3, 32, 32), QuantConfig(), progress=False)
    with pytest.raises(CalibrationError):
        quantize_model(resnet20, torch.zeros(3, 32, 32), QuantConfig(), progress=False)
    with pytest.raises(ValueError, match="bit-width must be one of"):
        QuantConfig(w_bits=9)
    with pytest.raises(ValueError):
        QuantConfig(preset="fancy")
    with pytest.raises(QuantizedFileError, match="not found"):
        load_quantized(resnet20, tmp_path / "nothing")
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(QuantizedFileError):
        load_quantized(resnet20, tmp_path / "bad.pt")


def test_fewer_images_than_batch_and_minmax(resnet20):
    x = torch.randn(3, 3, 32, 32)
    qm = quantize_model(resnet20, x, QuantConfig(preset="pot", algorithm=Algorithm.MINMAX, batch_size=64),
                        progress=False)
    q = qm.input_quantizer
    # min/max pot: threshold is the smallest power of two >= max|x|
    assert float(q.threshold()) == 2.0 ** math.ceil(math.log2(float(x.abs().max())))


def test_bias_correction_known_answer():
    from dgh.models.spec import LoadedModel, ModelSpec

    conv = nn.Conv2d(3, 4, 1, bias=True).eval()
    spec = ModelSpec(name="tiny", family="test", task="classification", input_size=(4, 4), num_classes=4)
    loaded = LoadedModel(spec=spec, model=conv)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(11)) + 1.0  # non-zero channel means
    qm = quantize_model(loaded, x, QuantConfig(preset="pot", w_bits=2, a_bits=16, bias_correction=True),
                        progress=False)
    layer = qm.model
    with torch.no_grad():
        delta = (layer.quantized_weight() - conv.weight)[:, :, 0, 0]  # (4, 3)
        expected = conv.bias - delta @ x.mean((0, 2, 3))
    assert torch.allclose(layer.bias, expected, atol=1e-6)
    assert qm.quant_config["bias_correction"] is True
    # the float layer is untouched and the mean output error over the calibration set vanishes
    with torch.no_grad():
        from dgh.quantization import set_quant_state as sqs

        sqs(qm, weights=True, activations=False)
        err = (qm(x) - conv(x)).mean((0, 2, 3))
    assert err.abs().max() < 1e-5
    # off by default for the paper preset
    qp = quantize_model(loaded, x, QuantConfig(preset="paper", w_bits=2), progress=False)
    assert qp.quant_config["bias_correction"] is False and torch.allclose(qp.model.bias, conv.bias)


def test_learnable_pot_scale_stays_power_of_two_when_frozen():
    q = FakeQuantizer(bits=8, signed=False, power_of_two=True)
    q.set_threshold(3.0)
    q.make_learnable(True)
    with torch.no_grad():
        q.scale.mul_(1.3)  # an LSQ step moved it off the grid; forward projects it
    x = torch.rand(100) * 4
    y = q(x)
    q.make_learnable(False)
    assert is_power_of_two(q.scale) and torch.equal(q(x), y)


def test_activation_observer_subsample_is_proportional_to_batch_size():
    """A partial last batch (1/4 of the elements) contributes 1/4 of the draws: every image weighs the same."""
    from dgh.quantization.thresholds import ActivationObserver

    obs = ActivationObserver(samples_per_batch=32, seed=0)
    obs("site", None, torch.randn(4, 250))
    obs("site", None, torch.randn(1, 250))
    st = obs.stats["site"]
    assert [t.numel() for t in st.samples] == [32, 8]
    assert st.n_seen == 1250
