"""Graph coverage on detectors (random weights, built from their YAML, tiny input): every Concat, every residual
add, every upsample/pool and every raw Detect output is quantized, without model-specific code."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn
from torchvision.models import get_model_weights
from typer.testing import CliRunner

from dgh.cli import app
from dgh.models import load_model
from dgh.models.registry import RANDOM_WEIGHTS, get_spec, list_models
from dgh.models.spec import LoadedModel, ModelSpec
from dgh.quantization import (
    QUANT_LAYER_TYPES,
    CaptureError,
    QuantConfig,
    check_supported_modules,
    fold_batch_norms,
    iter_quantizers,
    load_quantized,
    quantize_model,
    save_quantized,
    set_quant_state,
)
from dgh.quantization.layers import FLOAT_LAYER_TYPES, to_quant_layer
from tests.quant_audit import audit_coverage

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync overhead


def _on_grid(t: torch.Tensor, q) -> bool:
    v = t / q.scale.reshape(()) + q.zero_point.reshape(())
    return bool(torch.allclose(v, v.round(), atol=1e-3))


def test_yolov5n_every_concat_and_detect_output_quantized():
    loaded = load_model("yolov5n", RANDOM_WEIGHTS, imgsz=64)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm = quantize_model(loaded, images, QuantConfig(preset="pot", samples_per_site=4096), progress=False)
    quantizers = dict(iter_quantizers(qm))

    concat_names = [n for n, m in qm.named_modules() if type(m).__name__ == "Concat"]
    assert len(concat_names) == 4  # the YOLOv5 v6 neck has 4 Concat layers
    for name in concat_names:
        assert quantizers[f"{name}.act_quantizers.cat0"].initialized
    # C3 blocks also concatenate inside their forward (torch.cat in C3.forward)
    c3 = [n for n, m in qm.named_modules() if type(m).__name__ == "C3"]
    assert c3 and all(f"{n}.act_quantizers.cat0" in quantizers for n in c3)
    # bottleneck residual adds in the backbone C3 blocks, SPPF's 3 max-pools, 2 upsamples
    assert sum(n.endswith("act_quantizers.add0") for n in quantizers) == 1 + 2 + 3 + 1
    assert sum(".act_quantizers.maxpool0" in n for n in quantizers) == 3
    assert sum(n.endswith("act_quantizers.upsample0") for n in quantizers) == 2
    # every conv has a weight quantizer and an output site
    layers = [n for n, m in qm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]
    assert all(quantizers[f"{n}.weight_quantizer"].initialized for n in layers)
    assert all(quantizers[f"{n}.output_quantizer"].initialized for n in layers)

    # raw Detect outputs: one quantizer each, role "output", and the returned tensors lie on its grid
    outputs = {n: q for n, q in quantizers.items() if q.role == "output"}
    head = [n for n, m in qm.named_modules() if type(m).__name__ == "AnchorDetect"][0]
    assert sorted(outputs) == [f"{head}.m.{i}.output_quantizer" for i in range(3)]
    with torch.no_grad():
        raw = qm(images)
    assert [tuple(r.shape) for r in raw] == [tuple(r.shape) for r in loaded.model(images)]
    for i, r in enumerate(raw):
        assert _on_grid(r, outputs[f"{head}.m.{i}.output_quantizer"])
    # the input is quantized too
    assert quantizers["input_quantizer"].initialized and not quantizers["input_quantizer"].signed


def test_ultralytics_yolov8n_from_yaml_is_covered():
    pytest.importorskip("ultralytics")
    try:
        loaded = load_model("yolov8n", RANDOM_WEIGHTS, imgsz=64)
    except Exception as exc:  # noqa: BLE001 - the registry may not build this name offline
        pytest.skip(f"yolov8n random build unavailable: {exc}")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm = quantize_model(loaded, images, QuantConfig(preset="paper", samples_per_site=4096), progress=False)
    quantizers = dict(iter_quantizers(qm))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in loaded.model.modules())
    assert sum(q.role == "weight" for q in quantizers.values()) == n_convs
    assert sum(".act_quantizers.cat" in n for n in quantizers) >= 6  # C2f concats + neck Concats
    assert sum(q.role == "output" for q in quantizers.values()) >= 3
    with torch.no_grad():
        raw = qm(images)
    ref = loaded.model(images)
    assert [tuple(r.shape) for r in raw] == [tuple(r.shape) for r in ref]


# ------------------------------------------------------------------------------ conv subclasses with own forward
class StaticSamePadConv2d(nn.Conv2d):
    """The lukemelas EfficientNet ``Conv2dStaticSamePadding``: TensorFlow "same" padding computed once for a fixed
    image size, applied by a ``ZeroPad2d`` in forward (the conv itself has padding 0)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _SamePadNet(nn.Module):
    """Stride-2 "same" stem (27 -> 14 only with the subclass padding), then residual blocks whose convs pad
    through their own forward: without that padding the residual add sees mismatched shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StaticSamePadConv2d(3, 8, 3, stride=2, image_size=27, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = Conv2dSame(8, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = Conv2dSameExport(8, 8, 3, groups=8)
        self.c3 = StaticSamePadConv2d(8, 8, 4, image_size=14)  # even kernel: asymmetric padding
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = x + F.relu6(self.bn1(self.c1(x)))
        x = x + self.c3(F.relu(self.c2(x)))
        return self.head(x.mean((2, 3)))


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def _classifier(model: nn.Module, size: int, name: str = "test_net") -> LoadedModel:
    spec = ModelSpec(name=name, family="test", task="classification", input_size=(size, size))
    return LoadedModel(spec=spec, model=model.eval())


def _near_lossless(loaded: LoadedModel, images: torch.Tensor) -> tuple[float, float]:
    """Max |quantized - float| / max |float| at W16A16 and with every quantizer off."""
    qm = quantize_model(loaded, images, QuantConfig(preset="paper", w_bits=16, a_bits=16, bias_correction=False),
                        progress=False)
    with torch.no_grad():
        ref = loaded.model(images)
        w16 = float((qm(images) - ref).abs().max() / ref.abs().max())
        set_quant_state(qm, weights=False, activations=False)
        off = float((qm(images) - ref).abs().max() / ref.abs().max())
    return w16, off


def test_conv_subclasses_keep_their_same_padding(tmp_path):
    torch.manual_seed(0)
    net = _SamePadNet()
    _randomize_bn(net)
    images = torch.randn(3, 3, 27, 27, generator=torch.Generator().manual_seed(1))
    loaded = _classifier(net, 27)
    # 16-bit steps are ~range/65535 per tensor; a dozen quantizers in series stay far below 1e-3 of the logit range
    w16, off = _near_lossless(loaded, images)
    assert w16 <= 1e-3 and off <= 1e-5  # quantization off == the BN-folded float network
    qm = quantize_model(loaded, images, QuantConfig(preset="pot"), progress=False)
    for name in ("stem", "c1", "c2", "c3"):
        layer = qm.model.get_submodule(name)
        assert isinstance(layer, (type(net.get_submodule(name)), *QUANT_LAYER_TYPES))
        assert isinstance(layer, QUANT_LAYER_TYPES) and isinstance(layer, type(net.get_submodule(name)))
        assert layer.weight_quantizer.initialized and layer.output_quantizer.initialized
        assert layer.padding == net.get_submodule(name).padding  # the padding stays in forward, not in the conv
    assert ("c1", "bn1") in qm.folded_pairs and ("stem", "bn0") in qm.folded_pairs
    assert audit_coverage(qm, images) == []
    # the generated classes survive a deep copy and a save / load round trip
    save_quantized(qm, tmp_path / "quantized.pt")
    with torch.no_grad():
        out = qm(images)
        assert torch.equal(copy.deepcopy(qm)(images), out)
        assert torch.equal(load_quantized(loaded, tmp_path)(images), out)


def test_timm_tf_efficientnet_lite0_quantizes_near_lossless():
    import timm  # noqa: PLC0415 - timm's model registry import costs ~1 s; only this test needs it

    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    assert any(type(m).__name__ == "Conv2dSame" for m in net.modules())  # TF "same" padding on stride-2 convs
    _randomize_bn(net, seed=2)
    images = torch.randn(2, 3, 67, 67, generator=torch.Generator().manual_seed(3))  # odd size: asymmetric padding
    w16, off = _near_lossless(_classifier(net, 67, "tf_efficientnet_lite0"), images)
    # ~60 quantizers in series at 16 bits; BN-act modules keep their ReLU6 after folding
    assert w16 <= 1e-3 and off <= 1e-5


def test_conv_subclass_that_transforms_its_weight_is_refused():
    net = nn.Sequential(StdConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    images = torch.randn(2, 3, 8, 8)
    net(images)  # materialize the lazy linear
    with pytest.raises(CaptureError, match="transformed weight to conv2d"):
        quantize_model(_classifier(net, 8), images, QuantConfig(preset="pot"), progress=False)


# ---------------------------------------------------------------------------------------------- transposed convs
class _UpNet(nn.Module):
    """conv -> BN -> ReLU -> ConvTranspose2d (x2 upsampling) -> BN -> ReLU -> conv -> pooled linear."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=groups, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.up(x)))
        return self.head(self.c2(x).mean((2, 3)))


