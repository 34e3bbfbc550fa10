"""Stage ``stats``: ``python -m dgh.pipeline.stats <model>`` puts the statistics of every calibration set and every
quantized experiment of ``<model>`` side by side. It reads only the per-set and per-experiment files (stages
``set_stats`` and ``quant_stats_<task>``), so it takes seconds:

- ``stages/stats/<model>/<set-id>/``: ``stats.json`` (the set's statistics with the model's real set as
  ``reference`` and ``stats.output_range_ratio``; what the report reads), ``stats_bn_layers.png`` and
  ``stats_output_ranges.png`` (the set next to the real set);
- ``stages/stats/<model>/bn_layers.png`` and ``output_ranges.png``: every source of the model on one chart;
- ``stages/stats/<model>/quantized/<exp-id>/thresholds.json``: per activation quantizer, ``log2`` of the
  experiment's range ends over the experiment calibrated on the model's real set with the same quantization
  setting (:func:`dgh.stats.compare_thresholds`); ``summary.json``: the experiment's ``stats.q_*`` scalars (the
  report's row);
- ``stages/stats/<model>/quantized/<setting>.png``: per setting, the clipping rate on evaluation images and the
  range against real, one line per calibration source.

MLflow: each set's run ``generate/<set-id>`` gets the summary with ``stats.output_range_ratio`` and the figures;
each experiment's run gets ``stats.q_thr_log2_*`` / ``stats.q_sites_narrower`` / ``stats.q_sites_wider``, the step
metric ``stats.site.thr_log2_vs_real`` and its setting's figure.
"""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.stats")

import re
from pathlib import Path

from dgh.io import write_text
from dgh.params import REAL
from dgh.pipeline.common import Project, StageError, stage_main
from dgh.pipeline.quant_stats import quant_stats_dir
from dgh.pipeline.set_stats import set_stats_dir
from dgh.stats import CalibrationStats, QuantizedStats, SiteThresholds
from dgh.stats.outputs import BN_PLOT_FILE, RANGES_PLOT_FILE, STATS_DIR, STATS_FILE, make_stats_file, read_stats
from dgh.stats.plots import plot_bn_layers, plot_output_ranges, plot_setting
from dgh.stats.quant_outputs import (
    QUANT_STATS_FILE,
    SUMMARY_FILE,
    THRESHOLDS_FILE,
    QuantStatsFile,
    ThresholdsFile,
    log_thresholds,
    make_experiment_summary,
    make_thresholds_file,
    read_quant_stats,
)
from dgh.tracking import Tracker

STATS_STAGE = STATS_DIR
MODEL_BN_PLOT = "bn_layers.png"
MODEL_RANGES_PLOT = "output_ranges.png"
QUANTIZED_DIR = "quantized"


def sets_of_model(project: Project, model: str) -> list[str]:
    """The calibration-set ids of ``model``, real sets first, then in ``params.yaml`` order."""
    params = project.params
    ids = [s for s, g in params.generate.items() if g.model == model]
    return sorted(ids, key=lambda s: params.generation(s).method != REAL)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _set_stats(project: Project, model: str, tracker: Tracker | None) -> Path:
    set_ids = sets_of_model(project, model)
    if not set_ids:
        raise StageError(f"model {model!r} has no calibration set in params.yaml `generate`")
    params = project.params
    out_root = project.layout.stage_dir(STATS_STAGE, model)
    per_set = {}
    for set_id in set_ids:
        path = set_stats_dir(project, model, set_id) / STATS_FILE
        if not path.is_file():
            raise StageError(f"{path} not found; run `dvc repro set_stats@{set_id}`")
        per_set[set_id] = read_stats(path).stats
    reference = next((per_set[s] for s in set_ids if params.generation(s).method == REAL), None)
    by_source: dict[str, CalibrationStats] = {}
    for set_id, st in per_set.items():
        ref = reference if reference is not None and st is not reference else None
        doc = make_stats_file(st, ref)
        set_dir = out_root / set_id
        write_text(doc.model_dump_json(indent=1) + "\n", set_dir / STATS_FILE)
        sources = {st.source: st, **({"real": ref} if ref is not None and st.source != "real" else {})}
        figures = [plot_output_ranges(sources, set_dir / RANGES_PLOT_FILE)]
        if st.bn_layers:
            figures.append(plot_bn_layers(sources, set_dir / BN_PLOT_FILE))
        by_source[st.source if st.source not in by_source else set_id] = st
        run_id = tracker.find_run(model, f"generate/{set_id}") if tracker is not None else None
        if run_id is not None:
            tracker.log_metrics(run_id, doc.summary)
            for path in (set_dir / STATS_FILE, *figures):
                tracker.log_artifact(run_id, path, "stats")
    figures = [plot_output_ranges(by_source, out_root / MODEL_RANGES_PLOT)]
    if any(st.bn_layers for st in by_source.values()):
        figures.append(plot_bn_layers(by_source, out_root / MODEL_BN_PLOT))
    if tracker is not None:
        for set_id in set_ids:
            run_id = tracker.find_run(model, f"generate/{set_id}")
            if run_id is not None:
                for path in figures:
                    tracker.log_artifact(run_id, path, "stats/model")
    return out_root


