"""The DVC stages: each function reads ``params.yaml``, calls the library and writes ``stages/<stage>/<id>/``.

``dvc.yaml`` runs them as ``dgh stage <name> <id>`` (see :mod:`dgh.cli`); they are plain functions so tests call
them directly. Layout of the outputs (project-relative)::

    stages/generate/<set-id>/            images.pt, meta.json, preview.png, losses.json  (generated sources)
                                         calib.json only                                 (real, noise)
    stages/quantize/<exp-id>/            quantized.pt, quantization_report.csv, meta.json
    stages/evaluate_imagenet/<exp-id>/   metrics.json   {"top1", "top5" (percent), "n_images", ...}
    stages/evaluate_imagenet/<model>-float/metrics.json (float baseline, once per model)
    stages/evaluate_coco/<exp-id>/       metrics.json   {"map", "map50" (0-1), "n_images", ...}
    stages/evaluate_coco/<model>-float/  metrics.json

Real and noise calibration sets are not materialized (``calib.json`` records what to draw); ``quantize`` draws them
with :func:`dgh.data.load_calibration_set`, deterministically from the set's seed. Generated sets are produced
once per model x method and shared by every quantization setting that uses them.

MLflow (:mod:`dgh.tracking`): ``generate`` logs its loss terms per iteration into a ``generate/<set-id>`` run;
``quantize`` opens the experiment's run (params, tags, the generation loss curves as ``gen.*`` step metrics,
``preview.png``/``meta.json``/``quantized.pt``/``quantization_report.csv`` artifacts); ``evaluate_*`` resumes it and
logs the metrics. Float baselines get their own ``<model>-float`` runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dgh.env import configure_offline
from dgh.errors import first_line
from dgh.io import write_json
from dgh.params import Params, Source, load_params
from dgh.tracking import TAG_KIND, StepLogger, Tracker

STAGES_DIR = "stages"


class StageError(ValueError):
    """A pipeline stage cannot run (missing upstream output, bad id). One line."""


# ------------------------------------------------------------------------------------------------- helpers
def project_root(params_path: str | os.PathLike) -> Path:
    """The folder holding ``params.yaml`` (all stage outputs are relative to it)."""
    return Path(params_path).resolve().parent


def stage_dir(root: Path, stage: str, item: str) -> Path:
    """``<root>/stages/<stage>/<item>``."""
    return root / STAGES_DIR / stage / item


def float_id(model: str) -> str:
    """The id of a model's float baseline: ``<model>-float``."""
    return f"{model}-float"


def ensure_ultralytics_font(root: Path) -> None:
    """Point ``YOLO_CONFIG_DIR`` (if unset) at ``<root>/.cache/ultralytics`` and put a local ``Arial.ttf`` there.

    Ultralytics looks for Arial.ttf in its config folder whenever it plots or validates and downloads it when missing;
    with no network that fails. matplotlib's DejaVuSans serves as the fallback (same as ``run.sh`` does).
    """
    import shutil

    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(root / ".cache" / "ultralytics")))
    try:
        cfg.mkdir(parents=True, exist_ok=True)
        if not (cfg / "Arial.ttf").is_file():
            import matplotlib

            font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                shutil.copyfile(font, cfg / name)
    except OSError:
        pass  # a read-only location: ultralytics then only warns


def _tracker(root: Path, enabled: bool) -> Tracker | None:
    if not enabled or os.environ.get("DGH_TRACKING", "1").lower() in ("0", "false", "no", "off"):
        return None
    return Tracker.for_project(root)


@contextmanager
def _run(tracker: Tracker | None, experiment: str, key: str, *, fresh: bool, tags: dict, params: dict | None = None):
    """Open (or resume) a run; mark it FAILED when the body raises, FINISHED otherwise. Yields the run id or None."""
    if tracker is None:
        yield None
        return
    run_id = tracker.start_run(experiment, key, fresh=fresh, tags=tags, params=params)
    try:
        yield run_id
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id, "FINISHED")


def _load(params: Params, model_key: str):
    from dgh.models import load_model

    name, weights, imgsz = params.model_args(model_key)
    return load_model(name, weights, imgsz)


