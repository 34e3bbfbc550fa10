"""The learning rate relative to the pixel range (``GenerationConfig.lr_units``): known answers and equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgh.generation import GenerationConfig, GenerationConfigError, generate_images
from dgh.generation.config import LrUnits, effective_lr
from dgh.models.spec import IMAGENET_STD, LoadedModel, ModelSpec


def _loaded(std: tuple[float, float, float]) -> LoadedModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    model[1].running_var.copy_(torch.tensor([0.5, 1.5, 1.0, 2.0]))
    for p in model.parameters():
        p.requires_grad_(False)
    spec = ModelSpec(name="tiny", family="test", task="classification", input_size=(8, 8), mean=(0.0, 0.0, 0.0),
                     std=std, pad=0, num_classes=3)
    return LoadedModel(spec=spec, model=model.eval())


def test_effective_lr_known_answers():
    width_imagenet = (1 / 0.229 + 1 / 0.224 + 1 / 0.225) / 3  # 4.4252 normalized units per pixel range
    assert effective_lr(16.0, IMAGENET_STD, LrUnits.PIXEL_RANGE) == 16.0
    assert effective_lr(16.0, (1.0, 1.0, 1.0), LrUnits.PIXEL_RANGE) == pytest.approx(16.0 / width_imagenet, rel=1e-12)
    assert effective_lr(16.0, (1.0, 1.0, 1.0), LrUnits.PIXEL_RANGE) == pytest.approx(3.6157, abs=1e-4)
    assert effective_lr(16.0, (128 / 255,) * 3, LrUnits.PIXEL_RANGE) == pytest.approx(16.0 * (255 / 128) / width_imagenet)
    assert effective_lr(16.0, (1.0, 1.0, 1.0), LrUnits.NORMALIZED) == 16.0
    with pytest.raises(GenerationConfigError, match="std must be positive"):
        effective_lr(16.0, (1.0, 0.0, 1.0), LrUnits.PIXEL_RANGE)


def test_engine_steps_with_the_effective_lr():
    """One un-adapted RAdam step (t = 1: p -= lr * grad) without augmentation: ``pixel-range`` units with lr L equal
    ``normalized`` units with lr L * factor, and differ from ``normalized`` with lr L."""
    loaded = _loaded((1.0, 1.0, 1.0))
    factor = effective_lr(1.0, (1.0, 1.0, 1.0), LrUnits.PIXEL_RANGE)
    common = dict(n_images=4, iterations=1, batch_size=4, checkpoint_every=0, lr_schedule=False, output_loss="none",
                  canvas_pad=0, flip=False, smoothing=False, random_crop=False, clamp=False)
    rel = generate_images(loaded, GenerationConfig(lr=0.5, lr_units="pixel-range", **common), progress=False)
    same = generate_images(loaded, GenerationConfig(lr=0.5 * factor, lr_units="normalized", **common), progress=False)
    raw = generate_images(loaded, GenerationConfig(lr=0.5, lr_units="normalized", **common), progress=False)
    assert rel.meta["settings"]["lr_effective"] == pytest.approx(0.5 * factor, rel=1e-12)
    assert torch.allclose(rel.images_nchw, same.images_nchw, atol=1e-6)
    init = generate_images(loaded, GenerationConfig(lr=0.5, **{**common, "iterations": 0}), progress=False)
    step_rel = (rel.images_nchw - init.images_nchw).abs().sum()
    step_raw = (raw.images_nchw - init.images_nchw).abs().sum()
    assert float(step_rel) > 0 and float(step_rel / step_raw) == pytest.approx(factor, rel=1e-4)
