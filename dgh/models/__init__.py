"""Model registry: ``load_model(name, weights, imgsz) -> LoadedModel``; see :mod:`dgh.models.registry`.

The family modules register their names when imported; importing this package imports every family.
"""

from dgh.models import (  # noqa: F401 - register
    cifar_resnet,
    efficientnet_lite,
    torchvision_models,
    ultralytics_models,
    yolov5_classic,
)
from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, detection_spec, load_state_dict_strict
from dgh.models.registry import REGISTRY, get_spec, list_models, load_model
from dgh.models.spec import LoadedModel, ModelSpec

__all__ = [
    "RANDOM_WEIGHTS",
    "REGISTRY",
    "LoadedModel",
    "ModelLoadError",
    "ModelSpec",
    "detection_spec",
    "get_spec",
    "list_models",
    "load_model",
    "load_state_dict_strict",
]