def test_conv_transpose_gets_per_output_channel_weight_and_output_quantizers():
    torch.manual_seed(0)
    net = _UpNet()
    _randomize_bn(net, seed=4)
    images = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    loaded = _classifier(net, 10)
    w16, off = _near_lossless(loaded, images)
    assert w16 <= 1e-3 and off <= 1e-5  # its BN is folded along weight axis 1 (output channels)
    qm = quantize_model(loaded, images, QuantConfig(preset="pot", algorithm="minmax"), progress=False)
    assert ("up", "b2") in qm.folded_pairs
    up = qm.model.up
    assert isinstance(up, nn.ConvTranspose2d) and isinstance(up, QUANT_LAYER_TYPES)
    wq = up.weight_quantizer
    assert wq.initialized and wq.channel_axis == 1 and wq.scale.shape == (6,)  # weight (C_in=8, C_out=6, 4, 4)
    assert up.output_quantizer.initialized and not up.output_quantizer.signed  # after the fused ReLU
    # minmax: each output channel's threshold is that channel's max |w| (axis 1 of the weight), s = T / 2^7
    per_channel_max = up.weight.detach().abs().amax(dim=(0, 2, 3))
    assert torch.allclose(wq.scale * 128, per_channel_max, rtol=1e-6)
    v = up.quantized_weight().detach() / wq.scale.view(1, -1, 1, 1)
    assert torch.allclose(v, v.round(), atol=1e-4) and v.abs().max() <= 128
    assert audit_coverage(qm, images) == []


