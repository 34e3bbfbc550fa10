"""Image decoding and the two preprocessings: classification (resize + center crop) and detection (letterbox).

Conventions:
- Classification follows torchvision (PIL decode, ``Resize(resize_size)`` + ``CenterCrop(input_size)``, ``ToTensor``).
- Detection follows YOLOv5 ``val.py`` (v6.1): OpenCV decode, resize so the long side equals ``imgsz``
  (``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging), then pad to ``imgsz x imgsz`` with gray 114,
  the padding split evenly (``top = round(dh - 0.1)``, ``bottom = round(dh + 0.1)``). Read, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LETTERBOX_PAD_VALUE = 114


class DatasetError(ValueError):
    """A dataset folder, annotation file or image could not be used. The message is one actionable line."""


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is a known image extension (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Raises:
        DatasetError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def read_rgb_cv2(path: str | Path) -> np.ndarray:
    """Decode an image with OpenCV as RGB ``uint8`` ``(H, W, 3)``.

    Raises:
        DatasetError: the file cannot be decoded.
    """
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise DatasetError(f"cannot decode image {path}")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original image maps into the letterboxed network input.

    ``x_net = x_orig * ratio_w + pad_left`` and ``y_net = y_orig * ratio_h + pad_top`` (pixels).
    """

    orig_hw: tuple[int, int]
    ratio_w: float
    ratio_h: float
    pad_left: int
    pad_top: int

    def boxes_to_original(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Map ``(K, 4)`` network-frame ``x1 y1 x2 y2`` pixels to original-image pixels, clipped to the image."""
        out = boxes_xyxy.clone().float()
        out[:, [0, 2]] = ((out[:, [0, 2]] - self.pad_left) / self.ratio_w).clamp(0, self.orig_hw[1])
        out[:, [1, 3]] = ((out[:, [1, 3]] - self.pad_top) / self.ratio_h).clamp(0, self.orig_hw[0])
        return out


def letterbox(image_rgb_hwc: np.ndarray, imgsz: int) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize (long side = ``imgsz``, aspect kept) and pad with 114 to ``imgsz x imgsz`` (YOLOv5 val convention).

    Args:
        image_rgb_hwc: ``uint8`` ``(H0, W0, 3)``.
        imgsz: target square size in pixels.

    Returns:
        ``(uint8 (imgsz, imgsz, 3), LetterboxInfo)``.
    """
    import cv2

    h0, w0 = image_rgb_hwc.shape[:2]
    r = imgsz / max(h0, w0)
    im = image_rgb_hwc
    if r != 1:
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        im = cv2.resize(im, (max(1, int(w0 * r)), max(1, int(h0 * r))), interpolation=interp)
    h, w = im.shape[:2]
    dw, dh = (imgsz - w) / 2, (imgsz - h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(LETTERBOX_PAD_VALUE,) * 3)
    return im, LetterboxInfo((h0, w0), w / w0, h / h0, left, top)


def hwc_uint8_to_chw_float(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> ``float32 (3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class _FitToSize:
    """PIL image at ``size`` (H, W) unchanged; otherwise Resize(min(size)) + CenterCrop(size). Picklable."""

    def __init__(self, size: tuple[int, int], mode) -> None:  # noqa: ANN001 - torchvision InterpolationMode
        self.size, self.mode = size, mode

    def __call__(self, img):  # noqa: ANN001, ANN204 - PIL in, PIL out
        from torchvision import transforms as T

        if (img.height, img.width) == self.size:
            return img
        return T.CenterCrop(self.size)(T.Resize(min(self.size), interpolation=self.mode, antialias=True)(img))


def classification_transform(input_size: tuple[int, int], resize_size: int | None, interpolation: str = "bilinear"):  # noqa: ANN201
    """The torchvision eval transform: PIL image -> ``float32 (3, H, W)`` in [0, 1] (normalization not applied).

    ``resize_size`` set: ``Resize(resize_size)`` (shorter side) then ``CenterCrop(input_size)``. ``None``: images
    already at ``input_size`` pass unchanged; others are resized and center-cropped to ``input_size``.
    """
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    steps = []
    if resize_size is not None:
        steps += [T.Resize(resize_size, interpolation=mode, antialias=True), T.CenterCrop(input_size)]
    else:
        steps.append(_FitToSize(tuple(input_size), mode))
    steps.append(T.ToTensor())
    return T.Compose(steps)


def read_pil_rgb(path: str | Path):  # noqa: ANN201 - PIL.Image.Image
    """Open an image with PIL as RGB.

    Raises:
        DatasetError: the file cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DatasetError(f"cannot decode image {path} ({type(exc).__name__})") from None
