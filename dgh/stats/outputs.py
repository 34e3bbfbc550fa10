"""Files and MLflow records of calibration-set statistics.

Files of one set (:func:`write_stats`), next to its ``images.pt``:

- ``stats.json``: :class:`StatsFile`: the set's :class:`CalibrationStats`, the scalar summary (``stats.*``) and,
  where the model has a real set, that set's statistics as ``reference`` (output coverage of real images next to
  the synthetic ones; ``stats.output_range_ratio`` is relative to it);
- ``stats_layers.csv``: one row per BN layer (``layer`` index, ``name``, ``channels``, ``mean_term``, ``std_term``,
  ``bn_distance``), the data of the DVC per-layer plot (``plots:`` in ``dvc.yaml``; ``dvc plots show/diff``);
- ``stats_output_ranges.csv``: one row per image and output (``image``, ``output``, ``range``);
- ``stats_bn_layers.png`` and ``stats_output_ranges.png``: the per-layer BN distance and the output-range
  histograms of the set, next to the real set when there is one (:mod:`dgh.stats.plots`).

MLflow (:func:`log_stats`): the summary as metrics, the per-layer curves as step metrics (``stats.layer.*``, step =
layer index ``l``), the layer names as a table (``stats_layers.json``), and the files and figures as
artifacts.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dgh.io import write_text
from dgh.stats.calibration import CalibrationStats, StatsError
from dgh.stats.plots import plot_bn_layers, plot_output_ranges
from dgh.tracking import Tracker

STATS_DIR = "stats"
"""Stage folder of the pipeline's statistics: ``stages/stats/<model>/<set-id>/stats.json``."""
STATS_FILE = "stats.json"
LAYERS_FILE = "stats_layers.csv"
RANGES_FILE = "stats_output_ranges.csv"
BN_PLOT_FILE = "stats_bn_layers.png"
RANGES_PLOT_FILE = "stats_output_ranges.png"
LAYERS_TABLE_FILE = "stats_layers.json"
LAYER_COLUMNS = ("layer", "name", "channels", "mean_term", "std_term", "bn_distance")
LAYER_METRICS = ("bn_distance", "mean_term", "std_term")


class StatsFile(BaseModel):
    """Content of ``stats.json``.

    Attributes:
        stats: the set's statistics.
        summary: ``stats.*`` scalars (:meth:`CalibrationStats.summary` against ``reference``).
        reference: statistics of the model's real set, or ``None`` (no real set, or this is the real set).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stats: CalibrationStats
    summary: dict[str, float]
    reference: CalibrationStats | None = None


def make_stats_file(stats: CalibrationStats, reference: CalibrationStats | None = None) -> StatsFile:
    """Bundle a set's statistics with its summary (and the real set's statistics, when given).

    Raises:
        StatsError: ``reference`` comes from another model.
    """
    if reference is not None and reference.model != stats.model:
        raise StatsError(f"reference statistics are of model {reference.model}, not {stats.model}")
    return StatsFile(stats=stats, summary=stats.summary(reference), reference=reference)


def layers_csv(stats: CalibrationStats) -> str:
    """``stats_layers.csv`` text (columns :data:`LAYER_COLUMNS`, 10 significant digits)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LAYER_COLUMNS)
    for layer in stats.bn_layers:
        w.writerow([layer.index, layer.name, layer.channels, f"{layer.mean_term:.10g}", f"{layer.std_term:.10g}",
                    f"{layer.distance:.10g}"])
    return buf.getvalue()


def ranges_csv(stats: CalibrationStats) -> str:
    """``stats_output_ranges.csv`` text: ``image, output, range`` per image and output."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("image", "output", "range"))
    for o in stats.outputs:
        for i, r in enumerate(o.ranges):
            w.writerow((i, o.name, f"{r:.7g}"))
    return buf.getvalue()


def _label(stats: CalibrationStats, fallback: str) -> str:
    return stats.source or fallback


def write_stats(
    out_dir: str | Path, stats: CalibrationStats, reference: CalibrationStats | None = None, plots: bool = True
) -> list[Path]:
    """Write ``stats.json``, ``stats_layers.csv``, ``stats_output_ranges.csv`` and (``plots``) the two figures into
    ``out_dir`` (atomically).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    doc = make_stats_file(stats, reference)
    paths = [
        write_text(doc.model_dump_json(indent=1) + "\n", out / STATS_FILE),
        write_text(layers_csv(stats), out / LAYERS_FILE),
        write_text(ranges_csv(stats), out / RANGES_FILE),
    ]
    if plots:
        sources = {_label(stats, "this set"): stats}
        if reference is not None:
            sources[_label(reference, "real") if _label(reference, "real") not in sources else "real"] = reference
        if stats.bn_layers:
            paths.append(plot_bn_layers(sources, out / BN_PLOT_FILE))
        paths.append(plot_output_ranges(sources, out / RANGES_PLOT_FILE))
    return paths


