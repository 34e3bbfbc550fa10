"""Registry: names, specs, CIFAR and torchvision families, error paths (one-line ModelLoadError)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgh.models import ModelLoadError, get_spec, list_models, load_model
from dgh.models.torchvision_models import cached_default_weights_path


def test_list_models_covers_every_family() -> None:
    specs = {s.name: s for s in list_models()}
    assert {"resnet20_cifar10", "resnet56_cifar10", "resnet110_cifar10"} <= set(specs)
    assert {"resnet18", "resnet50", "mobilenet_v2"} <= set(specs)
    assert {"yolov8n", "yolo11n", "yolov5n", "yolov5x"} <= set(specs)
    assert {s.family for s in specs.values()} == {"cifar_resnet", "torchvision", "ultralytics", "yolov5_classic",
                                                  "efficientnet_lite"}
    assert all(s.default_weights for s in specs.values())


def test_specs_carry_paper_defaults() -> None:
    cifar = get_spec("resnet20_cifar10")
    assert (cifar.pad, cifar.input_size, cifar.resize_size, cifar.num_classes) == (8, (32, 32), None, 10)
    assert cifar.mean == (0.485, 0.456, 0.406)  # akamaster models: ImageNet statistics
    r18, r50, mb2 = get_spec("resnet18"), get_spec("resnet50"), get_spec("mobilenet_v2")
    assert (r18.pad, r18.input_size, r18.resize_size) == (32, (224, 224), 256)
    assert (r18.output_loss_weight, r50.output_loss_weight, mb2.output_loss_weight) == (3e-7, 1e-7, 3e-5)
    eff = get_spec("efficientnet_b3")  # preprocessing comes from the DEFAULT weights' metadata
    assert (eff.input_size, eff.resize_size, eff.interpolation) == ((300, 300), 320, "bicubic")
    y = get_spec("yolov5n", imgsz=320)
    assert (y.task, y.input_size, y.pad, y.mean, y.std) == ("detection", (320, 320), 32, (0, 0, 0), (1, 1, 1))
    assert get_spec("yolov8n").input_size == (640, 640)


def test_unknown_name_and_bad_imgsz() -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelLoadError, match="multiple of 32"):
        get_spec("yolov5n", imgsz=100)


def test_cifar_resnet_real_checkpoint(resnet20_weights: Path) -> None:
    loaded = load_model("resnet20_cifar10", str(resnet20_weights))
    assert not loaded.model.training
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules()) == 19
    assert sum(p.numel() for p in loaded.model.parameters()) == 269_722
    out = loaded.model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10) and out.dtype == torch.float32


def test_wrong_checkpoint_names_missing_and_unexpected_keys(assets: Path) -> None:
    r56 = assets / "cifar10" / "models" / "resnet56-4bfd9763.th"
    with pytest.raises(ModelLoadError) as err:
        load_model("resnet20_cifar10", str(r56))
    msg = str(err.value)
    assert "\n" not in msg and "unexpected keys: layer1.3.bn1.bias" in msg
    with pytest.raises(ModelLoadError) as err:
        load_model("resnet18", str(r56))
    msg = str(err.value)
    assert "\n" not in msg and "missing keys: fc.bias" in msg and "unexpected keys" in msg


@pytest.mark.parametrize("name", ["resnet20_cifar10", "resnet18", "yolov5n", "yolov8n"])
def test_not_a_checkpoint_is_one_line(tmp_path: Path, name: str) -> None:
    bogus = tmp_path / "notes.pt"
    bogus.write_text("this is not a checkpoint\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(name, str(bogus))
    assert "\n" not in str(err.value) and str(bogus) in str(err.value)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(name, str(tmp_path / "missing.pt"))


def test_torchvision_default_weights_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(ModelLoadError, match="pass --weights PATH"):
        load_model("resnet18")


def test_torchvision_state_dict_and_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local state_dict reproduces the saved model; a DEFAULT file already in the hub cache is used, not downloaded."""
    torch.manual_seed(0)
    src = load_model("mobilenet_v3_small", "random")
    x = torch.randn(2, 3, 224, 224)
    ref = src.model(x)
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    again = load_model("mobilenet_v3_small", str(path))
    assert torch.equal(again.model(x), ref)
    assert ref.shape == (2, 1000)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = cached_default_weights_path("mobilenet_v3_small")
    cached.parent.mkdir(parents=True)
    torch.save(src.model.state_dict(), cached)
    from_cache = load_model("mobilenet_v3_small")
    assert from_cache.weights == str(cached) and torch.equal(from_cache.model(x), ref)


def test_cifar_resnet_without_weights_is_an_error() -> None:
    """Random BN statistics would silently make every generated/calibrated result meaningless."""
    with pytest.raises(ModelLoadError, match="--weights PATH"):
        load_model("resnet20_cifar10")


def test_load_model_freezes_parameters() -> None:
    loaded = load_model("resnet20_cifar10", "random")
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.spec.name == "resnet20_cifar10" and loaded.decode is None
