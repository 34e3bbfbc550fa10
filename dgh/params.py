"""``params.yaml``: the single place that defines every experiment, validated on load.

Layout (see the file itself for the defaults and ``README.md`` for how to edit it)::

    assets: ../shared/assets        # root of relative data/weights paths; env DGH_ASSETS overrides it
    device: auto                    # auto | cpu | cuda | cuda:N
    models:                         # registry name -> weights file and input size
      <model>: {weights: PATH, imgsz: INT|null}
    generate:                       # calibration sets, one per model x source; produced by the `generate` stage
      <set-id>: {model, source: dgh|batch-bns|image-bns|noise|real, n_images, iters, batch_size, seed, data, options}
    imagenet:                       # classification task (top-1 / top-5 in percent)
      eval: {<model>: {data: IMAGEFOLDER, limit, batch_size}}       # float baseline evaluated once per model
      experiments: {<exp-id>: {model, calib: <set-id>, preset, w_bits, a_bits, algorithm, options}}
    coco:                           # detection task (mAP@[.5:.95] and mAP@.5, 0-1)
      eval: {<model>: {images: DIR, labels: DIR | annotations: JSON, batch_size}}
      experiments: {...same as imagenet...}
    report: {out_dir: reports, grid_images: 8}

Relative data and weights paths are relative to ``assets``; absolute paths are used as they are. The asset root
itself, when relative, is relative to the folder that holds ``params.yaml``.

Every problem is a :class:`ParamsError` (a ``ValueError``) with a one-line message that names the offending key:
an unknown key, a wrong type, a reference to a model or calibration set that is not defined, or a data/weights
path that does not exist (with what to do about it).
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from dgh.errors import validation_error_line

ASSETS_ENV = "DGH_ASSETS"
DEFAULT_ASSETS = "../shared/assets"
TASKS: tuple[str, ...] = ("imagenet", "coco")


class ParamsError(ValueError):
    """``params.yaml`` is invalid or points at something missing. The message is one actionable line."""


class Source(str, Enum):
    """Where a calibration set comes from.

    ``dgh`` / ``batch-bns`` / ``image-bns``: synthesized from the float model's BN statistics
    (``dgh.generation`` presets); ``noise``: i.i.d. N(0,1) pixels in normalized space clipped to the valid range;
    ``real``: real images from ``data`` (an ImageFolder or a folder of images).
    """

    DGH = "dgh"
    BATCH_BNS = "batch-bns"
    IMAGE_BNS = "image-bns"
    NOISE = "noise"
    REAL = "real"

    @property
    def is_generated(self) -> bool:
        """True for the sources that run the generation engine (optimization from BN statistics)."""
        return self in (Source.DGH, Source.BATCH_BNS, Source.IMAGE_BNS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Strict):
    """One model. ``name`` is the registry name (defaults to the key); ``weights`` a checkpoint path;
    ``imgsz`` the square input size in pixels (detection only)."""

    name: str | None = None
    weights: str | None = None
    imgsz: int | None = Field(None, ge=32)


class GenerateEntry(_Strict):
    """One calibration set.

    Attributes:
        model: key into ``models``.
        source: see :class:`Source`.
        n_images: number of images N (generated, noise) or of real images taken (class-balanced, deterministic).
        iters: generation iterations (one = one pass over all batches); generated sources only.
        batch_size: generation batch size n (a memory knob); generated sources only.
        seed: seeds the initialization / the real-image subset.
        data: ``real`` only: the ImageFolder or image folder to draw from (asset-relative or absolute).
        options: any further :class:`dgh.generation.GenerationConfig` field (``lr``, ``lambda_sigma``,
            ``output_loss_weight``, ``speed`` ...), validated by that class.
    """

    model: str
    source: Source
    n_images: int = Field(256, ge=1)
    iters: int = Field(200, ge=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    data: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _data_for_real(self) -> GenerateEntry:
        if self.source is Source.REAL and not self.data:
            raise ValueError("source 'real' needs a `data` path (an ImageFolder or a folder of images)")
        if self.source is not Source.REAL and self.data:
            raise ValueError(f"`data` is only used with source 'real', not {self.source.value!r}")
        return self


class ExperimentEntry(_Strict):
    """One quantization experiment: a model, a calibration set and a quantization setting.

    Attributes:
        model: key into ``models``.
        calib: key into ``generate`` (a calibration set of the same model).
        preset: quantization preset: ``pot`` (power-of-two thresholds, MCT/IMX500), ``paper`` (all layers at
            the target bit-width, BRECQ-style quantizers) or ``academic`` (first/last layer 8 bit, float output).
        w_bits, a_bits: weight / activation bit-widths (the WxAy setting).
        algorithm: PTQ algorithm: ``minmax`` | ``mse`` | ``adaround`` | ``brecq``.
        options: any further :class:`dgh.quantization.QuantConfig` field, validated by that class.
    """

    model: str
    calib: str
    preset: str = "pot"
    w_bits: int = Field(8, ge=2, le=16)
    a_bits: int = Field(8, ge=2, le=16)
    algorithm: str = "mse"
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def setting(self) -> str:
        """The column key of the results table: ``W8A8 pot mse``."""
        return f"W{self.w_bits}A{self.a_bits} {self.preset} {self.algorithm}"


class ImagenetData(_Strict):
    """Classification evaluation data of one model: an ImageFolder (ImageNet val layout), an optional image limit
    (first ``limit`` images in a class-balanced deterministic order; ``null`` = all) and the batch size."""

    data: str
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)


class CocoData(_Strict):
    """Detection evaluation data of one model: an image folder and exactly one of ``labels`` (YOLO txt folder)
    or ``annotations`` (COCO instances json)."""

    images: str
    labels: str | None = None
    annotations: str | None = None
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _one_label_source(self) -> CocoData:
        if (self.labels is None) == (self.annotations is None):
            raise ValueError("give exactly one of `labels` (YOLO label folder) or `annotations` (COCO json)")
        return self


class ImagenetTask(_Strict):
    """Classification experiments and the evaluation data of each model."""

    eval: dict[str, ImagenetData] = Field(default_factory=dict)
    experiments: dict[str, ExperimentEntry] = Field(default_factory=dict)


class CocoTask(_Strict):
    """Detection experiments and the evaluation data of each model."""

    eval: dict[str, CocoData] = Field(default_factory=dict)
    experiments: dict[str, ExperimentEntry] = Field(default_factory=dict)


class ReportParams(_Strict):
    """``dgh report`` settings: output folder (project-relative) and how many images per row of the image grid."""

    out_dir: str = "reports"
    grid_images: int = Field(8, ge=1, le=64)


class Params(_Strict):
    """The whole of ``params.yaml``. Load it with :func:`load_params`."""

    assets: str = DEFAULT_ASSETS
    device: str = "auto"
    progress: bool = True
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    generate: dict[str, GenerateEntry] = Field(default_factory=dict)
    imagenet: ImagenetTask = Field(default_factory=ImagenetTask)
    coco: CocoTask = Field(default_factory=CocoTask)
    report: ReportParams = Field(default_factory=ReportParams)

    # filled by parse_params, not part of the file
    _root: Path = PrivateAttr(default_factory=lambda: Path(".").resolve())
    _assets_override: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _references(self) -> Params:
        for gid, g in self.generate.items():
            if g.model not in self.models:
                raise ValueError(f"generate.{gid}.model: {g.model!r} is not defined under `models`")
        seen: dict[str, str] = {}
        for task in TASKS:
            section = getattr(self, task)
            for model in section.eval:
                if model not in self.models:
                    raise ValueError(f"{task}.eval.{model}: {model!r} is not defined under `models`")
            for eid, e in section.experiments.items():
                where = f"{task}.experiments.{eid}"
                if eid in seen:
                    raise ValueError(f"{where}: experiment id also used in {seen[eid]}; ids must be unique")
                seen[eid] = where
                if e.model not in self.models:
                    raise ValueError(f"{where}.model: {e.model!r} is not defined under `models`")
                if e.model not in section.eval:
                    raise ValueError(f"{where}.model: {e.model!r} has no evaluation data under `{task}.eval`")
                if e.calib not in self.generate:
                    raise ValueError(f"{where}.calib: {e.calib!r} is not a calibration set under `generate`")
                if self.generate[e.calib].model != e.model:
                    raise ValueError(
                        f"{where}.calib: set {e.calib!r} belongs to model {self.generate[e.calib].model!r}, "
                        f"not {e.model!r}"
                    )
        return self

    # ----------------------------------------------------------------------------------------------- paths
    @property
    def assets_root(self) -> Path:
        """The asset root: ``$DGH_ASSETS`` when set, else ``assets`` (relative to the params file's folder)."""
        raw = self._assets_override or self.assets
        p = Path(os.path.expanduser(raw))
        return (p if p.is_absolute() else self._root / p).resolve()

    def resolve(self, path: str) -> Path:
        """An asset-relative or absolute path as an absolute :class:`Path` (not checked)."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.assets_root / p

    def require(self, path: str | None, key: str, what: str) -> Path | None:
        """Resolve ``path`` and check that it exists.

        Raises:
            ParamsError: naming ``key``, the resolved path and what to do.
        """
        if path is None:
            return None
        p = self.resolve(path)
        if not p.exists():
            hint = (
                f"set `assets` in params.yaml or ${ASSETS_ENV} to the folder that holds it"
                if not Path(path).is_absolute()
                else f"point `{key}` at an existing {what}"
            )
            raise ParamsError(f"params.yaml: {key}: {what} not found at {p}; {hint}")
        return p

    def task_of(self, experiment_id: str) -> str:
        """``imagenet`` or ``coco``: the section that defines ``experiment_id``.

        Raises:
            ParamsError: unknown id.
        """
        for task in TASKS:
            if experiment_id in getattr(self, task).experiments:
                return task
        known = ", ".join(self.experiment_ids()) or "none"
        raise ParamsError(f"unknown experiment {experiment_id!r}; params.yaml defines: {known}")

    def experiment(self, experiment_id: str) -> ExperimentEntry:
        """The :class:`ExperimentEntry` of ``experiment_id`` (raises :class:`ParamsError` if unknown)."""
        return getattr(self, self.task_of(experiment_id)).experiments[experiment_id]

    def experiment_ids(self) -> list[str]:
        """All experiment ids, imagenet first, in file order."""
        return [eid for task in TASKS for eid in getattr(self, task).experiments]

    def generation(self, set_id: str) -> GenerateEntry:
        """The :class:`GenerateEntry` of ``set_id`` (raises :class:`ParamsError` if unknown)."""
        if set_id not in self.generate:
            known = ", ".join(self.generate) or "none"
            raise ParamsError(f"unknown calibration set {set_id!r}; params.yaml `generate` defines: {known}")
        return self.generate[set_id]

    def model(self, key: str) -> ModelEntry:
        """The :class:`ModelEntry` of ``key`` (raises :class:`ParamsError` if unknown)."""
        if key not in self.models:
            raise ParamsError(f"unknown model {key!r}; params.yaml `models` defines: {', '.join(self.models)}")
        return self.models[key]

    def model_args(self, key: str) -> tuple[str, str | None, int | None]:
        """``(registry name, weights path, imgsz)`` for :func:`dgh.models.load_model`; weights must exist.

        Raises:
            ParamsError: unknown model or missing weights file.
        """
        entry = self.model(key)
        weights = self.require(entry.weights, f"models.{key}.weights", "weights file")
        return entry.name or key, (str(weights) if weights else None), entry.imgsz


def parse_params(data: Any, root: str | os.PathLike = ".", source: str = "params.yaml") -> Params:
    """Validate a params mapping (already parsed YAML).

    Args:
        data: the mapping.
        root: folder the relative ``assets`` path is relative to.
        source: file name used in messages.

    Raises:
        ParamsError: one line naming the first offending key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(f"{source}: {validation_error_line(exc)}") from None
    params._root = Path(root).resolve()
    params._assets_override = os.environ.get(ASSETS_ENV) or None
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ParamsError: missing file, invalid YAML, unknown key, wrong type or dangling reference (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params PATH)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")[:200]
        raise ParamsError(f"{path}: not valid YAML ({first})") from None
    return parse_params(data, root=path.parent, source=str(path.name))


def check_paths(params: Params) -> list[str]:
    """Every data and weights path that ``params`` references and that does not exist, as one-line messages."""
    problems: list[str] = []

    def probe(path: str | None, key: str, what: str) -> None:
        try:
            params.require(path, key, what)
        except ParamsError as exc:
            problems.append(str(exc))

    for key, m in params.models.items():
        probe(m.weights, f"models.{key}.weights", "weights file")
    for gid, g in params.generate.items():
        probe(g.data, f"generate.{gid}.data", "image folder")
    for model, d in params.imagenet.eval.items():
        probe(d.data, f"imagenet.eval.{model}.data", "ImageFolder")
    for model, c in params.coco.eval.items():
        probe(c.images, f"coco.eval.{model}.images", "image folder")
        probe(c.labels, f"coco.eval.{model}.labels", "YOLO label folder")
        probe(c.annotations, f"coco.eval.{model}.annotations", "COCO instances json")
    return problems


TaskName = Literal["imagenet", "coco"]
