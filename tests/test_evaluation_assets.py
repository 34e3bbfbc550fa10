"""Real-asset accuracy on CI-sized subsets; expected values measured once with this code.

Full-size references (assets README): ResNet-20 81.03 % on 10,000 JPEGs (this code: 8103 / 10000 correct);
YOLOv5n val2017-128 @640 mAP 0.340 / 0.522 (this code: 0.3392 / 0.5230).

Tolerances: top-1 is an exact count (deterministic float32 inference, sorted-name subset). mAP +-1e-3: float32
convolution sums differ across CPUs/BLAS builds in the last bits, which can reorder near-tied scores in NMS and move
mAP on 16 images by ~1e-4; a real bug (pre-processing, decoding, category mapping) moves it by > 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgh.data import load_calibration_set
from dgh.evaluation import evaluate_classification, evaluate_coco
from dgh.models import load_model


def test_resnet20_cifar10_500_test_images(assets: Path, resnet20_weights: Path) -> None:
    loaded = load_model("resnet20_cifar10", str(resnet20_weights))
    metrics = evaluate_classification(loaded.model, loaded.spec, assets / "cifar10" / "test", limit=500, progress=False)
    assert metrics["n_images"] == 500
    assert (metrics["top1_correct"], metrics["top5_correct"]) == (399, 496)
    assert metrics["top1"] == pytest.approx(79.8)


@pytest.fixture(scope="module")
def yolov5n_320(yolov5n_weights: Path):  # noqa: ANN201
    return load_model("yolov5n", str(yolov5n_weights), imgsz=320)


def test_yolov5n_val2017_yolo_labels_16_images(assets: Path, yolov5n_320) -> None:  # noqa: ANN001
    val = assets / "coco" / "val2017-128"
    m = evaluate_coco(yolov5n_320.model, yolov5n_320, val / "images", labels=val / "labels", limit=16, progress=False)
    assert m["n_images"] == 16 and m["imgsz"] == 320
    assert m["map"] == pytest.approx(0.3527, abs=1e-3) and m["map50"] == pytest.approx(0.5762, abs=1e-3)


def test_yolov5n_train2017_instances_json_16_images(assets: Path, yolov5n_320) -> None:  # noqa: ANN001
    """The real json uses the 91-id COCO categories: wrong mapping would give mAP ~0."""
    train = assets / "coco" / "train2017-128"
    m = evaluate_coco(yolov5n_320.model, yolov5n_320, train / "images",
                      annotations=train / "annotations" / "instances_train2017.json", limit=16, progress=False)
    assert m["n_images"] == 16
    assert m["map"] == pytest.approx(0.5229, abs=1e-3) and m["map50"] == pytest.approx(0.7498, abs=1e-3)


def test_real_calibration_sets(assets: Path, resnet20_weights: Path, yolov5n_320) -> None:  # noqa: ANN001
    cifar = load_model("resnet20_cifar10", str(resnet20_weights))
    images = load_calibration_set(assets / "cifar10" / "train-subset", cifar, n_images=40, seed=0, progress=False)
    assert images.shape == (40, 3, 32, 32)
    lo, hi = cifar.spec.pixel_range()
    assert (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()
    # class-balanced round-robin order: row i is class i % 10; ResNet-20 gets ~86 % of JPEG training images right
    labels = torch.arange(40) % 10
    correct = int((cifar.model(images).argmax(1) == labels).sum())
    assert correct >= 30, correct
    det = load_calibration_set(assets / "coco" / "train2017-128", yolov5n_320, n_images=4, progress=False)
    assert det.shape == (4, 3, 320, 320) and 0.0 <= float(det.min()) and float(det.max()) <= 1.0
