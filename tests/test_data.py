"""Data: class-balanced subsets, letterbox geometry, YOLO-label -> COCO conversion, category mapping, calibration sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgh.data import (
    COCO80_TO_91,
    DatasetError,
    balanced_subset,
    letterbox,
    load_calibration_set,
    load_detection_data,
    map_classes_to_categories,
    yolo_labels_to_coco,
)
from dgh.models import load_model


def _write_image(path: Path, width: int, height: int, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def test_balanced_subset_counts_and_determinism() -> None:
    files = [[Path(f"c{c}/{i}.jpg") for i in range(n)] for c, n in enumerate([5, 2, 4])]
    sub = balanced_subset(files, 7)
    counts = [sum(1 for _, c in sub if c == k) for k in range(3)]
    assert counts == [3, 2, 2]  # round-robin: 3 per class until class 1 runs out after 2
    assert sub[:3] == [(Path("c0/0.jpg"), 0), (Path("c1/0.jpg"), 1), (Path("c2/0.jpg"), 2)]
    assert balanced_subset(files, 7) == sub
    assert len(balanced_subset(files, None)) == 11 and len(balanced_subset(files, 100)) == 11
    shuffled = balanced_subset(files, 6, seed=1)
    assert shuffled == balanced_subset(files, 6, seed=1) and [c for _, c in shuffled] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DatasetError):
        balanced_subset(files, 0)


def test_letterbox_geometry_round_trip() -> None:
    image = np.zeros((50, 100, 3), np.uint8)  # H=50, W=100
    out, info = letterbox(image, 64)
    assert out.shape == (64, 64, 3)
    assert (info.ratio_w, info.ratio_h, info.pad_left, info.pad_top) == (0.64, 0.64, 0, 16)
    assert (out[:16] == 114).all() and (out[48:] == 114).all() and (out[16:48] == 0).all()
    net_box = torch.tensor([[0.0 * 0.64, 10 * 0.64 + 16, 50 * 0.64, 40 * 0.64 + 16]])
    assert torch.allclose(info.boxes_to_original(net_box), torch.tensor([[0.0, 10.0, 50.0, 40.0]]), atol=1e-4)
    outside = info.boxes_to_original(torch.tensor([[-5.0, 0.0, 70.0, 70.0]]))
    assert outside.tolist() == [[0.0, 0.0, 100.0, 50.0]]  # clipped to the original image


def test_yolo_labels_to_coco_hand_computed(tmp_path: Path) -> None:
    img = _write_image(tmp_path / "images" / "000000000042.jpg", width=200, height=100)
    _write_image(tmp_path / "images" / "000000000007.jpg", width=10, height=10)  # no label file: no objects
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "000000000042.txt").write_text("3 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.2 0.4\n")
    (tmp_path / "data.yaml").write_text("names: [a, b, c, d]\n")
    gt = yolo_labels_to_coco(sorted((tmp_path / "images").iterdir()), labels)
    assert gt["categories"] == [{"id": i, "name": n} for i, n in enumerate("abcd")]
    assert gt["images"] == [{"id": 7, "file_name": "000000000007.jpg", "width": 10, "height": 10},
                            {"id": 42, "file_name": img.name, "width": 200, "height": 100}]
    a, b = gt["annotations"]
    # class 3, centre (100, 50), size (40, 40) -> x, y = 80, 30; area 1600
    assert (a["image_id"], a["category_id"], a["iscrowd"]) == (42, 3, 0)
    assert a["bbox"] == pytest.approx([80.0, 30.0, 40.0, 40.0]) and a["area"] == pytest.approx(1600.0)
    assert b["bbox"] == pytest.approx([0.0, 0.0, 40.0, 40.0]) and b["category_id"] == 1
    (labels / "000000000042.txt").write_text("3 0.5 0.5\n")
    with pytest.raises(DatasetError, match="000000000042.txt:1"):
        yolo_labels_to_coco([img], labels)


def test_category_mapping_rules() -> None:
    coco_cats = [{"id": c, "name": f"n{c}"} for c in COCO80_TO_91]
    assert len(COCO80_TO_91) == 80 and COCO80_TO_91[11] == 13 and COCO80_TO_91[79] == 90
    by_id = map_classes_to_categories(coco_cats, (), 80)  # counts match: i-th sorted id
    assert by_id[0] == 1 and by_id[11] == 13 and by_id[79] == 90
    subset = [{"id": 13, "name": "stop sign"}, {"id": 90, "name": "toothbrush"}]
    assert map_classes_to_categories(subset, (), 80) == {11: 13, 79: 90}  # COCO 80 -> 91 table
    names = tuple(f"k{i}" for i in range(3))
    named = [{"id": 7, "name": "K2"}, {"id": 5, "name": "k0"}]
    assert map_classes_to_categories(named, names, 3) == {0: 5, 2: 7}  # by name, case-insensitive
    with pytest.raises(DatasetError, match="cannot map"):
        map_classes_to_categories([{"id": 1, "name": "x"}, {"id": 2, "name": "y"}], (), 3)


def test_detection_data_json_and_errors(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _write_image(images / "a.jpg", 20, 10)
    _write_image(images / "b.jpg", 20, 10)
    ann = tmp_path / "instances.json"
    import json

    ann.write_text(json.dumps({"images": [{"id": 5, "file_name": "b.jpg", "width": 20, "height": 10},
                                          {"id": 6, "file_name": "gone.jpg", "width": 20, "height": 10}],
                               "annotations": [{"id": 1, "image_id": 5, "category_id": 2, "bbox": [1, 1, 4, 4],
                                                "area": 16, "iscrowd": 0},
                                               {"id": 2, "image_id": 6, "category_id": 1, "bbox": [1, 1, 4, 4],
                                                "area": 16, "iscrowd": 0}],
                               "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}))
    data = load_detection_data(images, annotations=ann, class_names=("y", "x"), num_classes=2)
    assert [p.name for p in data.image_paths] == ["b.jpg"] and data.image_ids == [5]
    assert [a["id"] for a in data.coco_gt["annotations"]] == [1]
    assert data.class_to_category == {0: 2, 1: 1}
    with pytest.raises(DatasetError, match="exactly one"):
        load_detection_data(images)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a COCO instances json"):
        load_detection_data(images, annotations=tmp_path / "bad.json")


def test_calibration_noise_and_tensor_files(tmp_path: Path) -> None:
    loaded = load_model("resnet20_cifar10", "random")
    noise = load_calibration_set("noise", loaded, n_images=8, seed=3)
    lo, hi = loaded.spec.pixel_range()
    assert noise.shape == (8, 3, 32, 32) and noise.dtype == torch.float32
    assert (noise >= lo).all() and (noise <= hi).all()
    assert torch.equal(noise, load_calibration_set("noise", loaded, n_images=8, seed=3))
    assert not torch.equal(noise, load_calibration_set("noise", loaded, n_images=8, seed=4))
    torch.save(noise, tmp_path / "images.pt")
    assert torch.equal(load_calibration_set(tmp_path, loaded), noise)  # folder holding images.pt
    assert torch.equal(load_calibration_set(tmp_path / "images.pt", loaded, n_images=3), noise[:3])
    torch.save(noise[:, :, :16, :16], tmp_path / "small.pt")
    with pytest.raises(DatasetError, match="takes"):
        load_calibration_set(tmp_path / "small.pt", loaded)
    torch.save({"images_nchw": noise}, tmp_path / "dict.pt")  # images.pt is a bare tensor (dgh.io.save_images)
    with pytest.raises(DatasetError, match=r"\(N, 3, H, W\)"):
        load_calibration_set(tmp_path / "dict.pt", loaded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_calibration_set(tmp_path / "empty", loaded)
    with pytest.raises(DatasetError, match="not found"):
        load_calibration_set(tmp_path / "missing", loaded)


def test_calibration_image_folders(tmp_path: Path) -> None:
    for c, n in (("cat", 3), ("dog", 1)):
        for i in range(n):
            _write_image(tmp_path / "cls" / c / f"{i}.png", 32, 32, value=50 * i)
    cifar = load_model("resnet20_cifar10", "random")
    images = load_calibration_set(tmp_path / "cls", cifar, n_images=3)
    assert images.shape == (3, 3, 32, 32)
    expected_first = cifar.spec.normalize(torch.zeros(1, 3, 32, 32))[0]  # cat/0.png is black
    assert torch.allclose(images[0], expected_first, atol=1e-6)
    yolo = load_model("yolov5n", "random", imgsz=64)
    _write_image(tmp_path / "det" / "images" / "x.jpg", 128, 64, value=255)
    det = load_calibration_set(tmp_path / "det", yolo)  # folder with images/ sub-folder
    assert det.shape == (1, 3, 64, 64)
    assert torch.allclose(det[0, :, 0, 0], torch.full((3,), 114 / 255))  # letterbox padding row
    assert det[0, :, 32, 32].min() > 0.98  # the white image itself