def test_conv_transpose_bias_correction_shift_matches_brute_force():
    """``E[(W_q - W) x]`` of a stride-2 transposed conv: each interior output pixel of a 2x2 phase block receives a
    different quarter of the 4x4 taps, so the mean over a block is sum(taps) / 4 per input channel."""
    g = torch.Generator().manual_seed(6)
    layer = to_quant_layer(nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1))
    delta = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    const = mean.view(1, 5, 1, 1).expand(1, 5, 8, 8)
    out = F.conv_transpose2d(const, delta, stride=2, padding=1)  # (1, 3, 16, 16)
    interior = out[0, :, 2:14, 2:14].mean((1, 2))
    assert torch.allclose(layer.weight_error_output_shift(delta, mean), interior, atol=1e-12)


def test_grouped_conv_transpose_is_refused():
    net = _UpNet(groups=2)
    with pytest.raises(CaptureError, match="groups=2 is not supported"):
        quantize_model(_classifier(net, 10), torch.randn(2, 3, 10, 10), QuantConfig(preset="pot"), progress=False)


# ------------------------------------------------------------------------------------------------ unfoldable BN
class _AddBNNet(nn.Module):
    """A BN after a residual add (nothing to fold it into), feeding the next conv directly."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.bn(x + self.c2(x))
        return self.head(F.relu(self.c3(x)).mean((2, 3)))


def test_unfoldable_bn_output_is_quantized():
    torch.manual_seed(0)
    net = _AddBNNet()
    _randomize_bn(net, seed=8)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    loaded = _classifier(net, 8)
    qm = quantize_model(loaded, images, QuantConfig(preset="pot"), progress=False)
    assert qm.folded_pairs == [] and isinstance(qm.model.bn, nn.BatchNorm2d)
    site = qm.model.bn.act_quantizers["bn0"]
    assert site.initialized and site.signed  # BN of a signed sum: signed grid
    # what c3 reads (its input as the runtime resolves it for the conv op) is the BN output on that quantizer's grid
    seen = {}
    h = qm.model.c3.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", qm.runtime.resolve(a[0])))
    with torch.no_grad():
        qm(images)
    h.remove()
    assert _on_grid(seen["x"], site)
    assert audit_coverage(qm, images) == []
    w16, off = _near_lossless(loaded, images)
    assert w16 <= 1e-3 and off <= 1e-5


# ------------------------------------------------------------------------------- conv output with a second reader
class _SharedConvOutNet(nn.Module):
    """``y = conv(x)`` feeds its BN and, raw, a residual add: folding the BN into the conv would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.c1(x)
        z = F.relu(self.b1(y)) + y
        return self.head(F.relu(self.b2(self.c2(z))).mean((2, 3)))


