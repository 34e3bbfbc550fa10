"""Graph coverage without tracing: eager module replacement + a ``TorchFunctionMode`` over functional ops.

How a model is wrapped (:func:`build_quantized_model`):

0. Refusals before any forward (:func:`check_supported_modules`): ``nn.MultiheadAttention`` (its projections are
   applied straight from its weights) and grouped transposed convs raise a one-line :class:`CaptureError`.
1. BN is folded into the preceding conv on a deep copy (:mod:`dgh.quantization.fold`), only where the BN is the
   conv output's sole reader.
2. Every ``Conv1d``/``Conv2d``/``ConvTranspose1d``/``ConvTranspose2d``/``Linear`` (subclasses included; a subclass
   with its own forward keeps it) is replaced by its quantized version (:mod:`dgh.quantization.layers`).
3. The model is wrapped in :class:`QuantizedModel` (``.model`` is the wrapped network, ``.input_quantizer``
   quantizes the network input).
4. Forward pre/post hooks on every module keep a module stack; the first module called (the *entry*: the wrapper
   for a full forward, or any submodule called on its own) switches on a ``torch.overrides.TorchFunctionMode``
   for the duration of its call.

Quantization *sites* (tensors that integer hardware materializes), seen by the mode during forward:

- conv/linear/transposed-conv outputs (quantizer ``<layer>.output_quantizer``);
- ``add``/``sub``/``mul``/``div`` of two non-scalar tensors (``+``, ``+=``, ``torch.add`` ...), ``cat``/``stack``,
  pooling (``max/avg/adaptive`` pools, ``mean`` over dims), ``interpolate``/``Upsample``, functional
  convs/linears, ``matmul``/``@``/``bmm``/``einsum``, an unfolded BN (``batch_norm``), ``layer_norm``/``group_norm``/
  ``instance_norm``, ``softmax`` (quantizer ``<owner module>.act_quantizers[<op><k>]``, ``k`` = call index of that op
  inside one call of the owner; ``@i`` is appended for the i-th repeated call of the owner within one entry call).
  When the owner is a container (``nn.Sequential``/``ModuleList``/``ModuleDict`` subclass with its own forward,
  e.g. DenseNet's ``_DenseBlock``), whose forward iterates its children, the quantizer lives on the nearest
  non-container ancestor as ``act_quantizers["<container path relative to it, / separated>/<op><k>"]``.
- A folded BN kept in the graph for the rest of its forward (timm ``BatchNormAct2d``) is an exact identity in its
  normalization and no site.

Observe phase checks (first calibration batch, before the long work): a >= 2-D parameter may reach a weight op
(conv/linear/matmul/attention) only as the unchanged weight of the quantized layer running the op; anything else
(e.g. torchvision Swin's ``F.linear(x, self.qkv.weight)``, a weight-standardizing conv) is a one-line
:class:`CaptureError`.

Capture options measured (``python benchmarks/quantize.py --capture``; 2-core CPU shared with 4 other jobs,
torch 2.14.1, random weights, input 1x3x64x64 except CIFAR 32x32; "sites" for fx/export = graph nodes that are
conv/linear/add/cat/pool/upsample/mean; for eager = activation quantization sites including the input):

====================  =====================  =====================  =====================
model                 torch.fx trace         torch.export           eager (this module)
====================  =====================  =====================  =====================
resnet20_cifar10      ok, 30, 0.15 s         ok, 30, 4.6 s          ok, 31, 5.0 s
resnet18 (tv)         ok, 31, 0.08 s         ok, 31, 2.9 s          ok, 32, 5.9 s
resnet50 (tv)         ok, 72, 0.14 s         ok, 72, 7.3 s          ok, 73, 15.8 s
mobilenet_v2 (tv)     ok, 64, 0.19 s         ok, 64, 6.9 s          ok, 65, 11.4 s
yolov8n (ultralytics) FAILS (TraceError:     ok, 90, 8.4 s          ok, 91, 6.4 s
                      Proxy cannot be
                      iterated)
yolov5n (classic,     ok, 85, 0.15 s         ok, 85, 5.1 s          ok, 86, 7.4 s
dgh's rebuilt model)
====================  =====================  =====================  =====================

(eager time = deep copy + BN folding forward + one site-discovery forward; the machine load inflates all times.)

Why eager: it is the only option that works on all four families *and* keeps the module hierarchy. ``torch.fx``
fails on ultralytics models (the MCT failure mode). ``torch.export`` succeeds but returns a flat ATen graph: no
submodule can be called on its own, which BRECQ block reconstruction needs, and every model pays an export of several
seconds. The eager approach finds the same sites as the graph methods (+1: the network input, which graph node
counts do not include).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from dgh.quantization.fold import METADATA_OPS, fold_batch_norms, set_submodule
from dgh.quantization.layers import (
    FLOAT_LAYER_TYPES,
    QUANT_LAYER_TYPES,
    UnsupportedLayerError,
    check_supported_layer,
    to_quant_layer,
)
from dgh.quantization.quantizers import FakeQuantizer, QuantizerError

# op name (func.__name__) -> canonical site op
_BINARY = {
    "add": "add", "add_": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__rsub__": "sub", "__isub__": "sub",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul",
    "div": "div", "div_": "div", "__truediv__": "div", "__itruediv__": "div", "true_divide": "div",
}
_SITE_OPS = {
    "cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "stack",
    "max_pool1d": "maxpool", "max_pool2d": "maxpool", "_max_pool2d": "maxpool", "max_pool2d_with_indices": "maxpool",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool",
    "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool",
    "adaptive_max_pool1d": "maxpool", "adaptive_max_pool2d": "maxpool", "_adaptive_max_pool2d": "maxpool",
    "interpolate": "upsample", "upsample": "upsample", "upsample_nearest2d": "upsample",
    "upsample_bilinear2d": "upsample", "mean": "mean",
    "conv1d": "conv", "conv2d": "conv", "conv_transpose1d": "conv", "conv_transpose2d": "conv", "linear": "linear",
    "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "bmm": "matmul", "mm": "matmul",
    "einsum": "matmul",
    "batch_norm": "bn", "layer_norm": "norm", "group_norm": "norm", "instance_norm": "norm",
    "softmax": "softmax", "log_softmax": "softmax",
    **_BINARY,
}
# ops that multiply by a weight: a >= 2-D parameter may reach them only as the weight of a quantized layer
_WEIGHT_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "bilinear",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "multi_head_attention_forward",
})
# float module types whose forward uses their weights without calling a quantizable layer: refused at build time
_UNSUPPORTED_MODULES: dict[type, str] = {
    nn.MultiheadAttention: "its projections are applied by F.multi_head_attention_forward straight from its "
    "weights, not by quantizable layers",
}
ACTIVATION_OPS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "gelu", "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "mish", "elu",
    "elu_", "tanh", "tanh_", "softplus", "prelu", "celu", "selu",
})
# metadata queries never force quantization of a pending tensor
_PASSTHROUGH = METADATA_OPS
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# the ops a quantized layer's forward runs with its (quantized) weight
_LAYER_OP_NAMES = frozenset({"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "linear"})


class CaptureError(ValueError):
    """The model could not be wrapped or run with quantization sites. The message is one line."""


@dataclass
class SiteInfo:
    """What calibration learned about one activation site (observe phase only)."""

    name: str
    quantizer: FakeQuantizer
    order: int
    producers: list[str] = field(default_factory=list)
    is_output: bool = False


@dataclass
class _Frame:
    module: nn.Module
    path: str
    invocation: int
    counters: dict[str, int] = field(default_factory=dict)


class _Runtime:
    """Per-model capture state (not a module, no tensors kept between calls)."""

    def __init__(self) -> None:
        self.phase = "quantize"  # or "observe"
        self.observer: Callable[[str, FakeQuantizer, torch.Tensor], None] | None = None
        self.sites: dict[str, SiteInfo] = {}
        self.layer_order: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self.entry: nn.Module | None = None
        self.mode: _SiteMode | None = None
        self.stack: list[_Frame] = []
        self.calls: dict[str, int] = {}
        self.pending: WeakIdKeyDictionary | None = None

    def abort(self) -> None:
        """Return to idle after a forward pass that was interrupted (an exception raised inside the model, e.g. by a
        hook that stops the pass once it has what it needs): leave the site mode and drop the call stack."""
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        self._reset()

    def __deepcopy__(self, memo):  # a copied model gets a fresh, idle runtime with the same phase
        new = _Runtime()
        memo[id(self)] = new
        new.phase = self.phase
        return new

    # ------------------------------------------------------------------------------------------ applying
    def apply(self, name: str, quantizer: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
        """Quantize (or observe, in the observe phase) tensor ``x`` at site ``name``."""
        with torch._C.DisableTorchFunction():
            if self.phase == "observe":
                if self.observer is not None:
                    self.observer(name, quantizer, x.detach())
                return x
            try:
                return quantizer(x)
            except QuantizerError as exc:
                raise CaptureError(f"site {name}: {exc}") from None

    def resolve(self, t: torch.Tensor) -> torch.Tensor:
        """The quantized version of ``t`` if it is a pending site output, else ``t``."""
        entry = self.pending.get(t) if self.pending is not None else None
        if entry is None:
            return t
        if entry[2] is None:
            entry[2] = self.apply(entry[1], entry[0], t)
        return entry[2]

    # ------------------------------------------------------------------------------------------- sites
    def site_quantizer(self, op: str, raw_name: str) -> tuple[FakeQuantizer, str]:
        frame = self.stack[-1] if self.stack else None
        owner = frame.module if frame is not None else None
        if owner is not None and isinstance(owner, QUANT_LAYER_TYPES) and op in ("conv", "linear"):
            return owner.output_quantizer, frame.path
        if owner is None:
            raise CaptureError(f"functional op {raw_name} called outside any module of the model")
        k = frame.counters.get(op, 0)
        frame.counters[op] = k + 1
        key = f"{op}{k}" + (f"@{frame.invocation}" if frame.invocation else "")
        store, prefix = owner, ""
        if isinstance(owner, _CONTAINERS):  # a container iterates its children: its quantizers live on an ancestor
            store, prefix = getattr(owner, "_dgh_site_store", (None, ""))
            if store is None:
                raise CaptureError(f"functional op {raw_name} in container {frame.path or type(owner).__name__} "
                                   "has no enclosing module to own its quantizer")
        qdict = getattr(store, "act_quantizers", None)
        if qdict is None:
            qdict = nn.ModuleDict()
            store.act_quantizers = qdict
        qkey = prefix + key
        if qkey not in qdict:
            if self.phase != "observe":
                raise CaptureError(f"site {frame.path}:{key} was not seen during calibration (data-dependent graph?)")
            ref = next(iter(store.parameters()), None)
            q = FakeQuantizer(role="activation")
            if ref is not None:
                q.to(ref.device)
            qdict[qkey] = q
        return qdict[qkey], f"{frame.path}:{key}"

    def check_weight_use(self, name: str, args, kwargs) -> None:
        """Observe phase: a >= 2-D parameter may reach a weight op (conv/linear/matmul ...) only as the weight of the
        quantized layer that runs the op, passed unchanged (all quantizers are transparent in this phase).

        Raises:
            CaptureError: a weight used outside a quantizable layer, or transformed inside one.
        """
        frame = self.stack[-1] if self.stack else None
        owner = frame.module if frame is not None else None
        where = f"{frame.path or 'model'} ({type(owner).__name__})" if frame is not None else "model"
        own_weight = owner.weight if isinstance(owner, QUANT_LAYER_TYPES) else None
        used_own = False

        def visit(t):
            nonlocal used_own
            if t is own_weight:
                used_own = True
            elif isinstance(t, nn.Parameter) and t.dim() >= 2:
                raise CaptureError(
                    f"{where} passes a parameter of shape {tuple(t.shape)} straight to {name} instead of calling a "
                    "quantizable layer, so that weight cannot be quantized; this architecture is not supported"
                )
            return t

        tree_map_only(torch.Tensor, visit, (args, kwargs))
        if own_weight is not None and not used_own and name in _LAYER_OP_NAMES:
            raise CaptureError(
                f"{where}: its forward passes a transformed weight to {name}; only layers that use their weight "
                "unchanged (e.g. 'same'-padding subclasses) can be quantized"
            )

    def mark(self, out: torch.Tensor, quantizer: FakeQuantizer, name: str, producers: list[str]) -> None:
        self.pending[out] = [quantizer, name, None]
        if self.phase == "observe" and name not in self.sites:
            self.sites[name] = SiteInfo(name, quantizer, len(self.sites), producers)

    # ------------------------------------------------------------------------------------------- hooks
    def pre_hook(self, module: nn.Module, args):
        if not self.active:
            self.active = True
            self.entry = module
            self.pending = WeakIdKeyDictionary()
            self.mode = _SiteMode(self)
            self.mode.__enter__()
        path = getattr(module, "_dgh_path", "?")
        inv = self.calls.get(path, 0)
        self.calls[path] = inv + 1
        self.stack.append(_Frame(module, path, inv))
        if self.phase == "observe" and isinstance(module, QUANT_LAYER_TYPES) and path not in self.layer_order:
            self.layer_order.append(path)
        return None

    def post_hook(self, module: nn.Module, args, output):
        if self.stack and self.stack[-1].module is module:
            self.stack.pop()
        if not (self.active and self.entry is module and not self.stack):
            return None
        is_root = isinstance(module, QuantizedModel)
        try:
            self.mode.__exit__(None, None, None)
            self.mode = None

            def finish(t: torch.Tensor) -> torch.Tensor:
                entry = self.pending.get(t)
                if entry is not None and is_root and self.phase == "observe" and entry[1] in self.sites:
                    self.sites[entry[1]].is_output = True
                return self.resolve(t)

            return tree_map_only(torch.Tensor, finish, output)
        finally:
            self._reset()


def _canonical(name: str) -> str | None:
    return _SITE_OPS.get(name)


def _producers(rt: _Runtime, args, kwargs) -> list[str]:
    found: list[str] = []

    def visit(t):
        e = rt.pending.get(t)
        if e is not None:
            found.append(e[1])
        return t

    tree_map_only(torch.Tensor, visit, (args, kwargs))
    return found


class _SiteMode(TorchFunctionMode):
    """Intercepts every torch function call during an entry module's forward (see the module docstring)."""

    def __init__(self, runtime: _Runtime) -> None:
        super().__init__()
        self.rt = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _PASSTHROUGH:
            return func(*args, **kwargs)
        rt = self.rt
        if name == "batch_norm" and getattr(rt.stack[-1].module if rt.stack else None, "_dgh_folded_bn", False):
            # a folded BN kept for the rest of its forward: its normalization is the identity, no site
            x = args[0] if args else kwargs.get("input")
            out = func(*args, **kwargs)
            entry = rt.pending.get(x) if isinstance(x, torch.Tensor) else None
            if entry is not None and entry[2] is None and isinstance(out, torch.Tensor):
                rt.pending[out] = [entry[0], entry[1], None]
            return out
        if name in ACTIVATION_OPS:
            x = args[0] if args else kwargs.get("input")
            entry = rt.pending.get(x) if isinstance(x, torch.Tensor) else None
            if entry is not None and entry[2] is None:
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    rt.pending[out] = [entry[0], entry[1], None]
                return out
        op = _canonical(name)
        if rt.phase == "observe" and name in _WEIGHT_OPS:
            rt.check_weight_use(name, args, kwargs)
        producers = _producers(rt, args, kwargs) if (op is not None and rt.phase == "observe") else []
        args, kwargs = tree_map_only(torch.Tensor, rt.resolve, (args, kwargs))
        out = func(*args, **kwargs)
        if op is None or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if op in ("add", "sub", "mul", "div"):
            a = args[0] if len(args) > 0 else kwargs.get("input")
            b = args[1] if len(args) > 1 else kwargs.get("other")
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() > 1 and b.numel() > 1):
                return out
        if op == "mean" and out.dim() == 0:
            return out
        quantizer, site = rt.site_quantizer(op, name)
        rt.mark(out, quantizer, site, producers)
        return out


