"""Graph coverage on detectors (random weights, built from their YAML, tiny input): every Concat, every residual
add, every upsample/pool and every raw Detect output is quantized, without model-specific code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgh.models import load_model
from dgh.models.registry import RANDOM_WEIGHTS
from dgh.quantization import (
    QUANT_LAYER_TYPES,
    QuantConfig,
    iter_quantizers,
    quantize_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync overhead


def _on_grid(t: torch.Tensor, q) -> bool:
    v = t / q.scale.reshape(()) + q.zero_point.reshape(())
    return bool(torch.allclose(v, v.round(), atol=1e-3))


def test_yolov5n_every_concat_and_detect_output_quantized():
    loaded = load_model("yolov5n", RANDOM_WEIGHTS, imgsz=64)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm = quantize_model(loaded, images, QuantConfig(preset="pot", samples_per_site=4096), progress=False)
    quantizers = dict(iter_quantizers(qm))

    concat_names = [n for n, m in qm.named_modules() if type(m).__name__ == "Concat"]
    assert len(concat_names) == 4  # the YOLOv5 v6 neck has 4 Concat layers
    for name in concat_names:
        assert quantizers[f"{name}.act_quantizers.cat0"].initialized
    # C3 blocks also concatenate inside their forward (torch.cat in C3.forward)
    c3 = [n for n, m in qm.named_modules() if type(m).__name__ == "C3"]
    assert c3 and all(f"{n}.act_quantizers.cat0" in quantizers for n in c3)
    # bottleneck residual adds in the backbone C3 blocks, SPPF's 3 max-pools, 2 upsamples
    assert sum(n.endswith("act_quantizers.add0") for n in quantizers) == 1 + 2 + 3 + 1
    assert sum(".act_quantizers.maxpool0" in n for n in quantizers) == 3
    assert sum(n.endswith("act_quantizers.upsample0") for n in quantizers) == 2
    # every conv has a weight quantizer and an output site
    layers = [n for n, m in qm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]
    assert all(quantizers[f"{n}.weight_quantizer"].initialized for n in layers)
    assert all(quantizers[f"{n}.output_quantizer"].initialized for n in layers)

    # raw Detect outputs: one quantizer each, role "output", and the returned tensors lie on its grid
    outputs = {n: q for n, q in quantizers.items() if q.role == "output"}
    head = [n for n, m in qm.named_modules() if type(m).__name__ == "AnchorDetect"][0]
    assert sorted(outputs) == [f"{head}.m.{i}.output_quantizer" for i in range(3)]
    with torch.no_grad():
        raw = qm(images)
    assert [tuple(r.shape) for r in raw] == [tuple(r.shape) for r in loaded.model(images)]
    for i, r in enumerate(raw):
        assert _on_grid(r, outputs[f"{head}.m.{i}.output_quantizer"])
    # the input is quantized too
    assert quantizers["input_quantizer"].initialized and not quantizers["input_quantizer"].signed


def test_ultralytics_yolov8n_from_yaml_is_covered():
    pytest.importorskip("ultralytics")
    try:
        loaded = load_model("yolov8n", RANDOM_WEIGHTS, imgsz=64)
    except Exception as exc:  # noqa: BLE001 - the registry may not build this name offline
        pytest.skip(f"yolov8n random build unavailable: {exc}")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm = quantize_model(loaded, images, QuantConfig(preset="paper", samples_per_site=4096), progress=False)
    quantizers = dict(iter_quantizers(qm))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in loaded.model.modules())
    assert sum(q.role == "weight" for q in quantizers.values()) == n_convs
    assert sum(".act_quantizers.cat" in n for n in quantizers) >= 6  # C2f concats + neck Concats
    assert sum(q.role == "output" for q in quantizers.values()) >= 3
    with torch.no_grad():
        raw = qm(images)
    ref = loaded.model(images)
    assert [tuple(r.shape) for r in raw] == [tuple(r.shape) for r in ref]
