"""Files and MLflow records of quantized-model statistics (the stage ``quant_stats_<task>`` and the per-model stage
``stats``).

One experiment (:func:`make_quant_stats_file`, written by the stage as ``quant_stats.json``): the per-site clipping
rate and data range of its activation quantizers on (a subset of) its calibration set and on evaluation images
(:func:`dgh.stats.quantized_model_stats`, quantizers on). Its sites as CSV (:func:`sites_csv`, the data of the DVC
plot). Against the experiment calibrated on real data with the same model and quantization setting
(:func:`make_thresholds_file`, ``thresholds.json``): per-site ``log2`` of its range's ends over the real-calibrated
ones (:func:`dgh.stats.compare_thresholds`).

MLflow (the experiment's run): the summaries as ``stats.q_*`` metrics; per-site curves as step metrics
``stats.site.*`` with the index of the quantized site as the step (the site names in the table
``stats/quant_sites.json``); the files and figures as artifacts.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dgh.stats.calibration import StatsError
from dgh.stats.quantized import QuantizedStats, SiteThresholds, compare_thresholds, threshold_summary
from dgh.tracking import Tracker

QUANT_STATS_FILE = "quant_stats.json"
THRESHOLDS_FILE = "thresholds.json"
SUMMARY_FILE = "summary.json"
SITES_TABLE_FILE = "quant_sites.json"
SITE_COLUMNS = ("site", "name", "role", "bits", "q_low", "q_high", "clip_calib", "clip_eval", "eval_min", "eval_max")


class QuantStatsFile(BaseModel):
    """Content of ``quant_stats.json``: one quantized experiment on its calibration set and on evaluation images.

    Attributes:
        experiment, model, calib_set, calib_source, setting: what the experiment is (params.yaml ids, the
            setting as ``W4A8 pot mse``).
        calibration: clipping on (the first images of) the calibration set the ranges were chosen on.
        evaluation: clipping on (a deterministic subset of) the evaluation images.
        summary: ``stats.q_calib_*`` and ``stats.q_eval_*`` (:meth:`QuantizedStats.summary`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str
    model: str
    calib_set: str
    calib_source: str
    setting: str
    calibration: QuantizedStats
    evaluation: QuantizedStats
    summary: dict[str, float]

    def quantized_sites(self) -> list[str]:
        """Names of the quantized sites, in model order: the step index of the ``stats.site.*`` metrics."""
        return [s.name for s in self.evaluation.sites if s.quantized]


def make_quant_stats_file(experiment: str, model: str, calib_set: str, calib_source: str, setting: str,
                          calibration: QuantizedStats, evaluation: QuantizedStats) -> QuantStatsFile:
    """Bundle both measurements with their summaries.

    Raises:
        StatsError: the two measurements have different sites (not the same quantized model).
    """
    if [s.name for s in calibration.sites] != [s.name for s in evaluation.sites]:
        raise StatsError(f"{experiment}: calibration and evaluation statistics list different quantizer sites")
    summary = {**calibration.summary("stats.q_calib_"), **evaluation.summary("stats.q_eval_")}
    return QuantStatsFile(experiment=experiment, model=model, calib_set=calib_set, calib_source=calib_source,
                          setting=setting, calibration=calibration, evaluation=evaluation, summary=summary)


def read_quant_stats(path: str | Path) -> QuantStatsFile:
    """Read ``quant_stats.json`` (or the folder holding it).

    Raises:
        StatsError: missing or unreadable file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / QUANT_STATS_FILE
    if not p.is_file():
        raise StatsError(f"quantized-model statistics not found: {p} (run the quant_stats stage first)")
    try:
        return QuantStatsFile.model_validate_json(p.read_text())
    except ValueError as exc:
        raise StatsError(f"{p} is not a dgh quant_stats.json ({str(exc).splitlines()[0][:200]})") from None


def sites_csv(doc: QuantStatsFile) -> str:
    """One row per quantized site (columns :data:`SITE_COLUMNS`; ``site`` = its index, the step of the MLflow
    curves): range, clipping rate on the calibration and the evaluation images, evaluation data min and max."""
    calib = {s.name: s for s in doc.calibration.sites}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SITE_COLUMNS)
    for i, s in enumerate(s for s in doc.evaluation.sites if s.quantized):
        c = calib[s.name]
        w.writerow([i, s.name, s.role, s.bits, f"{s.q_low:.7g}", f"{s.q_high:.7g}", f"{c.clip:.7g}",
                    f"{s.clip:.7g}", f"{s.data_min:.7g}", f"{s.data_max:.7g}"])
    return buf.getvalue()


def _log_table(tracker: Tracker, run_id: str, name: str, table: dict, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # log_artifact replaces an earlier table (log_table appends)
        path = Path(tmp) / name
        path.write_text(json.dumps(table))
        tracker.log_artifact(run_id, path, artifact_path)


def log_quant_stats(tracker: Tracker, run_id: str, doc: QuantStatsFile, artifacts: Iterable[str | Path] = (),
                    artifact_path: str = "stats") -> int:
    """Log one experiment's clipping statistics to its MLflow run: ``doc.summary`` as metrics; per quantized site
    (step = its index) ``stats.site.clip_calib``, ``stats.site.clip_eval``, ``stats.site.q_high`` and
    ``stats.site.eval_max``; the site names as the table ``quant_sites.json``; ``artifacts`` under
    ``artifact_path``. Returns the number of metric values logged."""
    tracker.log_metrics(run_id, doc.summary)
    calib = {s.name: s for s in doc.calibration.sites}
    sites = [s for s in doc.evaluation.sites if s.quantized]
    history = [(i, {"stats.site.clip_calib": calib[s.name].clip, "stats.site.clip_eval": s.clip,
                    "stats.site.q_high": s.q_high, "stats.site.eval_max": s.data_max})
               for i, s in enumerate(sites)]
    n = len(doc.summary) + tracker.log_history(run_id, history)
    _log_table(tracker, run_id, SITES_TABLE_FILE, {
        "columns": ["site", "name", "role", "bits", "q_low", "q_high", "clip_calib", "clip_eval"],
        "data": [[i, s.name, s.role, s.bits, s.q_low, s.q_high, calib[s.name].clip, s.clip]
                 for i, s in enumerate(sites)],
    }, artifact_path)
    for path in artifacts:
        tracker.log_artifact(run_id, path, artifact_path)
    return n


class ThresholdsFile(BaseModel):
    """Content of ``thresholds.json``: an experiment's activation ranges against the real-calibrated experiment
    with the same model and quantization setting.

    Attributes:
        experiment, reference: the two experiment ids (equal for the real-calibrated experiment itself).
        sites: :class:`SiteThresholds` per quantized site, model order (the step index of the MLflow curve).
        summary: :func:`dgh.stats.threshold_summary`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str
    reference: str
    sites: list[SiteThresholds]
    summary: dict[str, float]


def make_thresholds_file(doc: QuantStatsFile, reference: QuantStatsFile) -> ThresholdsFile:
    """Compare ``doc``'s ranges with ``reference``'s (thresholds do not depend on the data: the evaluation
    measurement's sites are used).

    Raises:
        StatsError: another model or setting, or no common quantized site.
    """
    if (doc.model, doc.setting) != (reference.model, reference.setting):
        raise StatsError(f"{doc.experiment} ({doc.model}, {doc.setting}) cannot be compared with "
                         f"{reference.experiment} ({reference.model}, {reference.setting})")
    sites = compare_thresholds(doc.evaluation, reference.evaluation)
    return ThresholdsFile(experiment=doc.experiment, reference=reference.experiment, sites=sites,
                          summary=threshold_summary(sites))


def log_thresholds(tracker: Tracker, run_id: str, doc: ThresholdsFile, artifacts: Iterable[str | Path] = (),
                   artifact_path: str = "stats") -> int:
    """Log the comparison to the experiment's run: ``doc.summary`` as metrics, ``stats.site.thr_log2_vs_real`` per
    site (step = site index; sites without a defined ratio are skipped), ``artifacts`` under ``artifact_path``."""
    tracker.log_metrics(run_id, doc.summary)
    history = [(i, {"stats.site.thr_log2_vs_real": s.log2_high}) for i, s in enumerate(doc.sites)
               if s.log2_high is not None]
    n = len(doc.summary) + tracker.log_history(run_id, history)
    for path in artifacts:
        tracker.log_artifact(run_id, path, artifact_path)
    return n


class ExperimentSummary(BaseModel):
    """Content of ``summary.json`` (per experiment, written by the per-model stage ``stats``; the report's row).

    Attributes:
        experiment, calib_set, calib_source, setting: as in :class:`QuantStatsFile`.
        reference: the real-calibrated experiment compared with, or ``None`` (none with this setting).
        summary: ``stats.q_calib_*``, ``stats.q_eval_*`` and, with a reference, ``stats.q_thr_*`` /
            ``stats.q_sites_*``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str
    calib_set: str
    calib_source: str
    setting: str
    reference: str | None
    summary: dict[str, float]


def make_experiment_summary(doc: QuantStatsFile, thresholds: ThresholdsFile | None) -> ExperimentSummary:
    """One experiment's row: its clipping summary and, when compared, its threshold summary."""
    return ExperimentSummary(experiment=doc.experiment, calib_set=doc.calib_set, calib_source=doc.calib_source,
                             setting=doc.setting, reference=thresholds.reference if thresholds else None,
                             summary={**doc.summary, **(thresholds.summary if thresholds else {})})


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2g}"


