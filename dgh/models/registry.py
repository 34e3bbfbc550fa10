"""The model registry: a name -> how to build it, load its weights and preprocess its input.

Each family module registers its names when imported (:func:`register_model`, :func:`register_file_family`);
``dgh/models/__init__.py`` imports them all:

- ``cifar_resnet``: ``resnet{20,32,44,56,110}_cifar10`` (akamaster checkpoints; ``--weights`` required).
- ``torchvision``: every ``torchvision.models.list_models(module=torchvision.models)`` name
  (:mod:`dgh.models.torchvision_models`).
- ``ultralytics``: ``yolov8{n,s,m,l,x}``, ``yolo11{n,s,m,l,x}``, or any path to an ultralytics ``.pt`` / model
  ``.yaml`` used as the name (:mod:`dgh.models.ultralytics_models`).
- ``yolov5_classic``: ``yolov5{n,s,m,l,x}`` from original YOLOv5 v6.x checkpoints, loaded without running pickled
  code (:mod:`dgh.models.yolov5_classic`).
- ``efficientnet_lite``: ``efficientnet_lite0`` (timm ``tf_efficientnet_lite0`` with a lukemelas-layout checkpoint;
  ``--weights`` required) (:mod:`dgh.models.efficientnet_lite`).

``weights="random"`` builds any family with random weights (tests); ``weights=None`` means the family default,
which for torchvision and ultralytics would download and therefore fails fast offline. Detection specs:
:func:`dgh.models.loading.detection_spec`.

Use :func:`load_model` to get a :class:`~dgh.models.spec.LoadedModel`, and :func:`get_spec` for the facts alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, detection_spec, sniff_checkpoint_family
from dgh.models.spec import LoadedModel, ModelSpec

SpecFn = Callable[[str], ModelSpec]
LoaderFn = Callable[[str, "str | None", "int | None"], LoadedModel]


@dataclass(frozen=True)
class RegistryEntry:
    """How to describe and load one model: ``spec(name)`` (detection specs at imgsz 640) and
    ``load(name, weights, imgsz)``."""

    spec: SpecFn
    load: LoaderFn


# name -> entry; filled by the family modules on import
REGISTRY: dict[str, RegistryEntry] = {}
# family of a model file used as the name (ultralytics .pt/.yaml, classic YOLOv5 .pt) -> entry(stem, path, imgsz)
FILE_FAMILIES: dict[str, RegistryEntry] = {}

__all__ = ["FILE_FAMILIES", "RANDOM_WEIGHTS", "REGISTRY", "ModelLoadError", "RegistryEntry", "detection_spec",
           "get_spec", "list_models", "load_model", "register_file_family", "register_model"]


def register_model(name: str, spec: SpecFn, load: LoaderFn) -> None:
    """Add ``name`` to the registry.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    REGISTRY[name] = RegistryEntry(spec, load)


def register_file_family(family: str, spec: SpecFn, load: LoaderFn) -> None:
    """Register how to load a model file of ``family`` (as sniffed by
    :func:`dgh.models.loading.sniff_checkpoint_family`) passed as the model name."""
    FILE_FAMILIES[family] = RegistryEntry(spec, load)


def _is_path_name(name: str) -> bool:
    return Path(name).suffix.lower() in (".pt", ".yaml", ".yml")


def list_models() -> list[ModelSpec]:
    """All registered model specs (name, family, task, input size, pad, lambda_out, default weights), sorted by name.

    Detection specs are given at the default ``imgsz`` 640.
    """
    return [REGISTRY[k].spec(k) for k in sorted(REGISTRY)]


def get_spec(name: str, imgsz: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name (or an ultralytics ``.pt``/``.yaml`` path), without loading weights.

    Args:
        name: registry name or model file path.
        imgsz: detection only, the square input size (default 640).

    Raises:
        ModelLoadError: unknown name, or ``imgsz`` not a multiple of 32.
    """
    if name in REGISTRY:
        spec = REGISTRY[name].spec(name)
    elif _is_path_name(name):
        spec = FILE_FAMILIES[sniff_checkpoint_family(name)].spec(Path(name).stem)
    else:
        raise ModelLoadError(f"unknown model {name!r}; `dgh models` lists the registry (or pass a .pt/.yaml path)")
    if spec.task == "detection" and imgsz is not None:
        spec = dataclasses.replace(spec, input_size=(int(imgsz), int(imgsz)), pad=round(0.1 * int(imgsz)))
        detection_spec(spec.name, spec.family, imgsz)  # validates imgsz
    return spec


def load_model(name: str, weights: str | None = None, imgsz: int | None = None) -> LoadedModel:
    """Build a registered model, load ``weights`` (a local file; never downloads), eval mode, float32, CPU.

    Args:
        name: registry name, or a path to an ultralytics ``.pt``/``.yaml`` or a classic YOLOv5 ``.pt`` (the
            family is sniffed with the restricted unpickler).
        weights: path to a checkpoint; ``"random"`` for random weights; ``None`` for the family default
            (an error for CIFAR ResNets; torchvision DEFAULT only if already cached; otherwise an error).
        imgsz: detection only, the square network input size in pixels (multiple of 32, default 640).

    Returns:
        A :class:`LoadedModel` whose parameters have ``requires_grad=False``.

    Raises:
        ModelLoadError: unknown name, missing/invalid file, a download that would be needed, or a checkpoint that
            does not fit (one line naming missing and unexpected keys).
    """
    if name in REGISTRY:
        loaded = REGISTRY[name].load(name, None if weights is None else str(weights), imgsz)
    elif _is_path_name(name):
        loaded = FILE_FAMILIES[sniff_checkpoint_family(name)].load(Path(name).stem, str(name), imgsz)
    else:
        raise ModelLoadError(f"unknown model {name!r}; `dgh models` lists the registry (or pass a .pt/.yaml path)")
    loaded.model.eval().float()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded
