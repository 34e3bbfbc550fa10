"""Calibration sets for PTQ: generated images, real images or noise, always in the model's normalized space."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from dgh.data.classification import (
    ImageFolderDataset,
    balanced_subset,
    is_image_folder,
    scan_image_folder,
)
from dgh.data.images import (
    DatasetError,
    hwc_uint8_to_chw_float,
    letterbox,
    list_images,
    read_rgb_cv2,
)
from dgh.io import IMAGES_FILE, ImagesFileError, load_images
from dgh.models.spec import LoadedModel

NOISE = "noise"
DEFAULT_NOISE_IMAGES = 1024  # the paper code's default N (method.md, defaults table)


def noise_images(loaded: LoadedModel, n_images: int, seed: int = 0) -> torch.Tensor:
    """The noise baseline: i.i.d. N(0, 1) per pixel in normalized space, clamped to the valid pixel range.

    This is DGH's initialization (method.md section 2) without any optimization.

    Returns:
        float32 ``(n_images, 3, H, W)`` with ``(H, W) = spec.input_size``.
    """
    h, w = loaded.spec.input_size
    gen = torch.Generator().manual_seed(seed)
    lo, hi = loaded.spec.pixel_range()
    return torch.randn(n_images, 3, h, w, generator=gen).clamp(lo, hi)


def _subset_rows(images_nchw: torch.Tensor, n_images: int | None) -> torch.Tensor:
    if n_images is None:
        return images_nchw
    if n_images < 1:
        raise DatasetError(f"n_images must be >= 1, got {n_images}")
    return images_nchw[:n_images]


def load_calibration_set(source: str | Path, loaded: LoadedModel, n_images: int | None = None, seed: int = 0,
                         progress: bool = True) -> torch.Tensor:
    """Load a calibration set as one tensor in the model's normalized input space.

    Args:
        source: one of
            - ``"noise"``: :func:`noise_images` (``n_images`` default 1024);
            - an ``images.pt`` file, or a folder holding one (generation output, :func:`dgh.io.load_images`); the
              first ``n_images`` rows;
            - an ImageFolder (``root/<class>/<image>``): a deterministic class-balanced subset
              (:func:`dgh.data.classification.balanced_subset` with ``seed``), eval preprocessing of the model;
            - a folder of images (or a folder with an ``images/`` sub-folder): the first ``n_images`` by name;
              detection models letterbox them to ``spec.input_size`` (pad 114), classifiers use eval preprocessing.
        loaded: the model whose spec defines size and normalization.
        n_images: how many images (``None``: all; 1024 for noise).
        seed: noise seed / ImageFolder per-class shuffle seed.
        progress: tqdm bar while decoding images.

    Returns:
        float32 ``(N, 3, H, W)``, ``(H, W) = spec.input_size``, normalized space.

    Raises:
        DatasetError: missing or empty source, wrong image size in a tensor file, ``n_images`` < 1.
    """
    spec = loaded.spec
    if str(source) == NOISE:
        n = DEFAULT_NOISE_IMAGES if n_images is None else n_images
        if n < 1:
            raise DatasetError(f"n_images must be >= 1, got {n}")
        return noise_images(loaded, n, seed)
    path = Path(source)
    if path.is_dir() and (path / IMAGES_FILE).is_file():
        path = path / IMAGES_FILE
    if path.is_file():
        try:
            images = _subset_rows(load_images(path), n_images)
        except ImagesFileError as exc:
            raise DatasetError(str(exc)) from None
        if tuple(images.shape[-2:]) != tuple(spec.input_size):
            raise DatasetError(f"{path}: images are {tuple(images.shape[-2:])}, {spec.name} takes {spec.input_size}")
        if images.shape[0] == 0:
            raise DatasetError(f"{path} holds no images")
        return images
    if not path.is_dir():
        raise DatasetError(f"calibration source not found: {source} (expected 'noise', images.pt, or an image folder)")
    if n_images is not None and n_images < 1:
        raise DatasetError(f"n_images must be >= 1, got {n_images}")
    if spec.task == "classification" and is_image_folder(path):
        _, files = scan_image_folder(path)
        samples = balanced_subset(files, n_images, seed=seed)
    else:
        folder = path / "images" if (path / "images").is_dir() and not list_images(path) else path
        files_flat = list_images(folder)
        if not files_flat and is_image_folder(folder):  # a detector calibrated on an ImageFolder: all classes
            files_flat = sorted(p for group in scan_image_folder(folder)[1] for p in group)
        samples = [(p, -1) for p in files_flat[:n_images]]
    if not samples:
        raise DatasetError(f"no images found in {path}")
    out = []
    if spec.task == "detection":
        for p, _ in tqdm(samples, desc="calibration images", disable=not progress, leave=False):
            im, _info = letterbox(read_rgb_cv2(p), spec.input_size[0])
            out.append(hwc_uint8_to_chw_float(im))
        return spec.normalize(torch.stack(out))
    ds = ImageFolderDataset(samples, spec.input_size, spec.resize_size, spec.mean, spec.std, spec.interpolation)
    for i in tqdm(range(len(ds)), desc="calibration images", disable=not progress, leave=False):
        out.append(ds[i][0])
    return torch.stack(out)
