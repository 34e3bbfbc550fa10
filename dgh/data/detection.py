"""COCO-style detection data: an image folder plus a COCO ``instances_*.json`` or a YOLO label folder.

Both become a COCO ground-truth dict in memory (``images``, ``annotations``, ``categories``) and a map from the
model's class index to a COCO ``category_id``:

- YOLO labels (``class cx cy w h``, normalized to [0, 1], class contiguous 0..nc-1): ``category_id = class``;
  ``bbox = [(cx - w/2) W, (cy - h/2) H, w W, h H]`` in pixels of the original image, ``area = w W * h H``,
  ``iscrowd = 0``. Class names come from an optional ``data.yaml`` (``names``) next to or above the label folder.
- A COCO json keeps its category ids (the original 91-id scheme for COCO). Model class i maps to the json category
  of the same name when names are known, else the i-th category by sorted id when the counts match, else the
  standard COCO 80 -> 91 table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dgh.data.images import (
    DatasetError,
    LetterboxInfo,
    hwc_uint8_to_chw_float,
    letterbox,
    list_images,
    oriented_size,
    read_rgb,
)

# COCO's 80 detection classes (YOLO index order) -> original category ids 1..90 (11 ids unused).
COCO80_TO_91: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)


@dataclass
class DetectionData:
    """Images plus COCO ground truth.

    Attributes:
        image_paths: the images to run, in order.
        image_ids: COCO ``image_id`` of each image (same order).
        coco_gt: the ground-truth dict (``images``, ``annotations``, ``categories``).
        class_to_category: model class index -> COCO ``category_id`` (classes absent from the ground truth are
            left out; their detections are dropped).
    """

    image_paths: list[Path]
    image_ids: list[int]
    coco_gt: dict
    class_to_category: dict[int, int] = field(default_factory=dict)


def _image_ids(paths: list[Path]) -> list[int]:
    """``int(stem)`` when every stem is a distinct integer (COCO file names), else the 0-based index."""
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(paths)))


def read_yolo_names(labels_dir: Path) -> list[str] | None:
    """Class names from a ``data.yaml`` in ``labels_dir`` or its parent (``names``: list or ``{index: name}``)."""
    import yaml

    for candidate in (labels_dir / "data.yaml", labels_dir.parent / "data.yaml"):
        if candidate.is_file():
            try:
                names = (yaml.safe_load(candidate.read_text()) or {}).get("names")
            except yaml.YAMLError as exc:
                raise DatasetError(f"cannot parse {candidate} ({exc})".splitlines()[0]) from None
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a text label file (not UTF-8)") from None


def parse_yolo_line(line: str, where: str, num_classes: int | None) -> tuple[int, float, float, float, float]:
    """One YOLO box line ``class cx cy w h`` -> ``(class, cx, cy, w, h)``, or a :class:`DatasetError` naming ``where``.

    Rules (what YOLO training and ultralytics' label checks accept, made strict): exactly 5 columns (polygon
    segment lines are not boxes); ``class`` a non-negative integer below ``num_classes`` (when known); all numbers
    finite; centre ``cx, cy`` in [0, 1]; width and height in (0, 1].
    """
    parts = line.split()
    if len(parts) != 5:
        raise DatasetError(f"{where}: expected 5 columns 'class cx cy w h', got {len(parts)}: {line.strip()[:80]!r}")
    try:
        cls_f = float(parts[0])
        cx, cy, bw, bh = (float(v) for v in parts[1:])
    except ValueError:
        raise DatasetError(f"{where}: class must be an integer and cx cy w h numbers, got {line.strip()[:80]!r}") from None
    if not all(math.isfinite(v) for v in (cls_f, cx, cy, bw, bh)):
        raise DatasetError(f"{where}: value not finite in {line.strip()[:80]!r}")
    if cls_f != int(cls_f):
        raise DatasetError(f"{where}: class must be an integer, got {parts[0]!r}")
    cls = int(cls_f)
    if cls < 0 or (num_classes is not None and cls >= num_classes):
        top = "" if num_classes is None else f"0..{num_classes - 1}"
        raise DatasetError(f"{where}: class {cls} outside {top or 'the non-negative integers'}")
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
        raise DatasetError(f"{where}: box centre ({cx:g}, {cy:g}) outside [0, 1] (coordinates are normalized)")
    if not 0.0 < bw <= 1.0:
        raise DatasetError(f"{where}: box width {bw:g} not in (0, 1] (normalized)")
    if not 0.0 < bh <= 1.0:
        raise DatasetError(f"{where}: box height {bh:g} not in (0, 1] (normalized)")
    return cls, cx, cy, bw, bh


def yolo_labels_to_coco(image_paths: list[Path], labels_dir: str | Path, num_classes: int | None = None,
                        image_sizes: dict[Path, tuple[int, int]] | None = None) -> dict:
    """Convert YOLO label files into a COCO ground-truth dict (formulas in the module docstring).

    Args:
        image_paths: images; the label of ``a/b/NAME.jpg`` is ``labels_dir/NAME.txt`` (missing file = no objects).
        labels_dir: the label folder.
        num_classes: number of categories when no ``data.yaml`` names are found (default: max class + 1).
        image_sizes: optional ``{path: (width, height)}``; otherwise the displayed size (header, EXIF
            orientation applied: :func:`dgh.data.images.oriented_size`), the frame YOLO labels are normalized to
            and the frame :func:`dgh.data.images.read_rgb` decodes to.

    Returns:
        ``{"images": [...], "annotations": [...], "categories": [{"id": i, "name": ...}, ...]}``.

    Raises:
        DatasetError: missing folder, a malformed line (:func:`parse_yolo_line`, message ``file:line: ...``),
            a class outside 0..nc-1.
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DatasetError(f"YOLO label folder not found: {labels_dir}")
    names = read_yolo_names(labels_dir)
    nc_known = len(names) if names else num_classes
    images, annotations = [], []
    max_class = -1
    for path, image_id in zip(image_paths, _image_ids(image_paths)):
        w, h = (image_sizes or {}).get(path) or oriented_size(path)
        images.append({"id": image_id, "file_name": path.name, "width": w, "height": h})
        label = labels_dir / f"{path.stem}.txt"
        if not label.is_file():
            continue
        for line_no, line in enumerate(_read_text(label).splitlines(), 1):
            if not line.split():
                continue
            cls, cx, cy, bw, bh = parse_yolo_line(line, f"{label}:{line_no}", nc_known)
            max_class = max(max_class, cls)
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    nc = len(names) if names else (num_classes if num_classes is not None else max_class + 1)
    if max_class >= nc:
        raise DatasetError(f"{labels_dir}: class {max_class} outside 0..{nc - 1}")
    categories = [{"id": i, "name": names[i] if names else str(i)} for i in range(nc)]
    return {"images": images, "annotations": annotations, "categories": categories}


