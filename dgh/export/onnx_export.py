"""Write a fake-quantized :class:`~dgh.quantization.capture.QuantizedModel` as an ONNX QDQ model.

How (see :mod:`dgh.export.qdq` for the node patterns and why they are exact):

1. The quantized model is deep-copied to the CPU. On the copy, every active ``FakeQuantizer`` module is replaced by a
   stand-in that computes the same numbers through :class:`~dgh.export.qdq.ActivationQDQ` (activations, the input,
   the outputs) or :class:`~dgh.export.qdq.WeightDQ` (weights, their integers computed once). The capture runtime
   (BN folded, activation sites found by a ``TorchFunctionMode``) runs unchanged and calls the stand-ins where it
   called the quantizers, so every quantizer is applied exactly where it is in the fake-quant forward.
2. ``torch.onnx.export(..., dynamo=False)`` traces that forward (TorchScript exporter) and emits the symbolic ONNX
   nodes. The batch axis is dynamic; height and width are fixed at the example input's. (The dynamo exporter would
   need ``torch.export`` to trace the capture runtime's hooks and function mode; the TorchScript tracer records the
   ops they run as they run.)
3. The ONNX graph is post-processed with ``onnx``: each QuantizeLinear/DequantizeLinear is renamed after its
   quantizer (``<quantizer name>/QuantizeLinear``; activation quantizers are matched to the traced call order and
   their scales compared), constants become initializers, and ``metadata_props`` record every quantizer's bits,
   integer range and container (``dgh.quantizers``, JSON), the quantization config (``dgh.config``) and the output
   names. ``onnx.checker`` validates the result, which is written atomically.

A detector's outputs are the head's raw per-level maps (one ONNX output per level, each behind its own output
quantizer); decoding and NMS stay outside the file, as on the target hardware.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper

from dgh.export.qdq import ActivationQDQ, ExportError, QuantParams, WeightDQ, integer_weight, quant_params
from dgh.io import write_bytes
from dgh.quantization.capture import QuantizedModel, iter_quantizers
from dgh.quantization.fold import set_submodule
from dgh.quantization.layers import QUANT_LAYER_TYPES
from dgh.quantization.quantizers import is_power_of_two

MIN_OPSET = 13
MAX_OPSET = 20
DEFAULT_OPSET = 17
INPUT_NAME = "input"


@dataclass
class QuantizerNode:
    """One quantizer as it appears in the exported graph.

    Attributes:
        name: quantizer module name in the quantized model.
        kind: ``weight`` (stored integers + DequantizeLinear) or ``activation`` (QuantizeLinear + DequantizeLinear;
            the input and the outputs included).
        role: the quantizer's role (``weight``, ``input``, ``activation``, ``output``).
        params: its fixed parameters.
        dq_output: name of the DequantizeLinear output tensor in the ONNX graph (the dequantized value).
    """

    name: str
    kind: str
    role: str
    params: QuantParams
    dq_output: str = ""


@dataclass
class ExportedGraph:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: ONNX opset of the default domain.
        input_name: the graph input (``(N, C, H, W)`` float32, dynamic ``N``).
        output_names: graph outputs in the model's output order (logits, or one raw map per detector level).
        quantizers: every exported quantizer in graph order (activations in forward order, then weights).
        size_bytes: file size.
    """

    path: Path
    opset: int
    input_name: str
    output_names: list[str]
    quantizers: list[QuantizerNode] = field(default_factory=list)
    size_bytes: int = 0

    def counts(self) -> dict[str, int]:
        """``{"activation_qdq": n, "weight_dq": n}``."""
        act = sum(1 for q in self.quantizers if q.kind == "activation")
        return {"activation_qdq": act, "weight_dq": len(self.quantizers) - act}


def _flatten_outputs(out) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    raise ExportError(f"model output of type {type(out).__name__} cannot be exported (tensors, lists or dicts only)")


class FlatOutputs(torch.nn.Module):
    """Wraps a model (quantized or float) so that ONNX sees a flat tuple of output tensors."""

    def __init__(self, qmodel: torch.nn.Module) -> None:
        super().__init__()
        self.qmodel = qmodel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flatten_outputs(self.qmodel(x)))


