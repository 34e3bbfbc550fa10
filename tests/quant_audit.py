"""An independent check of quantizer coverage, used by the coverage tests (not by the library).

:func:`audit_coverage` runs a quantized model once under an outer ``TorchFunctionMode`` that follows every tensor's
*status*: ``Q`` (on a quantization grid: the output of an enabled fake quantizer, or of a data-movement op such as a
view, zero pad, ReLU clamp or max-pool applied to such a tensor, or of a scalar affine op such as ``x * 0.5``),
``C`` (a constant: a parameter, a buffer, or computed from constants only) or ``F`` (a float value computed from
activations and never quantized). Integer hardware only ever feeds integer tensors to an op, so:

- every tensor argument of a value-computing op (conv, linear, matmul, add, cat, pool, norm, softmax ...) must be
  ``Q`` or ``C``; an activation function may take an ``F`` input (it is fused with the op before it, and its
  output must then be quantized before the next value op);
- every >= 2-D parameter passed to a weight op (conv/linear/matmul/attention) must be a fake-quantized weight;
- every tensor the model returns must be ``Q``.

The rules are written from what integer hardware materializes, not from :mod:`dgh.quantization.capture`'s site
list, so the two are checked against each other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dgh.quantization import FakeQuantizer

# ops that only query metadata
_META = frozenset({
    "__get__", "__set__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "__len__",
    "__repr__", "__format__", "__hash__", "is_floating_point", "get_device", "ndimension", "nelement",
    "requires_grad_", "register_hook", "retain_grad", "__reduce_ex__", "__deepcopy__", "__setstate__", "__bool__",
    "__int__", "__float__", "__index__", "item", "tolist", "__iter__", "type", "is_complex", "has_names",
    "_is_view", "dtype", "device", "shape",
})
# data movement: the output holds (a subset of, or zeros next to) the values of the first tensor argument
_MOVE = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "transpose_", "t",
    "contiguous", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "__getitem__", "narrow", "select", "chunk",
    "split", "split_with_sizes", "tensor_split", "unbind", "expand", "expand_as", "repeat", "clone", "detach", "to",
    "float", "cpu", "cuda", "pad", "constant_pad_nd", "dropout", "dropout_", "dropout1d", "dropout2d",
    "feature_dropout", "alpha_dropout", "roll", "flip", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "movedim", "swapaxes",
    "index_select", "gather", "take_along_dim", "max_pool1d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices",
    "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool1d", "relu", "relu_", "relu6", "hardtanh",
    "hardtanh_", "identity", "stochastic_depth", "__setitem__", "zero_", "fill_", "type_as", "requires_grad_",
})
# activation functions: fused with the op before them (their input may be unquantized)
_ACT = frozenset({
    "silu", "silu_", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_", "gelu", "sigmoid", "sigmoid_",
    "hardsigmoid", "hardsigmoid_", "mish", "elu", "elu_", "tanh", "tanh_", "softplus", "prelu", "celu", "selu",
})
_AFFINE = frozenset({
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__", "__itruediv__",
    "true_divide", "neg", "__neg__",
})
_WEIGHT_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "bilinear",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "multi_head_attention_forward",
})
_FACTORY = frozenset({"zeros", "ones", "arange", "full", "empty", "rand", "randn", "linspace", "tensor", "zeros_like",
                      "ones_like", "full_like", "empty_like", "meshgrid", "stack_constants"})


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _is_identity_bn(args, kwargs) -> bool:
    """``F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)`` that returns ``x`` exactly in eval
    (mean 0, var 1, eps 0, weight 1 or None, bias 0 or None)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = dict(zip(names, args))
    a.update(kwargs)

    def all_equal(t, v) -> bool:
        return t is None or bool((t == v).all())

    return (not a.get("training", False) and float(a.get("eps", 1e-5)) == 0.0 and all_equal(a.get("running_mean"), 0)
            and all_equal(a.get("running_var"), 1) and all_equal(a.get("weight"), 1) and all_equal(a.get("bias"), 0))


class _Audit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.status: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (tensor kept alive, status)
        self.violations: list[str] = []
        self.path: list[str] = [""]

    def get(self, t: torch.Tensor) -> str:
        e = self.status.get(id(t))
        return e[1] if e is not None and e[0] is t else "C"

    def set(self, t: torch.Tensor, s: str) -> None:
        self.status[id(t)] = (t, s)

    def flag(self, msg: str) -> None:
        where = self.path[-1] or "model"
        if len(self.violations) < 50:
            self.violations.append(f"{where}: {msg}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if name in _META:
            return out
        ins = [t for t in _tensors((args, kwargs)) if t.is_floating_point()]
        outs = [t for t in _tensors(out) if t.is_floating_point()]
        if not outs:
            return out
        if not ins:
            st = "C"
        elif name in _MOVE or (name == "batch_norm" and _is_identity_bn(args, kwargs)):
            st = self.get(ins[0])
        elif name in _ACT:
            st = "C" if all(self.get(t) == "C" for t in ins) else "F"
        elif name in _AFFINE and (len(ins) == 1 or min(t.numel() for t in ins) == 1):
            big = max(ins, key=lambda t: t.numel())
            st = self.get(big)
        else:
            for t in ins:
                if self.get(t) == "F":
                    self.flag(f"{name} reads an unquantized activation of shape {tuple(t.shape)}")
            if name in _WEIGHT_OPS:
                for t in ins:
                    if isinstance(t, nn.Parameter) and t.dim() >= 2:
                        self.flag(f"{name} uses an unquantized weight of shape {tuple(t.shape)}")
            st = "C" if all(self.get(t) == "C" for t in ins) else "F"
        for t in outs:
            self.set(t, st)
        return out


def audit_coverage(qmodel: nn.Module, images_nchw: torch.Tensor) -> list[str]:
    """Run ``qmodel(images_nchw)`` once (no grad) and return the coverage violations (empty = fully covered).

    Each entry is one line ``"<module path>: <what>"``; see the module docstring for the rules.
    """
    audit = _Audit()
    handles = []

    def q_hook(mod, args, out):
        if mod.enabled and not mod.bypass and isinstance(out, torch.Tensor):
            audit.set(out, "Q")

    def pre(mod, args):
        audit.path.append(names.get(id(mod), "?"))

    def post(mod, args, out):
        audit.path.pop()

    names = {id(m): n for n, m in qmodel.named_modules()}
    for m in qmodel.modules():
        if isinstance(m, FakeQuantizer):
            handles.append(m.register_forward_hook(q_hook))
        else:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.no_grad(), audit:
            out = qmodel(images_nchw)
    finally:
        for h in handles:
            h.remove()
    for i, t in enumerate(_tensors(out)):
        if t.is_floating_point() and audit.get(t) != "Q":
            audit.violations.append(f"model output {i} of shape {tuple(t.shape)} is not quantized")
    return audit.violations
