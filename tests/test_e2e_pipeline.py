"""End to end: `dvc repro` at a tiny budget on the real assets, in a temporary git copy of the project.

Asserts that every stage wrote real metrics (finite, in range), that the report holds every cell, that MLflow has
one run per experiment with its metrics, params, tags and artifacts plus the float and generation runs, and that
editing one calibration set's `iterations` or one dgh module makes `dvc status` list exactly the stages that read it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "stages", "mlflow.db", "mlartifacts", "mlruns", "__pycache__",
                                     "*.egg-info", ".pytest_cache", "tmp", "cache", ".cache")


def tiny_params(assets: Path, val_dir: Path) -> dict:
    """Two models, every source kind, two bit settings: the default matrix's shape at a budget of seconds."""
    r20, y5 = "resnet20_cifar10", "yolov5n"
    fast = {"n_candidates": 16, "samples_per_site": 4096}  # a coarse threshold search: seconds, not minutes
    exp = lambda m, c, w: {"model": m, "calib": c, "preset": "pot", "w_bits": w, "a_bits": 8,  # noqa: E731
                           "algorithm": "mse", **fast}
    return {
        "assets": str(assets),
        "device": "cpu",
        "progress": False,
        "models": {r20: {"weights": "cifar10/models/resnet20-12fca82f.th"},
                   y5: {"weights": "coco/models/yolov5n.pt", "imgsz": 128}},
        "generate": {
            "r20-real": {"model": r20, "method": "real", "data": "cifar10/train-subset", "n_images": 40},
            "r20-dgh": {"model": r20, "method": "dgh", "n_images": 16, "iterations": 3, "batch_size": 8},
            "r20-noise": {"model": r20, "method": "noise", "n_images": 16},
            "y5-dgh": {"model": y5, "method": "dgh", "n_images": 2, "iterations": 2, "batch_size": 2},
        },
        "imagenet": {
            "eval": {r20: {"data": "cifar10/test", "limit": 200, "batch_size": 100}},
            "experiments": {
                "r20-real-w8a8": exp(r20, "r20-real", 8),
                "r20-dgh-w8a8": exp(r20, "r20-dgh", 8),
                "r20-noise-w8a8": exp(r20, "r20-noise", 8),
                "r20-dgh-w4a8": exp(r20, "r20-dgh", 4),
            },
        },
        "coco": {
            "eval": {y5: {"images": str(val_dir / "images"), "labels": str(val_dir / "labels"), "batch_size": 4}},
            "experiments": {"y5-dgh-w8a8": exp(y5, "y5-dgh", 8)},
        },
        "report": {"out_dir": "reports", "grid_images": 4},
        "export": {"enabled": True, "opset": 17, "sample_images": 4, "evaluate_backend": "pytorch"},
    }


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def project(assets) -> tuple[Path, dict]:
    """A git copy of the project with tiny params, after one full `dvc repro`.

    It lives in its own temporary folder (not pytest's rotating basetemp, which concurrent pytest sessions prune),
    removed afterwards unless DGH_KEEP_E2E is set.
    """
    base = Path(tempfile.mkdtemp(prefix="dgh-e2e-"))
    root = base / "proj"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    # 8 val images with their labels: a real, tiny detection set
    val = root.parent / "val8"
    (val / "images").mkdir(parents=True)
    (val / "labels").mkdir()
    src = assets / "coco" / "val2017-128"
    for img in sorted((src / "images").glob("*.jpg"))[:8]:
        shutil.copy(img, val / "images" / img.name)
        lab = src / "labels" / (img.stem + ".txt")
        if lab.exists():
            shutil.copy(lab, val / "labels" / lab.name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(assets, val), sort_keys=False))
    shutil.rmtree(root / "reports", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", YOLO_OFFLINE="1", GIT_AUTHOR_NAME="dgh-test",
               GIT_AUTHOR_EMAIL="dgh@test", GIT_COMMITTER_NAME="dgh-test", GIT_COMMITTER_EMAIL="dgh@test",
               PYTHONPATH=str(root))
    env.pop("DGH_ASSETS", None)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "e2e copy"], root, env)
    run(["dvc", "repro"], root, env)
    yield root, env
    if not os.environ.get("DGH_KEEP_E2E"):
        shutil.rmtree(base, ignore_errors=True)


def _metrics(root: Path, task: str, item: str) -> dict:
    return json.loads((root / "stages" / f"evaluate_{task}" / item / "metrics.json").read_text())


