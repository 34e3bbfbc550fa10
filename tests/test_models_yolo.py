"""YOLO families: classic YOLOv5 (restricted unpickler, rebuild, decode) and ultralytics (raw head, decode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dgh.models import ModelLoadError, load_model
from dgh.models.safe_pickle import (
    PickledObject,
    UnsafeCheckpointError,
    module_state,
    safe_load_checkpoint,
)
from dgh.models.yolov5_classic import decode_anchor


class _RunsCode:
    """Unpickling this with the standard pickle runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (self.command,))


def test_restricted_unpickler_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(f"touch {marker}"), "w": torch.arange(6.0).view(2, 3)}, evil)
    obj, replaced = safe_load_checkpoint(evil)
    assert not marker.exists()
    assert isinstance(obj["model"], PickledObject) and obj["model"]._call_args == (f"touch {marker}",)
    assert any(name.endswith(".system") for name in replaced)
    assert torch.equal(obj["w"], torch.arange(6.0).view(2, 3))  # real tensors still come through
    with pytest.raises(ModelLoadError, match="no classic YOLOv5 model"):
        load_model("yolov5n", str(evil))
    assert not marker.exists()


def test_safe_unpickler_rebuilds_strided_and_fp16_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float16).view(4, 6)
    path = tmp_path / "t.pt"
    torch.save({"view": base[1:, ::2], "param": torch.nn.Parameter(torch.ones(3)), "n": 7}, path)
    obj, _ = safe_load_checkpoint(path)
    assert obj["view"].dtype == torch.float16 and torch.equal(obj["view"], base[1:, ::2])
    assert torch.equal(obj["param"], torch.ones(3)) and obj["n"] == 7
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnsafeCheckpointError):
        safe_load_checkpoint(bad)


def test_module_state_matches_torch_state_dict(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "m.pt"
    torch.save({"model": net}, path)
    obj, _ = safe_load_checkpoint(path)
    harvested = module_state(obj["model"])
    ref = net.state_dict()
    assert harvested.keys() == ref.keys() and all(torch.equal(harvested[k], ref[k]) for k in ref)


def test_classic_yolov5_checkpoint_rebuild(yolov5n_weights: Path) -> None:
    loaded = load_model("yolov5n", str(yolov5n_weights), imgsz=320)
    model = loaded.model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 57 and {bn.eps for bn in bns} == {1e-3}
    assert sum(p.numel() for p in model.parameters()) == 1_872_157  # 1.87 M (unfused, BN affine included)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert loaded.extra["strides"] == [8.0, 16.0, 32.0]
    assert loaded.extra["anchors_px"][0] == [[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]
    assert loaded.spec.class_names[:2] == ("person", "bicycle") and loaded.spec.num_classes == 80
    raw = model(torch.rand(1, 3, 320, 320))
    assert [tuple(r.shape) for r in raw] == [(1, 255, 40, 40), (1, 255, 20, 20), (1, 255, 10, 10)]
    assert loaded.decode(raw).shape == (1, 3 * (1600 + 400 + 100), 84)
    # the yaml-only build has exactly the checkpoint's keys and shapes
    random = load_model("yolov5n", "random")
    assert {k: v.shape for k, v in random.model.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # a path as the model name is sniffed as a classic checkpoint
    assert load_model(str(yolov5n_weights)).spec.family == "yolov5_classic"


def test_classic_yolov5_errors(yolov5n_weights: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs --weights"):
        load_model("yolov5n")
    with pytest.raises(ModelLoadError, match="not a yolov5s checkpoint"):
        load_model("yolov5s", str(yolov5n_weights))
    with pytest.raises(ModelLoadError, match="classic YOLOv5 checkpoint"):
        load_model("yolov8n", str(yolov5n_weights))


def test_decode_anchor_hand_computed() -> None:
    """Raw zeros: sigmoid = 0.5, so cx = (0.5 + gx) s, w = anchor_px, score = 0.5 * 0.5."""
    anchors = torch.tensor([[[1.0, 2.0]]])  # one level, one anchor, in stride units
    strides = torch.tensor([8.0])
    raw = [torch.zeros(1, 5 + 2, 2, 3)]  # nc = 2, H = 2, W = 3
    out = decode_anchor(raw, anchors, strides)
    assert out.shape == (1, 6, 6)
    # cell (gy=1, gx=2) is row 1*3 + 2 = 5: centre (20, 12), size (8, 16)
    assert torch.allclose(out[0, 5], torch.tensor([16.0, 4.0, 24.0, 20.0, 0.25, 0.25]))
    raw[0][0, 4, 0, 0] = 100.0  # objectness ~1 at cell (0, 0)
    raw[0][0, 6, 0, 0] = -100.0  # class 1 ~0
    assert torch.allclose(decode_anchor(raw, anchors, strides)[0, 0, 4:], torch.tensor([0.5, 0.0]), atol=1e-6)


def test_ultralytics_name_needs_local_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="would download"):
        load_model("yolov8n")
    with pytest.raises(ModelLoadError, match="would download"):
        load_model("yolov8n", "yolov8n.pt")  # a bare asset name: ultralytics would fetch it
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("yolov8n", str(tmp_path / "yolov8n.pt"))


def test_ultralytics_raw_outputs_match_ultralytics_inference(tmp_path: Path) -> None:
    """Raw head = ultralytics' own (boxes, scores) before decoding; our decode = its decoded boxes (xyxy)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    net = DetectionModel("yolov8n.yaml", verbose=False).eval()
    path = tmp_path / "tiny.pt"
    torch.save({"model": net}, path)
    loaded = load_model(str(path), imgsz=64)
    assert loaded.spec.family == "ultralytics" and loaded.spec.input_size == (64, 64) and loaded.spec.pad == 6
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = loaded.model(x)
        decoded_ref, preds = net(x)
    assert [tuple(r.shape) for r in raw] == [(2, 144, 8, 8), (2, 144, 4, 4), (2, 144, 2, 2)]
    flat = torch.cat([r.flatten(2) for r in raw], 2)
    assert torch.equal(flat[:, :64], preds["boxes"]) and torch.equal(flat[:, 64:], preds["scores"])
    ours = loaded.decode(raw)
    xywh = decoded_ref[:, :4].transpose(1, 2)
    xyxy = torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), -1)
    assert torch.allclose(ours[..., :4], xyxy, atol=1e-4)  # float32 rounding of pixel coordinates < 64
    assert torch.allclose(ours[..., 4:], decoded_ref[:, 4:].transpose(1, 2))
    # BN modules stay in eval mode and keep their running statistics
    assert not any(m.training for m in loaded.model.modules())


def test_ultralytics_random_from_yaml() -> None:
    loaded = load_model("yolo11n", "random", imgsz=64)
    raw = loaded.model(torch.rand(1, 3, 64, 64))
    assert len(raw) == 3 and raw[0].shape[1] == 4 * 16 + 80
    assert loaded.decode(raw).shape == (1, 64 + 16 + 4, 84)
