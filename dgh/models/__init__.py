"""Model registry: ``load_model(name, weights, imgsz) -> LoadedModel``; see :mod:`dgh.models.registry`."""

from dgh.models.registry import (
    RANDOM_WEIGHTS,
    REGISTRY,
    ModelLoadError,
    detection_spec,
    get_spec,
    list_models,
    load_model,
    load_state_dict_strict,
)
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
