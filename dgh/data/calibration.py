"""Calibration sets for PTQ: generated images, real images or noise, always in the model's normalized space."""

from __future__ import annotations

import json
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
    read_rgb,
)
from dgh.io import IMAGES_FILE, ImagesFileError, load_images
from dgh.models.spec import LoadedModel, ModelSpec

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


# Relative tolerance on the valid pixel range: one bfloat16 step (2**-7 relative; bf16 keeps 8 significant bits) of
# the largest normalized magnitude, so fp32, fp16 and bf16 round trips of clamped images pass. For ImageNet
# mean/std that is 0.021 normalized = 1.2 levels of 255; anything further out was not clamped to the pixel range.
RANGE_TOLERANCE = 2.0 ** -7
# Unclamped generators (ZeroQ / GENIE-style ``batch-bns`` / ``image-bns``, ``clamp: false``) optimize pixels
# without the [0, 1] box, so their outputs leave it: measured 0.67 range widths below / 0.51 above after 500
# iterations of batch-bns on ResNet-20 (64 images, lr 16). Allowed: this many range widths on either side, which
# still refuses raw 0..255 pixels (about 57 widths out for ImageNet mean/std) and overflowed values.
UNCLAMPED_MARGIN = 3.0


def validate_calibration_images(images_nchw: torch.Tensor, spec: ModelSpec, source: str | Path,
                                clamped: bool = True) -> torch.Tensor:
    """Check that a calibration tensor is images in ``spec``'s normalized input space; return it as float32.

    Args:
        images_nchw: ``(N, 3, H, W)`` floating tensor, ``(pixel_0_1 - mean) / std``.
        spec: the model (input size, mean/std).
        source: what to name in messages (the file).
        clamped: the images were clamped to the valid pixel range (real images, ``dgh`` generation, noise).
            Values must lie in ``spec.pixel_range()`` widened by :data:`RANGE_TOLERANCE` of the largest
            normalized magnitude. ``False`` (a generator run with ``clamp: false``): values may leave the range by
            :data:`UNCLAMPED_MARGIN` range widths on either side.

    Returns:
        ``images_nchw`` as float32 (a copy only when the dtype changes).

    Raises:
        DatasetError: not a floating tensor (uint8 pixels are named as such), not 4-D, not 3 channels, wrong
            ``(H, W)``, no images, NaN/inf values, values outside the allowed range (with the worst value and
            the allowed interval).
    """
    if not isinstance(images_nchw, torch.Tensor):
        raise DatasetError(f"{source} holds a {type(images_nchw).__name__}, not an (N, 3, H, W) images tensor")
    if not images_nchw.is_floating_point():
        hint = (" (0..255 pixels?)" if images_nchw.dtype == torch.uint8 else "")
        raise DatasetError(f"{source} holds {str(images_nchw.dtype).removeprefix('torch.')} values{hint}; "
                           f"calibration images must be float in {spec.name}'s normalized space "
                           "(pixel/255 - mean) / std")
    if images_nchw.ndim != 4:
        raise DatasetError(f"{source} holds a tensor of shape {tuple(images_nchw.shape)}, expected (N, 3, H, W)")
    if images_nchw.shape[1] != 3:
        raise DatasetError(f"{source} holds {images_nchw.shape[1]}-channel images; {spec.name} takes 3 channels "
                           "(RGB, NCHW)")
    if tuple(images_nchw.shape[-2:]) != tuple(spec.input_size):
        raise DatasetError(f"{source}: images are {tuple(images_nchw.shape[-2:])}, {spec.name} takes "
                           f"{tuple(spec.input_size)}")
    if images_nchw.shape[0] == 0:
        raise DatasetError(f"{source} holds no images")
    x = images_nchw.float()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise DatasetError(f"{source} holds {n_nan} NaN and {n_inf} inf values; regenerate it")
    lo, hi = spec.pixel_range()
    if clamped:
        slack = RANGE_TOLERANCE * torch.maximum(lo.abs(), hi.abs()).amax()
    else:
        slack = UNCLAMPED_MARGIN * (hi - lo)
    lo_ok, hi_ok = lo - slack, hi + slack
    bad = (x < lo_ok) | (x > hi_ok)
    if bool(bad.any()):
        worst = float(x[bad].abs().max())
        raise DatasetError(
            f"{source}: {int(bad.sum())} values outside {spec.name}'s normalized pixel range "
            f"[{float(lo_ok.min()):.3g}, {float(hi_ok.max()):.3g}] (largest |value| {worst:.3g}); calibration "
            "images must be (pixel/255 - mean) / std, not raw 0..255 pixels"
        )
    return x


def generated_unclamped(images_file: Path) -> bool:
    """True when the ``meta.json`` next to ``images_file`` says the generator ran with ``clamp: false``.

    Raises:
        DatasetError: ``meta.json`` exists but is not JSON.
    """
    meta = images_file.parent / "meta.json"
    if not meta.is_file():
        return False
    try:
        settings = json.loads(meta.read_text()).get("settings") or {}
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DatasetError(f"{meta} is not a generation meta.json ({type(exc).__name__})") from None
    return settings.get("clamp") is False


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
        DatasetError: missing or empty source, ``n_images`` < 1, a tensor file that fails
            :func:`validate_calibration_images`, an undecodable or truncated image.
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
            images = load_images(path)
        except ImagesFileError as exc:
            raise DatasetError(str(exc)) from None
        images = validate_calibration_images(images, spec, path, clamped=not generated_unclamped(path))
        return _subset_rows(images, n_images)
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
            im, _info = letterbox(read_rgb(p), spec.input_size[0])
            out.append(hwc_uint8_to_chw_float(im))
        return spec.normalize(torch.stack(out))
    ds = ImageFolderDataset(samples, spec.input_size, spec.resize_size, spec.mean, spec.std, spec.interpolation)
    for i in tqdm(range(len(ds)), desc="calibration images", disable=not progress, leave=False):
        out.append(ds[i][0])
    return torch.stack(out)
