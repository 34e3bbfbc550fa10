"""The image pipeline (method.md section 2): canvas, flip, 3x3 Gaussian smoothing, crop, straight-through clamp.

Images live as canvases ``(n, 3, H+p, W+p)`` in the model's normalized space. The *training view* ``T(x)`` feeds
the model at every optimization step (flip -> smoothing -> random H x W crop -> clamp); the *final view* ``F(x)``
(smoothing -> center crop -> clamp) is what generation returns and saves. Every part can be switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gaussian_kernel_3x3(sigma: float = 1.25) -> torch.Tensor:
    """Normalized 3x3 Gaussian kernel, float32 ``(3, 3)``: ``k[i, j] ∝ exp(-(i^2 + j^2) / (2 sigma^2))`` for
    ``i, j in {-1, 0, 1}``, divided by its sum (paper code: sigma 1.25).

    Raises:
        ValueError: sigma <= 0.
    """
    if sigma <= 0:
        raise ValueError(f"smoothing sigma must be > 0, got {sigma}")
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


def smooth(images_nchw: torch.Tensor, kernel_3x3: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 convolution with zero padding 1 (same size out): ``(n, C, H, W) -> (n, C, H, W)``."""
    c = images_nchw.shape[1]
    weight = kernel_3x3.to(images_nchw).expand(c, 1, 3, 3)
    return F.conv2d(images_nchw, weight, padding=1, groups=c)


def ste_clamp(images_nchw: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clamp to ``[lo, hi]`` (broadcast, e.g. ``(1, C, 1, 1)``) in the forward pass; identity gradient (straight
    through) in the backward pass: ``x + (clamp(x) - x).detach()``."""
    clamped = torch.maximum(torch.minimum(images_nchw, hi.to(images_nchw)), lo.to(images_nchw))
    return images_nchw + (clamped - images_nchw).detach()


def crop(images_nchw: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """``images[..., top:top+h, left:left+w]``."""
    return images_nchw[:, :, top : top + h, left : left + w]


@dataclass
class ImagePipeline:
    """Training and final views of canvases.

    Attributes:
        out_hw: ``(H, W)`` of the model input in pixels.
        pad: p; canvases are ``(H+p, W+p)``.
        lo, hi: valid pixel range in normalized space, ``(1, 3, 1, 1)`` (``ModelSpec.pixel_range``).
        flip, smoothing, random_crop, clamp: switches; with ``random_crop`` off the training view is center-cropped.
        per_image: draw flip and crop per image instead of once per batch step.
        sigma: smoothing sigma.
    """

    out_hw: tuple[int, int]
    pad: int
    lo: torch.Tensor
    hi: torch.Tensor
    flip: bool = True
    smoothing: bool = True
    random_crop: bool = True
    clamp: bool = True
    per_image: bool = False
    sigma: float = 1.25

    def __post_init__(self) -> None:
        self.kernel = gaussian_kernel_3x3(self.sigma)

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return (self.out_hw[0] + self.pad, self.out_hw[1] + self.pad)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return ste_clamp(x, self.lo, self.hi) if self.clamp else x

    def final_view(self, canvas_nchw: torch.Tensor) -> torch.Tensor:
        """``F(x)``: smoothing -> center crop -> clamp. ``(n, 3, H+p, W+p) -> (n, 3, H, W)``."""
        x = smooth(canvas_nchw, self.kernel) if self.smoothing else canvas_nchw
        h, w = self.out_hw
        top, left = self.pad // 2, self.pad // 2
        return self._finish(crop(x, top, left, h, w))

    def train_view(self, canvas_nchw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``T(x)``: random flip (p = 0.5) -> smoothing -> random crop -> clamp, draws from ``generator`` (CPU).

        ``(n, 3, H+p, W+p) -> (n, 3, H, W)``; differentiable w.r.t. the canvas (the clamp passes gradient).
        """
        n = canvas_nchw.shape[0]
        x = canvas_nchw
        if self.flip:
            if self.per_image:
                mask = torch.rand(n, generator=generator) < 0.5
                if bool(mask.any()):
                    m = mask.to(x.device).view(n, 1, 1, 1)
                    x = torch.where(m, x.flip(3), x)
            elif float(torch.rand(1, generator=generator)) < 0.5:
                x = x.flip(3)
        if self.smoothing:
            x = smooth(x, self.kernel)
        h, w = self.out_hw
        if self.random_crop and self.pad > 0:
            if self.per_image:
                tops = torch.randint(0, self.pad + 1, (n,), generator=generator).tolist()
                lefts = torch.randint(0, self.pad + 1, (n,), generator=generator).tolist()
                x = torch.cat([crop(x[i : i + 1], t, l, h, w) for i, (t, l) in enumerate(zip(tops, lefts))])
            else:
                t, l = torch.randint(0, self.pad + 1, (2,), generator=generator).tolist()
                x = crop(x, t, l, h, w)
        else:
            x = crop(x, self.pad // 2, self.pad // 2, h, w)
        return self._finish(x)


def init_canvases(
    n: int, canvas_hw: tuple[int, int], lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Initialization (method.md section 2): i.i.d. N(0, 1) per pixel in normalized space, clamped to
    ``[lo, hi]``; with ``affine = (scale, shift)`` (each ``(1, 3, 1, 1)``, :func:`dgh.generation.config.init_affine`)
    the draw is ``scale * z + shift`` before the clamp. Returns float32 ``(n, 3, *canvas_hw)`` on CPU."""
    x = torch.randn((n, 3, *canvas_hw), generator=generator, dtype=torch.float32)
    if affine is not None:
        x.mul_(affine[0]).add_(affine[1])  # in place: no second N-sized tensor
    return x.clamp_(min=lo.to(x), max=hi.to(x))


def batch_slices(n_images: int, batch_size: int) -> list[slice]:
    """Split ``range(n_images)`` into ``ceil(n_images / batch_size)`` contiguous batches; the last may be smaller."""
    return [slice(i, min(i + batch_size, n_images)) for i in range(0, n_images, batch_size)] or [slice(0, 0)]

