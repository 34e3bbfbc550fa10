"""Stage ``quantize``: ``python -m dgh.pipeline.quantize <exp-id>`` writes ``stages/quantize/<exp-id>/``
(:func:`dgh.runs.quantize.quantize_to_dir`) and opens a fresh MLflow run for the experiment."""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.quantize")

import json
from pathlib import Path

import torch

from dgh.data import load_calibration_set
from dgh.data.calibration import NOISE
from dgh.layout import CALIB_FILE, META_FILE, PREVIEW_FILE, QUANT_REPORT_FILE, QUANTIZED_FILE
from dgh.models import LoadedModel
from dgh.params import REAL
from dgh.pipeline.common import Project, StageError, experiment_tags, mlflow_run, stage_main
from dgh.runs.quantize import quantize_to_dir


def load_calibration(project: Project, set_id: str, loaded: LoadedModel) -> torch.Tensor:
    """The calibration images of ``set_id`` as float32 ``(N, 3, H, W)`` in normalized space.

    Raises:
        StageError: the generate stage has not produced the set yet.
    """
    params = project.params
    g = params.generation(set_id)
    if not project.layout.calib_file(set_id).is_file():
        raise StageError(f"calibration set {set_id!r} not found at {project.layout.generate_dir(set_id)}; "
                         f"run `dvc repro generate@{set_id}`")
    if g.is_generated:
        return load_calibration_set(str(project.layout.generate_dir(set_id)), loaded)
    if g.method == REAL:
        source = str(params.require(g.data, f"generate.{set_id}.data", "image folder"))
    else:
        source = NOISE
    return load_calibration_set(source, loaded, n_images=g.config.n_images, seed=g.config.seed)


def _read_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return [(int(r["iteration"]), {k: v for k, v in r.items() if k != "iteration"}) for r in rows]


def run_quantize(project: Project, experiment_id: str) -> Path:
    """Calibrate experiment ``experiment_id``; returns its folder."""
    params, layout = project.params, project.layout
    e = params.experiment(experiment_id)
    g = params.generation(e.calib)
    config = e.quant_config()
    loaded = project.load_model(e.model)
    calib = load_calibration(project, e.calib, loaded)
    out_dir, gen_dir = layout.quantize_dir(experiment_id), layout.generate_dir(e.calib)
    tracker = project.tracker()
    run_params = {
        "model": e.model,
        "weights": params.model(e.model).weights,
        "imgsz": params.model(e.model).imgsz,
        "calib": g.to_json_dict(),
        "quant": config.to_json_dict(),
    }
    meta = {"experiment": experiment_id, "model": e.model, "calib_set": e.calib, "calib_source": g.source,
            "setting": e.setting}
    with mlflow_run(tracker, e.model, experiment_id, fresh=True,
                    tags=experiment_tags(params, experiment_id, "quantize"), params=run_params) as run_id:
        _, meta = quantize_to_dir(loaded, calib, config, out_dir, meta=meta, device=params.device,
                                  progress=params.progress)
        if tracker is not None and run_id is not None:
            tracker.log_history(run_id, _read_history(layout.losses_file(e.calib)), prefix="gen.")
            tracker.log_metrics(run_id, {"quantize_seconds": meta["seconds"], "n_calib": meta["n_calib"]})
            for name in (PREVIEW_FILE, META_FILE, CALIB_FILE):
                tracker.log_artifact(run_id, gen_dir / name, "calibration")
            for name in (QUANTIZED_FILE, QUANT_REPORT_FILE, META_FILE):
                tracker.log_artifact(run_id, out_dir / name, "quantization")
    return out_dir


if __name__ == "__main__":
    stage_main(run_quantize, "DVC stage quantize: one experiment of params.yaml")
