"""``params.yaml``: the single place that defines every experiment, validated on load.

Layout (see the file itself for the defaults and ``README.md`` for how to edit it)::

    assets: ../shared/assets        # root of relative data/weights paths; env DGH_ASSETS overrides it
    device: auto                    # auto | cpu | cuda | cuda:N
    models:                         # registry name -> weights file and input size
      <model>: {weights: PATH, imgsz: INT|null}
    generate:                       # calibration sets, one per model x source; produced by the `generate` stage
      <set-id>: {model, method: dgh|batch-bns|image-bns|noise|real, data, ablation, <any GenerationConfig field>}
    imagenet:                       # classification task (top-1 / top-5 in percent)
      eval: {<model>: {data: IMAGEFOLDER, limit, batch_size}}       # float baseline evaluated once per model
      experiments: {<exp-id>: {model, calib: <set-id>, <any QuantConfig field: preset, w_bits, a_bits, ...>}}
    coco:                           # detection task (mAP@[.5:.95] and mAP@.5, 0-1)
      eval: {<model>: {images: DIR, labels: DIR | annotations: JSON, batch_size}}
      experiments: {...same as imagenet...}
    report: {out_dir: reports, grid_images: 8}
    export: {enabled: true, opset: 17, sample_images: 8, evaluate_backend: pytorch}   # stage `export` (ONNX QDQ)

Relative data and weights paths are relative to ``assets``; absolute paths are used as they are. The asset root
itself, when relative, is relative to the folder that holds ``params.yaml``.

Every problem is a :class:`ParamsError` (a ``ValueError``) with a one-line message that names the offending key:
an unknown key, a wrong type, a reference to a model or calibration set that is not defined, or a data/weights
path that does not exist (with what to do about it).
"""

from __future__ import annotations

import os
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

from dgh.data.classification import ClassLayout
from dgh.errors import validation_error_line
from dgh.generation.config import GenerationConfig, Method
from dgh.quantization.config import QuantConfig

ASSETS_ENV = "DGH_ASSETS"
DEFAULT_ASSETS = "../shared/assets"
TASKS: tuple[str, ...] = ("imagenet", "coco")


class ParamsError(ValueError):
    """``params.yaml`` is invalid or points at something missing. The message is one actionable line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Strict):
    """One model. ``name`` is the registry name (defaults to the key); ``weights`` a checkpoint path;
    ``imgsz`` the square input size in pixels (detection only)."""

    name: str | None = None
    weights: str | None = None
    imgsz: int | None = Field(None, ge=32)


REAL = "real"
"""The calibration source of real images (``method: real`` with a ``data`` folder); every other source is a
:class:`~dgh.generation.Method`."""
GENERATED_METHODS: tuple[Method, ...] = (Method.DGH, Method.BATCH_BNS, Method.IMAGE_BNS)
REAL_KNOBS = frozenset({"n_images", "seed"})
LAUNCH_KNOBS = ("schedule", "processes", "process_timeout_s")  # multi-process generation (dgh.generation.distributed)


class GenerateEntry(_Strict):
    """One calibration set: a model, a source and the :class:`~dgh.generation.GenerationConfig` fields inline.

    In ``params.yaml`` every key besides ``model``, ``method`` and ``data`` is a ``GenerationConfig`` field
    (``n_images``, ``iterations``, ``batch_size``, ``seed``, ``lr``, ``speed`` ...) with the library's defaults and
    the method's preset (:meth:`GenerationConfig.for_method`) under the values given.

    Attributes:
        model: key into ``models``.
        method: a :class:`~dgh.generation.Method` (``dgh`` | ``batch-bns`` | ``image-bns`` synthesize from the BN
            statistics; ``noise`` draws N(0,1) pixels), or ``real``: ``n_images`` real images from ``data``
            (class-balanced, deterministic in ``seed``; no other field applies).
        data: ``real`` only: the ImageFolder or image folder to draw from (asset-relative or absolute).
        ablation: the ablation variant this set is a row of (e.g. ``1-batch-stats``; MLflow tag ``dgh.ablation``).
            Experiments calibrated on such a set appear in the report's ablation table, not in the main table.
        config: the validated generation config (for ``real``/``noise`` only ``n_images`` and ``seed`` are used).
    """

    model: str
    method: Method | Literal["real"]
    data: str | None = None
    ablation: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    config: GenerationConfig

    @model_validator(mode="before")
    @classmethod
    def _embed_config(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "config" in data:
            return data
        own = {k: data[k] for k in ("model", "method", "data", "ablation") if k in data}
        knobs = {k: v for k, v in data.items() if k not in own}
        method = own.get("method")
        if method is None:
            raise ValueError("`method` is required: dgh | batch-bns | image-bns | noise | real")
        if method in (REAL, Method.NOISE.value, Method.NOISE):
            extra = sorted(set(knobs) - REAL_KNOBS)
            if extra:
                raise ValueError(f"method {method!r} takes only n_images and seed, not {', '.join(extra)}")
            method = Method.NOISE
        try:
            preset = GenerationConfig.for_method(method).model_dump()
        except ValueError:
            preset = {}  # an unknown method: the `method` field reports it
        own["config"] = {**preset, **knobs}  # validated as GenerationConfig: errors name generate.<id>.config.<key>
        return own

    @model_validator(mode="after")
    def _data_for_real(self) -> GenerateEntry:
        if self.method == REAL and not self.data:
            raise ValueError("method 'real' needs a `data` path (an ImageFolder or a folder of images)")
        if self.method != REAL and self.data:
            raise ValueError(f"`data` is only used with method 'real', not {self.source!r}")
        return self

    @property
    def source(self) -> str:
        """The source name: the method's value or ``real``."""
        return self.method.value if isinstance(self.method, Method) else REAL

    @property
    def is_generated(self) -> bool:
        """True for the methods that run the generation engine (optimization from BN statistics)."""
        return self.method in GENERATED_METHODS

    def to_json_dict(self) -> dict[str, Any]:
        """The set as ``params.yaml`` would spell it (inline config fields; ``real``: only n_images and seed)."""
        cfg = self.config.model_dump(mode="json")
        for k in LAUNCH_KNOBS:  # launch-only fields, omitted at their defaults so that calib.json records stay unchanged
            if cfg.get(k) == GenerationConfig.model_fields[k].default:
                cfg.pop(k, None)
        if not self.is_generated:
            cfg = {k: cfg[k] for k in sorted(REAL_KNOBS)}
        cfg.pop("method", None)
        out = {"model": self.model, "method": self.source, **cfg}
        if self.data:
            out["data"] = self.data
        if self.ablation:
            out["ablation"] = self.ablation
        return out


