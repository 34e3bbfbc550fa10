"""COCO bbox mAP of a detector (float or quantized) with YOLOv5 ``val.py`` conventions and pycocotools.

Pipeline: letterbox to ``imgsz`` (pad 114) -> model -> raw per-level outputs -> ``loaded.decode`` (float) ->
:func:`non_max_suppression` (conf 0.001, IoU 0.6, class-aware, multi-label, max 300) -> boxes mapped back to the
original image -> pycocotools ``COCOeval`` (bbox). ``map`` = mAP@[.5:.95] = ``stats[0]``, ``map50`` = ``stats[1]``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dgh.data.detection import LetterboxDataset, collate_letterbox, load_detection_data
from dgh.env import resolve_device
from dgh.evaluation.classification import default_num_workers, worker_errors
from dgh.models.spec import LoadedModel

CONF_THRESHOLD = 0.001
IOU_THRESHOLD = 0.6
MAX_DETECTIONS = 300
MAX_NMS_CANDIDATES = 30000  # YOLOv5 max_nms: boxes kept (by score) before NMS


def non_max_suppression(decoded: torch.Tensor, conf_threshold: float = CONF_THRESHOLD,
                        iou_threshold: float = IOU_THRESHOLD, max_det: int = MAX_DETECTIONS,
                        multi_label: bool = True) -> list[torch.Tensor]:
    """Class-aware NMS per image (YOLOv5 ``utils/general.py::non_max_suppression`` semantics, v6.1).

    Args:
        decoded: ``(N, A, 4 + nc)``: ``x1 y1 x2 y2`` pixels, then per-class scores in [0, 1] (objectness included).
        conf_threshold: keep (box, class) pairs with score > this.
        iou_threshold: IoU above which a lower-scored box of the same class is suppressed.
        max_det: detections kept per image, best first.
        multi_label: one candidate per (box, class) pair above the threshold (YOLOv5 val); else only the best class.

    Returns:
        Per image a ``(K, 6)`` float32 tensor ``x1 y1 x2 y2 score class``, sorted by score descending, K <= max_det.
    """
    out = []
    for x in decoded.float():
        boxes, scores = x[:, :4], x[:, 4:]
        if multi_label:
            i, j = (scores > conf_threshold).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.float()), 1)[conf.view(-1) > conf_threshold]
        if det.shape[0] > MAX_NMS_CANDIDATES:
            det = det[det[:, 4].argsort(descending=True)[:MAX_NMS_CANDIDATES]]
        if det.shape[0] == 0:
            out.append(det.new_zeros((0, 6)))
            continue
        keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_threshold)[:max_det]
        out.append(det[keep])
    return out


def coco_map(coco_gt_dict: dict, detections: list[dict], verbose: bool = False) -> dict:
    """pycocotools bbox evaluation.

    Args:
        coco_gt_dict: COCO ground truth (``images``, ``annotations``, ``categories``).
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}, ...]``.
        verbose: let pycocotools print (its loading messages and the 12-line summary).

    Returns:
        ``{"map": mAP@[.5:.95], "map50": mAP@.5, "stats": [12 COCOeval stats]}``, all in 0-1. No detections:
        ``map = map50 = 0`` (pycocotools' ``loadRes([])`` would raise). A category set with no ground truth
        gives -1 from pycocotools, reported as 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"map": 0.0, "map50": 0.0, "stats": [0.0] * 12}
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        gt = COCO()
        gt.dataset = {"info": {}, "licenses": [], **coco_gt_dict}
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(int(im["id"]) for im in coco_gt_dict["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {"map": max(stats[0], 0.0), "map50": max(stats[1], 0.0), "stats": stats}


def evaluate_coco(model: nn.Module, loaded: LoadedModel, images_dir: str | Path, annotations: str | Path | None = None,
                  labels: str | Path | None = None, imgsz: int | None = None, batch_size: int = 16,
                  device: str | None = None, progress: bool = True, num_workers: int | None = None,
                  verbose: bool = False, amp: bool = True, limit: int | None = None, multi_label: bool = True) -> dict:
    """COCO mAP of ``model`` on an image folder with COCO json or YOLO-label ground truth.

    Args:
        model: the float model or a quantized one with the same forward contract (raw per-level outputs).
        loaded: supplies ``decode`` (float post-processing) and the class names / count.
        images_dir: image folder.
        annotations: COCO instances json (original category ids), or
        labels: YOLO label folder (``class cx cy w h`` normalized, optional ``data.yaml``).
        imgsz: letterbox size in pixels (multiple of 32); default ``loaded.spec.input_size[0]``.
        batch_size: images per forward pass.
        device: ``None``/``"auto"``, ``"cpu"``, ``"cuda"``.
        progress: tqdm bar.
        num_workers: DataLoader workers (default: 0 on <= 2 CPUs).
        verbose: show pycocotools' output.
        amp: fp16 autocast on CUDA (decode and NMS always run in float32).
        limit: evaluate only the first ``limit`` images (by file name) and their ground truth.
        multi_label: NMS candidates per (box, class) pair (YOLOv5 val, default) or best class only.

    Returns:
        ``{"map": 0-1, "map50": 0-1, "n_images": int, "n_detections": int, "imgsz": int}``.

    Raises:
        DatasetError: bad folders / annotation files (see :func:`dgh.data.detection.load_detection_data`).
        ValueError: ``loaded`` has no ``decode`` (not a detector), or ``imgsz`` not a multiple of 32.
    """
    if loaded.decode is None or loaded.spec.task != "detection":
        raise ValueError(f"{loaded.spec.name} is not a detection model (no decode); use evaluate-imagenet")
    imgsz = int(imgsz or loaded.spec.input_size[0])
    if imgsz <= 0 or imgsz % 32:
        raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    data = load_detection_data(images_dir, annotations, labels, loaded.spec.class_names, loaded.spec.num_classes)
    paths, image_ids = data.image_paths, data.image_ids
    gt = data.coco_gt
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        paths, image_ids = paths[:limit], image_ids[:limit]
        keep = set(image_ids)
        gt = {**gt, "images": [im for im in gt["images"] if int(im["id"]) in keep],
              "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in keep]}
    dev = resolve_device(device)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(LetterboxDataset(paths, imgsz), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_letterbox)
    model = model.eval().to(dev)
    detections: list[dict] = []
    with torch.inference_mode():
        for images, idx, infos in worker_errors(tqdm(loader, desc=f"eval {loaded.spec.name}", disable=not progress,
                                                     leave=False)):
            images = loaded.spec.normalize(images.to(dev))
            with torch.autocast(dev.type, dtype=torch.float16, enabled=amp and dev.type == "cuda"):
                raw = model(images)
            decoded = loaded.decode([r.float() for r in raw])
            for det, i, info in zip(non_max_suppression(decoded, multi_label=multi_label), idx, infos):
                detections.extend(_to_coco_records(det.cpu(), info, image_ids[i], data.class_to_category))
    metrics = coco_map(gt, detections, verbose=verbose)
    return {"map": metrics["map"], "map50": metrics["map50"], "n_images": len(paths),
            "n_detections": len(detections), "imgsz": imgsz}


def _to_coco_records(det: torch.Tensor, info, image_id: int, class_to_category: dict[int, int]) -> list[dict]:  # noqa: ANN001
    """``(K, 6)`` network-frame detections -> COCO result dicts in original-image ``[x, y, w, h]`` pixels."""
    if det.shape[0] == 0:
        return []
    boxes = info.boxes_to_original(det[:, :4])
    records = []
    for (x1, y1, x2, y2), score, cls in zip(boxes.tolist(), det[:, 4].tolist(), det[:, 5].long().tolist()):
        cat = class_to_category.get(cls)
        if cat is None:
            continue
        records.append({"image_id": int(image_id), "category_id": int(cat),
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": round(score, 5)})
    return records
