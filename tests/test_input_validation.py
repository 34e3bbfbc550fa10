"""Bad input is refused up front with a one-line error; inputs we can interpret are interpreted correctly.

Covers: class mapping by folder name, EXIF orientation (pixels and box geometry), truncated/undecodable images,
every PIL image mode, calibration tensors (dtype, values, shape), detection ground truth (COCO json, YOLO lines),
weights files that are not state dicts, truncated generation checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgh.data import (
    DatasetError,
    LetterboxDataset,
    load_calibration_set,
    load_detection_data,
    validate_calibration_images,
    yolo_labels_to_coco,
)
from dgh.data.classification import ClassLayout, map_class_folders
from dgh.data.images import read_pil_rgb, read_rgb
from dgh.evaluation import evaluate_classification
from dgh.models import get_spec, load_model
from dgh.models.spec import imagenet_wnids

EXIF_ORIENTATION = 0x0112


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # noqa: ANN001, ANN202 - fixture
    yield


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:  # noqa: ANN003
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        im = Image.fromarray(array)
    elif mode == "P":  # an exact palette (the default web palette would dither)
        im = Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        im = Image.fromarray(array).convert(mode)
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------------------- class mapping
class _ConstantNet(torch.nn.Module):
    """Predicts class ``argmax`` of the mean of channel 0: images of value v in class folder order."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C)
        # the test images of class k are filled with pixel value 20 * k (0..255); recover k from the mean
        pixels = x[:, 0] * 0.229 + 0.485
        k = torch.round(pixels.mean(dim=(1, 2)) * 255 / 20).long()
        return torch.nn.functional.one_hot(k.clamp(0, self.num_classes - 1), self.num_classes).float()


def _cifar_folder(root: Path, names: list[str], true_index: list[int]) -> Path:
    for name, k in zip(names, true_index):
        _save(root / name / "0.png", np.full((32, 32, 3), 20 * k, np.uint8))
    return root


CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_class_folders_map_by_name_not_sort_order(tmp_path: Path) -> None:
    spec = get_spec("resnet20_cifar10")
    # a subset of classes whose sort order differs from the class order: 'truck' (9) sorts before nothing else
    names = ["truck", "airplane", "ship"]
    root = _cifar_folder(tmp_path / "sub", names, [CIFAR.index(n) for n in names])
    metrics = evaluate_classification(_ConstantNet(10), spec, root, device="cpu", progress=False, num_workers=0)
    assert metrics["top1"] == 100.0 and metrics["n_images"] == 3


def test_numbered_or_renamed_class_folders_are_refused(tmp_path: Path) -> None:
    spec = get_spec("resnet20_cifar10")
    numbered = _cifar_folder(tmp_path / "num", [str(i + 1) for i in range(10)], list(range(10)))  # 1..10
    with pytest.raises(DatasetError, match="'1'.*no class of resnet20_cifar10"):
        evaluate_classification(_ConstantNet(10), spec, numbered, device="cpu", progress=False, num_workers=0)
    renamed = _cifar_folder(tmp_path / "ren", ["plane"] + CIFAR[1:], list(range(10)))
    with pytest.raises(DatasetError, match="'plane'"):
        evaluate_classification(_ConstantNet(10), spec, renamed, device="cpu", progress=False, num_workers=0)


def test_numbered_layout_only_when_asked(tmp_path: Path) -> None:
    spec = get_spec("resnet20_cifar10")
    # folders 0..9 sort as 0,1,10?  No: 0..9 are single digits; use a 12-class model to test numeric (not
    # lexical) order: '10' sorts before '2' lexically
    root = _cifar_folder(tmp_path / "num", [str(i) for i in range(10)], list(range(10)))
    metrics = evaluate_classification(_ConstantNet(10), spec, root, device="cpu", progress=False, num_workers=0,
                                      class_layout=ClassLayout.NUMBERED)
    assert metrics["top1"] == 100.0
    mapping = map_class_folders([str(i) for i in range(12)], (), 12, ClassLayout.NUMBERED, "x")
    assert mapping == {str(i): i for i in range(12)}  # numeric, not lexical: '10' -> 10
    with pytest.raises(DatasetError, match="'12'.*0..11"):
        map_class_folders(["0", "12"], (), 12, ClassLayout.NUMBERED, "x")
    with pytest.raises(DatasetError, match="'cat'"):
        map_class_folders(["0", "cat"], (), 12, ClassLayout.NUMBERED, "x")
    with pytest.raises(DatasetError, match="no class names"):
        map_class_folders(["a"], (), 12, ClassLayout.NAMES, "x")


