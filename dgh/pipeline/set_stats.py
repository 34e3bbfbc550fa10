"""Stage ``set_stats``: ``python -m dgh.pipeline.set_stats <set-id>`` writes the statistics of one calibration set
(:func:`dgh.stats.calibration_set_stats`, through the float model):

- ``stages/set_stats/<model>/<set-id>/``: ``stats.json`` (the set alone; the per-model stage ``stats`` adds the
  real set as reference) and ``stats_output_ranges.csv``;
- ``stages/stats_layers/<model>/<set-id>.csv``: the per-layer BN distance, the data of the DVC plot
  (``dvc plots show`` / ``dvc plots diff``).

It depends on its own set only, so editing one set re-runs only that set's statistics; the statistics never re-run a
generation. The set's MLflow run ``generate/<set-id>`` (resumed; real and noise sets get one) receives the
``stats.*`` metrics, the per-layer step metrics and the layer table.
"""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.set_stats")

from pathlib import Path

from dgh.io import write_text
from dgh.pipeline.common import Project, mlflow_run, stage_main
from dgh.pipeline.quantize import load_calibration
from dgh.runs.stats import stats_to_dir
from dgh.stats.outputs import LAYERS_FILE, STATS_FILE, layers_csv, log_stats
from dgh.tracking import TAG_KIND

SET_STATS_STAGE = "set_stats"
LAYERS_STAGE = "stats_layers"


def set_stats_dir(project: Project, model: str, set_id: str) -> Path:
    """``stages/set_stats/<model>/<set-id>``."""
    return project.layout.stage_dir(SET_STATS_STAGE, model) / set_id


def layers_file(project: Project, model: str, set_id: str) -> Path:
    """``stages/stats_layers/<model>/<set-id>.csv``."""
    return project.layout.stage_dir(LAYERS_STAGE, model) / f"{set_id}.csv"


def run_set_stats(project: Project, set_id: str) -> Path:
    """Statistics of calibration set ``set_id``; returns its folder.

    Raises:
        ParamsError: unknown set. StageError: the set is not generated yet.
    """
    params = project.params
    g = params.generation(set_id)
    loaded = project.load_model(g.model)
    images = load_calibration(project, set_id, loaded)
    out = set_stats_dir(project, g.model, set_id)
    doc = stats_to_dir(loaded, images, out, source=g.source, device=params.device, plots=False)
    layers = write_text(layers_csv(doc.stats), layers_file(project, g.model, set_id))
    (out / LAYERS_FILE).unlink(missing_ok=True)  # the per-layer table lives in stages/stats_layers/
    tags = {TAG_KIND: "generation", "dgh.model": g.model, "dgh.calib": g.source,
            **({"dgh.ablation": g.ablation} if g.ablation else {})}
    tracker = project.tracker()
    with mlflow_run(tracker, g.model, f"generate/{set_id}", fresh=False, tags=tags) as run_id:
        if tracker is not None and run_id is not None:
            log_stats(tracker, run_id, doc, artifacts=[out / STATS_FILE, layers])
    return out


if __name__ == "__main__":
    stage_main(run_set_stats, "DVC stage set_stats: statistics of one calibration set of params.yaml")
