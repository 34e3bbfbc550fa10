"""Ultralytics anchor-free detectors (YOLOv8, YOLO11, ...) built through the ``ultralytics`` package.

- ``weights`` is a local ultralytics ``.pt`` (loaded with ultralytics' allow-list ``weights_only`` loader when the
  installed version supports it) or a model ``.yaml`` (``yolov8n.yaml`` resolves inside the package; random weights).
  A bare registry name (``yolov8n``) would resolve to ``yolov8n.pt``, which ultralytics downloads: that fails fast.
- :class:`RawDetectionModel` runs the ultralytics network but returns the Detect head's **raw** per-level outputs
  ``cat(box_head_i(x_i), cls_head_i(x_i))``: ``(N, 4*reg_max + nc, H_i, W_i)``, before DFL and sigmoid. It calls
  the head's convolution branches directly, so no module is put in training mode (BN keeps its running statistics).
- :func:`decode_dfl` is the float post-processing (ultralytics ``Detect._inference``: DFL expectation,
  ``dist2bbox``, sigmoid scores), written from the formulas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgh.errors import first_line
from dgh.models.loading import (
    RANDOM_WEIGHTS,
    ModelLoadError,
    detection_spec,
    sniff_checkpoint_family,
)
from dgh.models.registry import register_file_family, register_model
from dgh.models.spec import LoadedModel, ModelSpec

ULTRALYTICS_NAMES = tuple(f"{v}{s}" for v in ("yolov8", "yolo11") for s in "nsmlx")


class RawDetectionModel(nn.Module):
    """Wraps an ultralytics ``DetectionModel`` (``self.net``) to return raw head outputs.

    Forward: ``(N, 3, H, W)`` float32 RGB in [0, 1] (H, W multiples of 32) ->
    ``list[(N, 4*reg_max + nc, H/s_i, W/s_i)]``, one per stride ``s_i`` in ``self.stride``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        head = net.model[-1]
        if not (hasattr(head, "cv2") and hasattr(head, "cv3") and hasattr(head, "reg_max")):
            raise ValueError(f"{type(head).__name__} is not an ultralytics Detect head")
        if type(head).__name__ not in ("Detect", "v10Detect"):
            raise ValueError(f"only plain detection models are supported, got a {type(head).__name__} head")
        self.nc, self.reg_max, self.nl = int(head.nc), int(head.reg_max), int(head.nl)
        self.register_buffer("stride", head.stride.detach().float().clone(), persistent=False)

    def forward(self, images_nchw: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102 - see class docstring
        layers = self.net.model
        outputs: list[Any] = []
        x: Any = images_nchw
        save = set(self.net.save)
        for m in layers[:-1]:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in save else None)
        head = layers[-1]
        feats = [x if j == -1 else outputs[j] for j in head.f]
        return [torch.cat((head.cv2[i](feats[i]), head.cv3[i](feats[i])), 1) for i in range(self.nl)]


