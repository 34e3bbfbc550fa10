"""dgh report: tables with metric and delta to float, plot and image grid, from stage metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgh.params import parse_params
from dgh.report import collect, table_markdown, write_report


def _params(tmp_path: Path):
    data = {
        "assets": str(tmp_path / "assets"),
        "models": {"resnet20_cifar10": {"weights": "w.th"}, "yolov5n": {"weights": "y.pt", "imgsz": 64}},
        "generate": {
            "r-real": {"model": "resnet20_cifar10", "method": "real", "data": "train", "n_images": 4},
            "r-dgh": {"model": "resnet20_cifar10", "method": "dgh", "n_images": 4, "iterations": 1},
            "r-noise": {"model": "resnet20_cifar10", "method": "noise", "n_images": 4},
            "y-dgh": {"model": "yolov5n", "method": "dgh", "n_images": 2, "iterations": 1},
        },
        "imagenet": {
            "eval": {"resnet20_cifar10": {"data": "test"}},
            "experiments": {
                f"r-{src}-w{w}": {"model": "resnet20_cifar10", "calib": f"r-{src}", "preset": "pot",
                                  "w_bits": w, "a_bits": 8, "algorithm": "mse"}
                for src in ("real", "dgh", "noise") for w in (8, 4)
            },
        },
        "coco": {
            "eval": {"yolov5n": {"images": "val", "labels": "labels"}},
            "experiments": {"y-dgh-w8": {"model": "yolov5n", "calib": "y-dgh", "preset": "pot", "w_bits": 8,
                                         "a_bits": 8, "algorithm": "mse"}},
        },
    }
    return parse_params(data, tmp_path)


def _write(root: Path, task: str, item: str, metrics: dict) -> None:
    d = root / "stages" / f"evaluate_{task}" / item
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_tables_show_metric_and_delta_to_float(tmp_path):
    params = _params(tmp_path)
    _write(tmp_path, "imagenet", "resnet20_cifar10-float", {"top1": 81.03, "top5": 99.0, "n_images": 10000})
    values = {"r-real-w8": 80.91, "r-dgh-w8": 80.50, "r-noise-w8": 70.00, "r-real-w4": 78.25, "r-dgh-w4": 77.0}
    for eid, v in values.items():  # r-noise-w4 deliberately missing
        _write(tmp_path, "imagenet", eid, {"top1": v, "top5": 99.0, "n_images": 10000})
    _write(tmp_path, "coco", "yolov5n-float", {"map": 0.288, "map50": 0.461, "n_images": 128})
    _write(tmp_path, "coco", "y-dgh-w8", {"map": 0.270, "map50": 0.44, "n_images": 128})

    cells = collect(params, tmp_path)
    by_id = {c.experiment: c for c in cells}
    assert by_id["r-dgh-w8"].delta == pytest.approx(80.50 - 81.03)
    assert by_id["r-noise-w4"].value is None and by_id["r-noise-w4"].delta is None
    assert by_id["y-dgh-w8"].delta == pytest.approx(0.270 - 0.288)

    md = table_markdown(cells, "imagenet", "resnet20_cifar10").splitlines()
    assert md[0] == "| calibration | W8A8 pot mse | W4A8 pot mse |"
    assert [line.split(" | ")[0] for line in md[2:]] == ["| float", "| real", "| dgh", "| noise"]
    assert md[2] == "| float | 81.03 | 81.03 |"
    assert md[4] == "| dgh | 80.50 (-0.53) | 77.00 (-4.03) |"
    assert md[5] == "| noise | 70.00 (-11.03) | — |"
    det = table_markdown(cells, "coco", "yolov5n").splitlines()
    assert det[3] == "| dgh | 0.270 (-0.018) |"


def test_write_report_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("DGH_ASSETS", raising=False)  # the real images live under this test's own assets folder
    params = _params(tmp_path)
    _write(tmp_path, "imagenet", "resnet20_cifar10-float", {"top1": 81.0, "top5": 99.0, "n_images": 100})
    _write(tmp_path, "imagenet", "r-dgh-w8", {"top1": 80.0, "top5": 99.0, "n_images": 100})
    gen = tmp_path / "stages" / "generate" / "r-dgh"
    gen.mkdir(parents=True)
    torch.save(torch.randn(3, 3, 32, 32), gen / "images.pt")
    train = tmp_path / "assets" / "train" / "cat"
    train.mkdir(parents=True)
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 50, 50)).save(train / f"{i}.jpg")

    md_path = write_report(params, tmp_path)
    out = tmp_path / "reports"
    assert md_path == out / "results.md"
    text = md_path.read_text()
    assert "| dgh | 80.00 (-1.00) | — |" in text
    assert "## Detection: yolov5n" in text
    for png in ("accuracy.png", "calibration_images.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the grid has 2 rows (dgh, real): it is taller than the placeholder
    with Image.open(out / "calibration_images.png") as im:
        assert im.height > 150
    data = json.loads((out / "results.json").read_text())
    assert {c["experiment"] for c in data["cells"]} >= {"r-dgh-w8", "resnet20_cifar10-float", "y-dgh-w8"}


def test_dgh_comparison_rows(tmp_path):
    from dgh.report import dgh_comparison_markdown

    params = _params(tmp_path)
    _write(tmp_path, "imagenet", "resnet20_cifar10-float", {"top1": 81.0, "top5": 99.0, "n_images": 100})
    for eid, v in {"r-real-w8": 80.5, "r-dgh-w8": 80.25, "r-noise-w8": 70.0, "r-dgh-w4": 75.0}.items():
        _write(tmp_path, "imagenet", eid, {"top1": v, "top5": 99.0, "n_images": 100})
    lines = dgh_comparison_markdown(collect(params, tmp_path), "imagenet", "resnet20_cifar10").splitlines()
    assert lines[0] == "| setting | dgh − float | dgh − real | dgh − noise |"
    assert lines[2] == "| W8A8 pot mse | -0.75 | -0.25 | +10.25 |"
    assert lines[3] == "| W4A8 pot mse | -6.00 | — | — |"


def test_main_table_claim_sentence(tmp_path):
    from dgh.report import main_table_claim

    params = _params(tmp_path)
    _write(tmp_path, "imagenet", "resnet20_cifar10-float", {"top1": 81.0, "top5": 99.0, "n_images": 100})
    values = {"r-real-w8": 80.5, "r-dgh-w8": 79.75, "r-noise-w8": 70.0, "r-real-w4": 60.0, "r-dgh-w4": 57.0,
              "r-noise-w4": 58.0}
    for eid, v in values.items():
        _write(tmp_path, "imagenet", eid, {"top1": v, "top5": 99.0, "n_images": 100})
    claim = main_table_claim(collect(params, tmp_path), "imagenet", "resnet20_cifar10")
    # W8A8: -0.75 is on par (within 1), W4A8: -3.00 is not; DGH beats noise at W8A8 only -> 2 of 4 counts
    assert "support it in part" in claim
    assert "DGH − real -0.75 at W8A8 pot mse; DGH − real -3.00 at W4A8 pot mse" in claim
    assert "DGH ahead in 1 of 2 comparisons" in claim
    assert main_table_claim(collect(params, tmp_path), "coco", "yolov5n") == ""