def quant_table_markdown(rows: list[ExperimentSummary], metrics: dict[str, str] | None = None) -> str:
    """A markdown table, one row per quantized experiment of one model (in ``rows`` order).

    Columns: setting, source, the metric (``metrics[experiment]``, when given), the clipping rate on evaluation
    images (mean over sites, low / high, and the worst site, in percent), the number of sites clipping more than
    1e-4, and the sites' range against the real-calibrated experiment (mean and min..max of ``log2`` of the upper
    end; sites narrower / wider).
    """
    if not rows:
        return ""
    head = ["setting", "source", *(["metric"] if metrics is not None else []),
            "clipped on eval. images, % (low / high; worst site)", "sites clipping > 0.01 %",
            "range vs real-calibrated, log2 (mean; min .. max)", "sites narrower / wider"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.summary
        clip = (f"{_pct(s.get('stats.q_eval_clip_low'))} / {_pct(s.get('stats.q_eval_clip_high'))}; "
                f"{_pct(s.get('stats.q_eval_clip_max'))}")
        sites = s.get("stats.q_eval_sites_clipping")
        if "stats.q_thr_log2_mean" in s:
            thr = (f"{s['stats.q_thr_log2_mean']:+.2f}; {s['stats.q_thr_log2_min']:+.0f} .. "
                   f"{s['stats.q_thr_log2_max']:+.0f}")
            nw = f"{s['stats.q_sites_narrower']:.0f} / {s['stats.q_sites_wider']:.0f}"
        else:
            thr = nw = "—"
        row = [r.setting, f"{r.calib_source} (`{r.experiment}`)"]
        if metrics is not None:
            row.append(metrics.get(r.experiment, "—"))
        row += [clip, "—" if sites is None else f"{sites:.0f}", thr, nw]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
