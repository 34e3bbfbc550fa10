"""Evaluation with tiny hand-built models: top-k counting, NMS, pycocotools mAP known answers, empty detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dgh.data import DatasetError
from dgh.evaluation import (
    coco_map,
    evaluate_classification,
    evaluate_coco,
    non_max_suppression,
    topk_correct,
)
from dgh.models.registry import detection_spec
from dgh.models.spec import LoadedModel, ModelSpec


def test_topk_correct_known_answer() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}  # k capped at 3 classes


def test_nms_class_aware_multi_label_and_max_det() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60.0]])
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.7], [0.0005, 0.0]])  # box 3 is below conf 0.001
    out = non_max_suppression(torch.cat((boxes, scores), 1)[None])[0]
    # class 0: box 1 (IoU 0.81 with box 0) suppressed; class 1: box 1 alone survives -> 2 detections
    assert torch.allclose(out, torch.tensor([[0, 0, 10, 10, 0.9, 0], [1, 1, 10, 10, 0.7, 1]]))
    single = non_max_suppression(torch.cat((boxes, scores), 1)[None], multi_label=False)[0]
    assert single[:, 5].tolist() == [0.0]  # best class only: box 1 is class 0 and suppressed
    many = torch.cat((torch.arange(20.0).view(-1, 1).repeat(1, 4) * 20 + torch.tensor([0, 0, 5, 5.0]),
                      torch.linspace(0.9, 0.1, 20).view(-1, 1)), 1)
    assert non_max_suppression(many[None], max_det=7)[0].shape == (7, 6)
    assert non_max_suppression(torch.zeros(1, 5, 6))[0].shape == (0, 6)


def _gt(boxes: list[list[float]], cats: list[int]) -> dict:
    return {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "x.jpg"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for i, (b, c) in enumerate(zip(boxes, cats))],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_coco_map_known_answers(capsys: pytest.CaptureFixture) -> None:
    gt = _gt([[10, 10, 20, 20], [50, 50, 30, 30]], [1, 1])
    perfect = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9} for b in ([10, 10, 20, 20], [50, 50, 30, 30])]
    assert coco_map(gt, perfect)["map"] == pytest.approx(1.0)
    # one of two objects found: precision 1 up to recall 0.5, i.e. 51 of the 101 COCO recall points
    half = coco_map(gt, perfect[:1])
    assert half["map"] == pytest.approx(51 / 101) and half["map50"] == pytest.approx(51 / 101)
    assert capsys.readouterr().out == ""  # pycocotools silenced
    assert coco_map(gt, []) == {"map": 0.0, "map50": 0.0, "stats": [0.0] * 12}


class _FixedDetector(nn.Module):
    """Raw output: one (N, 1, 1, 1) level; the decode below ignores it and emits fixed boxes."""

    def forward(self, images_nchw: torch.Tensor) -> list[torch.Tensor]:
        return [images_nchw.mean(dim=(1, 2, 3), keepdim=True)]


def _fixed_loaded(rows: list[list[float]] | None) -> LoadedModel:
    spec = detection_spec("fixed", "test", 64, num_classes=2)

    def decode(raw: list[torch.Tensor]) -> torch.Tensor:
        n = raw[0].shape[0]
        if rows is None:
            return torch.zeros(n, 3, 6)
        return torch.tensor(rows).expand(n, -1, -1)

    return LoadedModel(spec=spec, model=_FixedDetector(), decode=decode)


def _write(path: Path, w: int, h: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_evaluate_coco_letterbox_mapping_and_empty(tmp_path: Path) -> None:
    """A 128x64 image letterboxed to 64: scale 0.5, 16 px pad on top; a box at the mapped place scores mAP 1."""
    _write(tmp_path / "images" / "000000000001.jpg", 128, 64)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "000000000001.txt").write_text("1 0.5 0.5 0.25 0.5\n")  # orig [48, 16, 80, 48]
    hit = _fixed_loaded([[24.0, 24.0, 40.0, 40.0, 0.0, 0.9]])  # network frame, class 1
    metrics = evaluate_coco(hit.model, hit, tmp_path / "images", labels=tmp_path / "labels", progress=False)
    assert metrics["map"] == pytest.approx(1.0) and metrics["n_images"] == 1 and metrics["n_detections"] == 1
    wrong_class = _fixed_loaded([[24.0, 24.0, 40.0, 40.0, 0.9, 0.0]])
    assert evaluate_coco(wrong_class.model, wrong_class, tmp_path / "images", labels=tmp_path / "labels",
                         progress=False)["map"] == 0.0
    nothing = _fixed_loaded(None)
    empty = evaluate_coco(nothing.model, nothing, tmp_path / "images", labels=tmp_path / "labels", progress=False)
    assert (empty["map"], empty["map50"], empty["n_detections"]) == (0.0, 0.0, 0)


def test_evaluate_coco_rejects_classifier(tmp_path: Path) -> None:
    spec = ModelSpec(name="c", family="test", task="classification", input_size=(8, 8), num_classes=2)
    with pytest.raises(ValueError, match="not a detection model"):
        evaluate_coco(nn.Identity(), LoadedModel(spec=spec, model=nn.Identity()), tmp_path, labels=tmp_path)


class _Brightness(nn.Module):
    """Logits ``(mean, -mean)``: bright images -> class 0, dark -> class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack((m, -m), 1)


def test_evaluate_classification_known_answer(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / "a_bright" / f"{i}.png", 8, 8, 250)
    _write(tmp_path / "b_dark" / "0.png", 8, 8, 5)
    _write(tmp_path / "b_dark" / "1.png", 8, 8, 250)  # misclassified
    spec = ModelSpec(name="toy", family="test", task="classification", input_size=(8, 8), mean=(0.5,) * 3,
                     std=(0.5,) * 3, num_classes=2, class_names=("a_bright", "b_dark"))
    metrics = evaluate_classification(_Brightness(), spec, tmp_path, batch_size=2, progress=False)
    assert (metrics["top1_correct"], metrics["n_images"]) == (4, 5)
    assert metrics["top1"] == pytest.approx(80.0) and metrics["top5"] == pytest.approx(100.0)
    limited = evaluate_classification(_Brightness(), spec, tmp_path, limit=2, progress=False)
    assert (limited["n_images"], limited["top1_correct"]) == (2, 2)  # a/0 and b/0
    with pytest.raises(DatasetError, match="'a_bright' names no class of big"):
        evaluate_classification(_Brightness(), ModelSpec(name="big", family="t", task="classification",
                                                          input_size=(8, 8), num_classes=10,
                                                          class_names=tuple("abcdefghij")), tmp_path)
