"""Top-1 / top-5 accuracy on an ImageFolder (``root/<class>/<image>``, class folders matched to the model's classes
by name, :func:`dgh.data.classification.map_class_folders`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dgh.data.classification import (
    ClassLayout,
    ImageFolderDataset,
    balanced_subset,
    map_class_folders,
    scan_image_folder,
)
from dgh.data.images import DatasetError
from dgh.env import resolve_device
from dgh.models.spec import ModelSpec


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` largest logits, for each ``k`` (capped at the class count).

    Args:
        logits: ``(N, C)`` float.
        labels: ``(N,)`` int64 class indices.

    Returns:
        ``{k: count}`` (ints).
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def worker_errors(batches: Iterable) -> Iterator:
    """Iterate a DataLoader, re-raising a :class:`DatasetError` from a worker process with its own one-line message.

    PyTorch re-raises worker exceptions as ``"Caught DatasetError in DataLoader worker process 0. Original
    Traceback ..."``; the last line of that text is the original ``DatasetError: <message>``.
    """
    try:
        yield from batches
    except DatasetError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        if len(lines) > 1:
            raise DatasetError(lines[-1].split("Error: ", 1)[-1].strip()) from None
        raise


def default_num_workers() -> int:
    """DataLoader workers: 0 on machines with <= 2 CPUs (decode in-process), else ``min(8, cpus - 1)``."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


def evaluate_classification(model: nn.Module, spec: ModelSpec, data_dir: str | Path, limit: int | None = None,
                            batch_size: int = 256, device: str | None = None, progress: bool = True,
                            num_workers: int | None = None, amp: bool = True,
                            class_layout: ClassLayout | str = ClassLayout.NAMES) -> dict:
    """Top-1 and top-5 accuracy of ``model`` on an ImageFolder, with the model's eval preprocessing.

    Args:
        model: float or quantized classifier; input normalized NCHW float32, output logits ``(N, num_classes)``.
        spec: the model's :class:`ModelSpec` (input size, resize, mean/std, ``num_classes``).
        data_dir: ImageFolder root; each class folder names one of ``spec.class_names`` (any subset of them).
        limit: evaluate a deterministic class-balanced subset of this many images
            (:func:`dgh.data.classification.balanced_subset`, files in name order); ``None``: all images.
        batch_size: images per forward pass.
        device: ``None``/``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
        progress: tqdm bar.
        num_workers: DataLoader workers (default :func:`default_num_workers`).
        amp: fp16 autocast on CUDA (ignored on CPU, which always runs float32).
        class_layout: ``names`` (default) or ``numbered`` (folders ``0..C-1`` are class indices); see
            :func:`dgh.data.classification.map_class_folders`.

    Returns:
        ``{"top1": percent, "top5": percent, "n_images": int, "top1_correct": int, "top5_correct": int}``.

    Raises:
        DatasetError: missing folder, no images, a class folder that names no class of the model, ``limit`` < 1,
            an undecodable or truncated image.
    """
    folders, files = scan_image_folder(data_dir)
    mapping = map_class_folders(folders, spec.class_names, spec.num_classes, class_layout, spec.name)
    samples = [(path, mapping[folders[c]]) for path, c in balanced_subset(files, limit)]
    dataset = ImageFolderDataset(samples, spec.input_size, spec.resize_size, spec.mean, spec.std, spec.interpolation)
    dev = resolve_device(device)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    model = model.eval().to(dev)
    correct = {1: 0, 5: 0}
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp and dev.type == "cuda"):
        for images, labels in worker_errors(tqdm(loader, desc=f"eval {spec.name}", disable=not progress,
                                                 leave=False)):
            logits = model(images.to(dev, non_blocking=True)).float()
            for k, v in topk_correct(logits, labels.to(dev)).items():
                correct[k] += v
    n = len(dataset)
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n, "n_images": n,
            "top1_correct": correct[1], "top5_correct": correct[5]}
