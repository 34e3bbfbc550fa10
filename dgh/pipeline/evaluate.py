"""Stages ``evaluate_imagenet`` / ``evaluate_coco``: ``python -m dgh.pipeline.evaluate <exp-id>`` evaluates an
experiment's quantized model, ``python -m dgh.pipeline.evaluate imagenet:<model>`` (or ``coco:<model>``) a model's
float baseline; both
write ``stages/evaluate_<task>/<id>/metrics.json`` (:func:`dgh.runs.evaluate.evaluate_to_file`) and log the metrics
to MLflow."""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.evaluate")

from pathlib import Path

from dgh.export import EXPORT_STAGE, ONNX_FILE, Backend
from dgh.layout import float_id
from dgh.pipeline.common import Project, StageError, experiment_tags, mlflow_run, stage_main
from dgh.runs.evaluate import ClassificationData, DetectionData, evaluate_to_file
from dgh.tracking import TAG_KIND


def eval_data(project: Project, task: str, model_key: str) -> ClassificationData | DetectionData:
    """The evaluation data of ``model_key`` on ``task`` (``imagenet`` | ``coco``), paths checked.

    Raises:
        StageError: no ``<task>.eval.<model>`` entry; ParamsError: a path does not exist.
    """
    params = project.params
    section = getattr(params, task)
    if model_key not in section.eval:
        raise StageError(f"model {model_key!r} has no `{task}.eval` entry in params.yaml")
    d = section.eval[model_key]
    if task == "imagenet":
        return ClassificationData(params.require(d.data, f"imagenet.eval.{model_key}.data", "ImageFolder"),
                                  d.limit, d.batch_size, d.class_layout)
    return DetectionData(
        images=params.require(d.images, f"coco.eval.{model_key}.images", "image folder"),
        labels=params.require(d.labels, f"coco.eval.{model_key}.labels", "YOLO label folder"),
        annotations=params.require(d.annotations, f"coco.eval.{model_key}.annotations", "COCO instances json"),
        imgsz=params.model(model_key).imgsz,
        batch_size=d.batch_size,
    )


def run_evaluate(project: Project, experiment_id: str) -> Path:
    """Evaluate experiment ``experiment_id`` (its task is the params section that defines it); returns the folder."""
    params, layout = project.params, project.layout
    task = params.task_of(experiment_id)
    e = params.experiment(experiment_id)
    qpath = layout.quantized_file(experiment_id)
    if not qpath.is_file():
        raise StageError(f"{qpath} not found; run `dvc repro` for the quantize stage of {experiment_id}")
    data = eval_data(project, task, e.model)
    record = {"experiment": experiment_id, "model": e.model, "calib": params.generation(e.calib).source,
              "setting": e.setting}
    out = layout.metrics_file(task, experiment_id)
    backend = params.export.evaluate_backend  # onnxruntime: score stages/export/<exp-id>/model.onnx itself
    onnx = layout.stage_dir(EXPORT_STAGE, experiment_id) / ONNX_FILE
    if backend == Backend.onnxruntime.value and not onnx.is_file():
        raise StageError(f"{onnx} not found; run `dvc repro` for the export stage of {experiment_id}")
    metrics = evaluate_to_file(project.load_model(e.model), data, out, quantized=qpath, record=record,
                               device=params.device, progress=params.progress, backend=backend, onnx=onnx)
    tracker = project.tracker()
    with mlflow_run(tracker, e.model, experiment_id, fresh=False,
                    tags=experiment_tags(params, experiment_id, f"evaluate_{task}")) as run_id:
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, metrics)
            tracker.set_tags(run_id, {f"dgh.backend.evaluate_{task}": backend})
            tracker.log_artifact(run_id, out, "evaluation")
    return out.parent


def run_evaluate_float(project: Project, task: str, model_key: str) -> Path:
    """Float baseline of ``model_key`` on its ``task`` data; writes ``stages/evaluate_<task>/<model>-float/``."""
    params, layout = project.params, project.layout
    data = eval_data(project, task, model_key)
    record = {"experiment": float_id(model_key), "model": model_key, "calib": "float", "setting": "float"}
    out = layout.metrics_file(task, float_id(model_key))
    metrics = evaluate_to_file(project.load_model(model_key), data, out, record=record, device=params.device,
                               progress=params.progress)
    tracker = project.tracker()
    tags = {TAG_KIND: "float", "dgh.task": task, "dgh.model": model_key, "dgh.calib": "float",
            "dgh.bits": "float", "dgh.preset": "float", "dgh.setting": "float", "dgh.stage": f"evaluate_{task}_float"}
    entry = params.model(model_key)
    run_params = {"model": model_key, "weights": entry.weights, "imgsz": entry.imgsz}
    with mlflow_run(tracker, model_key, float_id(model_key), fresh=True, tags=tags, params=run_params) as run_id:
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, metrics)
            tracker.log_artifact(run_id, out, "evaluation")
    return out.parent


def _run(project: Project, item: str) -> Path:
    """``<exp-id>``, or ``imagenet:<model>`` / ``coco:<model>`` for a float baseline."""
    task, sep, model_key = item.partition(":")
    if sep:
        if task not in ("imagenet", "coco"):
            raise StageError(f"float baseline id must be imagenet:<model> or coco:<model>, got {item!r}")
        return run_evaluate_float(project, task, model_key)
    return run_evaluate(project, item)


if __name__ == "__main__":
    stage_main(_run, "DVC stage evaluate: an experiment id, or imagenet:<model> / coco:<model> for a float baseline")
