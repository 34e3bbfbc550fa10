"""The ``dgh`` command (Typer). Thin: parse options, call the library, write outputs atomically.

Commands (the contract of ``../shared/docs/architecture.md``)::

    dgh models
    dgh generate  --model NAME [--weights PATH] --out DIR [--method dgh|batch-bns|image-bns|noise] ...
    dgh quantize  --model NAME [--weights PATH] --calib DIR_OR_IMAGEFOLDER --preset NAME [--w-bits B] ... --out DIR
    dgh evaluate-imagenet --model NAME [--weights PATH] [--quantized DIR] --data IMAGEFOLDER --metrics-out FILE.json
    dgh evaluate-coco     --model NAME [--weights PATH] [--quantized DIR] --images DIR
                          (--annotations INSTANCES.json | --labels YOLO_LABEL_DIR) [--imgsz S] --metrics-out FILE.json
    dgh report  [--params params.yaml]          # reports/results.md, accuracy.png, calibration_images.png
    dgh check   [--params params.yaml]          # validate params.yaml and every path it names
    dgh stage STAGE [ID]                        # one DVC stage (what dvc.yaml runs)

Any ``ValueError`` (bad option, missing file, invalid params.yaml ...) ends the command with a one-line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from dgh.env import configure_offline
from dgh.errors import validation_error_line
from dgh.generation.config import Method

app = typer.Typer(
    name="dgh",
    help="DGH: data generation for hardware-friendly post-training quantization (arXiv 2410.22110).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2


class CliError(ValueError):
    """A command-line option is invalid. One line."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return validation_error_line(exc)
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``ValueError`` (and file-system errors) raised by ``fn`` into ``error: <one line>`` + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def parse_set(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=8", "flip=false"]`` -> ``{"lr": 8, "flip": False}`` (values parsed as YAML scalars).

    Raises:
        CliError: an item without ``=``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def _device(device: str) -> str | None:
    return None if device in ("", "auto") else device


def _load(model: str, weights: Optional[Path], imgsz: Optional[int]):
    from dgh.models import load_model

    return load_model(model, str(weights) if weights else None, imgsz)


# ------------------------------------------------------------------------------------------------- options
MODEL_OPT = typer.Option(..., "--model", help="Registry name (see `dgh models`), or an ultralytics .pt/.yaml path.")
WEIGHTS_OPT = typer.Option(
    None, "--weights", help="Local checkpoint file. Never downloaded; required for pretrained models."
)
IMGSZ_OPT = typer.Option(None, "--imgsz", help="Detection only: square network input size in pixels (e.g. 320, 640).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
PROGRESS_OPT = typer.Option(True, "--progress/--no-progress", help="Show tqdm progress bars.")
SET_OPT = typer.Option(
    None, "--set", help="Any other config field as KEY=VALUE (repeatable), validated by the library config class."
)


@app.command("models")
@friendly
def models_cmd() -> None:
    """List the registry: name, task, input size (pixels), training padding p and the default weights."""
    from dgh.models import list_models

    typer.echo(f"{'name':<24} {'family':<16} {'task':<15} {'input HxW':<10} {'p':>3}  classes")
    for spec in list_models():
        h, w = spec.input_size
        typer.echo(f"{spec.name:<24} {spec.family:<16} {spec.task:<15} {f'{h}x{w}':<10} {spec.pad:>3}  {spec.num_classes}")
    typer.echo("weights: pass --weights PATH (local file; nothing is downloaded)")


@app.command("generate")
@friendly
def generate_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    imgsz: Optional[int] = IMGSZ_OPT,
    out: Path = typer.Option(..., "--out", help="Output folder: images.pt (N,3,H,W float32, normalized), meta.json, preview.png."),
    method: Method = typer.Option(Method.DGH, "--method", help="Generator: dgh (paper), batch-bns (GENIE/DeepInversion statistics), image-bns (ZeroQ statistics), noise."),
    n_images: Optional[int] = typer.Option(None, "--n-images", min=1, help="Number of images N. Default 1024 (paper)."),
    iters: Optional[int] = typer.Option(None, "--iters", min=0, help="Iterations; one = one pass over all batches. Default 1000 (paper)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per optimization batch n (memory knob). Default 128."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of initialization, batch order and augmentation. Default 0."),
    lr: Optional[float] = typer.Option(None, "--lr", help="RAdam learning rate, normalized-pixel units. Default 16 (paper)."),
    lambda_sigma: Optional[float] = typer.Option(None, "--lambda-sigma", help="Weight of the BN std term in L_BN. Default 10 (paper; MCT 1)."),
    output_loss: Optional[str] = typer.Option(None, "--output-loss", help="Output distribution stretching loss: paper (-range + last-BN hinges), mct (-range), none."),
    output_loss_weight: Optional[float] = typer.Option(None, "--output-loss-weight", help="lambda_out. Default: the model registry's value (e.g. 1e-5)."),
    statistics: Optional[str] = typer.Option(None, "--statistics", help="BN statistics over: all (DGH global), batch, image."),
    canvas_pad: Optional[int] = typer.Option(None, "--canvas-pad", min=0, help="Canvas padding p in pixels (canvas H+p x W+p). Default: registry (CIFAR 8, ImageNet 32)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flip in the training view. Default on for dgh."),
    smoothing: Optional[bool] = typer.Option(None, "--smoothing/--no-smoothing", help="3x3 Gaussian smoothing (sigma 1.25). Default on for dgh."),
    random_crop: Optional[bool] = typer.Option(None, "--random-crop/--no-random-crop", help="Random HxW crop of the canvas. Default on for dgh."),
    clamp: Optional[bool] = typer.Option(None, "--clamp/--no-clamp", help="Clamp to the valid pixel range (straight-through). Default on for dgh."),
    augment_draw: Optional[str] = typer.Option(None, "--augment-draw", help="Flip/crop draws: batch (paper) or image."),
    speed: Optional[str] = typer.Option(None, "--speed", help="exact (fp32, paper numerics) or fast (bf16 autocast on CPUs with native bf16 + channels-last; same algorithm). Skipping the per-step refresh forward is the separate lazy_refresh setting (--set lazy_refresh=true)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto (fp16 on CUDA, fp32 on CPU), on, off."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out if one exists."),
    set_: Optional[list[str]] = SET_OPT,
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Synthesize a calibration set from the model's BatchNorm statistics (or a baseline generator)."""
    configure_offline()
    from dgh.generation import GenerationConfig, generate_images

    overrides = parse_set(set_)
    overrides.update(
        n_images=n_images, iterations=iters, batch_size=batch_size, seed=seed, lr=lr, lambda_sigma=lambda_sigma,
        output_loss=output_loss, output_loss_weight=output_loss_weight, statistics=statistics,
        canvas_pad=canvas_pad, flip=flip, smoothing=smoothing, random_crop=random_crop, clamp=clamp,
        augment_draw=augment_draw, speed=speed, amp=amp,
    )
    config = GenerationConfig.for_method(method.value, **overrides)
    loaded = _load(model, weights, imgsz)
    result = generate_images(loaded, config, out_dir=out, resume=resume, device=_device(device), progress=progress)
    terms = ", ".join(f"{k}={v:.4g}" for k, v in result.loss_terms.items())
    typer.echo(f"wrote {out}/images.pt {tuple(result.images_nchw.shape)}; final {terms}")


@app.command("quantize")
@friendly
def quantize_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    imgsz: Optional[int] = IMGSZ_OPT,
    calib: str = typer.Option(..., "--calib", help="Calibration images: a folder with images.pt (from `dgh generate`), an ImageFolder, a folder of images, or 'noise'."),
    preset: str = typer.Option(..., "--preset", help="pot (power-of-two thresholds, MCT/IMX500), paper (all layers at target bits), academic (first/last 8 bit, float output)."),
    w_bits: int = typer.Option(8, "--w-bits", min=2, max=16, help="Weight bit-width (the x of WxAy)."),
    a_bits: int = typer.Option(8, "--a-bits", min=2, max=16, help="Activation bit-width (the y of WxAy)."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="minmax, mse (threshold by error minimization), adaround (layer-wise) or brecq (block-wise reconstruction). Default: mse. Reconstruction budget: --set 'reconstruction={iters: 300, act_iters: 75}' (paper code: 20000 + 5000 per block)."),
    n_calib: Optional[int] = typer.Option(None, "--n-calib", min=1, help="Use at most this many calibration images (real folders: class-balanced subset). Default: all / the source's size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the real-image subset / noise images."),
    out: Path = typer.Option(..., "--out", help="Output folder: quantized.pt, quantization_report.csv, meta.json."),
    set_: Optional[list[str]] = SET_OPT,
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Calibrate a fully quantized model (every layer, the input and the output) and save it."""
    configure_offline()
    from dgh.data import load_calibration_set
    from dgh.io import write_json
    from dgh.pipeline import config_dict
    from dgh.quantization import (
        QuantConfig,
        quantize_model,
        save_quantized,
        write_quantization_report,
    )

    fields = parse_set(set_)
    fields.update(preset=preset, w_bits=w_bits, a_bits=a_bits)
    if algorithm is not None:
        fields["algorithm"] = algorithm
    try:
        config = QuantConfig(**fields)
    except ValueError as exc:
        raise CliError(f"invalid quantization setting: {_one_line(exc)}") from None
    loaded = _load(model, weights, imgsz)
    images = load_calibration_set(calib, loaded, n_images=n_calib, seed=seed)
    qmodel = quantize_model(loaded, images, config, device=_device(device), progress=progress)
    meta = {"model": model, "weights": str(weights) if weights else None, "calib": calib,
            "n_calib": int(images.shape[0]), "quant": config_dict(config)}
    save_quantized(qmodel, out / "quantized.pt", meta=meta)
    write_quantization_report(qmodel, out / "quantization_report.csv")
    write_json(meta, out / "meta.json")
    typer.echo(f"wrote {out}/quantized.pt ({images.shape[0]} calibration images, W{w_bits}A{a_bits} {preset})")


def _maybe_quantized(loaded, quantized: Optional[Path]):
    if quantized is None:
        return loaded.model
    from dgh.quantization import load_quantized

    path = quantized / "quantized.pt" if quantized.is_dir() else quantized
    if not path.is_file():
        raise CliError(f"--quantized: {path} not found (pass the --out folder of `dgh quantize`)")
    return load_quantized(loaded, str(path))


@app.command("evaluate-imagenet")
@friendly
def evaluate_imagenet_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    quantized: Optional[Path] = typer.Option(None, "--quantized", help="Folder (or file) from `dgh quantize`; omit to evaluate the float model."),
    data: Path = typer.Option(..., "--data", help="ImageFolder (ImageNet val layout: one sub-folder per class, sorted = class index)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only this many images (deterministic subset). Default: all."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    metrics_out: Path = typer.Option(..., "--metrics-out", help="JSON file: top1, top5 (percent), n_images."),
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Top-1 / top-5 accuracy (percent) of the float or quantized classifier on an ImageFolder."""
    configure_offline()
    from dgh.evaluation import evaluate_classification
    from dgh.io import write_json

    loaded = _load(model, weights, None)
    net = _maybe_quantized(loaded, quantized)
    metrics = evaluate_classification(net, loaded.spec, str(data), limit=limit, batch_size=batch_size,
                                      device=_device(device), progress=progress)
    write_json(metrics, metrics_out)
    typer.echo(json.dumps(metrics))


@app.command("evaluate-coco")
@friendly
def evaluate_coco_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    quantized: Optional[Path] = typer.Option(None, "--quantized", help="Folder (or file) from `dgh quantize`; omit to evaluate the float model."),
    images: Path = typer.Option(..., "--images", help="Folder of images to detect on."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO instances json (original 91-id categories)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="YOLO label folder (class cx cy w h, normalized, 0..79)."),
    imgsz: Optional[int] = IMGSZ_OPT,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    metrics_out: Path = typer.Option(..., "--metrics-out", help="JSON file: map (mAP@[.5:.95], 0-1), map50 (0-1), n_images."),
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """COCO mAP (pycocotools) of the float or quantized detector; letterboxed input, decoding and NMS in float."""
    configure_offline()
    from dgh.evaluation import evaluate_coco
    from dgh.io import write_json

    if (annotations is None) == (labels is None):
        raise CliError("pass exactly one of --annotations INSTANCES.json or --labels YOLO_LABEL_DIR")
    loaded = _load(model, weights, imgsz)
    net = _maybe_quantized(loaded, quantized)
    metrics = evaluate_coco(net, loaded, str(images), annotations=str(annotations) if annotations else None,
                            labels=str(labels) if labels else None, imgsz=imgsz, batch_size=batch_size,
                            device=_device(device), progress=progress)
    write_json(metrics, metrics_out)
    typer.echo(json.dumps(metrics))


PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", help="The params file (its folder is the project root).")


@app.command("report")
@friendly
def report_cmd(params: Path = PARAMS_OPT) -> None:
    """Write reports/results.md (one table per task), accuracy.png and calibration_images.png from the metrics."""
    configure_offline()
    from dgh.params import load_params
    from dgh.pipeline import project_root
    from dgh.report import write_report

    out = write_report(load_params(params), project_root(params))
    typer.echo(f"wrote {out}")


@app.command("check")
@friendly
def check_cmd(params: Path = PARAMS_OPT) -> None:
    """Validate params.yaml and check that every data and weights path it names exists."""
    from dgh.params import ParamsError, check_paths, load_params

    p = load_params(params)
    problems = check_paths(p)
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise ParamsError(f"{len(problems)} missing path(s) in {params}; see above")
    n_exp = len(p.experiment_ids())
    typer.echo(f"{params}: ok ({len(p.models)} models, {len(p.generate)} calibration sets, {n_exp} experiments; "
               f"assets at {p.assets_root})")


@app.command("stage")
@friendly
def stage_cmd(
    stage: str = typer.Argument(..., help="generate | quantize | evaluate_imagenet | evaluate_coco | evaluate_imagenet_float | evaluate_coco_float | report"),
    item: Optional[str] = typer.Argument(None, help="Calibration-set id (generate), experiment id, or model key (*_float)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Run one pipeline stage as dvc.yaml does (outputs under stages/<stage>/<id>/, MLflow run resumed)."""
    from dgh.pipeline import run_stage

    out = run_stage(stage, item, params)
    typer.echo(f"{stage} {item or ''}: wrote {out}")


def main() -> None:
    """Console-script entry point: offline environment first, then the Typer app."""
    configure_offline()
    app()


if __name__ == "__main__":
    main()

