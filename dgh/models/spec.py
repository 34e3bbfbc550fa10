"""The contract every model family fulfils: :class:`ModelSpec` (static facts) and :class:`LoadedModel`.

Conventions shared by generation, quantization and evaluation:

- ``LoadedModel.model`` is an ``nn.Module`` in eval mode, float32, on CPU unless moved.
- Its input is an NCHW float32 tensor in the model's *normalized* space: ``(pixel_0_1 - mean) / std``.
  YOLO models have mean 0 and std 1 (RGB in [0, 1]).
- Classification models return logits ``(N, num_classes)``.
- Detection models return the head's raw outputs **before decoding**: a list of per-level tensors
  ``(N, C_i, H_i, W_i)``. That is "the network output" that is quantized and that the output-stretching
  loss acts on. ``LoadedModel.decode`` turns that list into boxes and scores in float (post-processing).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Task = Literal["classification", "detection"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k (ILSVRC-2012) class wnids in class-index order (sorted, ``n01440764`` first).

    Read offline from the list timm ships (``timm/data/_info/imagenet_synsets.txt``), located without importing
    timm (its import takes seconds). This is the order of every ImageNet-1k classifier here: torchvision's
    ``weights.meta["categories"]`` and the ImageNet-val ImageFolder layout (sorted wnid folders).

    Raises:
        RuntimeError: timm is not installed or its list is not 1000 sorted wnids.
    """
    found = importlib.util.find_spec("timm")
    if found is None or found.origin is None:
        raise RuntimeError("the ImageNet class list comes from timm, which is not installed (pip install timm)")
    text = (Path(found.origin).parent / "data" / "_info" / "imagenet_synsets.txt").read_text()
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RuntimeError(f"timm's imagenet_synsets.txt holds {len(wnids)} entries, expected 1000 sorted wnids")
    return wnids


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about a registered model.

    Attributes:
        name: registry name (``resnet20_cifar10``, ``resnet18``, ``yolov5n`` ...).
        family: ``cifar_resnet`` | ``torchvision`` | ``ultralytics`` | ``yolov5_classic``.
        task: ``classification`` or ``detection``.
        input_size: ``(H, W)`` in pixels of the network input.
        mean, std: per-channel normalization (RGB, 0-1 pixel units). ``(0,0,0)``/``(1,1,1)`` for YOLO.
        pad: training-augmentation padding ``p`` in pixels; the generation canvas is ``(H+p, W+p)``
            (method.md section 2: 8 for CIFAR, 32 for ImageNet).
        output_loss_weight: default lambda_out of the output distribution stretching loss (method.md section 3);
            ``None``: no tuned value, generation derives it (``dgh.generation.losses.balanced_output_weight``).
        num_classes: number of classes of the head.
        class_names: class names in index order; ImageFolder class folders are matched against them by name
            (:func:`dgh.data.classification.map_class_folders`). CIFAR-10: ``airplane`` .. ``truck``;
            ImageNet-1k models: the wnids (:func:`imagenet_wnids`); detectors: their dataset's names. Empty:
            unknown (folders must then use the numbered layout).
        resize_size: classification preprocessing: resize the shorter image side to this many pixels, then
            center-crop ``input_size`` (torchvision ``ImageClassification``). ``None``: no resize (CIFAR).
            Detection models ignore it (they letterbox to ``input_size``).
        interpolation: resize interpolation for classification preprocessing (``bilinear`` | ``bicubic`` | ``nearest``).
        default_weights: what ``load_model(name)`` uses without ``weights``, in words (``"random"``,
            ``"torchvision DEFAULT ResNet18_Weights.IMAGENET1K_V1 (download; pass --weights offline)"``,
            ``"required (--weights PATH)"``), for ``dgh models``.
    """

    name: str
    family: str
    task: Task
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pad: int = 32
    output_loss_weight: float | None = 1e-5
    num_classes: int = 1000
    class_names: tuple[str, ...] = ()
    resize_size: int | None = None
    interpolation: str = "bilinear"
    default_weights: str | None = None

    def pixel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid input range in normalized space, per channel.

        Returns:
            ``(lo, hi)``, each a float32 tensor of shape ``(1, 3, 1, 1)``: ``(0 - mean)/std`` and ``(1 - mean)/std``.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def normalize(self, images_01_nchw: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] (NCHW, float) to the model's normalized space."""
        mean = torch.tensor(self.mean, dtype=images_01_nchw.dtype, device=images_01_nchw.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images_01_nchw.dtype, device=images_01_nchw.device).view(1, 3, 1, 1)
        return (images_01_nchw - mean) / std

    def denormalize(self, images_nchw: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: normalized NCHW -> pixels in [0, 1] (not clamped)."""
        mean = torch.tensor(self.mean, dtype=images_nchw.dtype, device=images_nchw.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images_nchw.dtype, device=images_nchw.device).view(1, 3, 1, 1)
        return images_nchw * std + mean


@dataclass
class LoadedModel:
    """A model ready for generation, quantization and evaluation.

    Attributes:
        spec: the static facts (:class:`ModelSpec`).
        model: the float ``nn.Module`` in eval mode (see the module docstring for its input/output contract).
        decode: detection only. ``decode(raw_outputs) -> Tensor (N, A, 4 + num_classes)``: boxes as
            ``x1, y1, x2, y2`` in pixels of the network input frame, then per-class scores in [0, 1]
            (objectness already multiplied in). Runs in float; NMS is done by the evaluation.
        weights: the weights file that was loaded, if any.
        extra: family-specific details (e.g. strides, anchors, the yaml dict).
    """

    spec: ModelSpec
    model: nn.Module
    decode: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    weights: str | None = None
    extra: dict = field(default_factory=dict)