@pytest.mark.e2e
def test_repro_writes_real_metrics_and_report(project):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    for eid in list(params["imagenet"]["experiments"]) + ["resnet20_cifar10-float"]:
        m = _metrics(root, "imagenet", eid)
        assert m["n_images"] == 200
        assert 0.0 <= m["top1"] <= m["top5"] <= 100.0 and math.isfinite(m["top1"])
    f = _metrics(root, "imagenet", "resnet20_cifar10-float")
    assert f["top1"] > 60.0  # the real checkpoint (81 % on all 10k) is loaded, not random weights
    assert _metrics(root, "imagenet", "r20-real-w8a8")["top1"] > f["top1"] - 5.0
    for item in ("y5-dgh-w8a8", "yolov5n-float"):
        m = _metrics(root, "coco", item)
        assert m["n_images"] == 8 and 0.0 <= m["map"] <= m["map50"] <= 1.0
    assert _metrics(root, "coco", "yolov5n-float")["map"] > 0.0
    gen = root / "stages" / "generate" / "r20-dgh"
    losses = json.loads((gen / "losses.json").read_text())
    assert [r["iteration"] for r in losses] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in losses)
    md = (root / "reports" / "results.md").read_text()
    cells = json.loads((root / "reports" / "results.json").read_text())["cells"]
    assert len(cells) == 4 + 1 + 1 + 1 and all(c["value"] is not None for c in cells)  # every cell filled
    assert "| dgh | " in md and "| noise | " in md and "W4A8 pot mse" in md
    assert "Calibration-set statistics of resnet20_cifar10" in md and "| dgh (`r20-dgh`) | 16 |" in md
    for png in ("accuracy.png", "calibration_images.png"):
        assert (root / "reports" / png).stat().st_size > 1000


@pytest.mark.e2e
def test_mlflow_runs_hold_real_values(project):
    root, _ = project
    from dgh.tracking import Tracker

    tracker = Tracker(uri=f"sqlite:///{root / 'mlflow.db'}", artifact_root=root / "mlartifacts")
    client = tracker.client
    rid = tracker.find_run("resnet20_cifar10", "r20-dgh-w4a8")
    assert rid is not None
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    top1 = run.data.metrics["top1"]
    assert top1 == pytest.approx(_metrics(root, "imagenet", "r20-dgh-w4a8")["top1"]) and 0 <= top1 <= 100
    tags = run.data.tags
    assert (tags["dgh.preset"], tags["dgh.bits"], tags["dgh.calib"], tags["dgh.algorithm"]) == ("pot", "W4A8", "dgh", "mse")
    assert tags["dgh.stage"] == "evaluate_imagenet" and len(tags["dgh.git_commit"]) >= 40
    assert run.data.params["quant.w_bits"] == "4" and run.data.params["calib.iterations"] == "3"
    assert [m.step for m in client.get_metric_history(rid, "gen.loss")] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(rid, "quantization")}
    assert "quantization/quantized.pt" in arts and "quantization/quantization_report.csv" in arts
    assert {a.path for a in client.list_artifacts(rid, "calibration")} >= {"calibration/preview.png"}
    # the export stage logs model.onnx, its size and the onnxruntime agreement into the same run
    assert {a.path for a in client.list_artifacts(rid, "export")} >= {"export/model.onnx", "export/export.json"}
    record = json.loads((root / "stages" / "export" / "r20-dgh-w4a8" / "export.json").read_text())
    assert run.data.metrics["onnx_size_bytes"] == record["size_bytes"] > 0
    assert run.data.metrics["onnx_max_local_steps"] <= 1.0
    # float baseline and generation runs are their own runs
    frun = client.get_run(tracker.find_run("resnet20_cifar10", "resnet20_cifar10-float"))
    assert frun.data.metrics["top1"] == pytest.approx(_metrics(root, "imagenet", "resnet20_cifar10-float")["top1"])
    grun = client.get_run(tracker.find_run("yolov5n", "generate/y5-dgh"))
    assert len(client.get_metric_history(grun.info.run_id, "loss")) == 2
    # calibration-set statistics (stage stats) on the generation runs, the real set as the reference
    stats = json.loads((root / "stages" / "stats" / "resnet20_cifar10" / "r20-dgh" / "stats.json").read_text())
    gmetrics = client.get_run(tracker.find_run("resnet20_cifar10", "generate/r20-dgh")).data.metrics
    assert gmetrics["stats.bn_distance"] == pytest.approx(stats["stats"]["bn_distance"])
    assert gmetrics["stats.bn_distance"] > 0
    assert gmetrics["stats.output_range_ratio"] == pytest.approx(stats["summary"]["stats.output_range_ratio"])
    assert 0.0 <= gmetrics["stats.clip_low"] <= 1.0 and 0.0 < gmetrics["stats.pred_entropy"] <= math.log(10) + 1e-9
    drun = client.get_run(tracker.find_run("yolov5n", "y5-dgh-w8a8"))
    assert 0.0 <= drun.data.metrics["map"] <= 1.0
    # quantized-model statistics (stages quant_stats_* and stats) on the experiment runs
    qmetrics = client.get_run(tracker.find_run("resnet20_cifar10", "r20-dgh-w8a8")).data.metrics
    thr = json.loads((root / "stages" / "stats" / "resnet20_cifar10" / "quantized" / "r20-dgh-w8a8" /
                      "thresholds.json").read_text())
    assert thr["reference"] == "r20-real-w8a8"
    assert qmetrics["stats.q_thr_log2_mean"] == pytest.approx(thr["summary"]["stats.q_thr_log2_mean"])
    assert 0.0 <= qmetrics["stats.q_eval_clip_max"] <= 1.0 and 0.0 <= qmetrics["stats.q_calib_clip_low"] <= 1.0
    assert 0.0 <= drun.data.metrics["stats.q_eval_clip_max"] <= 1.0