class _OnnxQuantizer(torch.nn.Module):
    """Stands in for a :class:`FakeQuantizer` on the private export copy: same numbers, ONNX-exportable ops.

    (A separate module rather than a patched ``FakeQuantizer``: the TorchScript tracer rejects the ``FakeQuantizer``
    extra state, a dict, in ``state_dict``.)
    """

    def __init__(self, node: QuantizerNode, calls: list[str], weight_values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.node = node
        self.calls = calls
        self.weight_values = weight_values  # a plain attribute: traced as a constant, never a parameter

    def forward(self, x: torch.Tensor, rounding=None) -> torch.Tensor:  # noqa: ANN001
        params = self.node.params
        with torch._C.DisableTorchFunction():
            if self.weight_values is not None:
                return WeightDQ.apply(x, self.weight_values, params)
            if rounding is not None:
                raise ExportError(f"{params.name}: learned rounding on an activation quantizer cannot be exported")
            self.calls.append(params.name)
            return ActivationQDQ.apply(x, params)


def _swap_quantizers(qmodel: QuantizedModel) -> tuple[list[QuantizerNode], list[str]]:
    """Replace each active quantizer of ``qmodel`` (a private copy) by its ONNX-exportable twin; disabled or
    bypassed quantizers (identities in the fake-quant forward) become identities.

    Returns:
        The exported quantizers (module order) and the list that records activation-quantizer calls (names, in
        forward order) while the model runs.

    Raises:
        ExportError: see :func:`~dgh.export.qdq.quant_params`.
    """
    nodes: list[QuantizerNode] = []
    calls: list[str] = []
    for name, q in list(iter_quantizers(qmodel)):
        if not q.enabled or q.bypass:
            set_submodule(qmodel, name, _Identity())
            continue
        kind = "weight" if q.role == "weight" else "activation"
        node = QuantizerNode(name, kind, q.role, quant_params(name, q))
        nodes.append(node)
        values = None
        if kind == "weight":
            layer = qmodel.get_submodule(name.rpartition(".")[0])
            if not isinstance(layer, QUANT_LAYER_TYPES):
                raise ExportError(f"{name}: weight quantizer outside a quantized conv/linear layer")
            values = integer_weight(node.params, layer.weight, layer.weight_rounding)
        set_submodule(qmodel, name, _OnnxQuantizer(node, calls, values))
    return nodes, calls


class _Identity(torch.nn.Module):
    """A disabled quantizer: returns its input (accepts the weight quantizer's ``rounding`` keyword)."""

    def forward(self, x: torch.Tensor, rounding=None) -> torch.Tensor:  # noqa: ANN001
        return x


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Move every ``Constant`` node with a tensor value into the graph initializers (same tensor name)."""
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _drop_input_casts(model: onnx.ModelProto) -> None:
    """Remove ``Cast(to=FLOAT)`` nodes applied directly to the (float32) graph inputs (the traced ``x.float()``), so
    that the input's first node is its QuantizeLinear."""
    inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for node in list(model.graph.node):
        to = [a.i for a in node.attribute if a.name == "to"]
        if node.op_type == "Cast" and node.input[0] in inputs and to == [onnx.TensorProto.FLOAT]:
            if any(o.name == node.output[0] for o in model.graph.output):
                continue
            _rename_tensor(model, node.output[0], node.input[0])
            model.graph.node.remove(node)


def _initializer_values(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in model.graph.initializer}


def _rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.name == old:
            vi.name = new
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new


def _label_qdq_nodes(model: onnx.ModelProto, activation_calls: list[QuantizerNode],
                     weight_nodes: list[QuantizerNode]) -> list[QuantizerNode]:
    """Name the Q/DQ nodes after their quantizers and fill ``dq_output``; checks that the graph holds exactly one
    QDQ pair per traced activation-quantizer call (with the same scale) and one DequantizeLinear per weight.

    Raises:
        ExportError: counts or scales do not match (the graph is not the fake-quant forward).
    """
    inits = _initializer_values(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quant_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    if len(quant_nodes) != len(activation_calls):
        raise ExportError(f"the ONNX graph has {len(quant_nodes)} QuantizeLinear nodes but the model called "
                          f"{len(activation_calls)} activation quantizers")
    if len(weight_dq) != len(weight_nodes):
        raise ExportError(f"the ONNX graph has {len(weight_dq)} weight DequantizeLinear nodes but the model has "
                          f"{len(weight_nodes)} quantized weights")
    seen: dict[str, int] = {}
    out: list[QuantizerNode] = []
    for qnode, qn in zip(quant_nodes, activation_calls):
        scale = inits.get(qnode.input[1])
        if scale is None or not torch.equal(scale.reshape(-1), qn.params.scale_tensor()):
            raise ExportError(f"QuantizeLinear {qnode.name} does not carry the scale of {qn.name}")
        k = seen.get(qn.name, 0)
        seen[qn.name] = k + 1
        label = qn.name + (f"#{k}" if k else "")
        dq = [c for c in consumers.get(qnode.output[0], []) if c.op_type == "DequantizeLinear"]
        if len(dq) != 1:
            raise ExportError(f"QuantizeLinear of {label} is not followed by exactly one DequantizeLinear")
        qnode.name = f"{label}/QuantizeLinear"
        dq[0].name = f"{label}/DequantizeLinear"
        _rename_tensor(model, qnode.output[0], f"{label}/quantized")
        if not any(o.name == dq[0].output[0] for o in model.graph.output):
            _rename_tensor(model, dq[0].output[0], f"{label}/dequantized")
        out.append(QuantizerNode(label, qn.kind, qn.role, qn.params, dq[0].output[0]))
    for dq, qn in zip(weight_dq, weight_nodes):
        values = inits[dq.input[0]]
        scale = inits.get(dq.input[1])
        if scale is None or not torch.equal(scale.reshape(-1), qn.params.scale_tensor()):
            raise ExportError(f"weight DequantizeLinear {dq.name} does not carry the scale of {qn.name}")
        dq.name = f"{qn.name}/DequantizeLinear"
        _rename_tensor(model, dq.input[0], f"{qn.name}/int{8 if values.dtype in (torch.int8, torch.uint8) else 16}")
        _rename_tensor(model, dq.output[0], f"{qn.name}/dequantized")
        out.append(QuantizerNode(qn.name, qn.kind, qn.role, qn.params, dq.output[0]))
    return out


def _quantizer_metadata(nodes: list[QuantizerNode]) -> list[dict]:
    rows = []
    for n in nodes:
        p = n.params
        rows.append({
            "name": n.name, "kind": n.kind, "role": n.role, "bits": p.bits, "qmin": p.qmin, "qmax": p.qmax,
            "container": str(p.container_dtype).replace("torch.", ""),
            "granularity": "per-tensor" if p.axis is None else f"per-channel(axis={p.axis})",
            "power_of_two": bool(is_power_of_two(p.scale_tensor())), "tensor": n.dq_output,
        })
    return rows


def export_onnx(qmodel: QuantizedModel, out_path: str | Path, example_nchw: torch.Tensor | None = None,
                opset: int = DEFAULT_OPSET) -> ExportedGraph:
    """Export a fake-quantized model to ONNX with QuantizeLinear/DequantizeLinear nodes.

    Args:
        qmodel: a calibrated :class:`QuantizedModel` (from ``quantize_model`` or ``load_quantized``); not modified.
        out_path: the ``.onnx`` file to write (atomically).
        example_nchw: one example input ``(N, C, H, W)`` float32 in the model's normalized space; default zeros of
            ``qmodel.example_shape``. Only its shape matters (batch axis exported as dynamic).
        opset: ONNX opset, 13 (per-axis DequantizeLinear) to 20 (the TorchScript exporter's newest).

    Returns:
        :class:`ExportedGraph` (path, names, the quantizers in graph order, file size).

    Raises:
        ExportError: opset below 13, an uncalibrated quantizer, a quantizer without an exact ONNX form, a model
            output that is not a tensor or a list of tensors, or a graph that does not hold one QDQ per quantizer.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in {MIN_OPSET}..{MAX_OPSET} (per-channel DequantizeLinear; TorchScript "
                          f"exporter), got {opset}")
    if not isinstance(qmodel, QuantizedModel):
        raise ExportError(f"expected a dgh QuantizedModel, got {type(qmodel).__name__}")
    if example_nchw is None:
        shape = list(getattr(qmodel, "example_shape", []) or [])
        if not shape:
            raise ExportError("the quantized model has no example input shape; pass example_nchw")
        example_nchw = torch.zeros(shape, dtype=torch.float32)
    example = example_nchw[:1].detach().float().cpu()
    model = copy.deepcopy(qmodel).cpu().eval()  # the capture runtime gives a copy its own idle state
    nodes, calls = _swap_quantizers(model)
    wide = next((n.name for n in nodes if n.params.bits > 8), None)
    if wide is not None:
        raise ExportError(f"{wide}: quantizers above 8 bits are not exported (the QDQ export covers 2 to 8 bits)")
    wrapper = FlatOutputs(model).eval()
    with torch.no_grad():
        n_outputs = len(wrapper(example))
    calls.clear()
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True)
    onnx_model = onnx.load_from_string(buf.getvalue())
    _constants_to_initializers(onnx_model)
    _drop_input_casts(onnx_model)
    by_name = {n.name: n for n in nodes}
    activation_calls = [by_name[c] for c in calls]
    weights = [n for n in nodes if n.kind == "weight"]
    labelled = _label_qdq_nodes(onnx_model, activation_calls, _weights_in_graph_order(onnx_model, weights))
    meta = {
        "dgh.format": "dgh.onnx-qdq/1",
        "dgh.config": json.dumps(getattr(qmodel, "quant_config", None) or {}, default=str),
        "dgh.quantizers": json.dumps(_quantizer_metadata(labelled)),
        "dgh.outputs": json.dumps(output_names),
    }
    helper.set_model_props(onnx_model, meta)
    onnx_model.producer_name = "dgh"
    onnx.checker.check_model(onnx_model, full_check=True)
    data = onnx_model.SerializeToString()
    path = write_bytes(data, out_path)
    return ExportedGraph(Path(path), opset, INPUT_NAME, output_names, labelled, len(data))


def _weights_in_graph_order(model: onnx.ModelProto, weights: list[QuantizerNode]) -> list[QuantizerNode]:
    """Order weight quantizers like their DequantizeLinear nodes in the graph, matched by scale and shape."""
    inits = _initializer_values(model)
    remaining = list(weights)
    ordered: list[QuantizerNode] = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        scale = inits.get(node.input[1])
        values = inits[node.input[0]]
        for i, w in enumerate(remaining):
            if scale is not None and torch.equal(scale.reshape(-1), w.params.scale_tensor()) and \
                    values.shape[w.params.axis or 0] == len(w.params.scale):
                ordered.append(remaining.pop(i))
                break
        else:
            raise ExportError(f"weight DequantizeLinear {node.name} matches no weight quantizer")
    return ordered + remaining
