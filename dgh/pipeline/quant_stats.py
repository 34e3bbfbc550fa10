"""Stages ``quant_stats_imagenet`` / ``quant_stats_coco``: ``python -m dgh.pipeline.quant_stats <exp-id>`` measures
one quantized experiment (:func:`dgh.runs.stats.experiment_stats_to_dir`): per activation quantizer, the fraction
of values clipped low / high and the data range, on the first :data:`STATS_IMAGES` images of its calibration set
and on :data:`STATS_IMAGES` evaluation images (classifiers: a deterministic class-balanced subset of the
``<task>.eval`` folder, eval preprocessing; detectors: the first images by name, letterboxed to the model's size).

Writes ``stages/quant_stats/<model>/<exp-id>/`` (``quant_stats.json``, ``quant_clipping.png``) and
``stages/quant_sites/<model>/<exp-id>.csv`` (one row per site: the data of the DVC plot). Logs ``stats.q_calib_*``
/ ``stats.q_eval_*`` metrics, per-site step metrics ``stats.site.*`` (step = site index), the site table and the
figure to the experiment's MLflow run (resumed). It loads ``quantized.pt`` and never changes it. The comparison of
the thresholds with the real-calibrated experiment's is in the per-model stage ``stats``.
"""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.quant_stats")

from pathlib import Path

from dgh.data import load_calibration_set
from dgh.io import write_text
from dgh.pipeline.common import Project, StageError, experiment_tags, mlflow_run, stage_main
from dgh.pipeline.quantize import load_calibration
from dgh.runs.stats import CLIP_PLOT_FILE, experiment_stats_to_dir
from dgh.stats.quant_outputs import QUANT_STATS_FILE, log_quant_stats, sites_csv

QUANT_STATS_STAGE = "quant_stats"
SITES_STAGE = "quant_sites"
STATS_IMAGES = 32
"""Images of each kind (calibration, evaluation) per experiment. Measured on one loaded CPU core: 32 images through
the quantized efficientnet_lite0 with the counting hooks take about 5 s (64: 10 s; the forward alone 7 s), the
process start (imports, MLflow store) about 7 s; resnet20_cifar10 under 1 s."""


def quant_stats_dir(project: Project, model: str, experiment_id: str) -> Path:
    """``stages/quant_stats/<model>/<exp-id>``."""
    return project.layout.stage_dir(QUANT_STATS_STAGE, model) / experiment_id


def eval_images_folder(project: Project, task: str, model: str) -> Path:
    """The evaluation image folder of ``model`` on ``task`` (``imagenet``: ``data``; ``coco``: ``images``).

    Raises:
        StageError: no ``<task>.eval.<model>`` entry. ParamsError: the folder does not exist.
    """
    params = project.params
    section = getattr(params, task)
    if model not in section.eval:
        raise StageError(f"model {model!r} has no `{task}.eval` entry in params.yaml")
    d = section.eval[model]
    if task == "imagenet":
        return params.require(d.data, f"imagenet.eval.{model}.data", "ImageFolder")
    return params.require(d.images, f"coco.eval.{model}.images", "image folder")


def run_quant_stats(project: Project, experiment_id: str) -> Path:
    """Clipping statistics of experiment ``experiment_id``; returns its folder.

    Raises:
        ParamsError: unknown experiment. StageError: not quantized yet, or no evaluation data.
    """
    params, layout = project.params, project.layout
    e = params.experiment(experiment_id)
    task = params.task_of(experiment_id)
    qpath = layout.quantized_file(experiment_id)
    if not qpath.is_file():
        raise StageError(f"{qpath} not found; run `dvc repro` for the quantize stage of {experiment_id}")
    folder = eval_images_folder(project, task, e.model)
    loaded = project.load_model(e.model)
    calib = load_calibration(project, e.calib, loaded)[:STATS_IMAGES]
    evaluation = load_calibration_set(folder, loaded, n_images=STATS_IMAGES, seed=0, progress=False)
    out = quant_stats_dir(project, e.model, experiment_id)
    doc = experiment_stats_to_dir(loaded, qpath, calib, evaluation, out, experiment=experiment_id, model=e.model,
                                  calib_set=e.calib, calib_source=params.generation(e.calib).source,
                                  setting=e.setting, device=params.device)
    sites = write_text(sites_csv(doc), layout.stage_dir(SITES_STAGE, e.model) / f"{experiment_id}.csv")
    tags = {k: v for k, v in experiment_tags(params, experiment_id, "").items() if k != "dgh.stage"}
    tracker = project.tracker()
    with mlflow_run(tracker, e.model, experiment_id, fresh=False, tags=tags) as run_id:
        if tracker is not None and run_id is not None:
            log_quant_stats(tracker, run_id, doc, artifacts=[out / QUANT_STATS_FILE, sites, out / CLIP_PLOT_FILE])
    return out


if __name__ == "__main__":
    stage_main(run_quant_stats, "DVC stage quant_stats: clipping statistics of one quantized experiment")