def _quantized_stats(project: Project, model: str, tracker: Tracker | None) -> None:
    """Thresholds against the real-calibrated experiment of the same setting, and one figure per setting."""
    params = project.params
    out_root = project.layout.stage_dir(STATS_STAGE, model) / QUANTIZED_DIR
    groups: dict[str, list[tuple[str, QuantStatsFile]]] = {}
    for exp_id in params.experiment_ids():
        e = params.experiment(exp_id)
        if e.model != model:
            continue
        path = quant_stats_dir(project, model, exp_id)
        if not (path / QUANT_STATS_FILE).is_file():
            raise StageError(f"{path} has no quant_stats.json; run `dvc repro` for quant_stats of {exp_id}")
        key = e.quant_config().model_dump_json()  # same model and every quantization field equal
        groups.setdefault(key, []).append((exp_id, read_quant_stats(path)))
    used: set[Path] = set()
    for members in groups.values():
        real = [doc for _, doc in members if params.generation(doc.calib_set).method == REAL]
        clipping: dict[str, QuantizedStats] = {}
        thresholds: dict[str, list[SiteThresholds]] = {}
        files: dict[str, tuple[ThresholdsFile, Path]] = {}
        setting = members[0][1].setting
        figure = out_root / f"{_slug(setting)}.png"
        for i in range(2, len(groups) + 2):  # one figure per quantization config; settings may share a name
            if figure not in used:
                break
            figure = out_root / f"{_slug(setting)}-{i}.png"
        used.add(figure)
        for exp_id, doc in members:
            label = doc.calib_source if doc.calib_source not in clipping else doc.calib_set
            clipping[label] = doc.evaluation
            tf = make_thresholds_file(doc, real[0]) if real else None
            if tf is not None:
                thresholds[label] = tf.sites
                path = write_text(tf.model_dump_json(indent=1) + "\n", out_root / exp_id / THRESHOLDS_FILE)
                files[exp_id] = (tf, path)
            write_text(make_experiment_summary(doc, tf).model_dump_json(indent=1) + "\n",
                       out_root / exp_id / SUMMARY_FILE)
        plot_setting(clipping, thresholds, figure, title=f"{model} {setting}: per activation quantizer"
                     + ("" if real else " (no real-calibrated experiment to compare ranges with)"))
        for exp_id, _doc in members:
            run_id = tracker.find_run(model, exp_id) if tracker is not None else None
            if run_id is None:
                continue
            if exp_id in files:
                tf, tf_path = files[exp_id]
                log_thresholds(tracker, run_id, tf, artifacts=[tf_path])
            tracker.log_artifact(run_id, figure, "stats")


def run_stats(project: Project, model: str) -> Path:
    """Side-by-side statistics of the sets and experiments of ``model``; returns ``stages/stats/<model>``.

    Raises:
        ParamsError: unknown model. StageError: the model has no calibration set, or a per-set or per-experiment
            statistics file is missing.
    """
    project.params.model(model)
    tracker = project.tracker()
    out = _set_stats(project, model, tracker)
    _quantized_stats(project, model, tracker)
    return out


def read_model_stats(project: Project, model: str) -> dict[str, CalibrationStats]:
    """``{set-id: stats}`` of the sets of ``model`` whose ``stats.json`` exists (for the report)."""
    out: dict[str, CalibrationStats] = {}
    for set_id in sets_of_model(project, model):
        path = project.layout.stage_dir(STATS_STAGE, model) / set_id / STATS_FILE
        if path.is_file():
            out[set_id] = read_stats(path).stats
    return out


if __name__ == "__main__":
    stage_main(run_stats, "DVC stage stats: statistics of one model's sets and experiments side by side")
