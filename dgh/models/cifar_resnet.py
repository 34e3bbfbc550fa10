"""CIFAR ResNets (He et al. 2016, section 4.2) with the parameter-free "option A" shortcut.

Module names match the akamaster/pytorch_resnet_cifar10 checkpoints:
``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, load_state_dict_file, load_state_dict_strict
from dgh.models.registry import register_model
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 in H and W, zero-pad channels by ``planes // 4`` on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C + 2*pad, H/2, W/2)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): input ``(N, 3, 32, 32)`` normalized, output logits ``(N, num_classes)``."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


CIFAR_DEPTHS: dict[int, tuple[int, int, int]] = {d: ((d - 2) // 6,) * 3 for d in (20, 32, 44, 56, 110)}


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of ``depth`` in {20, 32, 44, 56, 110} with random weights.

    Raises:
        ValueError: for an unsupported depth.
    """
    if depth not in CIFAR_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {sorted(CIFAR_DEPTHS)}, got {depth}")
    return CifarResNet(CIFAR_DEPTHS[depth], num_classes)


def convert_akamaster_state_dict(state: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Turn an akamaster checkpoint (``{"state_dict": {"module.conv1.weight": ...}}``) into plain keys.

    Accepts the wrapped dict or a bare state_dict, with or without the ``module.`` prefix.

    Raises:
        ValueError: ``state`` (read from ``source``) is not a dict of tensors (a list, a bare tensor ...).
    """
    sd = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        what = type(sd).__name__ if not isinstance(sd, dict) else "dict with non-tensor values"
        raise ValueError(f"{source} holds a {what}, not a state_dict of tensors; pass an akamaster .th checkpoint")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def cifar_spec(name: str) -> ModelSpec:
    """The spec of ``resnet<depth>_cifar10``."""
    depth = int(name.removeprefix("resnet").removesuffix("_cifar10"))
    return ModelSpec(
        name=f"resnet{depth}_cifar10",
        family="cifar_resnet",
        task="classification",
        input_size=(32, 32),
        mean=IMAGENET_MEAN,  # the akamaster models were trained with ImageNet statistics
        std=IMAGENET_STD,
        pad=8,
        output_loss_weight=1e-5,
        num_classes=10,
        class_names=CIFAR10_CLASSES,
        default_weights="required (--weights PATH to an akamaster .th checkpoint)",
    )


def load_cifar(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    """Build ``resnet<depth>_cifar10`` and load an akamaster ``.th`` checkpoint (``imgsz`` unused)."""
    spec = cifar_spec(name)
    model = cifar_resnet(int(name.removeprefix("resnet").removesuffix("_cifar10")))
    if weights is None:
        # BN statistics of a random network are mean 0 / var 1: generating or quantizing from them is meaningless
        raise ModelLoadError(
            f"{name} has no downloadable default weights: pass --weights PATH to an akamaster .th checkpoint "
            "(or --weights random for random weights)"
        )
    if weights != RANDOM_WEIGHTS:
        sd = convert_akamaster_state_dict(load_state_dict_file(Path(weights)), str(weights))
        load_state_dict_strict(model, sd, str(weights))
    return LoadedModel(spec=spec, model=model.eval(), weights=weights)


for _depth in CIFAR_DEPTHS:
    register_model(f"resnet{_depth}_cifar10", cifar_spec, load_cifar)