def generation_config(params: Params, set_id: str):
    """The :class:`dgh.generation.GenerationConfig` of a generated calibration set (``params.generate[set_id]``).

    Raises:
        ParamsError / GenerationConfigError: unknown set, not a generated source, or an invalid option.
    """
    from dgh.generation import GenerationConfig

    g = params.generation(set_id)
    if not g.source.is_generated:
        raise StageError(f"calibration set {set_id!r} has source {g.source.value!r}; nothing to generate")
    overrides = dict(g.options)
    overrides.update(n_images=g.n_images, iterations=g.iters, batch_size=g.batch_size, seed=g.seed)
    return GenerationConfig.for_method(g.source.value, **overrides)


def quant_config(params: Params, experiment_id: str):
    """The :class:`dgh.quantization.QuantConfig` of an experiment (preset, bits, algorithm, options)."""
    from dgh.quantization import QuantConfig

    e = params.experiment(experiment_id)
    fields: dict[str, Any] = dict(e.options)
    fields.update(preset=e.preset, w_bits=e.w_bits, a_bits=e.a_bits, algorithm=e.algorithm)
    try:
        return QuantConfig(**fields)
    except ValueError as exc:
        raise StageError(
            f"params.yaml: experiment {experiment_id}: invalid quantization setting: {first_line(exc, 300)}"
        ) from None


def config_dict(config: Any) -> dict:
    """A JSON-able dict of a pydantic config (``to_json_dict()`` when the class offers one)."""
    if hasattr(config, "to_json_dict"):
        return config.to_json_dict()
    return config.model_dump(mode="json")


def experiment_tags(params: Params, experiment_id: str, stage: str) -> dict[str, str]:
    """The MLflow tags of an experiment run (what the compare view groups by)."""
    e = params.experiment(experiment_id)
    g = params.generation(e.calib)
    return {
        TAG_KIND: "experiment",
        "dgh.task": params.task_of(experiment_id),
        "dgh.model": e.model,
        "dgh.calib": g.source.value,
        "dgh.calib_set": e.calib,
        "dgh.preset": e.preset,
        "dgh.bits": f"W{e.w_bits}A{e.a_bits}",
        "dgh.algorithm": e.algorithm,
        "dgh.setting": e.setting,
        "dgh.stage": stage,
    }



def _read_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return [(int(r["iteration"]), {k: v for k, v in r.items() if k != "iteration"}) for r in rows]


# -------------------------------------------------------------------------------------------------- stages
def run_generate(params: Params, set_id: str, root: Path, *, track: bool = True) -> Path:
    """Stage ``generate``: produce calibration set ``set_id`` under ``stages/generate/<set_id>/``.

    Generated sources (dgh, batch-bns, image-bns) run :func:`dgh.generation.generate_images` and write
    ``images.pt`` (N,3,H,W float32, normalized space), ``meta.json``, ``preview.png`` and ``losses.json``
    (the loss terms per iteration). Real and noise sets write only ``calib.json`` (what ``quantize`` draws).

    Returns:
        the output folder.
    """
    g = params.generation(set_id)
    out_dir = stage_dir(root, "generate", set_id)
    record = {"set_id": set_id, "model": g.model, **g.model_dump(mode="json")}
    if g.source is Source.REAL:
        record["data"] = str(params.require(g.data, f"generate.{set_id}.data", "image folder"))
    if not g.source.is_generated:
        params.model_args(g.model)  # fail early on missing weights
        write_json(record, out_dir / "calib.json")
        return out_dir

    from dgh.generation import generate_images

    config = generation_config(params, set_id)
    loaded = _load(params, g.model)
    tracker = _tracker(root, track)
    tags = {TAG_KIND: "generation", "dgh.model": g.model, "dgh.calib": g.source.value, "dgh.stage": "generate"}
    with _run(tracker, g.model, f"generate/{set_id}", fresh=True, tags=tags,
              params={"generate": config.model_dump(mode="json")}) as run_id:
        logger = StepLogger(tracker, run_id, every=25)
        t0 = time.perf_counter()
        result = generate_images(
            loaded, config, out_dir=out_dir, resume=False, callback=logger,
            device=None if params.device == "auto" else params.device, progress=params.progress,
        )
        logger.flush()
        seconds = time.perf_counter() - t0
        write_json([{"iteration": i, **m} for i, m in logger.history], out_dir / "losses.json")
        write_json({**record, "seconds": round(seconds, 2)}, out_dir / "calib.json")
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, {"seconds": seconds, **{f"final.{k}": v for k, v in result.loss_terms.items()}})
            for name in ("preview.png", "meta.json"):
                tracker.log_artifact(run_id, out_dir / name)
    return out_dir


