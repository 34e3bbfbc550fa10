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

    Rule: natural-image pixel statistics mapped through the model's own normalization. The natural-image statistics
    are the ImageNet per-channel pixel mean 0.485/0.456/0.406 and std 0.229/0.224/0.225 (RGB, 0-1 scale; the
    statistics over images and pixels that torchvision's normalization uses), so the target is
    ``mean_t = (0.485 - mean_c) / std_c`` and ``std_t = 0.229 / std_c`` (per channel c).

    - Models normalized with the ImageNet mean/std (torchvision, the CIFAR ResNets here): exactly mean 0, std 1,
      the paper's target (method.md section 3; ssi-research/DGH ``OrigBNStatsHolder`` "images normalized to be
      0-mean, 1-variance").
    - Models with identity normalization (YOLO, RGB in [0, 1]): the ImageNet pixel statistics themselves.
    - Models normalized otherwise, e.g. EfficientNet-Lite's ``(x - 127) / 128`` (std 128/255 = 0.502): std
      ``0.229 / 0.502 = 0.46`` instead of 1. A 0/1 target there would ask for a pixel std of 0.5, about twice that
      of natural images (real ImageNet images measure 0.25-0.28 per channel under this model's preprocessing).

    ``spec=None`` gives 0/1.
    """
    if spec is None:
        mean, std = torch.zeros(3), torch.ones(3)
    else:
        model_mean = torch.tensor(spec.mean, dtype=torch.float64)
        model_std = torch.tensor(spec.std, dtype=torch.float64)
        mean = (torch.tensor(IMAGENET_MEAN, dtype=torch.float64) - model_mean) / model_std
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64) / model_std
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
