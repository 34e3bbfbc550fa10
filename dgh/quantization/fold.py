"""BatchNorm folding into the preceding convolution (Jacob et al. 2018, section 3.2; HPTQ arXiv 2109.09113).

For a conv ``y = W * x + b`` followed by BN ``(y - mu) * gamma / sqrt(var + eps) + beta``, per output channel c:

- ``W'_c = W_c * gamma_c / sqrt(var_c + eps)``
- ``b'_c = (b_c - mu_c) * gamma_c / sqrt(var_c + eps) + beta_c`` (``b = 0`` for a conv without bias).

This holds for grouped and depthwise convs (the output-channel axis is axis 0 of the weight in every case) and for
transposed convs with ``groups == 1`` (output-channel axis 1 of the ``(C_in, C_out, *k)`` weight).

Pairs are found without tracing: one eager forward on an example input with hooks records which BN's input tensor
is exactly the output tensor of which conv, and a ``TorchFunctionMode`` counts the torch ops that read each conv
output. A pair is folded only when the BN is the conv output's *only* reader (and the tensor is not a model output):
a conv whose raw output also feeds another op (a skip connection, a second BN, an in-place update) keeps its BN
unfolded, because folding would change what that other consumer reads. Works on every model family that runs
eagerly (ultralytics ``Conv``, classic YOLOv5, torchvision, CIFAR ResNets). Folding always happens on a deep copy;
the float model keeps its BN (generation reads its statistics). A BN that does not directly follow a conv stays as
it is (the capture runtime quantizes its output).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torchvision.ops.misc import FrozenBatchNorm2d

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm2d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)

# torch functions that only query metadata: they neither read a tensor's values nor count as a consumer
METADATA_OPS = frozenset({
    "__get__", "__set__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "__len__",
    "__repr__", "__format__", "__hash__", "is_floating_point", "get_device", "ndimension", "nelement",
    "requires_grad_", "register_hook", "retain_grad", "__reduce_ex__", "__deepcopy__", "__setstate__",
})


def _out_channel_axis(conv: nn.Module) -> int:
    return 1 if isinstance(conv, nn.modules.conv._ConvTransposeNd) else 0


class _ReaderCount(TorchFunctionMode):
    """Counts, per watched tensor (by id), the torch ops (metadata queries excluded) that take it as an argument."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.readers: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in METADATA_OPS:
            seen: set[int] = set()
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.watched and id(t) not in seen:
                    seen.add(id(t))
                    self.readers[id(t)] = self.readers.get(id(t), 0) + 1
        return func(*args, **kwargs)


class FoldError(ValueError):
    """BN folding failed (bad example input, mismatched channels). The message is one line."""


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(multiplier, offset)`` of an eval-mode BN: ``y = x * m + o``."""
    eps = float(getattr(bn, "eps", 1e-5))
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if getattr(bn, "weight", None) is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if getattr(bn, "bias", None) is not None else torch.zeros_like(var)
    mult = gamma / torch.sqrt(var + eps)
    return mult, beta - mean * mult


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``conv`` in place (formula in the module docstring). The conv gains a bias if it had none.

    Raises:
        FoldError: the BN channel count differs from the conv's output channels.
    """
    mult, offset = _bn_affine(bn)
    axis = _out_channel_axis(conv)
    if axis and getattr(conv, "groups", 1) != 1:
        raise FoldError(f"cannot fold BN into a transposed conv with groups={conv.groups}")
    out_ch = conv.weight.shape[axis]
    if mult.numel() != out_ch:
        raise FoldError(f"BN has {mult.numel()} channels but the conv before it outputs {out_ch}")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    shape = [1] * w.dim()
    shape[axis] = -1
    new_w = (w * mult.view(shape)).to(conv.weight.dtype)
    new_b = (b * mult + offset).to(conv.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(new_w)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)
    else:
        with torch.no_grad():
            conv.bias.copy_(new_b)


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """``[(conv_name, bn_name)]`` where the BN's input is exactly the conv's output tensor in one eager forward and
    the BN is that tensor's only reader (see the module docstring).

    Args:
        model: eval-mode module.
        example_input: NCHW float32 input (one image is enough).

    Raises:
        FoldError: the forward fails on the example input.
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, str] = {}  # id(output tensor) -> conv name (tensors kept alive below)
    keep: list[torch.Tensor] = []
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(mod, _inp, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = names[id(mod)]
            keep.append(out)

    def bn_hook(mod, inp):
        x = inp[0] if inp else None
        if isinstance(x, torch.Tensor) and id(x) in produced:
            pair = (produced[id(x)], names[id(mod)])
            if pair not in pairs:
                pairs.append(pair)

    for m in model.modules():
        if isinstance(m, _CONV_TYPES) and not (_out_channel_axis(m) and m.groups != 1):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _BN_TYPES):
            handles.append(m.register_forward_pre_hook(bn_hook))
    counter = _ReaderCount(produced)
    try:
        with torch.no_grad(), counter:
            output = model(example_input)
    except Exception as exc:  # noqa: BLE001 - any failure is reported as one line
        raise FoldError(f"forward on the example input failed while looking for conv-BN pairs: {exc}") from None
    finally:
        for h in handles:
            h.remove()
    # a conv output read by anything besides its BN (or returned by the model) must keep its raw value
    shared = {produced[k] for k, n in counter.readers.items() if n > 1}
    shared |= {produced[id(t)] for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and id(t) in produced}
    # a conv feeding two BNs, or a BN fed by two convs, cannot be folded
    conv_count: dict[str, int] = {}
    bn_count: dict[str, int] = {}
    for c, b in pairs:
        conv_count[c] = conv_count.get(c, 0) + 1
        bn_count[b] = bn_count.get(b, 0) + 1
    return [(c, b) for c, b in pairs if conv_count[c] == 1 and bn_count[b] == 1 and c not in shared]


_PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, FrozenBatchNorm2d.forward)


def _neutralize_bn(bn: nn.Module) -> None:
    """Make a folded BN that must stay in the graph (a subclass with its own forward, e.g. timm's ``BatchNormAct2d``
    = BN + activation) compute exactly ``x`` in its normalization (mean 0, var 1, eps 0, gamma 1, beta 0), so its
    forward keeps the rest (the activation). ``bn._dgh_folded_bn`` tells the capture runtime that this
    normalization is no quantization site."""
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        if getattr(bn, "weight", None) is not None:
            bn.weight.fill_(1.0)
        if getattr(bn, "bias", None) is not None:
            bn.bias.zero_()
    bn.eps = 0.0
    bn._dgh_folded_bn = True


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batch_norms(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Deep-copy ``model``, fold every conv-BN pair (see :func:`find_conv_bn_pairs`), replace those BNs by Identity
    (a BN subclass with its own forward stays, its normalization made exactly the identity: :func:`_neutralize_bn`).

    Returns:
        ``(folded_copy, pairs)``; ``model`` itself is unchanged.
    """
    folded = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(folded, example_input)
    for conv_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        fold_conv_bn(folded.get_submodule(conv_name), bn)
        if type(bn).forward in _PLAIN_BN_FORWARDS:
            set_submodule(folded, bn_name, nn.Identity())
        else:
            _neutralize_bn(bn)
    return folded, pairs