def load_calibration(params: Params, set_id: str, root: Path, loaded) -> Any:
    """The calibration images of ``set_id`` as a (N,3,H,W) float32 tensor in normalized space.

    Raises:
        StageError: the generate stage has not produced the set yet.
    """
    from dgh.data import load_calibration_set

    g = params.generation(set_id)
    src_dir = stage_dir(root, "generate", set_id)
    if not (src_dir / "calib.json").is_file():
        raise StageError(f"calibration set {set_id!r} not found at {src_dir}; run `dvc repro generate@{set_id}`")
    if g.source.is_generated:
        return load_calibration_set(str(src_dir), loaded)
    if g.source is Source.NOISE:
        return load_calibration_set("noise", loaded, n_images=g.n_images, seed=g.seed)
    data = params.require(g.data, f"generate.{set_id}.data", "image folder")
    return load_calibration_set(str(data), loaded, n_images=g.n_images, seed=g.seed)


def run_quantize(params: Params, experiment_id: str, root: Path, *, track: bool = True) -> Path:
    """Stage ``quantize``: calibrate experiment ``experiment_id``; writes ``quantized.pt``, ``quantization_report.csv``,
    ``meta.json`` under ``stages/quantize/<experiment_id>/``. Opens a fresh MLflow run for the experiment."""
    from dgh.quantization import (
        quantize_model,
        save_quantized,
        write_quantization_report,
    )

    e = params.experiment(experiment_id)
    g = params.generation(e.calib)
    config = quant_config(params, experiment_id)
    loaded = _load(params, e.model)
    calib = load_calibration(params, e.calib, root, loaded)
    out_dir = stage_dir(root, "quantize", experiment_id)
    gen_dir = stage_dir(root, "generate", e.calib)
    tracker = _tracker(root, track)
    run_params = {
        "model": e.model,
        "weights": params.model(e.model).weights,
        "imgsz": params.model(e.model).imgsz,
        "calib": g.model_dump(mode="json"),
        "quant": config_dict(config),
    }
    with _run(tracker, e.model, experiment_id, fresh=True, tags=experiment_tags(params, experiment_id, "quantize"),
              params=run_params) as run_id:
        t0 = time.perf_counter()
        qmodel = quantize_model(
            loaded, calib, config, device=None if params.device == "auto" else params.device,
            progress=params.progress,
        )
        seconds = time.perf_counter() - t0
        meta = {
            "experiment": experiment_id,
            "model": e.model,
            "calib_set": e.calib,
            "calib_source": g.source.value,
            "n_calib": int(calib.shape[0]),
            "setting": e.setting,
            "quant": config_dict(config),
            "seconds": round(seconds, 2),
        }
        save_quantized(qmodel, out_dir / "quantized.pt", meta=meta)
        write_quantization_report(qmodel, out_dir / "quantization_report.csv")
        write_json(meta, out_dir / "meta.json")
        if tracker is not None and run_id is not None:
            tracker.log_history(run_id, _read_history(gen_dir / "losses.json"), prefix="gen.")
            tracker.log_metrics(run_id, {"quantize_seconds": seconds, "n_calib": int(calib.shape[0])})
            for name in ("preview.png", "meta.json", "calib.json"):
                tracker.log_artifact(run_id, gen_dir / name, "calibration")
            for name in ("quantized.pt", "quantization_report.csv", "meta.json"):
                tracker.log_artifact(run_id, out_dir / name, "quantization")
    return out_dir


def _evaluate(params: Params, task: str, model_key: str, model_fn: Callable[[Any], Any]) -> dict:
    """Evaluate ``model_fn(loaded)`` on the task's data of ``model_key``; returns the metrics dict."""
    loaded = _load(params, model_key)
    model = model_fn(loaded)
    device = None if params.device == "auto" else params.device
    if task == "imagenet":
        from dgh.evaluation import evaluate_classification

        d = params.imagenet.eval[model_key]
        data = params.require(d.data, f"imagenet.eval.{model_key}.data", "ImageFolder")
        return evaluate_classification(
            model, loaded.spec, str(data), limit=d.limit, batch_size=d.batch_size, device=device,
            progress=params.progress,
        )
    from dgh.evaluation import evaluate_coco

    c = params.coco.eval[model_key]
    images = params.require(c.images, f"coco.eval.{model_key}.images", "image folder")
    labels = params.require(c.labels, f"coco.eval.{model_key}.labels", "YOLO label folder")
    ann = params.require(c.annotations, f"coco.eval.{model_key}.annotations", "COCO instances json")
    return evaluate_coco(
        model, loaded, str(images), annotations=str(ann) if ann else None, labels=str(labels) if labels else None,
        imgsz=params.model(model_key).imgsz, batch_size=c.batch_size, device=device, progress=params.progress,
    )


