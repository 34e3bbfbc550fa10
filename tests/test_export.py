"""ONNX QDQ export: graph contents, exact scales and integers, agreement with the fake-quant model in onnxruntime."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dgh.export import (
    AgreementError,
    ExportError,
    OnnxRuntimeModel,
    check_agreement,
    export_onnx,
    read_metadata,
)
from dgh.models.spec import LoadedModel, ModelSpec
from dgh.quantization import Preset, QuantConfig, iter_quantizers, quantize_model, write_quantization_report

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync overhead


class TinyNet(nn.Module):
    """conv-BN-ReLU, an in-place residual add (``r += y``, as torchvision's BasicBlock), max pool, a grouped conv with
    ReLU6, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        r = self.conv2(y)
        r += y  # modifies the conv2 quantizer's output in place: the agreement check must copy what it records
        y = r
        y = nn.functional.relu6(self.conv3(self.pool(y)))
        return self.fc(y.mean(dim=(2, 3)))


class TinyDetector(nn.Module):
    """Two feature levels (strides 2 and 4) and a 1x1 conv head per level returning raw maps ``[(N, 12, H_i, W_i)]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.ModuleList([nn.Conv2d(8, 12, 1), nn.Conv2d(16, 12, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p1 = nn.functional.silu(self.stem(x))
        p2 = nn.functional.silu(self.down(p1))
        return [conv(f) for conv, f in zip(self.head, [p1, p2])]


def _loaded(model: nn.Module, task: str = "classification") -> LoadedModel:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    spec = ModelSpec(name="tiny", family="test", task=task, input_size=(16, 16), num_classes=5)
    return LoadedModel(spec=spec, model=model.eval())


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _quantized(model: nn.Module, w_bits: int = 8, a_bits: int = 8, preset: Preset = Preset.POT,
               task: str = "classification"):
    torch.manual_seed(0)
    config = QuantConfig(preset=preset, w_bits=w_bits, a_bits=a_bits, algorithm="minmax")
    return quantize_model(_loaded(model, task), _images(), config, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny_w8a8(tmp_path_factory):
    qmodel = _quantized(TinyNet())
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return qmodel, export_onnx(qmodel, path)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_qdq_counts_match_quantization_report(tiny_w8a8, tmp_path):
    qmodel, graph = tiny_w8a8
    rows = list(csv.DictReader(write_quantization_report(qmodel, tmp_path / "r.csv").open()))
    active = [r for r in rows if r["quantized"] == "True"]
    n_act = sum(r["kind"] == "activation" for r in active)
    n_weight = sum(r["kind"] == "weight" for r in active)
    model = onnx.load(str(graph.path))
    inits = _initializers(model)
    ops = [n.op_type for n in model.graph.node]
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert ops.count("QuantizeLinear") == n_act == graph.counts()["activation_qdq"]
    assert len(weight_dq) == n_weight == graph.counts()["weight_dq"] == 4
    assert ops.count("DequantizeLinear") == n_act + n_weight
    # no float weight left: every conv/gemm weight input comes from a DequantizeLinear of stored integers
    for w in weight_dq:
        assert inits[w.input[0]].dtype == np.int8
        assert w.input[1] in inits and inits[w.input[1]].shape == (inits[w.input[0]].shape[0],)  # per-channel
        axis = [a.i for a in w.attribute if a.name == "axis"]
        assert axis == [0]  # output channels
    assert model.opset_import[0].version >= 13


def test_input_and_outputs_carry_quantizers(tiny_w8a8):
    _, graph = tiny_w8a8
    model = onnx.load(str(graph.path))
    first = [n for n in model.graph.node if graph.input_name in n.input]
    assert [n.op_type for n in first] == ["QuantizeLinear"] and first[0].name == "input_quantizer/QuantizeLinear"
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        assert producers[out.name].op_type == "DequantizeLinear"


def test_power_of_two_scales_are_exact(tiny_w8a8):
    qmodel, graph = tiny_w8a8
    model = onnx.load(str(graph.path))
    inits = _initializers(model)
    quantizers = dict(iter_quantizers(qmodel))
    n_checked = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        scale = inits[node.input[1]]
        assert scale.dtype == np.float32
        mantissa, _ = np.frexp(scale.astype(np.float64))
        assert np.all(mantissa == 0.5), node.name  # 2^k exactly
        name = node.name.rsplit("/", 1)[0]
        assert scale.tobytes() == quantizers[name].scale.detach().numpy().astype(np.float32).reshape(()).tobytes()
        n_checked += 1
    assert n_checked == graph.counts()["activation_qdq"]


def test_stored_weight_integers_equal_fake_quant(tiny_w8a8):
    qmodel, graph = tiny_w8a8
    model = onnx.load(str(graph.path))
    inits = _initializers(model)
    layers = {n: m for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    for q in (q for q in graph.quantizers if q.kind == "weight"):
        layer = layers[q.name.rsplit(".", 1)[0]]
        values = inits[f"{q.name}/int8"].astype(np.float32)
        scale = inits[[n for n in model.graph.node if n.name == f"{q.name}/DequantizeLinear"][0].input[1]]
        dequant = values * scale.reshape(-1, *([1] * (values.ndim - 1)))
        np.testing.assert_array_equal(dequant, layer.quantized_weight().detach().numpy())


def test_round_trip_within_one_step(tiny_w8a8):
    qmodel, graph = tiny_w8a8
    x = _images(16, seed=5) * 1.5  # unseen data, partly beyond the calibrated ranges (saturation)
    agreement = check_agreement(qmodel, graph, x)
    assert agreement.ok
    assert agreement.max_local_steps <= 1.0
    assert agreement.max_output_steps <= 1.0
    session_out = OnnxRuntimeModel(graph.path)(x)
    with torch.no_grad():
        ref = qmodel(x)
    step = [q for q in graph.quantizers if q.role == "output"][0].params.scale[0]
    assert float((session_out - ref).abs().max()) <= step * (1 + 1e-6)


def test_four_bit_weights_int8_container_and_narrow_activations(tmp_path):
    qmodel = _quantized(TinyNet(), w_bits=4, a_bits=4)
    graph = export_onnx(qmodel, tmp_path / "w4a4.onnx")
    model = onnx.load(str(graph.path))
    inits = _initializers(model)
    for q in (q for q in graph.quantizers if q.kind == "weight"):
        values = inits[f"{q.name}/int8"]
        assert values.dtype == np.int8 and values.min() >= -8 and values.max() <= 7
    meta = read_metadata(graph.path)
    rows = meta["dgh.quantizers"]
    assert {(r["qmin"], r["qmax"], r["container"]) for r in rows if r["kind"] == "weight"} == {(-8, 7, "int8")}
    assert {(r["qmin"], r["qmax"], r["container"]) for r in rows if r["kind"] == "activation"} <= {
        (-8, 7, "int8"), (0, 15, "uint8")}
    # every activation quantizer below 8 bits is preceded by a float Clip to its exact range
    producers = {o: n for n in model.graph.node for o in n.output}
    quant_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant_nodes) == graph.counts()["activation_qdq"]
    assert all(producers[n.input[0]].op_type == "Clip" for n in quant_nodes)
    x = _images(16, seed=7) * 3.0  # far outside the calibrated ranges: the clip must saturate as the quantizer does
    agreement = check_agreement(qmodel, graph, x)
    assert agreement.max_local_steps <= 1.0 and agreement.max_output_steps <= 1.0


def test_clip_bounds_reproduce_narrow_range_exactly():
    """Brute force over a fine grid: Clip + int8 QuantizeLinear/DequantizeLinear equals the 4-bit fake quantizer."""
    from dgh.export.qdq import quant_params
    from dgh.export.runtime import make_session
    from dgh.quantization import FakeQuantizer

    for signed, symmetric in ((True, True), (False, True), (False, False)):
        q = FakeQuantizer(bits=4, symmetric=symmetric, signed=signed, power_of_two=symmetric)
        if symmetric:
            q.set_threshold(0.7)
        else:
            q.set_range(-0.3, 1.1)
        p = quant_params("q", q)
        lo, hi = p.clip_bounds()
        x = torch.linspace(-3, 3, 20001)
        nodes = [
            onnx.helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
            onnx.helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
            onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ]
        inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in (("lo", lo), ("hi", hi))]
        inits += [numpy_helper.from_array(p.onnx_scale().numpy(), "s"),
                  numpy_helper.from_array(p.onnx_zero_point().numpy(), "z")]
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [None])],
                                       [onnx.helper.make_tensor_value_info("y", 1, [None])], inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        y = make_session(model.SerializeToString(), threads=1).run(None, {"x": x.numpy()})[0]
        np.testing.assert_array_equal(y, q(x).detach().numpy())


def test_exact_ties_round_half_to_even_on_both_sides():
    """Every exact tie ``(k + 1/2) s`` of an 8-bit power-of-two quantizer (they occur in sums and averages of grid
    values) rounds the same way in onnxruntime's QuantizeLinear and in the fake quantizer: half to even (ONNX
    QuantizeLinear spec; ``torch.round``), so ``0.5 s -> 0``, ``1.5 s -> 2 s``, ``-2.5 s -> -2 s``."""
    from dgh.export.qdq import quant_params
    from dgh.export.runtime import make_session
    from dgh.quantization import FakeQuantizer

    for signed in (True, False):
        q = FakeQuantizer(bits=8, symmetric=True, signed=signed, power_of_two=True)
        q.set_threshold(3.0)
        p = quant_params("q", q)
        s = p.scale[0]
        x = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * s  # exact in float32
        nodes = [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        inits = [numpy_helper.from_array(p.onnx_scale().numpy(), "s"),
                 numpy_helper.from_array(p.onnx_zero_point().numpy(), "z")]
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [None])],
                                       [onnx.helper.make_tensor_value_info("y", 1, [None])], inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        y = make_session(model.SerializeToString(), threads=1).run(None, {"x": x.numpy()})[0]
        ref = q(x).detach().numpy()
        np.testing.assert_array_equal(y, ref)
        inside = (x / s >= p.qmin) & (x / s <= p.qmax)
        even = torch.round(x / s) * s  # torch.round: half to even
        np.testing.assert_array_equal(ref[inside.numpy()], even[inside].numpy())
        assert float(q(torch.tensor([0.5 * s, 1.5 * s]))[1]) == 2 * s and float(q(torch.tensor([0.5 * s]))) == 0.0


def test_detector_exports_one_raw_output_per_level(tmp_path):
    qmodel = _quantized(TinyDetector(), task="detection")
    graph = export_onnx(qmodel, tmp_path / "det.onnx")
    assert graph.output_names == ["output_0", "output_1"]
    session = OnnxRuntimeModel(graph.path, as_list=True)
    x = _images(3, seed=2)
    outs = session(x)
    assert [tuple(o.shape) for o in outs] == [(3, 12, 8, 8), (3, 12, 4, 4)]
    output_quantizers = [q for q in graph.quantizers if q.role == "output"]
    assert [q.dq_output for q in output_quantizers] == graph.output_names  # each level behind its own quantizer
    assert len({q.name for q in output_quantizers}) == 2
    agreement = check_agreement(qmodel, graph, x)
    assert agreement.max_local_steps <= 1.0


def test_agreement_error_names_the_first_differing_tensor(tiny_w8a8, tmp_path):
    qmodel, graph = tiny_w8a8
    model = onnx.load(str(graph.path))
    target = [n for n in model.graph.node if n.op_type == "Conv"][1]  # conv2: wrong bias in the exported file
    bias = {i.name: i for i in model.graph.initializer}[target.input[2]]
    values = numpy_helper.to_array(bias) + 10.0
    bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    graph_broken = type(graph)(broken, graph.opset, graph.input_name, graph.output_names, graph.quantizers)
    with pytest.raises(AgreementError, match="model.conv2.output_quantizer"):
        check_agreement(qmodel, graph_broken, _images(4))


def test_systematic_one_step_mismatch_is_an_error(tiny_w8a8, tmp_path):
    """A mismatch never larger than one step (conv2's bias moved by half a step of its output quantizer in the file:
    about half of that tensor's elements round to the neighbour) is caught by the near-tie bound on the teacher-forced
    fraction of differing elements, and named; the step bound alone would pass it."""
    qmodel, graph = tiny_w8a8
    model = onnx.load(str(graph.path))
    target = [n for n in model.graph.node if n.op_type == "Conv"][1]
    bias = {i.name: i for i in model.graph.initializer}[target.input[2]]
    step = qmodel.model.conv2.output_quantizer.effective_scale().item()
    bias.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(bias) + np.float32(step / 2)), bias.name))
    broken = tmp_path / "half_step.onnx"
    onnx.save(model, str(broken))
    graph_broken = type(graph)(broken, graph.opset, graph.input_name, graph.output_names, graph.quantizers)
    x = _images(4)
    loose = check_agreement(qmodel, graph_broken, x, max_local_fraction=None, reference=False)
    row = next(t for t in loose.teacher_forced if t.name == "model.conv2.output_quantizer")
    assert loose.ok and row.max_steps == 1.0 and row.frac_differing > 0.2
    with pytest.raises(AgreementError, match=r"model\.conv2\.output_quantizer \(1 steps on \d+ of 8192 elements"):
        check_agreement(qmodel, graph_broken, x)


def test_agreement_reports_the_float_order_reference(tiny_w8a8):
    """The free-running output difference is reported next to PyTorch against itself with its other convolution
    kernels; the kernel switch is undone afterwards."""
    from dgh.export.verify import alternate_kernels

    qmodel, graph = tiny_w8a8
    before = torch.backends.mkldnn.enabled
    agreement = check_agreement(qmodel, graph, _images(8, seed=3))
    assert torch.backends.mkldnn.enabled == before
    summary = agreement.summary()
    assert summary["reference_output_steps"] is not None and 0 <= summary["reference_output_steps"] <= 1
    assert 0 <= summary["max_local_fraction"] <= 1e-3
    with alternate_kernels("cpu"):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before
    assert check_agreement(qmodel, graph, _images(2), reference=False).reference_output_steps is None


def test_export_rejects_bad_input(tmp_path):
    qmodel = _quantized(TinyNet())
    with pytest.raises(ExportError, match="opset"):
        export_onnx(qmodel, tmp_path / "m.onnx", opset=11)
    qmodel.model.conv1.output_quantizer.initialized = False
    with pytest.raises(ExportError, match="model.conv1.output_quantizer.*never calibrated"):
        export_onnx(qmodel, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError, match="not found"):
        OnnxRuntimeModel(tmp_path / "missing.onnx")


def test_runtime_rejects_wrong_input_size(tiny_w8a8):
    _, graph = tiny_w8a8
    with pytest.raises(ExportError, match="takes input"):
        OnnxRuntimeModel(graph.path)(torch.zeros(1, 3, 32, 32))


def test_metadata_records_config_and_quantizers(tiny_w8a8):
    qmodel, graph = tiny_w8a8
    meta = read_metadata(graph.path)
    assert meta["dgh.config"]["preset"] == "pot" and meta["dgh.config"]["w_bits"] == 8
    assert len(meta["dgh.quantizers"]) == len(graph.quantizers)
    assert all(r["power_of_two"] for r in meta["dgh.quantizers"] if r["kind"] == "activation")
    assert meta["dgh.outputs"] == graph.output_names


def test_yolov5n_exports_one_raw_output_per_head_level(yolov5n_weights, tmp_path):
    """Real YOLOv5n at 64x64: three raw head maps (na*(5+nc) = 255 channels, strides 8/16/32), each behind its own
    output quantizer, decode/NMS left out of the graph; the file agrees with the fake-quant model in onnxruntime."""
    from dgh.export import export_quantized
    from dgh.models import load_model

    loaded = load_model("yolov5n", str(yolov5n_weights), imgsz=64)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qmodel = quantize_model(loaded, images, QuantConfig(preset="pot", algorithm="minmax"), device="cpu",
                            progress=False)
    result = export_quantized(loaded, qmodel, tmp_path / "model.onnx", sample_nchw=images[:2])
    model = onnx.load(str(result.graph.path))
    shapes = [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert shapes == [["batch", 255, 8, 8], ["batch", 255, 4, 4], ["batch", 255, 2, 2]]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonMaxSuppression", "TopK", "Exp", "Pow"}  # no decoding in the graph
    assert [q.role for q in result.graph.quantizers if q.dq_output in result.graph.output_names] == ["output"] * 3
    assert result.agreement.ok and result.agreement.max_local_steps <= 1.0


def test_export_to_dir_writes_model_and_record(tiny_w8a8, tmp_path):
    from dgh.export import EXPORT_RECORD_FILE, ONNX_FILE, export_to_dir

    qmodel, graph = tiny_w8a8
    loaded = _loaded(TinyNet())
    record = export_to_dir(loaded, qmodel, tmp_path / "out", sample_nchw=_images(4), record={"experiment": "x"})
    written = json.loads((tmp_path / "out" / EXPORT_RECORD_FILE).read_text())
    assert written == json.loads(json.dumps(record))
    assert written["experiment"] == "x" and written["agreement"]["ok"] is True
    assert written["size_bytes"] == (tmp_path / "out" / ONNX_FILE).stat().st_size
    assert written["activation_qdq"] == graph.counts()["activation_qdq"]