def _status(root: Path, env: dict) -> dict:
    """`dvc status --json` without the `inputs` stage (always changed: it re-hashes the assets on every repro)."""
    status = json.loads(run(["dvc", "status", "--json"], root, env).stdout or "{}")
    assert "always changed" in status.pop("inputs", ["always changed"])
    return status


@pytest.mark.e2e
def test_editing_a_module_marks_exactly_the_stages_that_import_it(project):
    """An edit to dgh/io.py (imported by every stage) or dgh/evaluation/coco.py (evaluation stages only) shows in
    `dvc status` for exactly those stages; undoing it makes the pipeline clean again."""
    root, env = project
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert _status(root, env) == {}
    for module, groups in (("dgh/io.py", set(dvc)),
                           ("dgh/evaluation/coco.py", {g for g in dvc if g.startswith(("evaluate_", "export_"))})):
        path = root / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        status = _status(root, env)
        assert {name.split("@")[0] for name in status} == groups - {"inputs"}, (module, sorted(status))
        path.write_text(original)
        assert _status(root, env) == {}


@pytest.mark.e2e
def test_editing_one_generation_knob_reruns_only_its_downstream(project):
    """Runs last (it changes the project): iterations of one set 3 -> 4, then `dvc status` and `dvc repro`."""
    import re

    root, env = project
    assert _status(root, env) == {}
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["generate"]["r20-dgh"]["iterations"] = 4
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = _status(root, env)
    # the stages that read that entry: its generation and statistics, the experiments calibrated with it and their
    # statistics, the per-model side-by-side statistics (every model's reads the whole `generate` section: seconds)
    # and the report
    assert set(status) == {"generate@r20-dgh", "set_stats@r20-dgh",
                           "quantize_imagenet@r20-dgh-w8a8", "quantize_imagenet@r20-dgh-w4a8",
                           "quant_stats_imagenet@r20-dgh-w8a8", "quant_stats_imagenet@r20-dgh-w4a8",
                           "export_imagenet@r20-dgh-w8a8", "export_imagenet@r20-dgh-w4a8",
                           "evaluate_imagenet@r20-dgh-w8a8", "evaluate_imagenet@r20-dgh-w4a8",
                           "stats@resnet20_cifar10", "stats@yolov5n", "report"}, status
    assert "generate.r20-dgh" in json.dumps(status["generate@r20-dgh"])
    untouched = {p: p.stat().st_mtime_ns for p in (root / "stages").rglob("metrics.json")}
    out = run(["dvc", "repro"], root, env).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {
        "inputs",
        "generate@r20-dgh",
        "set_stats@r20-dgh",
        "quant_stats_imagenet@r20-dgh-w8a8",
        "quant_stats_imagenet@r20-dgh-w4a8",
        "quantize_imagenet@r20-dgh-w8a8",
        "quantize_imagenet@r20-dgh-w4a8",
        "export_imagenet@r20-dgh-w8a8",
        "export_imagenet@r20-dgh-w4a8",
        "evaluate_imagenet@r20-dgh-w8a8",
        "evaluate_imagenet@r20-dgh-w4a8",
        "stats@resnet20_cifar10",
        "stats@yolov5n",
        "report",
    }, out
    for path, mtime in untouched.items():
        rerun = "r20-dgh-" in str(path)
        assert (path.stat().st_mtime_ns != mtime) == rerun, path