def decode_dfl(raw: list[torch.Tensor], strides: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Decode anchor-free YOLO raw outputs into boxes and scores.

    For each cell centre ``(gx + 0.5, gy + 0.5)`` of a level with stride ``s``: each side distance
    ``d = sum_k k * softmax(box logits)_k`` (distribution focal loss expectation, GFL / YOLOv8; ``d`` = the raw value
    when ``reg_max == 1``); ``x1 = (cx - d_l) s``, ``y1 = (cy - d_t) s``, ``x2 = (cx + d_r) s``, ``y2 = (cy + d_b) s``;
    scores = ``sigmoid(cls logits)``.

    Args:
        raw: per level ``(N, 4*reg_max + nc, H_i, W_i)``.
        strides: ``(nl,)`` pixels per cell.
        reg_max: DFL bins per side.

    Returns:
        ``(N, sum_i H_i W_i, 4 + nc)`` float32: ``x1, y1, x2, y2`` input pixels, then class scores in [0, 1].
    """
    out = []
    for i, x in enumerate(raw):
        n, c, h, w = x.shape
        x = x.float().flatten(2)  # (N, C, HW)
        box, cls = x[:, : 4 * reg_max], x[:, 4 * reg_max :]
        if reg_max > 1:
            bins = torch.arange(reg_max, device=x.device, dtype=torch.float32).view(1, 1, reg_max, 1)
            dist = (box.view(n, 4, reg_max, h * w).softmax(2) * bins).sum(2)  # (N, 4, HW)
        else:
            dist = box
        gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        centre = torch.stack((gx.flatten(), gy.flatten()), 0).float().unsqueeze(0) + 0.5  # (1, 2, HW)
        s = strides[i].to(x.device).float()
        boxes = torch.cat((centre - dist[:, :2], centre + dist[:, 2:]), 1) * s  # (N, 4, HW)
        out.append(torch.cat((boxes, cls.sigmoid()), 1).transpose(1, 2))
    return torch.cat(out, 1)


def load_ultralytics(source: str) -> tuple[nn.Module, dict]:
    """Build an ultralytics detection network from a local ``.pt`` or a model ``.yaml``.

    Args:
        source: path to a ``.pt`` checkpoint, or a ``.yaml`` path / packaged config name (``yolov8n.yaml``).

    Returns:
        ``(net, info)``: the ultralytics ``DetectionModel`` (float32, eval) and ``{"names": [...], "yaml": dict}``.

    Raises:
        ModelLoadError: missing file, a name that would download, not an ultralytics checkpoint.
    """
    suffix = Path(source).suffix.lower()
    if suffix in (".yaml", ".yml"):
        from ultralytics.nn.tasks import DetectionModel  # optional dependency, 6.3 s to import (measured, loaded 2-core CPU): only when used

        try:
            net = DetectionModel(source, verbose=False)
        except Exception as exc:  # noqa: BLE001 - ultralytics raises assorted errors for a bad yaml
            raise ModelLoadError(f"cannot build an ultralytics model from {source} ({type(exc).__name__}: {exc})"[:300]) from None
    elif suffix == ".pt":
        if not Path(source).is_file() and Path(source).parent != Path("."):
            raise ModelLoadError(f"weights file not found: {source} (pass --weights PATH to an existing .pt)")
        if not Path(source).is_file():
            raise ModelLoadError(
                f"{source} is not a local file; ultralytics would download it. Offline, pass --weights PATH to a "
                f"local .pt (or a model .yaml such as {Path(source).stem}.yaml for random weights)"
            )
        from ultralytics.nn import tasks  # optional dependency, 6.3 s to import (measured, loaded 2-core CPU): only when used

        safe = bool(getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False))
        try:
            ckpt, _ = tasks.torch_safe_load(source, safe_only=safe) if safe else tasks.torch_safe_load(source)
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            raise ModelLoadError(f"{source} is not a loadable ultralytics checkpoint ({first_line(exc)})") from None
        net = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
        if not isinstance(net, nn.Module):
            raise ModelLoadError(f"{source} holds no ultralytics model")
        net = net.float()
    else:
        raise ModelLoadError(f"{source}: expected an ultralytics .pt or .yaml")
    names = getattr(net, "names", None) or {}
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), {"names": names, "yaml": dict(getattr(net, "yaml", {}) or {})}


def ultralytics_spec(name: str) -> ModelSpec:
    """The spec of an ultralytics detector ``name`` at imgsz 640 (classes known once loaded)."""
    return detection_spec(name, "ultralytics", default_weights=f"{name}.pt (download; offline pass --weights PATH.pt or {name}.yaml)")


def load_ultralytics_file(name: str, source: str, imgsz: int | None) -> LoadedModel:
    """Load an ultralytics ``.pt`` checkpoint or build a model ``.yaml`` (random weights) as detector ``name``."""
    if sniff_checkpoint_family(source) == "yolov5_classic":  # ultralytics would try to download a 'u' model
        raise ModelLoadError(f"{source} is a classic YOLOv5 checkpoint; use --model yolov5n/s/m/l/x with --weights {source}")
    net, info = load_ultralytics(source)
    try:
        model = RawDetectionModel(net)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    names = tuple(info["names"]) if len(info["names"]) == model.nc else ()
    spec = detection_spec(name, "ultralytics", imgsz, names, model.nc, ultralytics_spec(name).default_weights)
    strides, reg_max = model.stride.clone(), model.reg_max
    weights = source if source.lower().endswith(".pt") else None
    return LoadedModel(spec=spec, model=model, decode=lambda raw: decode_dfl(raw, strides, reg_max), weights=weights,
                       extra={"strides": strides.tolist(), "reg_max": reg_max, "yaml": info["yaml"], "source": source})


def load_ultralytics_name(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    """Load registry name ``name`` (``yolov8n`` ...) from a local ``.pt``, or ``random`` weights from its yaml."""
    if weights is None:
        raise ModelLoadError(
            f"{name} resolves to {name}.pt, which ultralytics would download; offline, pass --weights PATH to a local "
            f"{name}.pt (or --weights {name}.yaml / random for random weights)"
        )
    return load_ultralytics_file(name, f"{name}.yaml" if weights == RANDOM_WEIGHTS else str(weights), imgsz)


for _name in ULTRALYTICS_NAMES:
    register_model(_name, ultralytics_spec, load_ultralytics_name)
register_file_family("ultralytics", ultralytics_spec, load_ultralytics_file)
