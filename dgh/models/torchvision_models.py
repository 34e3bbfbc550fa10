"""torchvision ImageNet classifiers: any name of ``torchvision.models.list_models(module=torchvision.models)``.

- ``weights=PATH``: a local ``state_dict`` file (``torch.load(weights_only=True)``), loaded with ``strict=True``.
- ``weights=None``: torchvision's ``DEFAULT`` weights. They are used only if already in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``); otherwise this fails fast (no download is attempted) and says to pass
  ``--weights PATH``.
- ``weights="random"``: random initialization (tests, smoke runs).

Class names: every torchvision classifier is an ImageNet-1k model whose ``weights.meta["categories"]`` are human
names in class-index order, and that order is the sorted-wnid order. The spec's ``class_names`` are the wnids
(:func:`dgh.models.spec.imagenet_wnids`), the folder names of the standard ImageNet-val layout; the human names are
not used to match folders: they are not unique in the synset lemmas they come from (two classes are "crane", two
"maillot"; torchvision renames them "crane bird" and "maillot tank suit"), so they have no standard spelling.

Preprocessing follows the ``DEFAULT`` weights' ``ImageClassification`` transform (resize the shorter side to
``resize_size``, center-crop ``crop_size``, ImageNet mean/std): Resize(256) + CenterCrop(224) for most models.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.models import get_model_weights

from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, load_state_dict_file, load_state_dict_strict
from dgh.models.registry import register_model
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec, imagenet_wnids

# lambda_out of the output distribution stretching loss, from the DGH paper code (method.md section 3);
# other torchvision models get MCT's single default 1e-5 and must be swept.
_OUTPUT_LOSS_WEIGHT = {"resnet18": 3e-7, "resnet50": 1e-7, "mobilenet_v2": 3e-5}
_MCT_DEFAULT_OUTPUT_LOSS_WEIGHT = 1e-5


def torchvision_names() -> list[str]:
    """All torchvision classification model names (``torchvision.models.list_models(module=torchvision.models)``)."""

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _default_weights(name: str):  # noqa: ANN202 - a torchvision WeightsEnum member
    return get_model_weights(name).DEFAULT


def cached_default_weights_path(name: str) -> Path:
    """Where torchvision would cache the ``DEFAULT`` weights of ``name`` (may not exist)."""
    url = _default_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def torchvision_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a torchvision classifier, preprocessing read from its ``DEFAULT`` weights' metadata.

    ``pad`` p = 32 (RandomResizedCrop 224 from ~256, method.md section 2).
    """
    w = _default_weights(name)
    kw = dict(getattr(w.transforms, "keywords", {}) or {})
    crop = int(kw.get("crop_size", 224))
    resize = int(kw.get("resize_size", 256))
    interp = kw.get("interpolation")
    categories = tuple(w.meta.get("categories") or ())
    wnids = imagenet_wnids() if len(categories) == 1000 else ()
    return ModelSpec(
        name=name,
        family="torchvision",
        task="classification",
        input_size=(crop, crop),
        mean=tuple(kw.get("mean", IMAGENET_MEAN)),
        std=tuple(kw.get("std", IMAGENET_STD)),
        pad=32,
        output_loss_weight=_OUTPUT_LOSS_WEIGHT.get(name, _MCT_DEFAULT_OUTPUT_LOSS_WEIGHT),
        num_classes=len(categories) or 1000,
        class_names=wnids,
        resize_size=resize,
        interpolation=getattr(interp, "value", "bilinear") if interp is not None else "bilinear",
        default_weights=f"torchvision DEFAULT {w} (download; offline pass --weights PATH)",
    )


def build_torchvision(name: str, weights: str | None) -> tuple[torch.nn.Module, str | None]:
    """Build ``name`` and load its weights (see the module docstring).

    Returns:
        ``(model, weights_path_or_None)`` in eval mode.

    Raises:
        ModelLoadError: DEFAULT weights not cached (offline), missing/invalid file, or keys that do not fit.
    """
    model = torchvision.models.get_model(name, weights=None)
    if weights == RANDOM_WEIGHTS:
        return model.eval(), None
    if weights is None:
        cached = cached_default_weights_path(name)
        if not cached.is_file():
            raise ModelLoadError(
                f"{name}: the DEFAULT torchvision weights would be downloaded ({cached.name} is not in "
                f"{cached.parent}); offline, pass --weights PATH to a local state_dict (or --weights random)"
            )
        weights = str(cached)
    state = load_state_dict_file(Path(weights))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{weights} is not a state_dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_state_dict_strict(model, state, str(weights))
    return model.eval(), str(weights)


def load_torchvision(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    """Registry loader: :func:`build_torchvision` with the spec of ``name`` (``imgsz`` unused)."""
    model, path = build_torchvision(name, weights)
    return LoadedModel(spec=torchvision_spec(name), model=model, weights=path)


for _name in torchvision_names():
    register_model(_name, torchvision_spec, load_torchvision)
