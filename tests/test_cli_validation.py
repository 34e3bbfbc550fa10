"""CLI-level bad input: exit status 2 and one line, before any long work (``--set`` conflicts, devices, output
folders, the per-folder lock, ``dgh check`` building what the stages build)."""

from __future__ import annotations

import copy
import multiprocessing as mp
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dgh.cli import app
from dgh.preflight import output_lock

REPO = Path(__file__).resolve().parents[1]
GEN = ["generate", "--model", "resnet20_cifar10", "--weights", "random", "--n-images", "2", "--iters", "1",
       "--no-progress", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output.strip()


@pytest.mark.parametrize("extra,message", [
    (["--lr", "16", "--set", "lr=0.001"], "--set lr=0.001 conflicts with --lr 16"),
    (["--set", "iterations=3"], "--set iterations=3 conflicts with --iterations 1"),
    (["--set", "method=noise"], "--set method='noise' conflicts with --method 'dgh'"),
])
def test_set_conflicting_with_an_option_is_an_error(tmp_path: Path, extra: list[str], message: str) -> None:
    code, out = run([*GEN, "--out", str(tmp_path / "g"), *extra])
    assert code == 2 and message in out and len(out.splitlines()) == 1
    assert not (tmp_path / "g").exists()  # refused before anything was written


def test_set_alone_is_the_one_source(tmp_path: Path) -> None:
    code, out = run(["quantize", "--model", "resnet20_cifar10", "--weights", "random", "--calib", "noise",
                     "--n-calib", "4", "--preset", "pot", "--algorithm", "minmax", "--set", "w_bits=4",
                     "--out", str(tmp_path / "q"), "--no-progress", "--device", "cpu"])
    assert code == 0 and "W4A8" in out


@pytest.mark.parametrize("device", ["banana", "gpu0", "cuda:99"])
def test_bad_device_is_one_line(tmp_path: Path, device: str) -> None:
    code, out = run([*GEN[:-2], "--device", device, "--out", str(tmp_path / "g")])
    assert code == 2 and out.startswith("error:") and device in out and len(out.splitlines()) == 1


def test_bad_out_fails_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, out = run([*GEN, "--out", str(tmp_path / "file")])
    assert code == 2 and "is an existing file" in out
    code, out = run([*GEN, "--out", "/sys/dgh-cli-test"])
    assert code == 2 and "cannot be created" in out
    code, out = run([*GEN[:5], "--n-images", "100000000", "--iters", "1", "--out", str(tmp_path / "big")])
    assert code == 2 and "GiB are free" in out


def _hold(out: str, ready, release) -> None:  # noqa: ANN001 - multiprocessing Events
    with output_lock(out):
        ready.set()
        release.wait(60)


def test_second_generate_on_the_same_out_is_refused(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold, args=(str(tmp_path / "g"), ready, release))
    first.start()
    try:
        assert ready.wait(30)
        code, out = run([*GEN, "--out", str(tmp_path / "g")])
        assert code == 2 and "another dgh run is writing to --out" in out
    finally:
        release.set()
        first.join(30)
    code, _ = run([*GEN, "--out", str(tmp_path / "g")])
    assert code == 0


def _params(tmp_path: Path, edit) -> Path:  # noqa: ANN001 - a callable editing the dict
    data = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    data["assets"] = str(Path(__import__("os").environ.get("DGH_ASSETS", REPO.parent / "shared" / "assets")))
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _first_experiment(data: dict) -> dict:
    return next(iter(data["imagenet"]["experiments"].values()))


@pytest.mark.parametrize("edit,message", [
    (lambda d: _first_experiment(d).update(preset="potato"), "potato"),
    (lambda d: _first_experiment(d).update(w_bits=12), "got 12"),
    (lambda d: _first_experiment(d).update(options={"lrr": 3}), "options"),
    (lambda d: d["models"]["yolov5n"].update(imgsz=100), "models.yolov5n: --imgsz must be a positive multiple of 32"),
    (lambda d: d.update(device="gpu0"), "device: unknown device 'gpu0'"),
    (lambda d: d["imagenet"]["eval"]["resnet20_cifar10"].update(class_layout="numbered"),
     "imagenet.eval.resnet20_cifar10.data: class folder 'airplane' is not a class index"),
    (lambda d: d["models"].update(resnet20_cifar100={"name": "resnet20_cifar10", "weights": "x.th"}),
     "models.resnet20_cifar100: no calibration set in `generate` (stage stats@resnet20_cifar100 needs one)"),
])
def test_check_rejects_what_a_stage_would_reject(assets: Path, tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    code, out = run(["check", "--params", str(_params(tmp_path, edit))])
    assert code == 2 and message in out


def test_check_accepts_the_repository_params(assets: Path, tmp_path: Path) -> None:
    code, out = run(["check", "--params", str(_params(tmp_path, lambda d: None))])
    assert code == 0 and ": ok (" in out
