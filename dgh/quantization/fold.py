"""BatchNorm folding into the preceding convolution (Jacob et al. 2018, section 3.2; HPTQ arXiv 2109.09113).

For a conv ``y = W * x + b`` followed by BN ``(y - mu) * gamma / sqrt(var + eps) + beta``, per output channel c:

- ``W'_c = W_c * gamma_c / sqrt(var_c + eps)``
- ``b'_c = (b_c - mu_c) * gamma_c / sqrt(var_c + eps) + beta_c`` (``b = 0`` for a conv without bias).

This holds for grouped and depthwise convs (the output-channel axis is axis 0 of the weight in every case).

Pairs are found without tracing: one eager forward on an example input with hooks records which BN's input tensor
is exactly the output tensor of which ``Conv1d``/``Conv2d``. Works on every model family that runs eagerly
(ultralytics ``Conv``, classic YOLOv5, torchvision, CIFAR ResNets). Folding always happens on a deep copy; the float
model keeps its BN (generation reads its statistics). A BN that does not directly follow a conv stays as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm2d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


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
    out_ch = conv.weight.shape[0]
    if mult.numel() != out_ch:
        raise FoldError(f"BN has {mult.numel()} channels but the conv before it outputs {out_ch}")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    shape = (-1,) + (1,) * (w.dim() - 1)
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
    """``[(conv_name, bn_name)]`` where the BN's input is exactly the conv's output tensor in one eager forward.

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
        if isinstance(m, _CONV_TYPES):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _BN_TYPES):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:  # noqa: BLE001 - any failure is reported as one line
        raise FoldError(f"forward on the example input failed while looking for conv-BN pairs: {exc}") from None
    finally:
        for h in handles:
            h.remove()
    # a conv feeding two BNs, or a BN fed by two convs, cannot be folded
    conv_count: dict[str, int] = {}
    bn_count: dict[str, int] = {}
    for c, b in pairs:
        conv_count[c] = conv_count.get(c, 0) + 1
        bn_count[b] = bn_count.get(b, 0) + 1
    return [(c, b) for c, b in pairs if conv_count[c] == 1 and bn_count[b] == 1]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batch_norms(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Deep-copy ``model``, fold every conv-BN pair (see :func:`find_conv_bn_pairs`), replace those BNs by Identity.

    Returns:
        ``(folded_copy, pairs)``; ``model`` itself is unchanged.
    """
    folded = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(folded, example_input)
    for conv_name, bn_name in pairs:
        fold_conv_bn(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        set_submodule(folded, bn_name, nn.Identity())
    return folded, pairs
