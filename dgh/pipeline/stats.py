"""Stage ``stats``: ``python -m dgh.pipeline.stats <model>`` writes the calibration-set statistics of every set of
``<model>`` in ``params.yaml`` (:mod:`dgh.stats`):

- ``stages/stats/<model>/<set-id>/``: ``stats.json`` (with the model's real set as reference, when it has one),
  ``stats_output_ranges.csv`` and the per-set figures;
- ``stages/stats/<model>/bn_layers.png`` and ``output_ranges.png``: every source of the model on one chart;
- ``stages/stats_layers/<model>/<set-id>.csv``: the per-layer BN distance, the data of the DVC plots
  (``dvc plots show`` / ``dvc plots diff``).

Each set's statistics are logged to its MLflow run ``generate/<set-id>`` (resumed; real and noise sets get one):
``stats.*`` metrics, per-layer step metrics, the layer table and the figures.
"""

from __future__ import annotations

from pathlib import Path

from dgh.io import write_text
from dgh.params import REAL
from dgh.pipeline.common import Project, StageError, mlflow_run, stage_main
from dgh.pipeline.quantize import load_calibration
from dgh.runs.stats import stats_to_dir
from dgh.stats import CalibrationStats
from dgh.stats.outputs import (
    BN_PLOT_FILE,
    LAYERS_FILE,
    RANGES_PLOT_FILE,
    STATS_DIR,
    STATS_FILE,
    layers_csv,
    log_stats,
    read_stats,
)
from dgh.stats.plots import plot_bn_layers, plot_output_ranges
from dgh.tracking import TAG_KIND

STATS_STAGE = STATS_DIR
LAYERS_STAGE = "stats_layers"
MODEL_BN_PLOT = "bn_layers.png"
MODEL_RANGES_PLOT = "output_ranges.png"


def sets_of_model(project: Project, model: str) -> list[str]:
    """The calibration-set ids of ``model``, real sets first, then in ``params.yaml`` order."""
    params = project.params
    ids = [s for s, g in params.generate.items() if g.model == model]
    return sorted(ids, key=lambda s: params.generation(s).method != REAL)


def run_stats(project: Project, model: str) -> Path:
    """Statistics of every calibration set of ``model``; returns ``stages/stats/<model>``.

    Raises:
        ParamsError: unknown model. StageError: the model has no calibration set, or one is not generated yet.
    """
    params, layout = project.params, project.layout
    params.model(model)
    set_ids = sets_of_model(project, model)
    if not set_ids:
        raise StageError(f"model {model!r} has no calibration set in params.yaml `generate`")
    loaded = project.load_model(model)
    out_root = layout.stage_dir(STATS_STAGE, model)
    layers_root = layout.stage_dir(LAYERS_STAGE, model)
    tracker = project.tracker()
    reference: CalibrationStats | None = None
    by_source: dict[str, CalibrationStats] = {}
    for set_id in set_ids:
        g = params.generation(set_id)
        images = load_calibration(project, set_id, loaded)
        set_dir = out_root / set_id
        doc = stats_to_dir(loaded, images, set_dir, source=g.source, reference=reference, device=params.device)
        if g.method == REAL and reference is None:
            reference = doc.stats
        write_text(layers_csv(doc.stats), layers_root / f"{set_id}.csv")
        (set_dir / LAYERS_FILE).unlink(missing_ok=True)  # the per-layer table lives in stages/stats_layers/
        label = g.source if g.source not in by_source else set_id
        by_source[label] = doc.stats
        tags = {TAG_KIND: "generation", "dgh.model": model, "dgh.calib": g.source, "dgh.stage": "stats"}
        with mlflow_run(tracker, model, f"generate/{set_id}", fresh=False, tags=tags) as run_id:
            if tracker is not None and run_id is not None:
                files = [set_dir / STATS_FILE, layers_root / f"{set_id}.csv", set_dir / BN_PLOT_FILE,
                         set_dir / RANGES_PLOT_FILE]
                log_stats(tracker, run_id, doc, artifacts=files)
    if any(st.bn_layers for st in by_source.values()):
        plot_bn_layers(by_source, out_root / MODEL_BN_PLOT)
    plot_output_ranges(by_source, out_root / MODEL_RANGES_PLOT)
    if tracker is not None:
        for set_id in set_ids:
            run_id = tracker.find_run(model, f"generate/{set_id}")
            if run_id is not None:
                for name in (MODEL_BN_PLOT, MODEL_RANGES_PLOT):
                    tracker.log_artifact(run_id, out_root / name, "stats/model")
    return out_root


def read_model_stats(project: Project, model: str) -> dict[str, CalibrationStats]:
    """``{set-id: stats}`` of the sets of ``model`` whose ``stats.json`` exists (for the report)."""
    out: dict[str, CalibrationStats] = {}
    for set_id in sets_of_model(project, model):
        path = project.layout.stage_dir(STATS_STAGE, model) / set_id / STATS_FILE
        if path.is_file():
            out[set_id] = read_stats(path).stats
    return out


if __name__ == "__main__":
    stage_main(run_stats, "DVC stage stats: calibration-set statistics of one model's sets in params.yaml")