def run_evaluate(params: Params, task: str, experiment_id: str, root: Path, *, track: bool = True) -> Path:
    """Stage ``evaluate_imagenet`` / ``evaluate_coco`` of a quantized experiment; writes ``metrics.json``."""
    from dgh.quantization import load_quantized

    if params.task_of(experiment_id) != task:
        raise StageError(f"experiment {experiment_id!r} is not a {task} experiment")
    e = params.experiment(experiment_id)
    qpath = stage_dir(root, "quantize", experiment_id) / "quantized.pt"
    if not qpath.is_file():
        raise StageError(f"{qpath} not found; run `dvc repro` for the quantize stage of {experiment_id}")
    t0 = time.perf_counter()
    metrics = _evaluate(params, task, e.model, lambda loaded: load_quantized(loaded, str(qpath)))
    record = {
        **{k: v for k, v in metrics.items()},
        "experiment": experiment_id,
        "model": e.model,
        "calib": params.generation(e.calib).source.value,
        "setting": e.setting,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = write_json(record, stage_dir(root, f"evaluate_{task}", experiment_id) / "metrics.json")
    tracker = _tracker(root, track)
    with _run(tracker, e.model, experiment_id, fresh=False,
              tags=experiment_tags(params, experiment_id, f"evaluate_{task}")) as run_id:
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, metrics)
            tracker.log_artifact(run_id, out, "evaluation")
    return out.parent


def run_evaluate_float(params: Params, task: str, model_key: str, root: Path, *, track: bool = True) -> Path:
    """Float baseline of ``model_key`` on its ``task`` data; writes ``stages/evaluate_<task>/<model>-float/``."""
    section = getattr(params, task)
    if model_key not in section.eval:
        raise StageError(f"model {model_key!r} has no `{task}.eval` entry in params.yaml")
    t0 = time.perf_counter()
    metrics = _evaluate(params, task, model_key, lambda loaded: loaded.model)
    record = {**metrics, "experiment": float_id(model_key), "model": model_key, "calib": "float",
              "setting": "float", "seconds": round(time.perf_counter() - t0, 2)}
    out = write_json(record, stage_dir(root, f"evaluate_{task}", float_id(model_key)) / "metrics.json")
    tracker = _tracker(root, track)
    tags = {TAG_KIND: "float", "dgh.task": task, "dgh.model": model_key, "dgh.calib": "float",
            "dgh.bits": "float", "dgh.preset": "float", "dgh.setting": "float", "dgh.stage": f"evaluate_{task}_float"}
    run_params = {"model": model_key, "weights": params.model(model_key).weights, "imgsz": params.model(model_key).imgsz}
    with _run(tracker, model_key, float_id(model_key), fresh=True, tags=tags, params=run_params) as run_id:
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, metrics)
            tracker.log_artifact(run_id, out, "evaluation")
    return out.parent


def run_report(params: Params, root: Path) -> Path:
    """Stage ``report``: tables, plot and image grid under ``params.report.out_dir`` (see :mod:`dgh.report`)."""
    from dgh.report import write_report

    return write_report(params, root)


STAGE_NAMES = ("generate", "quantize", "evaluate_imagenet", "evaluate_coco", "evaluate_imagenet_float",
               "evaluate_coco_float", "report")


def run_stage(stage: str, item: str | None, params_path: str | os.PathLike = "params.yaml") -> Path:
    """Run one stage by name (what ``dvc.yaml`` calls through ``dgh stage``).

    Raises:
        StageError: unknown stage or missing id; ParamsError and library errors pass through.
    """
    configure_offline()
    params = load_params(params_path)
    root = project_root(params_path)
    ensure_ultralytics_font(root)
    if stage not in STAGE_NAMES:
        raise StageError(f"unknown stage {stage!r}; one of {', '.join(STAGE_NAMES)}")
    if stage == "report":
        return run_report(params, root)
    if not item:
        raise StageError(f"stage {stage!r} needs an id (a calibration set, experiment or model key)")
    if stage == "generate":
        return run_generate(params, item, root)
    if stage == "quantize":
        return run_quantize(params, item, root)
    if stage.endswith("_float"):
        return run_evaluate_float(params, stage.removeprefix("evaluate_").removesuffix("_float"), item, root)
    return run_evaluate(params, stage.removeprefix("evaluate_"), item, root)