class QuantizedModel(nn.Module):
    """A fake-quantized network with the float model's forward contract.

    Attributes:
        model: the wrapped network (BN folded, quantized conv/linear layers; same submodule names as the float model,
            minus folded BNs that became ``nn.Identity``).
        input_quantizer: quantizer of the network input (normalized space).
        folded_pairs: ``[(conv_name, bn_name)]`` folded at build time.

    Forward: ``x`` of the float model's input shape -> the float model's output structure (e.g. logits ``(N, K)`` or
    a list of raw detection maps), every tensor fake-quantized as described in the module docstring.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_quantizer = FakeQuantizer(role="input")
        self.folded_pairs: list[tuple[str, str]] = []
        self._dgh_runtime = _Runtime()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        # fake quantization is defined in float32: an outer fp16 autocast (e.g. AMP evaluation) is switched off here
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self._dgh_runtime.apply("input", self.input_quantizer, x.float())
            return self.model(x, *args, **kwargs)

    @property
    def runtime(self) -> _Runtime:
        return self._dgh_runtime


def iter_quantizers(qmodel: nn.Module):
    """Yield ``(name, FakeQuantizer)`` for every quantizer in ``qmodel`` (module names, ``named_modules`` order)."""
    for name, mod in qmodel.named_modules():
        if isinstance(mod, FakeQuantizer):
            yield name, mod


def install_hooks(qmodel: QuantizedModel) -> None:
    """Set ``_dgh_path`` on every module and register the stack/entry hooks (idempotent per module)."""
    rt = qmodel.runtime
    modules = dict(qmodel.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, _CONTAINERS) and name:
            # quantizers of ops in a container's own forward live on its nearest non-container ancestor
            # (``act_quantizers["<relative/path>/<op><k>"]``); a container's children must all be its layers
            anc = name
            while anc and isinstance(modules[anc], _CONTAINERS):
                anc = anc.rpartition(".")[0]
            rel = name[len(anc) + 1 :] if anc else name
            object.__setattr__(mod, "_dgh_site_store", (modules[anc], rel.replace(".", "/") + "/"))
    for name, mod in modules.items():
        if isinstance(mod, FakeQuantizer) or type(mod) is nn.ModuleDict or getattr(mod, "_dgh_hooked", False):
            continue
        mod._dgh_path = name
        mod.register_forward_pre_hook(rt.pre_hook)
        mod.register_forward_hook(rt.post_hook, always_call=True)
        mod._dgh_hooked = True


def check_supported_modules(model: nn.Module) -> None:
    """Refuse, before any forward, a model holding a module type whose weights cannot be quantized
    (:data:`_UNSUPPORTED_MODULES`, e.g. ``nn.MultiheadAttention``) or an unsupported layer (a grouped transposed conv).

    Raises:
        CaptureError: naming the first such module and the reason.
    """
    for name, mod in model.named_modules():
        for cls, reason in _UNSUPPORTED_MODULES.items():
            if isinstance(mod, cls):
                raise CaptureError(f"{name or 'model'} is a {type(mod).__name__}: {reason}; this architecture is "
                                   "not supported")
        try:
            check_supported_layer(mod)
        except UnsupportedLayerError as exc:
            raise CaptureError(f"{name or 'model'}: {exc}") from None


def build_quantized_model(model: nn.Module, example_input: torch.Tensor) -> QuantizedModel:
    """Refuse unsupported architectures, fold BN (on a deep copy), swap conv/linear for quantized layers, wrap,
    install hooks.

    Quantizers are not calibrated yet; activation-site quantizers are created by the first observe-phase forward
    (:func:`discover_sites`).

    Args:
        model: float ``nn.Module`` in eval mode (left unchanged).
        example_input: one input batch (NCHW float32, normalized space) for BN pairing.

    Raises:
        CaptureError: an architecture that cannot be quantized (:func:`check_supported_modules`).
        FoldError: the model cannot run on ``example_input``.
    """
    check_supported_modules(model)
    folded, pairs = fold_batch_norms(model, example_input)
    try:
        for name, mod in list(folded.named_modules()):
            if name and isinstance(mod, FLOAT_LAYER_TYPES) and not isinstance(mod, QUANT_LAYER_TYPES):
                set_submodule(folded, name, to_quant_layer(mod))
        if isinstance(folded, FLOAT_LAYER_TYPES):
            folded = to_quant_layer(folded)
    except UnsupportedLayerError as exc:
        raise CaptureError(str(exc)) from None
    qmodel = QuantizedModel(folded)
    qmodel.folded_pairs = pairs
    ref = next(iter(folded.parameters()), None)
    if ref is not None:
        qmodel.input_quantizer.to(ref.device)
    install_hooks(qmodel)
    return qmodel.eval()


def discover_sites(
    qmodel: QuantizedModel,
    images_nchw: torch.Tensor,
    observer: Callable[[str, FakeQuantizer, torch.Tensor], None] | None = None,
) -> dict[str, SiteInfo]:
    """Run one observe-phase forward (all quantizers transparent): creates missing site quantizers, records sites.

    Returns:
        ``{site name: SiteInfo}`` in first-seen order, including ``"input"``.
    """
    rt = qmodel.runtime
    rt.phase = "observe"
    rt.observer = observer
    saved = {name: q.enabled for name, q in iter_quantizers(qmodel)}
    for _, q in iter_quantizers(qmodel):
        q.enabled = False
    try:
        with torch.no_grad():
            qmodel(images_nchw)
    finally:
        rt.phase = "quantize"
        rt.observer = None
        for name, q in iter_quantizers(qmodel):
            q.enabled = saved.get(name, True)
    sites = {"input": SiteInfo("input", qmodel.input_quantizer, -1)}
    sites.update(rt.sites)
    install_hooks(qmodel)
    return sites
