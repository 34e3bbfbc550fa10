"""One orchestration for the `dgh` commands and the DVC stages: the same settings give the same files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from dgh.cli import app
from dgh.io import load_images
from dgh.models.cifar_resnet import cifar_resnet
from dgh.pipeline.common import open_project
from dgh.pipeline.generate import run_generate
from dgh.pipeline.quantize import run_quantize

runner = CliRunner()
GEN = {"n_images": 6, "iterations": 2, "batch_size": 4, "seed": 3, "lr": 8.0}
QUANT = {"preset": "pot", "w_bits": 4, "a_bits": 8, "n_candidates": 8, "samples_per_site": 4096}


def _project(tmp_path: Path) -> Path:
    """A params.yaml with one random-weight ResNet-20, one dgh calibration set and one experiment."""
    torch.manual_seed(0)
    torch.save({"state_dict": cifar_resnet(20).state_dict()}, tmp_path / "r20.th")
    params = {
        "assets": str(tmp_path),
        "device": "cpu",
        "progress": False,
        "models": {"resnet20_cifar10": {"weights": "r20.th"}},
        "generate": {"r20-dgh": {"model": "resnet20_cifar10", "method": "dgh", **GEN}},
        "imagenet": {"eval": {"resnet20_cifar10": {"data": "val"}},
                     "experiments": {"r20-dgh-w4a8": {"model": "resnet20_cifar10", "calib": "r20-dgh", **QUANT}}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_and_dvc_stage_give_bit_identical_images_and_quantization(tmp_path, monkeypatch):
    monkeypatch.delenv("DGH_ASSETS", raising=False)
    params_path = _project(tmp_path)
    project = open_project(params_path, track=False)
    stage_dir = run_generate(project, "r20-dgh")

    cli_dir = tmp_path / "cli-gen"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in GEN.items()]
    res = runner.invoke(app, ["generate", "--model", "resnet20_cifar10", "--weights", str(tmp_path / "r20.th"),
                              "--out", str(cli_dir), "--method", "dgh", *options, "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output

    stage_images, cli_images = load_images(stage_dir / "images.pt"), load_images(cli_dir / "images.pt")
    assert stage_images.shape == (6, 3, 32, 32)
    assert torch.equal(stage_images, cli_images)
    assert (stage_dir / "images.pt").read_bytes() == (cli_dir / "images.pt").read_bytes()
    stage_losses = json.loads((stage_dir / "losses.json").read_text())
    assert stage_losses == json.loads((cli_dir / "losses.json").read_text()) and len(stage_losses) == 2
    assert json.loads((stage_dir / "meta.json").read_text())["settings"] == \
        json.loads((cli_dir / "meta.json").read_text())["settings"]

    q_dir = run_quantize(project, "r20-dgh-w4a8")
    cli_q = tmp_path / "cli-q"
    res = runner.invoke(app, ["quantize", "--model", "resnet20_cifar10", "--weights", str(tmp_path / "r20.th"),
                              "--calib", str(cli_dir), "--preset", "pot", "--w-bits", "4", "--a-bits", "8",
                              "--set", "n_candidates=8", "--set", "samples_per_site=4096", "--out", str(cli_q),
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    stage_meta, cli_meta = (json.loads((d / "meta.json").read_text()) for d in (q_dir, cli_q))
    assert stage_meta["quant"] == cli_meta["quant"] and stage_meta["n_calib"] == cli_meta["n_calib"] == 6
    assert (q_dir / "quantization_report.csv").read_text() == (cli_q / "quantization_report.csv").read_text()


def test_input_fingerprints_change_exactly_with_their_input(tmp_path, monkeypatch):
    """stages/inputs: editing one image of a real set's folder changes that set's fingerprint file only; replacing
    the checkpoint changes the model's; nothing else is rewritten."""
    from dgh.pipeline.inputs import run_inputs

    monkeypatch.delenv("DGH_ASSETS", raising=False)
    params_path = _project(tmp_path)
    params = yaml.safe_load(params_path.read_text())
    for folder in ("train/cat", "val/cat"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "0.png").write_bytes(b"image-0")
    params["generate"]["r20-real"] = {"model": "resnet20_cifar10", "method": "real", "data": "train", "n_images": 2}
    params_path.write_text(yaml.safe_dump(params))
    project = open_project(params_path, track=False)
    run_inputs(project)
    layout = project.layout
    files = {k: layout.input_file(*k) for k in (("model", "resnet20_cifar10"), ("calib", "r20-real"),
                                                ("calib", "r20-dgh"), ("imagenet", "resnet20_cifar10"))}
    before = {k: (p.read_text(), p.stat().st_mtime_ns) for k, p in files.items()}
    assert len({text for text, _ in before.values()}) == 4

    (tmp_path / "train/cat/0.png").write_bytes(b"image-0 edited")
    run_inputs(project)
    changed = {k for k, p in files.items() if (p.read_text(), p.stat().st_mtime_ns) != before[k]}
    assert changed == {("calib", "r20-real")}

    torch.save({"state_dict": cifar_resnet(20).state_dict()}, tmp_path / "r20.th")  # new random weights
    mid = {k: p.read_text() for k, p in files.items()}
    run_inputs(project)
    assert {k for k, p in files.items() if p.read_text() != mid[k]} == {("model", "resnet20_cifar10")}
