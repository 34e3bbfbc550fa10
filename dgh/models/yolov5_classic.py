"""Classic YOLOv5 checkpoints (``yolov5n.pt`` ... from github.com/ultralytics/yolov5, v6.x), loaded without their code.

Steps:

1. :func:`dgh.models.safe_pickle.safe_load_checkpoint` unpickles the file with every class replaced by a plain
   container, so no checkpoint code runs.
2. The tensors are harvested from the ``ema`` (else ``model``) module stand-in, in ``state_dict`` naming.
3. The network is rebuilt from the YAML dict embedded in the checkpoint (``model.yaml``) with
   ``ultralytics.nn.modules`` blocks (Conv, C3, SPPF, Concat) plus ``nn.Upsample``, and our own anchor-based
   :class:`AnchorDetect` head. The architecture rules (depth/width multiples, ``make_divisible(c * gw, 8)``,
   C3 repeats) follow YOLOv5 ``models/yolo.py::parse_model`` (read, not copied).
4. Each BatchNorm keeps the checkpoint's ``eps`` (YOLOv5 uses 1e-3) and each Conv its pickled activation type;
   weights load with ``strict=True``; fp16 tensors become float32.

The model's forward returns the head's raw per-level outputs ``[(N, na*(5+nc), H_i, W_i)]``; :func:`decode_anchor`
turns them into boxes and scores (YOLOv5 ``Detect.forward`` inference branch, v6.1 formulas).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgh.models.loading import RANDOM_WEIGHTS, ModelLoadError, detection_spec, load_state_dict_strict
from dgh.models.registry import register_file_family, register_model
from dgh.models.spec import LoadedModel, ModelSpec
from dgh.models.safe_pickle import (
    PickledObject,
    UnsafeCheckpointError,
    iter_modules,
    module_state,
    safe_load_checkpoint,
)


class YoloV5CheckpointError(ValueError):
    """A file is not a usable classic YOLOv5 checkpoint."""


class AnchorDetect(nn.Module):
    """YOLOv5 anchor-based detection head, raw outputs only (decoding is :func:`decode_anchor`).

    Args:
        nc: number of classes.
        anchors: per level, a flat list ``[w0, h0, w1, h1, ...]`` of anchor sizes in input pixels.
        ch: input channels per level.

    Buffers:
        anchors: ``(nl, na, 2)`` float32, anchor sizes **in stride units** (pixels / stride), as YOLOv5 stores them.
        stride: ``(nl,)`` float32, pixels per grid cell of each level.

    Forward: ``list[(N, ch_i, H_i, W_i)] -> list[(N, na*(5+nc), H_i, W_i)]`` (1x1 convs ``m.{i}``).
    """

    def __init__(self, nc: int, anchors: list[list[float]], ch: list[int]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102 - see class docstring
        return [conv(f) for conv, f in zip(self.m, features)]


class YoloV5(nn.Module):
    """The rebuilt YOLOv5 network: ``model`` is the ``nn.Sequential`` of layers (YOLOv5 names ``model.{i}``).

    Forward: ``(N, 3, H, W)`` float32 RGB in [0, 1] (H, W multiples of the largest stride, 32) ->
    ``list[(N, na*(5+nc), H/s_i, W/s_i)]`` raw head outputs, one per stride ``s_i`` in ``self.stride``.
    """

    def __init__(self, layers: list[nn.Module], save: set[int]) -> None:
        super().__init__()
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)

    @property
    def head(self) -> AnchorDetect:
        """The detection head (last layer)."""
        return self.model[-1]  # type: ignore[return-value]

    def forward(self, images_nchw: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102 - see class docstring
        outputs: list[torch.Tensor | None] = []
        x: Any = images_nchw
        save = set(self.save)
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in save else None)
        return x


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv5 ``utils/general.py::make_divisible``)."""
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(a: Any, nc: int, anchors: Any) -> Any:
    """YAML arguments are literals or the names ``nc``, ``anchors``, ``None`` (never ``eval``-ed)."""
    if isinstance(a, str):
        return {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}.get(a, a)
    return a


