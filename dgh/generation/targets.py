"""Which BN layer is "the last BN" of the output loss, and the target of the input pseudo-layer.

Both are model-structure decisions, so they live apart from the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dgh.generation.bn_stats import BNTarget
from dgh.generation.config import LastBN
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


def flatten_outputs(output: object) -> list[torch.Tensor]:
    """The model output as a flat list of tensors (a tensor, or nested lists/tuples/dicts of tensors)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flatten_outputs(item)]
    return []


def input_target(spec: ModelSpec | None, std_eps: float = 0.0) -> BNTarget:
    """Target of the input pseudo-layer ``l = 0`` in normalized space, ``(3,)`` float32 mean and std.

    method.md section 3 sets mean 0 and std 1 per channel, which is what the normalization of ImageNet/CIFAR models
    maps natural images to. Models that take raw RGB in [0, 1] (YOLO: mean 0, std 1, identity normalization) would
    be pushed towards black images by that target, so for them the target is the ImageNet pixel statistics
    (mean 0.485/0.456/0.406, std 0.229/0.224/0.225) expressed in their input space: a natural-image prior instead of
    an unreachable one. ``spec=None`` gives 0/1.
    """
    if spec is None or not (tuple(spec.mean) == (0.0, 0.0, 0.0) and tuple(spec.std) == (1.0, 1.0, 1.0)):
        mean, std = torch.zeros(3), torch.ones(3)
    else:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return BNTarget("input", mean.float(), torch.sqrt(std.float() ** 2 + std_eps))


def _nearest_bns(root: object, node_to_layer: dict) -> set[int]:
    """BN layers reached walking the autograd graph back from ``root`` without crossing another BN."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node in node_to_layer:
            found.add(node_to_layer[node])
            continue
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return found


def find_last_bns(
    model: nn.Module, sample_nchw: torch.Tensor, layers: Sequence[tuple[str, nn.Module]], mode: LastBN
) -> list[int]:
    """Indices (into ``layers``) of the BN layer(s) whose input the output loss's hinge penalties constrain.

    Choice for detectors (what "the last BN layer" means there): a multi-level head has one output per level,
    each fed by its own neck branch. With ``mode=feeding`` (default), for each model output we walk its autograd
    graph backwards and stop at BN layers: among the BNs nearest to that output (no other BN in between) the one
    called last is that output's "last BN". For YOLOv5 this is the BN ending the C3 block that feeds each Detect
    conv (levels P3, P4, P5: three BNs); for a classifier it is the single last BN, the paper's definition.
    Reason: the hinge keeps the last BN's per-image statistics near the running statistics while the range term
    stretches the output; with a single BN (``mode=last``) only the P5 branch is held and P3/P4 may drift.
    ``mode=last`` is kept as the alternative (measured in the issue note).

    Args:
        sample_nchw: one valid input batch (``(1, 3, H, W)`` suffices), on the model's device.

    Returns:
        Sorted distinct layer indices; never empty.
    """
    index = {id(m): i for i, (_, m) in enumerate(layers)}
    node_to_layer: dict = {}
    call_rank: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        i = index[id(module)]
        call_rank.setdefault(i, len(call_rank))
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            node_to_layer.setdefault(output.grad_fn, i)
            keep.append(output)

    handles = [m.register_forward_hook(hook) for _, m in layers]
    try:
        with torch.enable_grad():
            outputs = flatten_outputs(model(sample_nchw.detach().clone().requires_grad_(True)))
    finally:
        for h in handles:
            h.remove()
    if not call_rank:
        return [len(layers) - 1]
    last_called = max(call_rank, key=call_rank.get)
    if mode is LastBN.LAST:
        return [last_called]
    chosen: set[int] = set()
    for z in outputs:
        near = _nearest_bns(z.grad_fn, node_to_layer)
        chosen.add(max(near, key=call_rank.get) if near else last_called)
    return sorted(chosen)
