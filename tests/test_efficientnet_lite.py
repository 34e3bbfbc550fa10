"""EfficientNet-Lite0 family: key map, strict loading, BN/activation split, preprocessing, float accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgh.evaluation.classification import evaluate_classification
from dgh.models import ModelLoadError, get_spec, load_model
from dgh.models.efficientnet_lite import (
    KeyMapError,
    build_timm_lite0,
    lukemelas_to_timm_keys,
    split_bn_act,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0_weights(assets: Path) -> Path:
    return assets / "imagenet" / "models" / "efficientnet-lite0-57934424.pth"


def _lukemelas_keys() -> list[str]:
    """The lukemelas EfficientNet-Lite0 key layout, written out from its block structure (16 blocks; block 0 has no
    expansion conv), independent of the key map under test."""
    keys = ["_conv_stem.weight"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys += [f"_bn0.{k}" for k in bn]
    for n in range(16):
        members = ([] if n == 0 else ["_expand_conv", "_bn0"]) + ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        for m in members:
            keys += [f"_blocks.{n}.{m}.weight"] if "conv" in m else [f"_blocks.{n}.{m}.{k}" for k in bn]
    keys += ["_conv_head.weight"] + [f"_bn1.{k}" for k in bn] + ["_fc.weight", "_fc.bias"]
    return keys


def test_key_map_is_a_bijection_onto_timm_keys():
    model = build_timm_lite0()
    keys = _lukemelas_keys()
    mapping = lukemelas_to_timm_keys(keys, model)
    assert len(keys) == 296
    assert sorted(mapping.values()) == sorted(model.state_dict())
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"
    assert mapping["_bn1.weight"] == "bn2.weight" and mapping["_fc.bias"] == "classifier.bias"


def test_key_map_rejects_unknown_keys():
    model = build_timm_lite0()
    with pytest.raises(KeyMapError, match="_blocks.16"):
        lukemelas_to_timm_keys(["_blocks.16._bn0.weight"], model)
    with pytest.raises(KeyMapError, match="_se_reduce"):
        lukemelas_to_timm_keys(["_blocks.2._se_reduce.weight"], model)
    with pytest.raises(KeyMapError, match="_expand_conv"):
        lukemelas_to_timm_keys(["_blocks.0._expand_conv.weight"], model)


def test_split_bn_act_is_exact_and_keeps_49_bns():
    torch.manual_seed(0)
    model = build_timm_lite0().eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        after = split_bn_act(model)(x)
    assert torch.equal(before, after)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 49 and all(type(m) is torch.nn.BatchNorm2d for m in bns)
    assert all(m.eps == 1e-3 for m in bns)


def test_spec_preprocessing_and_class_names():
    spec = get_spec("efficientnet_lite0")
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1) / 255.0
    expected = (torch.tensor([0.0, 127.0, 255.0]) - 127.0) / 128.0
    assert torch.allclose(spec.normalize(pixels).flatten(), expected, atol=1e-6)
    assert (spec.input_size, spec.resize_size, spec.interpolation, spec.pad) == ((224, 224), 256, "bilinear", 32)
    assert len(spec.class_names) == 1000 and list(spec.class_names) == sorted(spec.class_names)
    assert spec.class_names[0] == "n01440764" and spec.class_names[-1] == "n15075141"


def test_weights_required_and_bad_checkpoint(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="--weights"):
        load_model("efficientnet_lite0")
    keys = _lukemelas_keys()
    model = build_timm_lite0()
    own = model.state_dict()
    mapping = lukemelas_to_timm_keys(keys, model)
    sd = {k: own[mapping[k]].clone() for k in keys}
    sd["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(sd, tmp_path / "bad_shape.pth")
    with pytest.raises(ModelLoadError, match="shape mismatch: classifier.weight"):
        load_model("efficientnet_lite0", tmp_path / "bad_shape.pth")
    del sd["_fc.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ModelLoadError, match="missing keys: classifier.weight"):
        load_model("efficientnet_lite0", tmp_path / "missing.pth")


def test_float_top1_on_val_sample_subset(assets: Path, lite0_weights: Path):
    """The first 100 classes of ``val-sample`` (one image each): 85 correct, measured with this preprocessing
    (all 1000 images: 870, 87.0 %; the assets README gives 87.3 % with the reference implementation)."""
    loaded = load_model("efficientnet_lite0", lite0_weights)
    result = evaluate_classification(loaded.model, loaded.spec, assets / "imagenet" / "val-sample", limit=100,
                                     batch_size=50, progress=False, num_workers=0)
    assert result["n_images"] == 100
    assert result["top1_correct"] == 85
