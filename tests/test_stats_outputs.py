"""stats.json / DVC plot files and the MLflow record of calibration-set statistics (dgh/stats/outputs.py)."""

from __future__ import annotations

import csv
import json
import urllib.request

import pytest
import torch
from typer.testing import CliRunner

from dgh.cli import app
from dgh.generation import GenerationConfig
from dgh.models import load_model
from dgh.runs.generate import generate_to_dir
from dgh.runs.stats import stats_to_dir
from dgh.stats import StatsError, calibration_set_stats, quantized_model_stats
from dgh.stats.outputs import (
    LAYER_COLUMNS,
    log_stats,
    make_stats_file,
    read_stats,
    stats_table_markdown,
    write_stats,
)
from dgh.stats.quant_outputs import (
    SITE_COLUMNS,
    log_quant_stats,
    log_thresholds,
    make_experiment_summary,
    make_quant_stats_file,
    make_thresholds_file,
    quant_table_markdown,
    read_quant_stats,
    sites_csv,
)
from dgh.tracking import Tracker
from tests.mlflow_server import mlflow_server
from tests.test_stats import ChannelMeanLogits, TinyBNNet, _images, _loaded, _tiny_quantized

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
    # the MLflow 3 UI shows the runs/compare view (not the GenAI traces view) for experiments of this kind
    assert tracker.client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
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


