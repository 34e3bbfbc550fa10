"""The lean quantized forward gives the reference fake-quant model's outputs bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgh.models import load_model
from dgh.quantization import QuantConfig, load_quantized, quantize_model, save_quantized
from dgh.quantization.lean import (
    LeanQuantizedModel,
    ReplayQuantizedModel,
    traced_lean_forward,
    compile_pays_off,
    compiled_fake_quantize,
    fused_fake_quantize,
    fused_fake_quantize_symmetric,
    lean_forward_model,
)
from dgh.quantization.quantizers import fake_quantize
from dgh.runs.evaluate import model_to_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _hard_values(scale: float) -> torch.Tensor:
    """Random values plus the cases where rounding is delicate: exact ties k + 0.5 (half to even), tiny negatives
    (round to -0.0), exact zeros of both signs, values far outside the clamp range."""
    g = torch.Generator().manual_seed(0)
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale
    tiny = -torch.rand(200, generator=g) * 0.49 * scale
    return torch.cat([torch.randn(4000, generator=g) * 40 * scale, ties, tiny, torch.tensor([0.0, -0.0, 1e6, -1e6])])


@pytest.mark.parametrize("scale", [2.0**-5, 0.0371, 3.3])
@pytest.mark.parametrize(("zp", "qmin", "qmax"), [(0.0, -128, 127), (0.0, 0, 15), (3.0, 0, 255), (0.0, -8, 7)])
def test_fused_fake_quantize_is_bit_identical(scale: float, zp: float, qmin: int, qmax: int) -> None:
    x = _hard_values(scale)
    s, z = torch.tensor(scale), torch.tensor(zp)
    ref = fake_quantize(x, s, z, qmin, qmax)
    assert torch.equal(_bits(fused_fake_quantize(x, s, z, qmin, qmax)), _bits(ref))


@pytest.mark.parametrize("scale", [2.0**-5, 0.0371, 3.3, 2.0**3])
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 15), (0, 255), (-8, 7), (-32768, 32767)])
def test_fused_fake_quantize_symmetric_is_bit_identical(scale: float, qmin: int, qmax: int) -> None:
    x = torch.cat([_hard_values(scale), torch.tensor([float("nan"), 1e-45, -1e-45])])
    s, z = torch.tensor(scale), torch.tensor(0.0)
    ref = fake_quantize(x, s, z, qmin, qmax)
    out = fused_fake_quantize_symmetric(x, s, float(s), torch.zeros(()), qmin, qmax)
    assert torch.equal(_bits(out), _bits(ref))
    assert (_bits(out) == _bits(torch.tensor(-0.0))).sum() == 0  # no negative zero survives, as in the reference
    # infinities: the reference's straight-through rounding makes them NaN, both fused kernels clamp them alike
    inf = torch.tensor([float("inf"), -float("inf")]) * torch.ones(5, 1)
    assert torch.equal(_bits(fused_fake_quantize_symmetric(inf, s, float(s), torch.zeros(()), qmin, qmax)),
                       _bits(fused_fake_quantize(inf, s, z, qmin, qmax)))


def test_traced_replay_requantizes_no_weights(resnet20) -> None:
    """The trace records the cached fake-quantized weights and quantizer parameters as constants: per activation
    site only the four ops of :func:`fused_fake_quantize_symmetric` remain, and no weight is re-quantized."""
    g = torch.Generator().manual_seed(8)
    qmodel = quantize_model(resnet20, torch.randn(4, 3, 32, 32, generator=g), QuantConfig(preset="pot"),
                            device="cpu", progress=False)
    replay = traced_lean_forward(qmodel, torch.randn(2, 3, 32, 32, generator=g))
    kinds = [n.kind() for n in replay.inlined_graph.nodes()]
    n_conv = kinds.count("aten::_convolution") + kinds.count("aten::linear")
    assert n_conv == 20  # 19 convs + the classifier
    assert kinds.count("aten::round_") == kinds.count("aten::div")  # one div per activation site, none per weight
    assert "aten::round" not in kinds and "aten::sub_" not in kinds


def test_fused_fake_quantize_per_channel_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=g)
    s = (torch.rand(8, generator=g) * 0.1 + 0.01).view(8, 1, 1, 1)
    z = torch.zeros(8).view(8, 1, 1, 1)
    assert torch.equal(_bits(fused_fake_quantize(w, s, z, -8, 7)), _bits(fake_quantize(w, s, z, -8, 7)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


@pytest.fixture(scope="module")
def resnet20():
    loaded = load_model("resnet20_cifar10", "random")
    _randomize_bn(loaded.model)
    return loaded


@pytest.mark.parametrize("preset", ["pot", "paper", "academic"])
def test_lean_resnet20_bit_identical(resnet20, preset: str) -> None:
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(8, 3, 32, 32, generator=g)
    qmodel = quantize_model(resnet20, calib, QuantConfig(preset=preset, w_bits=4, a_bits=8),
                            device="cpu", progress=False)
    lean = lean_forward_model(qmodel)
    x = torch.randn(5, 3, 32, 32, generator=g) * 1.5
    with torch.no_grad():
        ref = qmodel(x)
        out = lean(x)
        again = lean(x)  # second call: cached weights
    with torch.inference_mode():  # how evaluation calls it
        inference = lean(x)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(again), _bits(ref))
    assert torch.equal(_bits(inference), _bits(ref))
    assert not torch.equal(ref, resnet20.model(x))  # quantization is really on
    # the quantizers got their class forward back: the eager model is untouched
    assert all("forward" not in m.__dict__ for m in qmodel.modules())


def test_lean_sees_later_weight_changes_and_falls_back_under_grad(resnet20) -> None:
    g = torch.Generator().manual_seed(3)
    calib = torch.randn(4, 3, 32, 32, generator=g)
    qmodel = quantize_model(resnet20, calib, QuantConfig(preset="pot"), device="cpu", progress=False)
    lean = lean_forward_model(qmodel)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        lean(x)  # fills the weight cache
        qmodel.model.conv1.weight.mul_(0.5)  # in place: the cache must notice
        assert torch.equal(_bits(lean(x)), _bits(qmodel(x)))
    out = lean(x.requires_grad_(True))  # grad mode: the reference path, gradients flow
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lean_small_detector_bit_identical() -> None:
    loaded = load_model("yolov5n", "random", imgsz=64)
    _randomize_bn(loaded.model)
    g = torch.Generator().manual_seed(4)
    calib = torch.rand(4, 3, 64, 64, generator=g)
    qmodel = quantize_model(loaded, calib, QuantConfig(preset="pot"), device="cpu", progress=False)
    lean = lean_forward_model(qmodel)
    x = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = qmodel(x)
        out = lean(x)
    ref_t = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    out_t = [out] if isinstance(out, torch.Tensor) else list(out)
    assert len(ref_t) == len(out_t) >= 1
    for a, b in zip(ref_t, out_t):
        assert torch.equal(_bits(a), _bits(b))


def test_lean_rejects_a_float_model(resnet20) -> None:
    with pytest.raises(TypeError, match="QuantizedModel"):
        LeanQuantizedModel(resnet20.model)


def test_compiled_fake_quantize_is_bit_identical() -> None:
    fq = compiled_fake_quantize()
    for scale in (2.0**-5, 0.0371):
        x = _hard_values(scale)
        s, z = torch.tensor(scale), torch.tensor(0.0)
        assert torch.equal(_bits(fq(x, s, z, -128, 127)), _bits(fake_quantize(x, s, z, -128, 127)))


def test_compile_pays_off_only_for_large_cpu_evaluations() -> None:
    assert not compile_pays_off(10_000, (32, 32))  # CIFAR-10 test set
    assert compile_pays_off(50_000, (224, 224))  # ImageNet validation
    assert compile_pays_off(5_000, (640, 640))  # COCO val2017
    assert compile_pays_off(10, (32, 32), "cuda")


def test_evaluation_loads_a_saved_model_behind_the_lean_forward(resnet20, tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    qmodel = quantize_model(resnet20, torch.randn(4, 3, 32, 32, generator=g), QuantConfig(preset="pot"),
                            device="cpu", progress=False)
    save_quantized(qmodel, tmp_path / "quantized.pt")
    net = model_to_evaluate(resnet20, tmp_path)
    assert isinstance(net, ReplayQuantizedModel)
    reference = load_quantized(resnet20, tmp_path / "quantized.pt")
    with torch.inference_mode():
        for n in (4, 3):  # the first call traces; a smaller last batch replays the same trace
            x = torch.randn(n, 3, 32, 32, generator=g)
            assert torch.equal(_bits(net(x)), _bits(reference(x)))
    assert net._replay is not None and not net.replay_failed


@pytest.mark.parametrize("name", ["resnet20_cifar10", "yolov5n"])
def test_traced_replay_bit_identical_at_other_batch_sizes(name: str) -> None:
    size = 32 if name == "resnet20_cifar10" else 64
    loaded = load_model(name, "random", imgsz=None if name == "resnet20_cifar10" else size)
    _randomize_bn(loaded.model)
    g = torch.Generator().manual_seed(7)
    qmodel = quantize_model(loaded, torch.rand(4, 3, size, size, generator=g), QuantConfig(preset="pot"),
                            device="cpu", progress=False)
    replay = traced_lean_forward(qmodel, torch.rand(4, 3, size, size, generator=g))
    x = torch.rand(3, 3, size, size, generator=g)
    with torch.inference_mode():
        ref, out = qmodel(x), replay(x)
    ref_t = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    out_t = [out] if isinstance(out, torch.Tensor) else list(out)
    assert len(ref_t) == len(out_t) >= 1
    for a, b in zip(ref_t, out_t):
        assert torch.equal(_bits(a), _bits(b))