def build_yolov5(cfg: dict) -> YoloV5:
    """Build a YOLOv5 v6.x network (random weights) from its model YAML dict.

    Args:
        cfg: the YAML dict (keys ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``, ``backbone``, ``head``,
            optional ``ch``).

    Returns:
        A :class:`YoloV5` with strides set by a 256x256 dry run (as YOLOv5 ``Model.__init__`` does), eval mode.

    Raises:
        YoloV5CheckpointError: an unsupported block type or malformed YAML.
    """
    from ultralytics.nn.modules import C3, SPPF, Concat, Conv  # optional dependency, 6.3 s to import (measured, loaded 2-core CPU): only when used

    try:
        nc, gd, gw = int(cfg["nc"]), float(cfg["depth_multiple"]), float(cfg["width_multiple"])
        anchors = cfg["anchors"]
        rows = list(cfg["backbone"]) + list(cfg["head"])
    except (KeyError, TypeError, ValueError) as exc:
        raise YoloV5CheckpointError(f"malformed YOLOv5 model yaml ({exc})") from None
    if isinstance(anchors, int):
        anchors = [list(range(anchors * 2))] * 3
    no = (len(anchors[0]) // 2) * (nc + 5)
    ch = [int(cfg.get("ch", 3))]
    layers: list[nn.Module] = []
    save: set[int] = set()
    for i, (f, n, name, args) in enumerate(rows):
        args = [_resolve_arg(a, nc, anchors) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if name in ("Conv", "C3", "SPPF"):
            c1, c2 = ch[f], args[0]
            c2 = make_divisible(c2 * gw, 8) if c2 != no else c2
            args = [c1, c2, *args[1:]]
            if name == "C3":
                args.insert(2, n)
                n = 1
            block = {"Conv": Conv, "C3": C3, "SPPF": SPPF}[name]
        elif name == "Concat":
            c2 = sum(ch[x] for x in f)
            block = Concat
        elif name == "nn.Upsample":
            c2 = ch[f]
            block = nn.Upsample
        elif name == "Detect":
            args = [args[0], args[1], [ch[x] for x in f]]
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(f)
            c2 = no
            block = AnchorDetect
        else:
            raise YoloV5CheckpointError(f"unsupported YOLOv5 block {name!r} in layer {i}")
        m = nn.Sequential(*(block(*args) for _ in range(n))) if n > 1 else block(*args)
        if name == "SPPF":  # ultralytics 8.4's SPPF drops cv1's activation and counts pools; YOLOv5's cv1 has SiLU
            for s in m.modules():
                if isinstance(s, SPPF):
                    s.cv1.act, s.n, s.add = nn.SiLU(), 3, False
        m.f, m.i, m.type = f, i, name  # type: ignore[assignment]
        save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m)
        if i == 0:
            ch = []
        ch.append(c2)
    model = YoloV5(layers, save)
    for bn in model.modules():  # YOLOv5 initialize_weights(): BN eps 1e-3, momentum 0.03
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps, bn.momentum = 1e-3, 0.03
    head = model.head
    with torch.no_grad():
        s = 256
        outs = model(torch.zeros(1, int(cfg.get("ch", 3)), s, s))
        head.stride.copy_(torch.tensor([s / o.shape[-2] for o in outs], dtype=torch.float32))
        head.anchors /= head.stride.view(-1, 1, 1)
    return model.eval()


_ACTIVATIONS = {
    "torch.nn.modules.activation.SiLU": nn.SiLU,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.Hardswish": nn.Hardswish,
    "torch.nn.modules.linear.Identity": nn.Identity,
}


def _copy_module_settings(model: YoloV5, stand_ins: dict[str, Any]) -> None:
    """Copy BN ``eps``/``momentum`` and Conv activation types from the pickled stand-ins (by module name)."""
    for name, mod in model.named_modules():
        src = stand_ins.get(name)
        if src is None:
            continue
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = float(getattr(src, "eps", mod.eps))
            mod.momentum = getattr(src, "momentum", mod.momentum)
        act = getattr(src, "__dict__", {}).get("_modules", {}).get("act") if hasattr(mod, "act") else None
        if isinstance(act, PickledObject):
            kind = act._pickled_global
            if kind == "torch.nn.modules.activation.LeakyReLU":
                mod.act = nn.LeakyReLU(float(getattr(act, "negative_slope", 0.1)))
            elif kind in _ACTIVATIONS:
                mod.act = _ACTIVATIONS[kind]()
            else:
                raise YoloV5CheckpointError(f"unsupported activation {kind} in {name}")


def load_yolov5_checkpoint(path: str | Path) -> tuple[YoloV5, dict]:
    """Load a classic YOLOv5 ``.pt`` safely and rebuild it (see the module docstring).

    Args:
        path: the checkpoint file.

    Returns:
        ``(model, info)``: the float32 :class:`YoloV5` in eval mode with all weights loaded (``strict=True``), and
        ``info`` with ``yaml`` (dict), ``names`` (list of class names, index order) and ``stride`` (list of floats).

    Raises:
        YoloV5CheckpointError: not a checkpoint, no YOLOv5 model inside, or keys/shapes that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise YoloV5CheckpointError(f"weights file not found: {path} (pass --weights PATH to a YOLOv5 .pt)")
    try:
        ckpt, _ = safe_load_checkpoint(path)
    except UnsafeCheckpointError as exc:
        raise YoloV5CheckpointError(str(exc)) from None
    root = None
    if isinstance(ckpt, dict):
        root = ckpt.get("ema") if isinstance(ckpt.get("ema"), PickledObject) else ckpt.get("model")
    elif isinstance(ckpt, PickledObject):
        root = ckpt
    cfg = getattr(root, "yaml", None) if isinstance(root, PickledObject) else None
    if not isinstance(cfg, dict) or "backbone" not in cfg:
        raise YoloV5CheckpointError(f"{path} holds no classic YOLOv5 model (no embedded model yaml)")
    model = build_yolov5(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in module_state(root).items()}
    load_state_dict_strict(model, state, str(path))
    _copy_module_settings(model, dict(iter_modules(root)))
    stride = getattr(root, "stride", None)
    if isinstance(stride, torch.Tensor) and stride.numel() == model.head.nl:
        if not torch.allclose(stride.float(), model.head.stride):
            raise YoloV5CheckpointError(f"{path}: checkpoint strides {stride.tolist()} != rebuilt {model.head.stride.tolist()}")
    names = getattr(root, "names", None)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, (list, tuple)) or len(names) != model.head.nc:
        names = [str(i) for i in range(model.head.nc)]
    return model.eval().float(), {"yaml": cfg, "names": list(names), "stride": model.head.stride.tolist()}


def decode_anchor(raw: list[torch.Tensor], anchors_stride_units: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Decode YOLOv5 raw head outputs into boxes and scores (YOLOv5 v6.1 ``Detect.forward``, inference branch).

    For each level with stride ``s``, grid cell ``(gx, gy)`` and anchor ``a`` (pixels = anchors * s), with
    ``t = sigmoid(raw)``: ``cx = (2 t_x - 0.5 + gx) s``, ``cy = (2 t_y - 0.5 + gy) s``, ``w = (2 t_w)^2 a_w``,
    ``h = (2 t_h)^2 a_h``; scores = ``t_obj * t_cls``.

    Args:
        raw: per level ``(N, na*(5+nc), H_i, W_i)``, any float dtype.
        anchors_stride_units: ``(nl, na, 2)``.
        strides: ``(nl,)`` pixels per cell.

    Returns:
        ``(N, sum_i na*H_i*W_i, 4 + nc)`` float32: ``x1, y1, x2, y2`` in input pixels, then class scores in [0, 1].
    """
    out = []
    for i, x in enumerate(raw):
        n, _, h, w = x.shape
        na = anchors_stride_units.shape[1]
        t = x.float().view(n, na, -1, h, w).permute(0, 1, 3, 4, 2).sigmoid()  # (N, na, H, W, 5+nc)
        gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        grid = torch.stack((gx, gy), -1).float().view(1, 1, h, w, 2)
        s = strides[i].to(x.device).float()
        anchor_px = (anchors_stride_units[i].to(x.device).float() * s).view(1, na, 1, 1, 2)
        xy = (t[..., 0:2] * 2 - 0.5 + grid) * s
        wh = (t[..., 2:4] * 2) ** 2 * anchor_px
        scores = t[..., 5:] * t[..., 4:5]
        boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1)
        out.append(torch.cat((boxes, scores), -1).reshape(n, -1, boxes.shape[-1] + scores.shape[-1]))
    return torch.cat(out, 1)