def test_imagenet_models_carry_wnids(assets: Path) -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == tuple(sorted(wnids)) and wnids[0] == "n01440764"
    assert list(wnids) == sorted(p.name for p in (assets / "imagenet" / "val-sample").iterdir())
    for name in ("resnet18", "mobilenet_v2", "vit_b_16"):
        assert get_spec(name).class_names == wnids


# ----------------------------------------------------------------------------------------- images
def _exif_jpeg(path: Path, array: np.ndarray, orientation: int) -> Path:
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[EXIF_ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=100, subsampling=0, exif=exif.tobytes())
    return path


def _raw_with_red_left(h: int = 40, w: int = 80) -> np.ndarray:
    """(H, W, 3) uint8: left quarter red, rest blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 2] = 255
    a[:, : w // 4] = (255, 0, 0)
    return a


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_applied_to_pixels(tmp_path: Path, orientation: int, k: int) -> None:
    raw = _raw_with_red_left()
    path = _exif_jpeg(tmp_path / "r.jpg", raw, orientation)
    rgb = read_rgb(path)
    expected = np.rot90(raw, k)  # 6: 90 degrees clockwise, 8: counter-clockwise, 3: 180
    assert rgb.shape == expected.shape
    # JPEG at quality 100 without chroma subsampling: a few levels of error, a rotation error would be ~100 mean
    assert np.abs(rgb.astype(int) - expected.astype(int)).mean() < 3
    assert np.asarray(read_pil_rgb(path)).shape == expected.shape


def test_exif_rotated_image_boxes_and_pixels_agree(tmp_path: Path) -> None:
    """YOLO labels are relative to the displayed (rotated) image, so the ground truth must use its size."""
    raw = _raw_with_red_left(40, 80)  # stored 80 wide x 40 high; displayed (orientation 6) 40 wide x 80 high
    img = _exif_jpeg(tmp_path / "images" / "000000000001.jpg", raw, 6)
    labels = tmp_path / "labels"
    labels.mkdir()
    # displayed image: red is the top quarter (rows 0..19), full width -> centre (0.5, 0.125), size (1, 0.25)
    (labels / "000000000001.txt").write_text("0 0.5 0.125 1.0 0.25\n")
    gt = yolo_labels_to_coco([img], labels, num_classes=1)
    assert (gt["images"][0]["width"], gt["images"][0]["height"]) == (40, 80)
    x, y, w, h = gt["annotations"][0]["bbox"]
    assert (x, y, w, h) == pytest.approx((0.0, 0.0, 40.0, 20.0))
    pixels, _, info = LetterboxDataset([img], 64)[0]
    assert info.orig_hw == (80, 40)
    # the box mapped into the letterbox frame covers red pixels
    y_net = int((y + h / 2) * info.ratio_h + info.pad_top)
    x_net = int((x + w / 2) * info.ratio_w + info.pad_left)
    assert pixels[0, y_net, x_net] > 0.8 and pixels[2, y_net, x_net] < 0.2


def test_exif_orientation_in_calibration_loading(tmp_path: Path) -> None:
    raw = _raw_with_red_left(32, 32)
    _exif_jpeg(tmp_path / "cal" / "a.jpg", raw, 6)
    cifar = load_model("resnet20_cifar10", "random")
    x = cifar.spec.denormalize(load_calibration_set(tmp_path / "cal", cifar, progress=False))
    assert x[0, 0, :4].mean() > 0.8 and x[0, 0, -4:].mean() < 0.2  # red on top after rotation


def _truncated_jpeg(path: Path) -> Path:
    _save(path, (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_and_undecodable_images_are_errors_in_every_loader(tmp_path: Path) -> None:
    bad = _truncated_jpeg(tmp_path / "images" / "000000000001.jpg")
    with pytest.raises(DatasetError, match="000000000001.jpg.*truncated"):
        read_rgb(bad)
    with pytest.raises(DatasetError, match="truncated"):
        LetterboxDataset([bad], 64)[0]
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "000000000001.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    yolo = load_model("yolov5n", "random", imgsz=64)
    with pytest.raises(DatasetError, match="truncated"):
        load_calibration_set(tmp_path / "images", yolo, progress=False)
    cls = tmp_path / "cls" / "cat"
    cls.mkdir(parents=True)
    (cls / "0.jpg").write_bytes(bad.read_bytes())
    cifar = load_model("resnet20_cifar10", "random")
    with pytest.raises(DatasetError, match="truncated"):
        load_calibration_set(tmp_path / "cls", cifar, progress=False)
    (cls / "0.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="0.jpg"):
        read_rgb(cls / "0.jpg")


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", 77, (77, 77, 77)),
    ("1", 255, (255, 255, 255)),
    ("P", 77, (77, 77, 77)),
    ("RGBA", 77, (77, 77, 77)),
    ("CMYK", 77, (77, 77, 77)),
    ("YCbCr", 77, (77, 77, 77)),
])
def test_image_modes_decode_to_8bit_rgb(tmp_path: Path, mode: str, value: int, expected: tuple) -> None:
    path = _save(tmp_path / f"x_{mode}.tif", np.full((8, 8, 3), value, np.uint8), mode)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    assert np.abs(rgb.astype(int) - np.array(expected)).max() <= 2  # CMYK/YCbCr round trips are within 2 levels


def test_16bit_grayscale_scales_to_8bit(tmp_path: Path) -> None:
    a = np.array([[0, 257 * 100, 65535, 257 * 7 + 129, 257 * 7 + 128]], np.uint16)  # 7.502 -> 8, 7.498 -> 7
    for suffix in ("png", "tif"):
        path = tmp_path / f"g16.{suffix}"
        Image.fromarray(a).save(path)
        assert Image.open(path).mode.startswith("I;16")
        rgb = read_rgb(path)
        assert rgb[0, :, 0].tolist() == [0, 100, 255, 8, 7] and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("array", [np.full((4, 4), 300, np.int32), np.full((4, 4), 0.5, np.float32)])
def test_32bit_images_are_a_clear_error(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "x.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(DatasetError, match=r"x\.tif.*(32-bit).*8-bit"):
        read_rgb(path)


# ----------------------------------------------------------------------------------------- calibration tensors
@pytest.mark.parametrize("bad,match", [
    (lambda x: (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
    (lambda x: torch.rand(4, 3, 32, 32) * 255, "outside"),
    (lambda x: x * 1e30, "outside"),
    (lambda x: x.index_fill(0, torch.tensor([2]), float("nan")), "NaN"),
    (lambda x: x.index_fill(0, torch.tensor([1]), float("inf")), "inf"),
    (lambda x: x[:, :1], r"3 channels|shape \(4, 1, 32, 32\)"),
    (lambda x: x[0], r"\(N, 3, H, W\)"),
    (lambda x: x[:0], "no images"),
    (lambda x: x.double() * 0 + 0.1, None),  # float64 in range: accepted (stored as float32)
])
def test_calibration_tensor_validation(tmp_path: Path, bad, match) -> None:  # noqa: ANN001
    cifar = load_model("resnet20_cifar10", "random")
    good = load_calibration_set("noise", cifar, n_images=4)
    validate_calibration_images(good, cifar.spec, "noise")
    torch.save(bad(good), tmp_path / "images.pt")
    if match is None:
        assert load_calibration_set(tmp_path, cifar).dtype == torch.float32
        return
    with pytest.raises(DatasetError, match=match) as err:
        load_calibration_set(tmp_path, cifar)
    assert "images.pt" in str(err.value) and "\n" not in str(err.value)


def test_calibration_range_tolerance_is_one_bf16_step() -> None:
    spec = get_spec("resnet20_cifar10")
    lo, hi = spec.pixel_range()
    edge = hi.expand(1, 3, 32, 32).clone()
    validate_calibration_images(edge.bfloat16().float(), spec, "x")  # bf16 rounding of the range edge: fine
    validate_calibration_images(edge * (1 + 2 ** -8), spec, "x")
    with pytest.raises(DatasetError, match="outside"):
        validate_calibration_images(edge + 0.05, spec, "x")  # 0.05 normalized ~ 3 pixel levels


def test_unclamped_generator_output_gets_a_bounded_range(tmp_path: Path) -> None:
    spec = get_spec("resnet20_cifar10")
    lo, hi = spec.pixel_range()
    x = (hi + 2.0 * (hi - lo)).expand(2, 3, 32, 32).clone()  # two range widths beyond the valid pixels
    with pytest.raises(DatasetError, match="outside"):
        validate_calibration_images(x, spec, "x")
    validate_calibration_images(x, spec, "x", clamped=False)
    with pytest.raises(DatasetError, match="outside"):
        validate_calibration_images(x * 1e30, spec, "x", clamped=False)
    with pytest.raises(DatasetError, match="outside"):  # raw pixels as floats
        validate_calibration_images(torch.full((2, 3, 32, 32), 255.0), spec, "x", clamped=False)
    # the flag comes from the generation meta.json next to images.pt
    torch.save(x, tmp_path / "images.pt")
    (tmp_path / "meta.json").write_text(json.dumps({"settings": {"clamp": False}}))
    cifar = load_model("resnet20_cifar10", "random")
    assert load_calibration_set(tmp_path, cifar).shape == (2, 3, 32, 32)
    (tmp_path / "meta.json").write_text(json.dumps({"settings": {"clamp": True}}))
    with pytest.raises(DatasetError, match="outside"):
        load_calibration_set(tmp_path, cifar)


# ----------------------------------------------------------------------------------------- detection ground truth
def _coco(tmp_path: Path, annotations: list) -> tuple[Path, Path]:  # noqa: ANN001
    images = tmp_path / "images"
    _save(images / "b.jpg", np.full((10, 20, 3), 128, np.uint8))
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 5, "file_name": "b.jpg", "width": 20, "height": 10}],
                               "annotations": annotations,
                               "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}))
    return images, ann


def test_coco_json_without_annotations_is_an_error(tmp_path: Path) -> None:
    images, ann = _coco(tmp_path, [])
    with pytest.raises(DatasetError, match="instances.json.*no annotations"):
        load_detection_data(images, annotations=ann, class_names=("x", "y"), num_classes=2)


@pytest.mark.parametrize("bbox,match", [
    ([1, 1, float("nan"), 4], "bbox"),
    ([1, 1, -4, 4], "bbox"),
    ([1, 1, 4], "bbox"),
])
def test_coco_json_bad_boxes(tmp_path: Path, bbox: list, match: str) -> None:
    images, ann = _coco(tmp_path, [{"id": 1, "image_id": 5, "category_id": 2, "bbox": bbox, "area": 16,
                                    "iscrowd": 0}])
    with pytest.raises(DatasetError, match=match):
        load_detection_data(images, annotations=ann, class_names=("x", "y"), num_classes=2)


def test_coco_json_size_must_match_the_displayed_image(tmp_path: Path) -> None:
    images, ann = _coco(tmp_path, [{"id": 1, "image_id": 5, "category_id": 2, "bbox": [1, 1, 4, 4], "area": 16,
                                    "iscrowd": 0}])
    _exif_jpeg(images / "b.jpg", np.full((10, 20, 3), 128, np.uint8), 6)  # displayed 10 x 20
    with pytest.raises(DatasetError, match="b.jpg.*20x10.*EXIF"):
        load_detection_data(images, annotations=ann, class_names=("x", "y"), num_classes=2)


@pytest.mark.parametrize("line,match", [
    ("0 nan 0.5 0.2 0.2", "not finite"),
    ("0 1.5 0.5 0.2 0.2", "centre"),
    ("0 0.5 -0.1 0.2 0.2", "centre"),
    ("0 0.5 0.5 -0.2 0.2", "width"),
    ("0 0.5 0.5 0.2 0", "height"),
    ("0 0.5 0.5 0.2", "5 columns"),
    ("0 0.5 0.5 0.2 0.2 0.9", "5 columns"),
    ("7 0.5 0.5 0.2 0.2", "class 7 outside 0..3"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 outside"),
    ("1.5 0.5 0.5 0.2 0.2", "integer"),
    ("cat 0.5 0.5 0.2 0.2", "integer"),
])
def test_yolo_label_lines_are_checked(tmp_path: Path, line: str, match: str) -> None:
    img = _save(tmp_path / "images" / "000000000042.jpg", np.full((10, 20, 3), 9, np.uint8))
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "000000000042.txt").write_text("1 0.5 0.5 0.2 0.2\n" + line + "\n")
    with pytest.raises(DatasetError, match=f"000000000042.txt:2: .*{match}") as err:
        yolo_labels_to_coco([img], labels, num_classes=4)
    assert "\n" not in str(err.value)


def test_yolo_labels_with_no_boxes_at_all_are_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "000000000042.jpg", np.full((10, 20, 3), 9, np.uint8))
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="no ground-truth boxes"):
        load_detection_data(tmp_path / "images", labels=tmp_path / "labels", num_classes=4)


# ----------------------------------------------------------------------------------------- weights and checkpoints
@pytest.mark.parametrize("obj", [[1, 2, 3], torch.zeros(3), {"state_dict": [1]}, {"a": 1}])
@pytest.mark.parametrize("model", ["resnet20_cifar10", "resnet18"])
def test_weights_file_that_is_not_a_state_dict(tmp_path: Path, obj, model: str) -> None:  # noqa: ANN001
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="w.pt") as err:  # ModelLoadError (CLI: exit 2) or its base
        load_model(model, str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.zeros(3)])
def test_yolo_weights_file_that_is_not_a_checkpoint(tmp_path: Path, obj) -> None:  # noqa: ANN001
    from dgh.models.registry import ModelLoadError

    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(ModelLoadError, match="w.pt"):
        load_model("yolov5n", str(path))


def test_resume_from_truncated_checkpoint_is_one_line(tmp_path: Path) -> None:
    from dgh.generation import GenerationConfig, generate_images
    from dgh.generation.engine import GenerationError

    loaded = load_model("resnet20_cifar10", "random")
    cfg = GenerationConfig.for_method("dgh", n_images=2, iterations=2, batch_size=2)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"format": "dgh-generation-checkpoint-v1", "canvases": [torch.zeros(2, 3, 40, 40)]}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a run killed while the file was copied
    with pytest.raises(GenerationError, match="checkpoint.pt.*--resume") as err:
        generate_images(loaded, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("device,match", [("banana", "unknown device 'banana'"), ("gpu0", "unknown device"),
                                          ("meta", "not supported"), ("cuda:99", "cuda:99")])
def test_bad_device_strings_are_one_line(device: str, match: str) -> None:
    from dgh.env import resolve_device

    if device == "cuda:99" and not torch.cuda.is_available():
        match = "CUDA is not available"
    with pytest.raises(ValueError, match=match):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_torchvision_category_order_is_the_wnid_order() -> None:
    """The docstring's claim: torchvision's human names are in sorted-wnid order (timm's lemma list, same index)."""
    from timm.data import ImageNetInfo
    from torchvision.models import ResNet18_Weights

    lemmas = ImageNetInfo().label_descriptions()  # index order of timm's imagenet_synsets.txt
    categories = ResNet18_Weights.DEFAULT.meta["categories"]
    misses = [i for i, (c, lemma) in enumerate(zip(categories, lemmas)) if c.lower() not in lemma.lower()]
    assert misses == [134, 639]  # torchvision's renamed duplicates: 'crane bird', 'maillot tank suit'
    assert ImageNetInfo().label_names() == list(imagenet_wnids())


def test_yolo_data_yaml_names_map_by_name(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "000000000042.jpg", np.full((10, 20, 3), 9, np.uint8))
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "000000000042.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("names: [dog, cat]\n")  # the model says (cat, dog)
    data = load_detection_data(tmp_path / "images", labels=labels, class_names=("cat", "dog"), num_classes=2)
    assert data.class_to_category == {1: 0, 0: 1}  # model 'dog' (1) -> label class 0
    (tmp_path / "data.yaml").write_text("names: [dog, horse]\n")
    with pytest.raises(DatasetError, match="'horse' is not a class of the model"):
        load_detection_data(tmp_path / "images", labels=labels, class_names=("cat", "dog"), num_classes=2)
    (tmp_path / "data.yaml").unlink()  # no names: label class = model class
    data = load_detection_data(tmp_path / "images", labels=labels, class_names=("cat", "dog"), num_classes=2)
    assert data.class_to_category == {0: 0, 1: 1}


def test_worker_process_errors_keep_their_one_line_message(tmp_path: Path) -> None:
    """With DataLoader workers (the GPU machines' default), a bad image still ends in its own one-line message."""
    root = _cifar_folder(tmp_path / "cls", ["cat", "dog"], [3, 5])
    _truncated_jpeg(root / "dog" / "1.jpg")
    with pytest.raises(DatasetError, match=r"^image .*1\.jpg is truncated") as err:
        evaluate_classification(_ConstantNet(10), get_spec("resnet20_cifar10"), root, device="cpu", progress=False,
                                num_workers=1, batch_size=1)
    assert "\n" not in str(err.value) and "DataLoader" not in str(err.value)