def test_mlflow_server_rest_api_returns_stats_metrics_of_generated_sets(tmp_path, two_sets) -> None:
    """The stats.* metrics of a generated set's run, read back through a real `mlflow server`'s REST API."""
    real, synth = two_sets
    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "mlartifacts", commit="abc")
    rid = tracker.start_run("tiny", "generate/tiny-dgh", fresh=True, tags={"dgh.kind": "generation", "dgh.calib": "dgh"})
    doc = make_stats_file(synth, reference=real)
    log_stats(tracker, rid, doc)
    tracker.finish(rid)

    with mlflow_server(tracker.uri, tmp_path) as base:
        with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=tiny", timeout=10) as r:
            exp_id = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [exp_id], "filter": "tags.`dgh.kind` = 'generation'"})
        req = urllib.request.Request(f"{base}/runs/search", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert len(runs) == 1
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        for key in ("stats.bn_distance", "stats.clip_low", "stats.clip_high", "stats.output_range_ratio",
                    "stats.pred_entropy"):
            assert metrics[key] == pytest.approx(doc.summary[key], rel=1e-9)
        query = f"run_id={rid}&metric_key=stats.layer.bn_distance"
        with urllib.request.urlopen(f"{base}/metrics/get-history?{query}", timeout=10) as r:
            history = json.load(r)["metrics"]
        assert sorted((m["step"], m["value"]) for m in history) == [
            (layer.index, pytest.approx(layer.distance, rel=1e-9)) for layer in synth.bn_layers]


def test_report_table_has_one_row_per_source(two_sets) -> None:
    real, synth = two_sets
    table = stats_table_markdown({"tiny-real": make_stats_file(real), "tiny-dgh": make_stats_file(synth, real)})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| real (`tiny-real`) | 6 |")
    dgh_row = lines[3].split(" | ")
    assert dgh_row[0] == "| dgh (`tiny-dgh`)"
    assert dgh_row[2].startswith(f"{synth.bn_distance:.3g} (")
    assert dgh_row[5] == f"{synth.output_range_mean / real.output_range_mean:.2f}"
    assert lines[3].endswith(f"| {synth.predictions.entropy_nats:.2f} / {synth.predictions.distinct} |")


def test_dgh_stats_command_on_noise(tmp_path, resnet20_weights) -> None:
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["stats", "--model", "resnet20_cifar10", "--weights", str(resnet20_weights),
                                      "--data", "noise", "--n-images", "8", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    doc = read_stats(out)
    assert doc.stats.n_images == 8 and doc.stats.source == "noise"
    assert summary["stats.bn_distance"] == pytest.approx(doc.stats.bn_distance)
    assert len(doc.stats.bn_layers) == 20  # 19 BN layers + the input pseudo-layer
    bad = CliRunner().invoke(app, ["stats", "--model", "resnet20_cifar10", "--weights", str(resnet20_weights),
                                   "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_generated_set_stats_match_the_generation_bn_distance(tmp_path, resnet20_weights) -> None:
    loaded = load_model("resnet20_cifar10", str(resnet20_weights))
    config = GenerationConfig.for_method("dgh", n_images=6, iterations=1, batch_size=3)
    result = generate_to_dir(loaded, config, tmp_path, device="cpu", progress=False)
    assert not (tmp_path / "stats.json").exists()  # generation never runs the statistics code (`dgh generate` does)
    stats_to_dir(loaded, result.images_nchw, tmp_path, source="dgh", batch_size=config.batch_size, device="cpu")
    doc = read_stats(tmp_path)
    # the same images, the same L_BN definition and batch size as the engine's final bn_distance
    assert doc.stats.bn_distance == pytest.approx(result.loss_terms["bn_distance"], rel=1e-12)
    assert doc.stats.source == "dgh" and doc.stats.n_images == 6


def _experiment(name: str, source: str, threshold: float, images):
    qmodel = _tiny_quantized(threshold)
    calib = quantized_model_stats(qmodel, images[:2], source="calibration set")
    ev = quantized_model_stats(qmodel, images, source="evaluation images")
    return make_quant_stats_file(name, "tiny", f"tiny-{source}", source, "W8A8 pot mse", calib, ev)


def test_quantized_experiment_files_and_mlflow(tmp_path) -> None:
    x = ((torch.arange(384, dtype=torch.float32) - 192) / 64).view(2, 3, 8, 8)  # -3 .. 2.984375 step 1/64
    dgh = _experiment("tiny-dgh-w8a8", "dgh", 2.0, x)  # input site [-2, 1.75]: 143 of 384 values clipped
    real = _experiment("tiny-real-w8a8", "real", 8.0, x)  # input site [-8, 7]: none clipped
    assert dgh.summary["stats.q_eval_clip_max"] == pytest.approx(143 / 384)
    assert real.summary["stats.q_eval_clip_max"] == 0.0
    (tmp_path / "quant_stats.json").write_text(dgh.model_dump_json())
    assert read_quant_stats(tmp_path) == dgh
    rows = list(csv.DictReader(sites_csv(dgh).splitlines()))
    assert tuple(rows[0]) == SITE_COLUMNS
    assert [r["name"] for r in rows] == dgh.quantized_sites()
    inp = next(r for r in rows if r["name"] == "input_quantizer")
    assert float(inp["clip_eval"]) == pytest.approx(143 / 384) and float(inp["q_high"]) == 1.75
    assert sum(float(r["clip_eval"]) for r in rows) == pytest.approx(143 / 384)  # no other site clips
    tf = make_thresholds_file(dgh, real)
    assert tf.reference == "tiny-real-w8a8"
    assert [s.log2_high for s in tf.sites] == [-2.0 if s.name == "input_quantizer" else 0.0 for s in tf.sites]
    with pytest.raises(StatsError, match="cannot be compared"):
        make_thresholds_file(dgh, real.model_copy(update={"setting": "W4A8 pot mse"}))
    # the report row: mean clipping over the n quantized sites (only the input clips), 1 site clipping, the input's
    # range a quarter of real's (log2 -2), every other site equal
    n_sites = len(rows)
    table = quant_table_markdown([make_experiment_summary(real, make_thresholds_file(real, real)),
                                  make_experiment_summary(dgh, tf)], {"tiny-dgh-w8a8": "80.00"})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| W8A8 pot mse | real (`tiny-real-w8a8`) | — | 0 / 0; 0 | 0 |")
    assert lines[3] == (f"| W8A8 pot mse | dgh (`tiny-dgh-w8a8`) | 80.00 | {100 * 64 / 384 / n_sites:.2g} / "
                        f"{100 * 79 / 384 / n_sites:.2g}; {100 * 143 / 384:.2g} | 1 | {-2 / n_sites:+.2f}; -2 .. +0 "
                        "| 1 / 0 |")

    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "mlartifacts", commit="abc")
    rid = tracker.start_run("tiny", "tiny-dgh-w8a8", fresh=True)
    n = log_quant_stats(tracker, rid, dgh) + log_thresholds(tracker, rid, tf)
    tracker.finish(rid)
    run = tracker.client.get_run(rid)
    assert run.data.metrics["stats.q_eval_clip_max"] == pytest.approx(143 / 384)
    assert run.data.metrics["stats.q_thr_log2_min"] == -2.0
    hist = sorted(tracker.client.get_metric_history(rid, "stats.site.clip_eval"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(len(rows)))
    assert [m.value for m in hist] == pytest.approx([float(r["clip_eval"]) for r in rows])
    thr = sorted(tracker.client.get_metric_history(rid, "stats.site.thr_log2_vs_real"), key=lambda m: m.step)
    assert [m.value for m in thr] == [s.log2_high for s in tf.sites]
    assert n == len(dgh.summary) + 4 * len(rows) + len(tf.summary) + len(tf.sites)
    assert {a.path for a in tracker.client.list_artifacts(rid, "stats")} == {"stats/quant_sites.json"}