def map_classes_to_categories(categories: list[dict], class_names: tuple[str, ...] | list[str], num_classes: int) -> dict[int, int]:
    """Model class index -> COCO ``category_id`` (rules in the module docstring).

    Raises:
        DatasetError: no rule applies.
    """
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
    names = [n.lower() for n in class_names]
    if names and len(names) == num_classes and set(by_name) <= set(names):
        return {i: by_name[n] for i, n in enumerate(names) if n in by_name}
    ids = sorted(int(c["id"]) for c in categories)
    if len(ids) == num_classes:
        return dict(enumerate(ids))
    if num_classes == 80 and set(ids) <= set(COCO80_TO_91):
        return {i: c for i, c in enumerate(COCO80_TO_91) if c in set(ids)}
    raise DatasetError(
        f"cannot map the model's {num_classes} classes onto the {len(ids)} annotation categories "
        "(names differ and the counts do not match)"
    )


def load_detection_data(images_dir: str | Path, annotations: str | Path | None = None, labels: str | Path | None = None,
                        class_names: tuple[str, ...] | list[str] = (), num_classes: int = 80) -> DetectionData:
    """Pair an image folder with its ground truth (exactly one of ``annotations`` / ``labels``).

    Args:
        images_dir: folder of images.
        annotations: a COCO instances json; only its images present in ``images_dir`` (by ``file_name``) are used.
        labels: a YOLO label folder.
        class_names: the model's class names (index order), used to map json categories by name.
        num_classes: the model's number of classes.

    Raises:
        DatasetError: both or neither ground-truth sources, missing files, no overlapping images, bad json, bad
            boxes or image sizes (:func:`check_coco_ground_truth`), no ground-truth boxes at all (every mAP
            would be 0), YOLO class names that are not the model's (:func:`yolo_class_mapping`).
    """
    if (annotations is None) == (labels is None):
        raise DatasetError("pass exactly one of --annotations INSTANCES.json or --labels YOLO_LABEL_DIR")
    paths = list_images(images_dir)
    if not paths:
        raise DatasetError(f"no images in {images_dir}")
    if labels is not None:
        gt = yolo_labels_to_coco(paths, labels, num_classes=num_classes)
        if len(gt["categories"]) != num_classes:
            raise DatasetError(f"{labels}: {len(gt['categories'])} classes in data.yaml but the model has {num_classes}")
        if not gt["annotations"]:
            raise DatasetError(f"{labels}: no ground-truth boxes for the {len(paths)} images in {images_dir} "
                               "(every mAP would be 0); check the label folder")
        mapping = yolo_class_mapping(gt["categories"], class_names, num_classes, Path(labels))
        return DetectionData(paths, [im["id"] for im in gt["images"]], gt, mapping)
    ann_path = Path(annotations)
    if not ann_path.is_file():
        raise DatasetError(f"annotation file not found: {ann_path}")
    try:
        gt = json.loads(ann_path.read_text())
        by_file = {Path(im["file_name"]).name: im for im in gt["images"]}
        gt["categories"], gt["annotations"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{ann_path} is not a COCO instances json ({type(exc).__name__}: {exc})"[:200]) from None
    used = [p for p in paths if p.name in by_file]
    if not used:
        raise DatasetError(f"none of the {len(paths)} images in {images_dir} is listed in {ann_path}")
    ids = [int(by_file[p.name]["id"]) for p in used]
    keep = set(ids)
    gt = {**gt, "images": [by_file[p.name] for p in used],
          "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in keep]}
    check_coco_ground_truth(gt, ann_path, used)
    return DetectionData(used, ids, gt, map_classes_to_categories(gt["categories"], class_names, num_classes))


def yolo_class_mapping(categories: list[dict], class_names: tuple[str, ...] | list[str], num_classes: int,
                       labels_dir: Path) -> dict[int, int]:
    """Model class index -> YOLO label class, by name when both the model and ``data.yaml`` name their classes.

    Without names on either side the label class is the model class (same count, checked by the caller). With names
    on both sides, each label class must name a model class (case-insensitive): a dataset whose ``data.yaml`` lists
    the classes in another order is mapped correctly, and one with a class the model does not know is refused.

    Raises:
        DatasetError: a ``data.yaml`` name that is not a class of the model.
    """
    label_names = [str(c["name"]) for c in categories]
    named = bool(class_names) and not all(n == str(c["id"]) for n, c in zip(label_names, categories))
    if not named:
        return {i: i for i in range(num_classes)}
    model_index = {n.lower(): i for i, n in enumerate(class_names)}
    mapping: dict[int, int] = {}
    for c, name in zip(categories, label_names):
        if name.lower() not in model_index:
            raise DatasetError(f"{labels_dir}: data.yaml class {c['id']} {name!r} is not a class of the model "
                               f"(its classes: {', '.join(list(class_names)[:4])}, ...)")
        mapping[model_index[name.lower()]] = int(c["id"])
    return mapping


def check_coco_ground_truth(gt: dict, ann_path: Path, image_paths: list[Path]) -> None:
    """Refuse COCO ground truth that pycocotools would score silently wrong.

    - at least one annotation for the images used (``"annotations": []`` gives mAP 0 with no warning);
    - each annotation: ``bbox`` of 4 finite numbers with width and height > 0, a ``category_id`` among the
      ``categories`` and an ``image_id`` among the images;
    - each image's ``width`` x ``height`` equals the file's displayed size (EXIF orientation applied, the frame the
      pixels are decoded in); a json sized like the stored, un-rotated pixels of an EXIF-rotated file is named as
      such, since its boxes are then in the other frame.

    Raises:
        DatasetError: naming the json, the annotation id or the image file.
    """
    from PIL import Image

    if not gt["annotations"]:
        raise DatasetError(f"{ann_path} has no annotations for the {len(image_paths)} images used "
                           "(every mAP would be 0); check the file")
    cats = {int(c["id"]) for c in gt["categories"]}
    image_ids = {int(im["id"]) for im in gt["images"]}
    for a in gt["annotations"]:
        where = f"{ann_path}: annotation id {a.get('id')}"
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"[:200])
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise DatasetError(f"{where}: bbox width and height must be > 0, got {bbox!r}")
        if int(a.get("category_id", -1)) not in cats:
            raise DatasetError(f"{where}: category_id {a.get('category_id')!r} is not among the categories")
        if int(a.get("image_id", -1)) not in image_ids:
            raise DatasetError(f"{where}: image_id {a.get('image_id')!r} is not among the images")
    for path, im in zip(image_paths, gt["images"]):
        declared = (int(im.get("width", -1)), int(im.get("height", -1)))
        shown = oriented_size(path)
        if declared == shown:
            continue
        with Image.open(path) as raw:
            stored = raw.size
        if declared == stored:
            raise DatasetError(
                f"{ann_path}: {path.name} is {declared[0]}x{declared[1]} in the json, its stored pixels, but its EXIF "
                f"orientation turns it to {shown[0]}x{shown[1]}; strip the EXIF orientation or re-annotate")
        raise DatasetError(f"{ann_path}: {path.name} is {declared[0]}x{declared[1]} in the json but "
                           f"{shown[0]}x{shown[1]} on disk; the json does not describe these files")


class LetterboxDataset(Dataset):
    """Letterboxed detection inputs: items ``(float32 (3, imgsz, imgsz) RGB in [0, 1], index, LetterboxInfo)``."""

    def __init__(self, image_paths: list[Path], imgsz: int) -> None:
        self.image_paths, self.imgsz = list(image_paths), int(imgsz)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, LetterboxInfo]:
        im, info = letterbox(read_rgb(self.image_paths[i]), self.imgsz)
        return hwc_uint8_to_chw_float(im), i, info


def collate_letterbox(batch: list) -> tuple[torch.Tensor, list[int], list[LetterboxInfo]]:
    """Stack a :class:`LetterboxDataset` batch."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]
