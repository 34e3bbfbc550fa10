"""The model registry: a name -> how to build it, load its weights and preprocess its input.

Families (see ``../shared/docs/architecture.md``):

- ``cifar_resnet``: ``resnet{20,32,44,56,110}_cifar10`` (akamaster checkpoints).
- ``torchvision``, ``ultralytics``, ``yolov5_classic``: added by their own modules.

Use :func:`load_model` to get a :class:`~dgh.models.spec.LoadedModel`, and :func:`get_spec` for the facts alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dgh.models.cifar_resnet import CIFAR_DEPTHS, cifar_resnet, convert_akamaster_state_dict
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec


class ModelLoadError(ValueError):
    """A model name, weights file or checkpoint could not be used. The message is one actionable line."""


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_spec(depth: int) -> ModelSpec:
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
    )


def _load_state_dict_file(path: Path) -> dict:
    """``torch.load(weights_only=True)``; never executes pickled code.

    Raises:
        ModelLoadError: missing file, or not a torch checkpoint.
    """
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path} (pass --weights PATH to an existing checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path} is not a loadable weights-only torch checkpoint ({first[:200]})") from None


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line error naming missing and unexpected keys.

    Raises:
        ModelLoadError: when keys or shapes do not match.
    """
    own = model.state_dict()
    # num_batches_tracked is bookkeeping that some checkpoints (akamaster) omit; keep the model's own.
    state_dict = dict(state_dict)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = own[k]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or bad_shape:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatch: {head(bad_shape)}")
        raise ModelLoadError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _load_cifar(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    depth = int(name.removeprefix("resnet").removesuffix("_cifar10"))
    spec = _cifar_spec(depth)
    model = cifar_resnet(depth)
    if weights is not None:
        sd = convert_akamaster_state_dict(_load_state_dict_file(Path(weights)))
        load_state_dict_strict(model, sd, str(weights))
    return LoadedModel(spec=spec, model=model.eval(), weights=weights)


# name -> (spec factory, loader). Other families register into this dict from their modules.
REGISTRY: dict[str, tuple[Callable[[], ModelSpec], Callable[[str, str | None, int | None], LoadedModel]]] = {
    f"resnet{d}_cifar10": ((lambda d=d: _cifar_spec(d)), _load_cifar) for d in CIFAR_DEPTHS
}


def list_models() -> list[ModelSpec]:
    """All registered model specs, sorted by name."""
    return [REGISTRY[k][0]() for k in sorted(REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name.

    Raises:
        ModelLoadError: unknown name.
    """
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; `dgh models` lists the registry")
    return REGISTRY[name][0]()


def load_model(name: str, weights: str | None = None, imgsz: int | None = None) -> LoadedModel:
    """Build a registered model, load ``weights`` (a local file; never downloads), eval mode, float32, CPU.

    Args:
        name: registry name.
        weights: path to a checkpoint. ``None`` builds random weights for CIFAR ResNets.
        imgsz: detection only, the square network input size in pixels.

    Raises:
        ModelLoadError: unknown name, missing/invalid file, or a checkpoint that does not fit.
    """
    get_spec(name)
    loaded = REGISTRY[name][1](name, weights, imgsz)
    loaded.model.eval().float()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded
