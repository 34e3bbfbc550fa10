"""Image decoding and the two preprocessings: classification (resize + center crop) and detection (letterbox).

Conventions:
- Every loader decodes with :func:`read_pil_rgb`: PIL, EXIF orientation applied (the displayed image, as
  ultralytics' ``exif_size`` / ``exif_transpose`` assume for YOLO labels), 8-bit RGB, truncated files refused.
  Image sizes used for ground truth come from :func:`oriented_size`, the same frame.
- Classification follows torchvision (PIL decode, ``Resize(resize_size)`` + ``CenterCrop(input_size)``, ``ToTensor``).
- Detection follows YOLOv5 ``val.py`` (v6.1): resize so the long side equals ``imgsz``
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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# EXIF orientations 5..8 transpose the stored pixels (width and height swap); 2..4 only mirror or rotate by 180.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(image) -> int:  # noqa: ANN001 - PIL.Image.Image
    """The EXIF orientation tag (1..8) of an opened PIL image; 1 when absent or invalid."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block means "no orientation", as for PIL's exif_transpose
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image *as displayed*: the header size, swapped for EXIF orientations 5..8.

    Reads only the header, not the pixels. This is the frame of :func:`read_rgb`'s output.

    Raises:
        DatasetError: the file is not an image PIL can open.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if exif_orientation(im) in TRANSPOSING_ORIENTATIONS else (w, h)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError) as exc:
        raise DatasetError(f"cannot read image {path}: {_not_image(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def _not_image(exc: BaseException) -> str:
    # ultralytics patches PIL.Image.open to retry an unidentified file with an optional HEIF plugin; without the
    # plugin that retry raises ImportError instead of PIL's UnidentifiedImageError.
    if isinstance(exc, ImportError):
        return "not an image format PIL can decode"
    return _reason(exc)


def _to_rgb(im, path: str | Path):  # noqa: ANN001, ANN202 - PIL in, PIL out
    """8-bit RGB from any PIL mode, or a :class:`DatasetError`.

    - 16-bit grayscale (``I;16*``): ``round(v / 257)`` (65535 -> 255), then gray -> RGB. PIL's own ``convert``
      clips at 255 instead of scaling.
    - 32-bit integer ``I`` and float ``F``: no defined 8-bit scale (a PNG or TIFF can hold any range): refused.
    - Alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``): dropped, as torchvision's ``pil_loader`` does.
    - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``P``, ``1``, ``L``: PIL's conversion to RGB.
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(im, dtype=np.uint16).astype(np.uint32)
        gray8 = ((gray * 2 + 257) // 514).astype(np.uint8)  # round(v / 257) in integers
        return Image.fromarray(np.repeat(gray8[..., None], 3, axis=2), "RGB")
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "32-bit float"
        raise DatasetError(f"{path} is a {kind} image (mode {im.mode}) with no defined 8-bit scale; "
                           "convert it to 8-bit RGB first")
    try:
        if im.mode in ("La", "PA"):
            im = im.convert("RGBA")
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DatasetError(f"cannot convert {path} (mode {im.mode}) to RGB: {_reason(exc)}; "
                           "convert it to 8-bit RGB first") from None


def read_pil_rgb(path: str | Path):  # noqa: ANN201 - PIL.Image.Image
    """Decode an image fully as 8-bit RGB with PIL, upright (EXIF orientation applied), the one decoder that every
    loader (classification, detection, calibration) uses.

    Returns:
        a PIL ``RGB`` image in the displayed orientation: ``size == oriented_size(path)``.

    Raises:
        DatasetError: missing, undecodable or truncated file (PIL refuses truncated files unless the global
            ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, which is then also refused here), or a mode without an
            8-bit meaning (see :func:`_to_rgb`).
    """
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # some library switched PIL to silently accept truncated files
        raise DatasetError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process; truncated images would "
                           "be used silently. Unset it before loading data")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: raises on a truncated file
            upright = ImageOps.exif_transpose(im)
            return _to_rgb(upright, path)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError) as exc:
        reason = _not_image(exc)
        if "truncated" in reason.lower():
            raise DatasetError(f"image {path} is truncated ({reason}); re-copy or delete it") from None
        raise DatasetError(f"cannot decode image {path}: {reason}") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """:func:`read_pil_rgb` as ``uint8 (H, W, 3)`` RGB (displayed orientation).

    Raises:
        DatasetError: see :func:`read_pil_rgb`.
    """
    return np.asarray(read_pil_rgb(path))


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