def test_conv_with_second_reader_keeps_its_bn_and_matches_float():
    torch.manual_seed(0)
    net = _SharedConvOutNet().eval()
    _randomize_bn(net, seed=10)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    folded, pairs = fold_batch_norms(net, images[:1])
    assert pairs == [("c2", "b2")]  # c1's raw output is also read by the add
    with torch.no_grad():
        assert (folded(images) - net(images)).abs().max() <= 1e-5 * net(images).abs().max()
    loaded = _classifier(net, 8)
    w16, off = _near_lossless(loaded, images)
    assert w16 <= 1e-3 and off <= 1e-5
    qm = quantize_model(loaded, images, QuantConfig(preset="pot"), progress=False)
    assert audit_coverage(qm, images) == []


# ------------------------------------------------------------------------------ functional ops in containers
class _DenseBlock(nn.ModuleDict):
    """As torchvision's DenseNet ``_DenseBlock``: a ``ModuleDict`` whose own forward concatenates its layers'
    outputs with ``torch.cat``."""

    def __init__(self, c: int, growth: int, n: int) -> None:
        super().__init__()
        for i in range(n):
            self.add_module(f"layer{i}", nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                                                       nn.Conv2d(c + i * growth, growth, 3, padding=1, bias=False)))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _TinyDenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _DenseBlock(4, 2, 3), nn.BatchNorm2d(10))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(F.relu(self.features(x)).mean((2, 3)))


def test_functional_cat_in_a_container_is_quantized_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = _TinyDenseNet()
    _randomize_bn(net, seed=12)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    loaded = _classifier(net, 8)
    qm = quantize_model(loaded, images, QuantConfig(preset="pot"), progress=False)
    quantizers = dict(iter_quantizers(qm))
    # the block's 4 cats are owned by its nearest non-container ancestor (the network), keyed by the block path
    cats = sorted(n for n in quantizers if "/cat" in n)
    assert cats == [f"model.act_quantizers.features/1/cat{i}" for i in range(4)]
    assert all(quantizers[n].initialized for n in cats)
    assert audit_coverage(qm, images) == []
    # the block called on its own applies the same quantizers as in the full forward
    block = qm.model.features[1]
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone()))
    h2 = block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        qm(images)
    h1.remove()
    h2.remove()
    with torch.no_grad():
        assert torch.equal(block(seen["in"]), seen["out"])
    save_quantized(qm, tmp_path / "quantized.pt")
    again = load_quantized(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(images), qm(images))


