"""Model registry: ``load_model(name, weights, imgsz) -> LoadedModel``; see :mod:`dgh.models.registry`."""

from dgh.models.registry import ModelLoadError, get_spec, list_models, load_model
from dgh.models.spec import LoadedModel, ModelSpec

__all__ = ["LoadedModel", "ModelLoadError", "ModelSpec", "get_spec", "list_models", "load_model"]
