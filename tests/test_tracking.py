"""MLflow tracking (dgh/tracking.py): run layout, resume by key, step metrics, and the REST API of a real server."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from dgh.tracking import StepLogger, Tracker, finite_metrics, flatten
from tests.mlflow_server import mlflow_server


def test_flatten_and_finite_metrics():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": "1", "a.c.d": "x", "e": "None"}
    assert finite_metrics({"top1": 80, "n": 3.5, "bad": float("nan"), "inf": float("inf"), "s": "x", "b": True}) == {
        "top1": 80.0, "n": 3.5}


@pytest.fixture()
def tracker(tmp_path) -> Tracker:
    return Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "mlartifacts", commit="abc")


def test_resume_by_key_and_fresh_runs(tracker, tmp_path):
    rid = tracker.start_run("resnet20_cifar10", "exp-a", fresh=True, tags={"dgh.preset": "pot"},
                            params={"quant": {"w_bits": 4}})
    logger = StepLogger(tracker, rid, every=3, prefix="gen.")
    for i in range(1, 8):
        logger(i, {"loss": 10.0 / i, "bn": float("nan")})
    logger.flush()
    tracker.finish(rid)
    art = tmp_path / "preview.png"
    art.write_bytes(b"\x89PNG")
    again = tracker.start_run("resnet20_cifar10", "exp-a", fresh=False, tags={"dgh.stage": "evaluate"})
    assert again == rid  # later stages resume the experiment's run
    tracker.log_metrics(again, {"top1": 80.5, "n_images": 10000})
    tracker.log_artifact(again, art, "calibration")
    tracker.finish(again)

    client = tracker.client
    run = client.get_run(rid)
    assert run.data.params["quant.w_bits"] == "4"
    assert run.data.tags["dgh.preset"] == "pot" and run.data.tags["dgh.stage"] == "evaluate"
    assert run.data.tags["dgh.git_commit"] == "abc" and run.info.run_name == "exp-a"
    assert run.data.metrics["top1"] == pytest.approx(80.5)
    hist = client.get_metric_history(rid, "gen.loss")
    assert [m.step for m in hist] == list(range(1, 8))
    assert hist[-1].value == pytest.approx(10.0 / 7)
    assert client.get_metric_history(rid, "gen.bn") == []  # NaN never logged
    assert [a.path for a in client.list_artifacts(rid, "calibration")] == ["calibration/preview.png"]
    # a fresh start (quantize re-ran) opens a new run, which later stages then resume
    new = tracker.start_run("resnet20_cifar10", "exp-a", fresh=True)
    assert new != rid and tracker.find_run("resnet20_cifar10", "exp-a") == new


def test_mlflow_server_rest_api_returns_experiment_metrics(tracker, tmp_path):
    rid = tracker.start_run("yolov5n", "yolov5n-dgh-w8a8-pot-mse", fresh=True, tags={"dgh.calib": "dgh"})
    tracker.log_metrics(rid, {"map": 0.281, "map50": 0.452})
    tracker.finish(rid)

    with mlflow_server(tracker.uri, tmp_path) as base:
        with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=yolov5n", timeout=10) as r:
            exp_id = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [exp_id], "filter": "tags.`dgh.run_key` = 'yolov5n-dgh-w8a8-pot-mse'"})
        req = urllib.request.Request(f"{base}/runs/search", data=body.encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert len(runs) == 1
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        assert metrics == {"map": pytest.approx(0.281), "map50": pytest.approx(0.452)}


def _concurrent_stage(db: str, artifacts: str, index: int, start) -> None:  # noqa: ANN001 - multiprocessing Event
    """One pipeline stage in its own process: open the store, start a run, log, finish."""
    from mlflow.tracking import MlflowClient  # noqa: F401 - imported before the start signal: all stages race

    start.wait(60)
    tracker = Tracker(uri=f"sqlite:///{db}", artifact_root=Path(artifacts), commit="abc")
    run_id = tracker.start_run("resnet20_cifar10", f"exp-{index}", fresh=True, tags={"dgh.stage": "quantize"},
                               params={"quant": {"w_bits": index}})
    tracker.log_metrics(run_id, {"top1": float(index)})
    tracker.finish(run_id)


def test_four_stages_at_once_on_a_fresh_store(tmp_path):
    """`dvc exp run --jobs 4` starts stages together; the first ones create the sqlite schema at the same time."""
    import multiprocessing as mp

    from mlflow.tracking import MlflowClient  # noqa: F401 - imported once here; forked stages start at once

    ctx = mp.get_context("fork")  # separate processes and sqlite connections, without re-importing MLflow
    start = ctx.Event()
    db = tmp_path / "mlflow.db"
    procs = [ctx.Process(target=_concurrent_stage, args=(str(db), str(tmp_path / "art"), i, start)) for i in range(4)]
    for p in procs:
        p.start()
    time.sleep(1)  # every process is waiting on the start signal
    start.set()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    tracker = Tracker(uri=f"sqlite:///{db}", artifact_root=tmp_path / "art", commit="abc")
    found = {i: tracker.find_run("resnet20_cifar10", f"exp-{i}") for i in range(4)}
    assert all(found.values())
    assert [tracker.client.get_run(found[i]).data.metrics["top1"] for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