YOLOV5_NAMES = tuple(f"yolov5{s}" for s in "nsmlx")
# YOLOv5 v6.x scales: (depth_multiple, width_multiple); models/yolov5{n,s,m,l,x}.yaml
YOLOV5_SCALES: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)
}


def yolov5_v6_yaml(scale: str, nc: int = 80) -> dict:
    """The YOLOv5 v6.x model YAML (as the checkpoints embed it) for a scale in ``n s m l x``; random-weight builds."""
    gd, gw = YOLOV5_SCALES[scale]
    up = ["None", 2, "nearest"]
    return {
        "nc": nc, "depth_multiple": gd, "width_multiple": gw,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                     [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                     [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]],
                     [-1, 1, "SPPF", [1024, 5]]],
        "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", up], [[-1, 6], 1, "Concat", [1]],
                 [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", up],
                 [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
                 [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
                 [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
                 [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]],
    }




def yolov5_spec(name: str) -> ModelSpec:
    """The spec of classic YOLOv5 ``name`` at imgsz 640."""
    return detection_spec(name, "yolov5_classic", default_weights="required (--weights PATH to a YOLOv5 v6 .pt)")


def load_yolov5(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    """Load classic YOLOv5 ``name`` from a v6.x ``.pt`` (restricted unpickler), or ``random`` weights."""
    scale = name.removeprefix("yolov5")
    if weights is None:
        raise ModelLoadError(f"{name} needs --weights PATH to a classic YOLOv5 .pt (github.com/ultralytics/yolov5 release)")
    if weights == RANDOM_WEIGHTS:
        model, info = build_yolov5(yolov5_v6_yaml(scale)), {"names": [], "yaml": yolov5_v6_yaml(scale)}
        path = None
    else:
        try:
            model, info = load_yolov5_checkpoint(weights)
        except YoloV5CheckpointError as exc:
            raise ModelLoadError(str(exc)) from None
        path = str(weights)
        if scale in YOLOV5_SCALES:
            want = YOLOV5_SCALES[scale]
            got = (float(info["yaml"].get("depth_multiple", -1)), float(info["yaml"].get("width_multiple", -1)))
            if got != want:
                raise ModelLoadError(f"{weights} is not a {name} checkpoint (depth/width multiples {got}, expected {want})")
    head = model.head
    anchors, strides = head.anchors.clone(), head.stride.clone()
    names = tuple(info["names"]) if len(info["names"]) == head.nc and not all(n.isdigit() for n in info["names"]) else ()
    spec = detection_spec(name, "yolov5_classic", imgsz, names, head.nc, yolov5_spec(name).default_weights)
    return LoadedModel(spec=spec, model=model, decode=lambda raw: decode_anchor(raw, anchors, strides), weights=path,
                       extra={"strides": strides.tolist(), "anchors_px": (anchors * strides.view(-1, 1, 1)).tolist(),
                              "yaml": info["yaml"]})


for _name in YOLOV5_NAMES:
    register_model(_name, yolov5_spec, load_yolov5)
register_file_family("yolov5_classic", yolov5_spec, load_yolov5)
