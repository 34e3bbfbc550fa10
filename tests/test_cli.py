"""The `dgh` Typer CLI: help texts, one-line errors with non-zero exit, and a tiny generate -> quantize -> evaluate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dgh.cli import CliError, app, parse_set
from dgh.io import load_images

runner = CliRunner()


def plain(text: str) -> str:
    """Help text without rich box drawing / ANSI codes, whitespace collapsed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(
    "command, must_mention",
    [
        ("generate", ["--model", "--weights", "--out", "--method", "--n-images", "--iterations", "--batch-size", "--seed",
                      "--lr", "--lambda-sigma", "--output-loss", "--canvas-pad", "pixels", "Default 1000"]),
        ("quantize", ["--calib", "--preset", "--w-bits", "--a-bits", "--algorithm", "--out", "power-of-two"]),
        ("evaluate-imagenet", ["--quantized", "--data", "--metrics-out", "percent"]),
        ("evaluate-coco", ["--images", "--annotations", "--labels", "--imgsz", "0-1", "pixels"]),
        ("export", ["--quantized", "--out", "--calib", "--opset", "QuantizeLinear"]),
        ("report", ["--params"]),
        ("models", []),
        ("stage", ["generate", "quantize", "export"]),
    ],
)
def test_help_explains_options(command, must_mention):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    for word in must_mention:
        assert word in text, f"{command} --help lacks {word!r}"


def _assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, err
    assert fragment in err, err


def test_unknown_model_is_one_line(tmp_path):
    res = runner.invoke(app, ["generate", "--model", "no_such_net", "--out", str(tmp_path / "g")])
    _assert_one_line_error(res, "no_such_net")
    assert not (tmp_path / "g").exists()


def test_missing_weights_is_one_line(tmp_path):
    res = runner.invoke(app, ["generate", "--model", "resnet20_cifar10", "--weights", str(tmp_path / "x.th"),
                              "--out", str(tmp_path / "g")])
    _assert_one_line_error(res, "x.th")


def test_bad_generation_setting_is_one_line(tmp_path):
    res = runner.invoke(app, ["generate", "--model", "resnet20_cifar10", "--weights", "random",
                              "--out", str(tmp_path / "g"), "--set", "no_such_field=1"])
    _assert_one_line_error(res, "no_such_field")


def test_bad_preset_and_label_choice(tmp_path):
    res = runner.invoke(app, ["quantize", "--model", "resnet20_cifar10", "--weights", "random", "--calib", "noise",
                              "--preset", "nonsense",
                              "--out", str(tmp_path / "q")])
    _assert_one_line_error(res, "nonsense")
    res = runner.invoke(app, ["evaluate-coco", "--model", "yolov5n", "--images", str(tmp_path), "--labels",
                              str(tmp_path), "--annotations", str(tmp_path / "a.json"), "--metrics-out",
                              str(tmp_path / "m.json")])
    _assert_one_line_error(res, "exactly one of")


def test_invalid_params_file_is_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("models: {}\ngenerate: {}\nimagenet: {experimentz: {}}\n")
    res = runner.invoke(app, ["check", "--params", str(p)])
    _assert_one_line_error(res, "imagenet.experimentz")


def test_parse_set():
    assert parse_set(["lr=8", "flip=false", "output-loss=mct", "w=null"]) == {
        "lr": 8, "flip": False, "output_loss": "mct", "w": None}
    with pytest.raises(CliError):
        parse_set(["lr"])


