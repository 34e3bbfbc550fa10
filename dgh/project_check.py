"""``dgh check``: build, for every entry of ``params.yaml``, the objects its stage will build, without running it.

What the stages build and what is checked here (each failure is one line naming the key):

- ``device``: :func:`dgh.env.resolve_device` (``gpu0``, ``banana``, CUDA on a machine without it);
- ``models.<key>``: the model's :class:`~dgh.models.spec.ModelSpec` at its ``imgsz``
  (:func:`dgh.models.get_spec`: unknown names, ``imgsz`` not a multiple of 32);
- ``generate.<id>``: the :class:`~dgh.generation.GenerationConfig` (built when params.yaml is parsed); a ``real``
  set's folder holds images;
- ``<task>.experiments.<id>``: its :class:`~dgh.quantization.QuantConfig` (``experiment.quant_config()``);
- ``imagenet.eval.<model>``: the ImageFolder's class folders map onto the model's classes
  (:func:`dgh.data.classification.map_class_folders`);
- ``coco.eval.<model>``: the ground truth loads and passes every box and size check
  (:func:`dgh.data.detection.load_detection_data`).

Paths that do not exist are reported by :func:`dgh.params.check_paths`; entries whose paths are missing are
skipped here.
"""

from __future__ import annotations

from pathlib import Path

from dgh.data.classification import is_image_folder, map_class_folders, scan_image_folder
from dgh.data.detection import load_detection_data
from dgh.data.images import list_images
from dgh.env import resolve_device
from dgh.models import get_spec
from dgh.models.spec import ModelSpec
from dgh.params import Params


def _resolved(params: Params, path: str | None) -> Path | None:
    if path is None:
        return None
    resolved = params.resolve(path)
    return resolved if resolved.exists() else None


def check_project(params: Params) -> list[str]:
    """Everything a stage of ``params`` would reject, as one-line messages naming the params key (empty: ok)."""
    problems: list[str] = []

    def attempt(key: str, fn) -> object:  # noqa: ANN001 - a zero-argument callable
        try:
            return fn()
        except ValueError as exc:
            problems.append(f"{key}: {' '.join(str(exc).split())[:300]}")
        return None

    attempt("device", lambda: resolve_device(None if params.device in ("", "auto") else params.device))
    specs: dict[str, ModelSpec] = {}
    for key, m in params.models.items():
        spec = attempt(f"models.{key}", lambda m=m, key=key: get_spec(m.name or key, m.imgsz))
        if spec is not None:
            specs[key] = spec
    with_sets = {g.model for g in params.generate.values()}
    problems += [f"models.{key}: no calibration set in `generate` (stage stats@{key} needs one)"
                 for key in params.models if key not in with_sets]
    for gid, g in params.generate.items():
        folder = _resolved(params, g.data)
        if folder is not None and not (list_images(folder) or is_image_folder(folder)
                                       or (folder / "images").is_dir() and list_images(folder / "images")):
            problems.append(f"generate.{gid}.data: no images in {folder}")
    for task in ("imagenet", "coco"):
        section = getattr(params, task)
        for eid, e in section.experiments.items():
            attempt(f"{task}.experiments.{eid}", e.quant_config)
    for key, d in params.imagenet.eval.items():
        folder, spec = _resolved(params, d.data), specs.get(key)
        if folder is None or spec is None:
            continue
        layout = getattr(d, "class_layout", "names")
        attempt(f"imagenet.eval.{key}.data", lambda folder=folder, spec=spec, layout=layout: map_class_folders(
            scan_image_folder(folder)[0], spec.class_names, spec.num_classes, layout, spec.name))
    for key, c in params.coco.eval.items():
        images, spec = _resolved(params, c.images), specs.get(key)
        labels, annotations = _resolved(params, c.labels), _resolved(params, c.annotations)
        if images is None or spec is None or (labels is None and annotations is None):
            continue
        attempt(f"coco.eval.{key}", lambda images=images, spec=spec, labels=labels, annotations=annotations:
                load_detection_data(images, annotations, labels, spec.class_names, spec.num_classes))
    return problems
