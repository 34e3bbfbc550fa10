"""ImageFolder classification data: ``root/<class>/<image>``, each class folder mapped to a class index by name.

Class folders are matched to the model's class names (:attr:`dgh.models.spec.ModelSpec.class_names`): the CIFAR-10
names for the CIFAR ResNets, the ImageNet wnids (``n01440764`` ...) for ImageNet models. This is the ImageNet-val
layout after the usual re-layout and the CIFAR-10 test JPEG layout. A folder that names no class is an error (never
a position in sort order); a subset of the classes is fine. A numbered layout (folders ``0`` .. ``C-1``, the class
index itself) is used only when asked for (:attr:`ClassLayout.NUMBERED`).
"""

from __future__ import annotations

import random
from enum import Enum
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dgh.data.images import (
    DatasetError,
    classification_transform,
    is_image_file,
    read_pil_rgb,
)


class ClassLayout(str, Enum):
    """How class folders name their class: ``names`` (the model's class names) or ``numbered`` (``0`` .. ``C-1``)."""

    NAMES = "names"
    NUMBERED = "numbered"


def map_class_folders(folders: list[str], class_names: tuple[str, ...] | list[str], num_classes: int,
                      layout: ClassLayout | str = ClassLayout.NAMES, model: str = "the model") -> dict[str, int]:
    """Folder name -> the model's class index.

    Args:
        folders: class folder names.
        class_names: the model's class names in index order (may be empty).
        num_classes: the model's number of outputs.
        layout: ``names``: each folder must equal one class name exactly; ``numbered``: each folder must be a
            decimal integer in ``0..num_classes-1`` (``"007"`` is 7), taken as the class index.
        model: model name for messages.

    Raises:
        DatasetError: a folder that matches no class (named in the message), two folders for one class, or
            ``names`` layout for a model without class names.
    """
    layout = ClassLayout(layout)
    mapping: dict[str, int] = {}
    if layout is ClassLayout.NUMBERED:
        for f in folders:
            if not (f.isascii() and f.isdigit()) or int(f) >= num_classes:
                raise DatasetError(f"class folder {f!r} is not a class index 0..{num_classes - 1} of {model} "
                                   "(numbered layout)")
            mapping[f] = int(f)
    else:
        if not class_names:
            raise DatasetError(f"{model} has no class names to match folders against; name the folders "
                               "0..C-1 and use the numbered class layout")
        index = {n: i for i, n in enumerate(class_names)}
        for f in folders:
            if f not in index:
                hint = ("; folders named 0..C-1 need the numbered class layout" if f.isdigit()
                        else f" (expected names like {', '.join(repr(n) for n in class_names[:3])})")
                raise DatasetError(f"class folder {f!r} names no class of {model}{hint}")
            mapping[f] = index[f]
    seen: dict[int, str] = {}
    for f, i in mapping.items():
        if i in seen:
            raise DatasetError(f"class folders {seen[i]!r} and {f!r} both mean class {i} of {model}")
        seen[i] = f
    return mapping


def scan_image_folder(root: str | Path) -> tuple[list[str], list[list[Path]]]:
    """Class folder names (sorted) and, per folder, its image files sorted by name.

    Raises:
        DatasetError: ``root`` missing, no class folders, or no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"ImageFolder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    files = [sorted(p for p in (root / c).iterdir() if is_image_file(p)) for c in classes]
    if not any(files):
        raise DatasetError(f"{root} has class folders but no images")
    return classes, files


def is_image_folder(root: str | Path) -> bool:
    """True when ``root`` has sub-folders holding images and no images of its own (ImageFolder layout)."""
    root = Path(root)
    if not root.is_dir() or any(is_image_file(p) for p in root.iterdir()):
        return False
    return any(p.is_dir() and any(is_image_file(q) for q in p.iterdir()) for p in root.iterdir())


def balanced_subset(files_per_class: list[list[Path]], n: int | None, seed: int | None = None) -> list[tuple[Path, int]]:
    """A deterministic, class-balanced subset of ``(path, class_index)`` samples.

    Classes are visited round-robin (class 0's first file, class 1's first file, ..., class 0's second file, ...),
    so any prefix holds per-class counts that differ by at most one (a class that runs out is skipped).
    ``seed=None`` keeps each class's files in name order; an int shuffles each class's list with
    ``random.Random(seed + class_index)`` first.

    Args:
        files_per_class: per class, its files.
        n: number of samples; ``None`` or >= total: all samples (in round-robin order).
        seed: see above.

    Returns:
        A list of ``(path, class_index)`` of length ``min(n, total)``.

    Raises:
        DatasetError: ``n`` < 1.
    """
    if n is not None and n < 1:
        raise DatasetError(f"subset size must be >= 1, got {n}")
    lists = []
    for c, files in enumerate(files_per_class):
        files = list(files)
        if seed is not None:
            random.Random(seed + c).shuffle(files)
        lists.append(files)
    out: list[tuple[Path, int]] = []
    total = sum(len(f) for f in lists)
    limit = total if n is None else min(n, total)
    depth = 0
    while len(out) < limit:
        for c, files in enumerate(lists):
            if depth < len(files) and len(out) < limit:
                out.append((files[depth], c))
        depth += 1
    return out


class ImageFolderDataset(Dataset):
    """``(image_float_chw, class_index)`` samples with the model's eval preprocessing.

    Args:
        samples: ``(path, class_index)`` pairs.
        input_size, resize_size, interpolation: see :func:`dgh.data.images.classification_transform`.
        mean, std: per-channel normalization; items are ``(pixels_0_1 - mean) / std``, float32 ``(3, H, W)``.
    """

    def __init__(self, samples: list[tuple[Path, int]], input_size: tuple[int, int], resize_size: int | None,
                 mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bilinear") -> None:
        self.samples = samples
        self.transform = classification_transform(input_size, resize_size, interpolation)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return (self.transform(read_pil_rgb(path)) - self.mean) / self.std, label