class ExperimentEntry(QuantConfig):
    """One quantization experiment: a model, a calibration set and the :class:`~dgh.quantization.QuantConfig`
    fields inline (``preset``, ``w_bits``, ``a_bits``, ``algorithm``, ``reconstruction`` ...; the library's defaults).

    Attributes:
        model: key into ``models``.
        calib: key into ``generate`` (a calibration set of the same model).
    """

    model: str
    calib: str

    def quant_config(self) -> QuantConfig:
        """The plain :class:`QuantConfig` of this experiment (without ``model``/``calib``)."""
        return QuantConfig(**self.model_dump(exclude={"model", "calib"}))

    @property
    def setting(self) -> str:
        """The column key of the results table: ``W8A8 pot mse``."""
        return f"W{self.w_bits}A{self.a_bits} {self.preset.value} {self.algorithm.value}"


class ImagenetData(_Strict):
    """Classification evaluation data of one model: an ImageFolder (ImageNet val layout), an optional image limit
    (first ``limit`` images in a class-balanced deterministic order; ``null`` = all) and the batch size."""

    data: str
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    class_layout: ClassLayout = ClassLayout.NAMES  # names: folders are class names; numbered: folders 0..C-1


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


class ExportParams(_Strict):
    """Stage ``export``: each quantized experiment as ``stages/export/<exp-id>/model.onnx`` (QuantizeLinear /
    DequantizeLinear, :mod:`dgh.export`), checked in onnxruntime on ``sample_images`` calibration images.

    ``enabled: false`` skips the export (the stage then only writes ``export.json`` saying so).
    ``evaluate_backend``: ``pytorch`` evaluates the fake-quant model, ``onnxruntime`` the exported file (needs
    ``enabled``); the report marks the cells of each backend.
    """

    enabled: bool = True
    opset: int = Field(17, ge=13, le=20)
    sample_images: int = Field(8, ge=1)
    evaluate_backend: Literal["pytorch", "onnxruntime"] = "pytorch"

    @model_validator(mode="after")
    def _backend_needs_export(self) -> ExportParams:
        if self.evaluate_backend == "onnxruntime" and not self.enabled:
            raise ValueError("export.evaluate_backend: onnxruntime evaluates the exported file; set export.enabled: true")
        return self


class Params(_Strict):
    """The whole of ``params.yaml``. Load it with :func:`load_params`."""

    assets: str = DEFAULT_ASSETS
    device: str = "auto"
    threads: int = Field(0, ge=0)  # 0 = auto (dgh.threads.auto_threads: the cores not busy right now)
    progress: bool = True
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    generate: dict[str, GenerateEntry] = Field(default_factory=dict)
    imagenet: ImagenetTask = Field(default_factory=ImagenetTask)
    coco: CocoTask = Field(default_factory=CocoTask)
    report: ReportParams = Field(default_factory=ReportParams)
    export: ExportParams = Field(default_factory=ExportParams)

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