def read_stats(path: str | Path) -> StatsFile:
    """Read ``stats.json`` (or the folder holding it).

    Raises:
        StatsError: missing or unreadable file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / STATS_FILE
    if not p.is_file():
        raise StatsError(f"statistics file not found: {p} (run `dgh stats` or `dgh generate` first)")
    try:
        return StatsFile.model_validate_json(p.read_text())
    except ValueError as exc:
        raise StatsError(f"{p} is not a dgh stats.json ({str(exc).splitlines()[0][:200]})") from None


def log_stats(
    tracker: Tracker, run_id: str, doc: StatsFile, artifacts: Iterable[str | Path] = (), artifact_path: str = "stats"
) -> int:
    """Log one set's statistics to an MLflow run.

    - metrics: ``doc.summary`` (``stats.bn_distance``, ``stats.clip_low``, ``stats.output_range_ratio`` ...) at step 0;
    - step metrics ``stats.layer.bn_distance`` / ``stats.layer.mean_term`` / ``stats.layer.std_term`` with the
      layer index as the step;
    - a table ``stats_layers.json`` naming each layer index (MLflow's table format ``{"columns", "data"}``, as
      ``log_table`` writes it; logged as a plain artifact so that a re-run replaces it instead of appending);
    - ``artifacts`` (files; missing ones skipped) under ``artifact_path``.

    Returns:
        The number of metric values logged.
    """
    n = 0
    tracker.log_metrics(run_id, doc.summary)
    n += len(doc.summary)
    layers = doc.stats.bn_layers
    if layers:
        history = [
            (layer.index, {f"stats.layer.{k}": v for k, v in zip(LAYER_METRICS, (layer.distance, layer.mean_term,
                                                                                  layer.std_term))})
            for layer in layers
        ]
        n += tracker.log_history(run_id, history)
        table = {
            "columns": ["layer", "name", "channels", "bn_distance", "mean_term", "std_term"],
            "data": [[layer.index, layer.name, layer.channels, layer.distance, layer.mean_term, layer.std_term]
                     for layer in layers],
        }
        with tempfile.TemporaryDirectory() as tmp:  # log_artifact replaces an earlier table (log_table appends)
            path = Path(tmp) / LAYERS_TABLE_FILE
            path.write_text(json.dumps(table))
            tracker.log_artifact(run_id, path, artifact_path)
    for path in artifacts:
        tracker.log_artifact(run_id, path, artifact_path)
    return n


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def stats_table_markdown(sets: dict[str, StatsFile]) -> str:
    """A markdown table, one row per calibration set of one model (``{set id: stats.json content}``).

    Columns: the source and N; the dataset-level BN distance L_BN with its mean and std parts; the percentage of
    pixels at 0 and at 1; the mean per-image output range (detectors: per head level), its ratio to the real set;
    the output min..max; for classifiers the prediction entropy (nats) and the number of distinct classes.
    """
    if not sets:
        return ""
    classify = any(doc.stats.predictions is not None for doc in sets.values())
    head = ["source (set)", "N", "BN distance L_BN (mean + std part)", "pixels at 0 / at 1 (%)",
            "output range per image, mean", "range / real", "output min .. max"]
    if classify:
        head.append("pred. entropy (nats) / classes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for set_id, doc in sets.items():
        st, s = doc.stats, doc.summary
        bn = (f"{st.bn_distance:.3g} ({s['stats.bn_mean_part']:.2g} + {s['stats.bn_std_part']:.2g})"
              if st.bn_distance is not None else "—")
        if len(st.outputs) > 1:
            rng = " / ".join(f"{o.range_mean:.3g}" for o in st.outputs) + " (per level)"
        else:
            o = st.outputs[0]
            rng = f"{o.range_mean:.3g} (p5 {o.range_percentiles['p5']:.3g}, p95 {o.range_percentiles['p95']:.3g})"
        ratio = s.get("stats.output_range_ratio")
        row = [f"{st.source} (`{set_id}`)", str(st.n_images), bn,
               f"{_pct(st.pixels.at_low_all)} / {_pct(st.pixels.at_high_all)}", rng,
               f"{ratio:.2f}" if ratio is not None else "—",
               f"{s['stats.output_min']:.3g} .. {s['stats.output_max']:.3g}"]
        if classify:
            p = st.predictions
            row.append(f"{p.entropy_nats:.2f} / {p.distinct}" if p is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
