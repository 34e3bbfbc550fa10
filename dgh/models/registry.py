"""The model registry: a name -> how to build it, load its weights and preprocess its input.

Families (see ``../shared/docs/architecture.md`` and issue 2):

- ``cifar_resnet``: ``resnet{20,32,44,56,110}_cifar10`` (akamaster checkpoints; ``--weights`` required).
- ``torchvision``: every ``torchvision.models.list_models(module=torchvision.models)`` name
  (:mod:`dgh.models.torchvision_models`).
- ``ultralytics``: ``yolov8{n,s,m,l,x}``, ``yolo11{n,s,m,l,x}``, or any path to an ultralytics ``.pt`` / model
  ``.yaml`` used as the name (:mod:`dgh.models.ultralytics_models`).
- ``yolov5_classic``: ``yolov5{n,s,m,l,x}`` from original YOLOv5 v6.x checkpoints, loaded without running pickled
  code (:mod:`dgh.models.yolov5_classic`).
- ``efficientnet_lite``: ``efficientnet_lite0`` (timm ``tf_efficientnet_lite0`` with a lukemelas-layout checkpoint;
  ``--weights`` required) (:mod:`dgh.models.efficientnet_lite`).

``weights="random"`` builds any family with random weights (tests); ``weights=None`` means the family default,
which for torchvision and ultralytics would download and therefore fails fast offline.

Detection specs: ``input_size = (imgsz, imgsz)`` (default 640, a multiple of 32); mean 0 / std 1 (RGB in [0, 1]);
``pad`` p = ``round(0.1 * imgsz)`` (64 at 640): YOLO trains with random translation of +-10 % of the image size
(``translate=0.1`` in the YOLOv5/ultralytics default hyper-parameters), the analogue of the crop jitter p models for
classifiers; ``output_loss_weight`` = 1e-5, MCT's default, which MCT's data-generation README used for YOLOv8n. Both
are starting points for the lambda_out sweep (method.md section 3).

Use :func:`load_model` to get a :class:`~dgh.models.spec.LoadedModel`, and :func:`get_spec` for the facts alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from dgh.errors import first_line
from dgh.models.cifar_resnet import (
    CIFAR_DEPTHS,
    cifar_resnet,
    convert_akamaster_state_dict,
)
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec


class ModelLoadError(ValueError):
    """A model name, weights file or checkpoint could not be used. The message is one actionable line."""


RANDOM_WEIGHTS = "random"  # ``weights=`` value that builds any family with random weights (tests, smoke runs)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_spec(depth: int) -> ModelSpec:
    return ModelSpec(
        name=f"resnet{depth}_cifar10",
        family="cifar_resnet",
        task="classification",
        input_size=(32, 32),
        mean=IMAGENET_MEAN,  # the akamaster models were trained with ImageNet statistics
        std=IMAGENET_STD,
        pad=8,
        output_loss_weight=1e-5,
        num_classes=10,
        class_names=CIFAR10_CLASSES,
        default_weights="required (--weights PATH to an akamaster .th checkpoint)",
    )


def _load_state_dict_file(path: Path) -> dict:
    """``torch.load(weights_only=True)``; never executes pickled code.

    Raises:
        ModelLoadError: missing file, or not a torch checkpoint.
    """
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path} (pass --weights PATH to an existing checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a checkpoint"
        raise ModelLoadError(f"{path} is not a loadable weights-only torch checkpoint ({first_line(exc)})") from None


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line error naming missing and unexpected keys.

    Raises:
        ModelLoadError: when keys or shapes do not match.
    """
    own = model.state_dict()
    # num_batches_tracked is bookkeeping that some checkpoints (akamaster) omit; keep the model's own.
    state_dict = dict(state_dict)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = own[k]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or bad_shape:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatch: {head(bad_shape)}")
        raise ModelLoadError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _load_cifar(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    depth = int(name.removeprefix("resnet").removesuffix("_cifar10"))
    spec = _cifar_spec(depth)
    model = cifar_resnet(depth)
    if weights is None:
        # BN statistics of a random network are mean 0 / var 1: generating or quantizing from them is meaningless
        raise ModelLoadError(
            f"{name} has no downloadable default weights: pass --weights PATH to an akamaster .th checkpoint "
            "(or --weights random for random weights)"
        )
    if weights != RANDOM_WEIGHTS:
        sd = convert_akamaster_state_dict(_load_state_dict_file(Path(weights)))
        load_state_dict_strict(model, sd, str(weights))
    return LoadedModel(spec=spec, model=model.eval(), weights=weights)


DEFAULT_DETECTION_IMGSZ = 640
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


def detection_spec(name: str, family: str, imgsz: int | None = None, class_names: tuple[str, ...] = (),
                   num_classes: int = 80, default_weights: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a YOLO detector at ``imgsz`` (see the module docstring for ``pad`` and lambda_out).

    Raises:
        ModelLoadError: ``imgsz`` not a positive multiple of 32.
    """
    imgsz = DEFAULT_DETECTION_IMGSZ if imgsz is None else int(imgsz)
    if imgsz <= 0 or imgsz % 32:
        raise ModelLoadError(f"--imgsz must be a positive multiple of 32 (the largest YOLO stride), got {imgsz}")
    return ModelSpec(
        name=name,
        family=family,
        task="detection",
        input_size=(imgsz, imgsz),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        pad=round(0.1 * imgsz),
        output_loss_weight=1e-5,
        num_classes=len(class_names) or num_classes,
        class_names=tuple(class_names),
        default_weights=default_weights,
    )


def _torchvision_spec(name: str) -> ModelSpec:
    from dgh.models.torchvision_models import torchvision_spec

    return torchvision_spec(name)


def _load_torchvision(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    from dgh.models.torchvision_models import build_torchvision

    model, path = build_torchvision(name, weights)
    return LoadedModel(spec=_torchvision_spec(name), model=model, weights=path)


def _ultralytics_spec(name: str) -> ModelSpec:
    return detection_spec(name, "ultralytics", default_weights=f"{name}.pt (download; offline pass --weights PATH.pt or {name}.yaml)")


def _wrap_ultralytics(name: str, source: str, imgsz: int | None) -> LoadedModel:
    from dgh.models.ultralytics_models import (
        RawDetectionModel,
        decode_dfl,
        load_ultralytics,
    )

    if _sniff_checkpoint_family(source) == "yolov5_classic":  # ultralytics would try to download a 'u' model
        raise ModelLoadError(f"{source} is a classic YOLOv5 checkpoint; use --model yolov5n/s/m/l/x with --weights {source}")
    net, info = load_ultralytics(source)
    try:
        model = RawDetectionModel(net)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    names = tuple(info["names"]) if len(info["names"]) == model.nc else ()
    spec = detection_spec(name, "ultralytics", imgsz, names, model.nc, _ultralytics_spec(name).default_weights)
    strides, reg_max = model.stride.clone(), model.reg_max
    weights = source if source.lower().endswith(".pt") else None
    return LoadedModel(spec=spec, model=model, decode=lambda raw: decode_dfl(raw, strides, reg_max), weights=weights,
                       extra={"strides": strides.tolist(), "reg_max": reg_max, "yaml": info["yaml"], "source": source})


def _load_ultralytics_name(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    if weights is None:
        raise ModelLoadError(
            f"{name} resolves to {name}.pt, which ultralytics would download; offline, pass --weights PATH to a local "
            f"{name}.pt (or --weights {name}.yaml / random for random weights)"
        )
    return _wrap_ultralytics(name, f"{name}.yaml" if weights == RANDOM_WEIGHTS else str(weights), imgsz)


def _yolov5_spec(name: str) -> ModelSpec:
    return detection_spec(name, "yolov5_classic", default_weights="required (--weights PATH to a YOLOv5 v6 .pt)")


def _load_yolov5(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    from dgh.models.yolov5_classic import (
        YoloV5CheckpointError,
        build_yolov5,
        decode_anchor,
        load_yolov5_checkpoint,
    )

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
    spec = detection_spec(name, "yolov5_classic", imgsz, names, head.nc, _yolov5_spec(name).default_weights)
    return LoadedModel(spec=spec, model=model, decode=lambda raw: decode_anchor(raw, anchors, strides), weights=path,
                       extra={"strides": strides.tolist(), "anchors_px": (anchors * strides.view(-1, 1, 1)).tolist(),
                              "yaml": info["yaml"]})


def _efficientnet_lite_spec() -> ModelSpec:
    from dgh.models.efficientnet_lite import efficientnet_lite0_spec  # timm import (~1.5 s) only when used

    return efficientnet_lite0_spec()


def _load_efficientnet_lite(name: str, weights: str | None, imgsz: int | None) -> LoadedModel:
    from dgh.models.efficientnet_lite import (  # timm import (~1.5 s) only when used
        KeyMapError,
        build_timm_lite0,
        load_lukemelas_state_dict,
        split_bn_act,
    )

    if weights is None:
        raise ModelLoadError(f"{name} needs --weights PATH to a lukemelas-layout checkpoint (efficientnet-lite0-*.pth)"
                             " (or --weights random for random weights)")
    model = build_timm_lite0()
    if weights != RANDOM_WEIGHTS:
        try:
            load_lukemelas_state_dict(model, _load_state_dict_file(Path(weights)), load_state_dict_strict, str(weights))
        except KeyMapError as exc:
            raise ModelLoadError(f"{weights}: {exc}") from None
    return LoadedModel(spec=_efficientnet_lite_spec(), model=split_bn_act(model).eval(),
                       weights=None if weights == RANDOM_WEIGHTS else str(weights))


def _registry() -> dict[str, tuple[Callable[[], ModelSpec], Callable[[str, str | None, int | None], LoadedModel]]]:
    from dgh.models.torchvision_models import torchvision_names
    from dgh.models.ultralytics_models import ULTRALYTICS_NAMES

    reg: dict = {f"resnet{d}_cifar10": ((lambda d=d: _cifar_spec(d)), _load_cifar) for d in CIFAR_DEPTHS}
    reg.update({n: ((lambda n=n: _torchvision_spec(n)), _load_torchvision) for n in torchvision_names()})
    reg.update({n: ((lambda n=n: _ultralytics_spec(n)), _load_ultralytics_name) for n in ULTRALYTICS_NAMES})
    reg.update({n: ((lambda n=n: _yolov5_spec(n)), _load_yolov5) for n in YOLOV5_NAMES})
    reg["efficientnet_lite0"] = (_efficientnet_lite_spec, _load_efficientnet_lite)
    return reg


# name -> (spec factory (no arguments; detection specs at imgsz 640), loader(name, weights, imgsz)).
REGISTRY = _registry()


def _is_path_name(name: str) -> bool:
    return Path(name).suffix.lower() in (".pt", ".yaml", ".yml")


def _sniff_checkpoint_family(path: str) -> str:
    """``yolov5_classic`` when a ``.pt`` pickles the original YOLOv5 ``models.yolo.Model``, else ``ultralytics``.

    Uses the restricted unpickler, so sniffing runs no checkpoint code.
    """
    from dgh.models.safe_pickle import UnsafeCheckpointError, safe_load_checkpoint

    if Path(path).suffix.lower() != ".pt" or not Path(path).is_file():
        return "ultralytics"
    try:
        _, replaced = safe_load_checkpoint(path)
    except UnsafeCheckpointError:
        return "ultralytics"
    return "yolov5_classic" if "models.yolo.Model" in replaced else "ultralytics"


def list_models() -> list[ModelSpec]:
    """All registered model specs (name, family, task, input size, pad, lambda_out, default weights), sorted by name.

    Detection specs are given at the default ``imgsz`` 640.
    """
    return [REGISTRY[k][0]() for k in sorted(REGISTRY)]


def get_spec(name: str, imgsz: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name (or an ultralytics ``.pt``/``.yaml`` path), without loading weights.

    Args:
        name: registry name or model file path.
        imgsz: detection only, the square input size (default 640).

    Raises:
        ModelLoadError: unknown name, or ``imgsz`` not a multiple of 32.
    """
    if name in REGISTRY:
        spec = REGISTRY[name][0]()
    elif _is_path_name(name):
        family = _sniff_checkpoint_family(name)
        spec = (_yolov5_spec if family == "yolov5_classic" else _ultralytics_spec)(Path(name).stem)
    else:
        raise ModelLoadError(f"unknown model {name!r}; `dgh models` lists the registry (or pass a .pt/.yaml path)")
    if spec.task == "detection" and imgsz is not None:
        spec = dataclasses.replace(spec, input_size=(int(imgsz), int(imgsz)), pad=round(0.1 * int(imgsz)))
        detection_spec(spec.name, spec.family, imgsz)  # validates imgsz
    return spec


def load_model(name: str, weights: str | None = None, imgsz: int | None = None) -> LoadedModel:
    """Build a registered model, load ``weights`` (a local file; never downloads), eval mode, float32, CPU.

    Args:
        name: registry name, or a path to an ultralytics ``.pt``/``.yaml`` or a classic YOLOv5 ``.pt`` (the
            family is sniffed with the restricted unpickler).
        weights: path to a checkpoint; ``"random"`` for random weights; ``None`` for the family default
            (an error for CIFAR ResNets; torchvision DEFAULT only if already cached; otherwise an error).
        imgsz: detection only, the square network input size in pixels (multiple of 32, default 640).

    Returns:
        A :class:`LoadedModel` whose parameters have ``requires_grad=False``.

    Raises:
        ModelLoadError: unknown name, missing/invalid file, a download that would be needed, or a checkpoint that
            does not fit (one line naming missing and unexpected keys).
    """
    if name in REGISTRY:
        loaded = REGISTRY[name][1](name, None if weights is None else str(weights), imgsz)
    elif _is_path_name(name):
        stem = Path(name).stem
        if _sniff_checkpoint_family(name) == "yolov5_classic":
            loaded = _load_yolov5(stem, str(name), imgsz)
        else:
            loaded = _wrap_ultralytics(stem, str(name), imgsz)
    else:
        get_spec(name)
        raise AssertionError("unreachable")
    loaded.model.eval().float()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded
