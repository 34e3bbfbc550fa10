"""stats.json / DVC plot files and the MLflow record of calibration-set statistics (dgh/stats/outputs.py)."""

from __future__ import annotations

import csv
import json

import pytest

from dgh.stats import StatsError, calibration_set_stats
from dgh.stats.outputs import LAYER_COLUMNS, log_stats, make_stats_file, read_stats, write_stats
from dgh.tracking import Tracker
from tests.test_stats import ChannelMeanLogits, TinyBNNet, _images, _loaded

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_sets():
    loaded = _loaded(TinyBNNet())
    real = calibration_set_stats(loaded, _images(6, seed=1), source="real")
    synth = calibration_set_stats(loaded, _images(6, seed=2) * 0.5, source="dgh")
    return real, synth


def test_write_and_read_stats_files(tmp_path, two_sets) -> None:
    real, synth = two_sets
    paths = write_stats(tmp_path, synth, reference=real)
    assert [p.name for p in paths] == ["stats.json", "stats_layers.csv", "stats_output_ranges.csv",
                                       "stats_bn_layers.png", "stats_output_ranges.png"]
    doc = read_stats(tmp_path)
    assert doc.stats == synth and doc.reference == real
    assert doc.summary["stats.output_range_ratio"] == pytest.approx(synth.output_range_mean / real.output_range_mean)
    with open(tmp_path / "stats_layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == LAYER_COLUMNS
    assert [r["name"] for r in rows] == [layer.name for layer in synth.bn_layers]
    assert sum(float(r["bn_distance"]) for r in rows) == pytest.approx(synth.bn_distance, rel=1e-8)
    with open(tmp_path / "stats_output_ranges.csv") as f:
        ranges = list(csv.DictReader(f))
    assert len(ranges) == synth.n_images
    assert [float(r["range"]) for r in ranges] == pytest.approx(synth.outputs[0].ranges, rel=1e-6)
    with pytest.raises(StatsError, match="not found"):
        read_stats(tmp_path / "absent")
    other = calibration_set_stats(_loaded(ChannelMeanLogits()), _images(2))
    other = other.model_copy(update={"model": "other"})
    with pytest.raises(StatsError, match="another|model"):
        make_stats_file(synth, reference=other)


def test_log_stats_to_mlflow(tmp_path, two_sets) -> None:
    real, synth = two_sets
    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "mlartifacts", commit="abc")
    rid = tracker.start_run("tiny", "generate/tiny-dgh", fresh=True)
    files = write_stats(tmp_path / "set", synth, reference=real)
    doc = make_stats_file(synth, reference=real)
    n = log_stats(tracker, rid, doc, artifacts=files)
    tracker.finish(rid)
    run = tracker.client.get_run(rid)
    for key in ("stats.bn_distance", "stats.clip_low", "stats.clip_high", "stats.output_range_ratio",
                "stats.pred_entropy"):
        assert run.data.metrics[key] == pytest.approx(doc.summary[key])
    hist = tracker.client.get_metric_history(rid, "stats.layer.bn_distance")
    assert sorted(m.step for m in hist) == [layer.index for layer in synth.bn_layers]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
        [layer.distance for layer in synth.bn_layers])
    assert n == len(doc.summary) + 3 * len(synth.bn_layers)
    listed = {a.path for a in tracker.client.list_artifacts(rid, "stats")}
    assert {"stats/stats.json", "stats/stats_layers.csv", "stats/stats_layers.json"} <= listed
    local = tracker.client.download_artifacts(rid, "stats/stats_layers.json", str(tmp_path / "dl"))
    with open(local) as f:
        tab = json.load(f)
    assert tab["columns"][:2] == ["layer", "name"]
    assert [row[1] for row in tab["data"]] == [layer.name for layer in synth.bn_layers]