def _tiny_image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    from dgh.models.cifar_resnet import CIFAR10_CLASSES

    for name in CIFAR10_CLASSES:  # the model's 10 classes, one image each
        (root / name).mkdir(parents=True)
        for i in range(1):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_generate_quantize_evaluate_roundtrip(tmp_path):
    """Random-weight ResNet-20: the three commands chain through their files; metrics equal the library's."""
    torch.manual_seed(0)
    from dgh.models.cifar_resnet import cifar_resnet

    weights = tmp_path / "r20.th"
    torch.save({"state_dict": cifar_resnet(20).state_dict()}, weights)
    gen, q, data = tmp_path / "gen", tmp_path / "q", _tiny_image_folder(tmp_path / "data")
    res = runner.invoke(app, ["generate", "--model", "resnet20_cifar10", "--weights", str(weights), "--out", str(gen),
                              "--n-images", "4", "--iters", "2", "--batch-size", "2", "--no-progress",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    images = load_images(gen / "images.pt")
    assert tuple(images.shape) == (4, 3, 32, 32) and torch.isfinite(images).all()
    assert json.loads((gen / "meta.json").read_text())

    res = runner.invoke(app, ["quantize", "--model", "resnet20_cifar10", "--weights", str(weights), "--calib",
                              str(gen), "--preset", "pot", "--w-bits", "4", "--a-bits", "8", "--out", str(q),
                              "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    meta = json.loads((q / "meta.json").read_text())
    assert meta["n_calib"] == 4 and meta["quant"]["w_bits"] == 4
    assert (q / "quantized.pt").stat().st_size > 0 and (q / "quantization_report.csv").read_text().count("\n") > 10

    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate-imagenet", "--model", "resnet20_cifar10", "--weights", str(weights),
                              "--quantized", str(q), "--data", str(data), "--metrics-out", str(out), "--no-progress",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    metrics = json.loads(out.read_text())
    assert metrics["n_images"] == 10 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0

    from dgh.evaluation import evaluate_classification
    from dgh.models import load_model
    from dgh.quantization import load_quantized

    loaded = load_model("resnet20_cifar10", str(weights))
    direct = evaluate_classification(load_quantized(loaded, q / "quantized.pt"), loaded.spec, str(data),
                                     device="cpu", progress=False)
    assert metrics["top1"] == pytest.approx(direct["top1"]) and metrics["top5"] == pytest.approx(direct["top5"])


def test_console_script_entry_point_runs_offline():
    """`python -m dgh.cli` (what dvc.yaml calls) sets the offline environment and lists the registry."""
    code = "import os, sys; sys.argv=['dgh','models']; import dgh.cli as c; c.main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resnet20_cifar10" in proc.stdout and "classification" in proc.stdout


def test_export_then_evaluate_with_onnxruntime(tmp_path):
    """quantize -> export -> evaluate-imagenet --backend onnxruntime: the exported file scores like the fake-quant
    model (within one image of 10), export.json carries the agreement, bad backends are one-line errors."""
    torch.manual_seed(0)
    from dgh.models.cifar_resnet import cifar_resnet

    weights = tmp_path / "r20.th"
    torch.save({"state_dict": cifar_resnet(20).state_dict()}, weights)
    q, onnx_dir, data = tmp_path / "q", tmp_path / "onnx", _tiny_image_folder(tmp_path / "data")
    common = ["--model", "resnet20_cifar10", "--weights", str(weights)]
    res = runner.invoke(app, ["quantize", *common, "--calib", "noise", "--n-calib", "4", "--preset", "pot",
                              "--out", str(q), "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    res = runner.invoke(app, ["export", *common, "--quantized", str(q), "--out", str(onnx_dir), "--calib", str(data),
                              "--n-sample", "4"])
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((onnx_dir / "export.json").read_text())
    assert record["agreement"]["ok"] and record["agreement"]["max_local_steps"] <= 1.0
    assert record["size_bytes"] == (onnx_dir / "model.onnx").stat().st_size
    metrics = {}
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        res = runner.invoke(app, ["evaluate-imagenet", *common, "--quantized", str(q), "--onnx", str(onnx_dir),
                                  "--backend", backend, "--data", str(data), "--metrics-out", str(out),
                                  "--no-progress", "--device", "cpu"])
        assert res.exit_code == 0, res.output + res.stderr
        metrics[backend] = json.loads(out.read_text())
        assert metrics[backend]["backend"] == backend
    assert abs(metrics["pytorch"]["top1"] - metrics["onnxruntime"]["top1"]) <= 10.0  # at most 1 of 10 images
    res = runner.invoke(app, ["evaluate-imagenet", *common, "--backend", "tensorrt", "--data", str(data),
                              "--metrics-out", str(tmp_path / "x.json")])
    _assert_one_line_error(res, "--backend")
    res = runner.invoke(app, ["evaluate-imagenet", *common, "--backend", "onnxruntime", "--data", str(data),
                              "--metrics-out", str(tmp_path / "x.json")])
    _assert_one_line_error(res, "--onnx")