# ------------------------------------------------------------------------------------------------ registry sweep
# Every registry name either quantizes fully covered or is refused up front with its reason. Random weights, one
# small image, ``pot`` W8A8 (minmax thresholds: coverage does not depend on the threshold search).
SWEEP_SUBSET = ["resnet20_cifar10", "densenet121", "mobilenet_v3_small", "shufflenet_v2_x0_5", "yolo11n", "vit_b_32"]
# names whose architecture cannot be quantized, with the reason the refusal must give
REFUSED = {
    **{n: "MultiheadAttention" for n in ("vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32")},
    **{n: "straight to linear instead of calling a quantizable layer"
       for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")},
}
# input side: 64 px unless the architecture needs more (inception_v3's stem; maxvit's fixed 7x7 partitions)
_SWEEP_SIZE = {"inception_v3": 96, "maxvit_t": 224}


def _float_layers_run(model: nn.Module, images: torch.Tensor) -> set[str]:
    """Names of the conv/linear modules the float model calls on ``images`` (dead modules, e.g. auxiliary heads in
    eval mode, are not called)."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: called.add(n))
               for n, m in model.named_modules() if isinstance(m, FLOAT_LAYER_TYPES)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return called


def _num_params(name: str) -> int | None:
    """Parameter count of a torchvision model from its weights' metadata (no build, no download); else ``None``."""
    if get_spec(name).family != "torchvision":
        return None
    return int(get_model_weights(name).DEFAULT.meta["num_params"])


# this 24 GiB machine is shared: the float model, its BN-folded copy and the quantized layers coexist, so larger
# models are skipped by the sweep (a model refused up front is still checked, on a weightless build); raise the cap
# where memory allows
SWEEP_MAX_PARAMS = int(float(os.environ.get("DGH_SWEEP_MAX_PARAMS", "200e6")))


def _sweep_one(name: str) -> None:
    n_params = _num_params(name)
    if n_params is not None and n_params > SWEEP_MAX_PARAMS:
        if name in REFUSED:  # the refusal happens before any forward: check it on a weightless (meta) build
            with torch.device("meta"):
                model = load_model(name, RANDOM_WEIGHTS).model
            with pytest.raises(CaptureError, match=REFUSED[name]):
                check_supported_modules(model)
            return
        pytest.skip(f"{n_params / 1e6:.0f} M parameters > DGH_SWEEP_MAX_PARAMS={SWEEP_MAX_PARAMS:.3g} (memory)")
    loaded = load_model(name, RANDOM_WEIGHTS, imgsz=64)
    h, w = loaded.spec.input_size if loaded.spec.family == "cifar_resnet" else (_SWEEP_SIZE.get(name, 64),) * 2
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(preset="pot", w_bits=8, a_bits=8, algorithm="minmax")
    if name in REFUSED:
        with pytest.raises(CaptureError, match=REFUSED[name]) as info:
            quantize_model(loaded, images, config, progress=False)
        assert "\n" not in str(info.value)
        return
    qm = quantize_model(loaded, images, config, progress=False)
    float_layers = {n for n, m in loaded.model.named_modules() if isinstance(m, FLOAT_LAYER_TYPES)}
    quant_layers = {n.removeprefix("model."): m for n, m in qm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    assert float_layers == set(quant_layers)  # every conv/linear swapped for its quantized version
    ran = {p.removeprefix("model.") for p in qm.runtime.layer_order}
    assert ran == _float_layers_run(loaded.model, images)
    for n in ran:
        assert quant_layers[n].weight_quantizer.initialized and quant_layers[n].output_quantizer.initialized, n
    assert audit_coverage(qm, images) == []


@pytest.mark.parametrize("name", SWEEP_SUBSET)
def test_registry_subset_quantizes_covered_or_is_refused(name):
    _sweep_one(name)


def _full_sweep_requested(config: pytest.Config) -> bool:
    expr = config.getoption("-m") or ""
    return os.environ.get("DGH_FULL_SWEEP") == "1" or ("sweep" in expr and "not sweep" not in expr)


@pytest.mark.sweep
@pytest.mark.parametrize("name", sorted(spec.name for spec in list_models()))  # what `dgh models` lists
def test_registry_sweep_every_model_covered_or_refused(name, request):
    if not _full_sweep_requested(request.config):
        pytest.skip("full registry sweep (minutes): run with -m sweep or DGH_FULL_SWEEP=1")
    if name in SWEEP_SUBSET:
        pytest.skip("in the always-on subset")
    _sweep_one(name)


def test_adaround_reconstructs_transposed_and_padding_subclass_convs(tmp_path):
    """AdaRound drives the per-channel grid along weight axis 1 of a transposed conv and the generated class of a
    same-padding conv: afterwards each weight lies on its channel's grid and the file reloads exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(StaticSamePadConv2d(3, 6, 3, stride=2, image_size=9), nn.ReLU(),
                        nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 10 * 10, 3))
    images = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(14))
    loaded = _classifier(net, 9)
    config = QuantConfig(preset="pot", w_bits=4, a_bits=8, algorithm="adaround",
                         reconstruction={"iters": 20, "act_iters": 0, "batch_size": 2})
    qm = quantize_model(loaded, images, config, progress=False)
    for idx in ("0", "2"):
        layer = qm.model.get_submodule(idx)
        axis = layer.weight_quantizer.channel_axis
        view = [1] * layer.weight.dim()
        view[axis] = -1
        v = layer.weight.detach() / layer.weight_quantizer.scale.view(view)
        assert torch.allclose(v, v.round(), atol=1e-4) and v.abs().max() <= 8  # 4-bit signed: [-8, 7]
    assert qm.model[2].weight_quantizer.channel_axis == 1
    save_quantized(qm, tmp_path / "quantized.pt")
    with torch.no_grad():
        assert torch.equal(load_quantized(loaded, tmp_path)(images), qm(images))


@pytest.mark.parametrize(("name", "reason"), [("vit_b_32", "MultiheadAttention"), ("swin_t", "straight to linear")])
def test_refused_architecture_is_a_one_line_cli_error(name, reason, tmp_path):
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", "--model", name, "--weights", "random", "--calib", "noise",
                                   "--n-calib", "1", "--preset", "pot", "--out", str(out)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()[-1]  # the progress bar may precede it on stderr
    assert err.startswith("error: ") and reason in err and "not supported" in err and "Traceback" not in res.output
    assert not (out / "quantized.pt").exists()
