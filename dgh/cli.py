"""The ``dgh`` command (Typer). Thin: parse options, call the library, write outputs atomically.

Commands (the contract of ``../shared/docs/architecture.md``)::

    dgh models
    dgh generate  --model NAME [--weights PATH] --out DIR [--method dgh|batch-bns|image-bns|noise] ...
    dgh quantize  --model NAME [--weights PATH] --calib DIR_OR_IMAGEFOLDER --preset NAME [--w-bits B] ... --out DIR
    dgh evaluate-imagenet --model NAME [--weights PATH] [--quantized DIR] --data IMAGEFOLDER --metrics-out FILE.json
    dgh evaluate-coco     --model NAME [--weights PATH] [--quantized DIR] --images DIR
                          (--annotations INSTANCES.json | --labels YOLO_LABEL_DIR) [--imgsz S] --metrics-out FILE.json
    dgh stats     --model NAME [--weights PATH] --data IMAGES_PT_OR_FOLDER_OR_noise --out DIR [--reference REAL]
                  [--quantized DIR]
    dgh export  --model NAME [--weights PATH] [--imgsz S] --quantized DIR --out DIR [--calib SRC] [--opset N]
                                                # DIR/model.onnx (QDQ) + export.json, checked in onnxruntime
    dgh report  [--params params.yaml]          # reports/results.md, accuracy.png, calibration_images.png
    dgh check   [--params params.yaml]          # validate params.yaml and every path it names
    dgh stage STAGE [ID]                        # one DVC stage by hand (dvc.yaml runs python -m dgh.pipeline.*)

Any ``ValueError`` (bad option, missing file, invalid params.yaml ...) ends the command with a one-line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

from dgh.data import load_calibration_set
from dgh.data.classification import ClassLayout
from dgh.env import configure_offline, resolve_device
from dgh.errors import validation_error_line
from dgh.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, Backend, export_to_dir
from dgh.generation import GenerationConfig, Method
from dgh.generation.distributed import launch, process_rank, world_size_from_env
from dgh.models import get_spec, list_models, load_model
from dgh.params import Params, ParamsError, check_paths, load_params
from dgh.pipeline.common import Project, open_project
from dgh.pipeline.evaluate import run_evaluate, run_evaluate_float
from dgh.pipeline.export import run_export
from dgh.pipeline.generate import run_generate
from dgh.pipeline.quant_stats import run_quant_stats
from dgh.pipeline.quantize import run_quantize
from dgh.pipeline.report import run_report
from dgh.pipeline.set_stats import run_set_stats
from dgh.pipeline.stats import run_stats
from dgh.preflight import PreflightError, check_output_dir, merge_settings, output_lock
from dgh.project_check import check_project
from dgh.quantization import QuantConfig
from dgh.runs.evaluate import ClassificationData, DetectionData, evaluate_to_file
from dgh.runs.generate import generate_to_dir
from dgh.runs.quantize import quantize_to_dir
from dgh.runs.stats import quant_stats_to_dir, stats_to_dir
from dgh.stats import ClipMode
from dgh.threads import apply_threads

app = typer.Typer(
    name="dgh",
    help="DGH: data generation for hardware-friendly post-training quantization (arXiv 2410.22110).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2


@app.callback()
def _global_options(
    threads: int = typer.Option(
        Params.model_fields["threads"].default, "--threads", min=0,
        help="CPU intra-op threads; 0 = auto: one per core not busy right now (on a shared 2-core machine 2 threads "
        "ran 7.9x slower than 1, on idle cores 1.4-1.7x faster). Stages run with `dgh stage` / DVC use params.yaml "
        "`threads` instead.",
    ),
) -> None:
    """Options for every command (before the command name: ``dgh --threads 2 generate ...``)."""
    apply_threads(threads)


class CliError(ValueError):
    """A command-line option is invalid. One line."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return validation_error_line(exc)
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]


# Choice options (--preset, --algorithm, --output-loss ...) are plain strings validated by the config classes, so a
# bad value ends in the same one-line `error:` as every other bad input (click's own choice errors are a box).


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
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


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


def _check_device(device: str) -> None:
    """Refuse a device string before any work (``banana``, ``gpu0``, CUDA on a machine without it)."""
    resolve_device(None if device in ("", "auto") else device)


def _check_metrics_out(path: Path) -> None:
    """The metrics file's folder is writable and the path is not a folder, before the evaluation runs."""
    if path.is_dir():
        raise PreflightError(f"--metrics-out {path} is a folder; pass a file path (metrics.json)")
    check_output_dir(path.parent, option="--metrics-out")


def _generation_bytes(config: GenerationConfig, spec) -> int:  # noqa: ANN001 - dgh.models.ModelSpec
    """What a generation run writes, in bytes: ``images.pt`` (float32 N x 3 x H x W) and its resume checkpoint
    (the N canvases of (H+p) x (W+p) and RAdam's two moment buffers of the same size)."""
    h, w = spec.input_size
    pad = spec.pad if config.canvas_pad is None else config.canvas_pad
    return config.n_images * 3 * 4 * (h * w + 3 * (h + pad) * (w + pad))


@app.command("models")
@friendly
def models_cmd() -> None:
    """List the registry: name, task, input size (pixels), training padding p and the default weights."""
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
    out: Path = typer.Option(..., "--out", help="Output folder: images.pt (N,3,H,W float32, normalized), meta.json, preview.png, losses.json."),
    method: Method = typer.Option(Method.DGH, "--method", help="Generator: dgh (paper), batch-bns (GENIE/DeepInversion statistics), image-bns (ZeroQ statistics), noise."),
    n_images: Optional[int] = typer.Option(None, "--n-images", min=1, help="Number of images N. Default 1024 (paper)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "--iters", min=0, help="Iterations; one = one pass over all batches. Default 1000 (paper)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per optimization batch n (memory knob). Default 128."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of initialization, batch order and augmentation. Default 0."),
    lr: Optional[float] = typer.Option(None, "--lr", help="RAdam learning rate relative to the model's pixel range (lr_units, default pixel-range): 16 is the paper's step for ImageNet-normalized models (YOLO gets 3.6). Default 16."),
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
    speed: Optional[str] = typer.Option(None, "--speed", help="exact (fp32, paper numerics), fast (bf16 autocast on CPUs with native bf16 + channels-last; same algorithm) or auto (fast on CUDA and bf16 CPUs, else exact). Skipping the per-step refresh forward is the separate lazy_refresh setting (--set lazy_refresh=true)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto (fp16 on CUDA, fp32 on CPU), on, off."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out if one exists."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, help="Processes K (torchrun; one GPU each on CUDA): each optimizes B/K batches against the exact global statistics. Several processes imply --set schedule=synchronous. Default 1."),
    set_: Optional[list[str]] = SET_OPT,
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Synthesize a calibration set from the model's BatchNorm statistics (or a baseline generator).

    Every option is the dgh.generation.GenerationConfig field of the same name (the key in params.yaml); options
    left unset keep the method preset's value.
    """
    fields = merge_settings(parse_set(set_), dict(
        method=Method(method).value, n_images=n_images, iterations=iterations, batch_size=batch_size, seed=seed,
        lr=lr, lambda_sigma=lambda_sigma, output_loss=output_loss, output_loss_weight=output_loss_weight,
        statistics=statistics, canvas_pad=canvas_pad, flip=flip, smoothing=smoothing, random_crop=random_crop,
        clamp=clamp, augment_draw=augment_draw, speed=speed, amp=amp, processes=processes,
    ))
    config = GenerationConfig.for_method(fields.pop("method"), **fields)
    _check_device(device)
    spec = get_spec(model, imgsz)
    check_output_dir(out, need_bytes=_generation_bytes(config, spec))
    if config.processes > 1 and world_size_from_env() == 1:  # relaunch the same command under torchrun
        raise typer.Exit(launch(config.processes, "dgh.cli", sys.argv[1:]))
    main = process_rank() == 0  # under torchrun rank 0 holds the lock and writes
    with output_lock(out) if main else contextlib.nullcontext():
        loaded = load_model(model, str(weights) if weights else None, imgsz)
        result = generate_to_dir(loaded, config, out, device=device, progress=progress, resume=resume)
        if main:
            stats_to_dir(loaded, result.images_nchw, out, source=config.method.value, batch_size=config.batch_size,
                         device=device)  # stats.json, stats_layers.csv, stats_output_ranges.csv, figures
    if main:
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
    w_bits: Optional[int] = typer.Option(None, "--w-bits", min=2, max=16, help="Weight bit-width (the x of WxAy). Default 8."),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", min=2, max=16, help="Activation bit-width (the y of WxAy). Default 8."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="minmax, mse (threshold by error minimization), adaround (layer-wise) or brecq (block-wise reconstruction). Default: mse. Reconstruction budget: --set 'reconstruction={iters: 300, act_iters: 75}' (paper code: 20000 + 5000 per block)."),
    n_calib: Optional[int] = typer.Option(None, "--n-calib", min=1, help="Use at most this many calibration images (real folders: class-balanced subset). Default: all / the source's size."),
    calib_seed: int = typer.Option(0, "--calib-seed", help="Seed of the real-image subset / noise images (the `seed` of a params.yaml calibration set)."),
    out: Path = typer.Option(..., "--out", help="Output folder: quantized.pt, quantization_report.csv, meta.json."),
    set_: Optional[list[str]] = SET_OPT,
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Calibrate a fully quantized model (every layer, the input and the output) and save it.

    --preset, --w-bits, --a-bits, --algorithm and --set KEY=VALUE are the dgh.quantization.QuantConfig fields of
    the same names (the keys of a params.yaml experiment).
    """
    given = {"preset": preset, "w_bits": w_bits, "a_bits": a_bits, "algorithm": algorithm}
    config = QuantConfig(**merge_settings(parse_set(set_), given))
    _check_device(device)
    check_output_dir(out)
    with output_lock(out):
        loaded = load_model(model, str(weights) if weights else None, imgsz)
        images = load_calibration_set(calib, loaded, n_images=n_calib, seed=calib_seed)
        meta = {"model": model, "weights": str(weights) if weights else None, "calib": calib}
        quantize_to_dir(loaded, images, config, out, meta=meta, device=device, progress=progress)
    typer.echo(f"wrote {out}/quantized.pt ({images.shape[0]} calibration images, "
               f"W{config.w_bits}A{config.a_bits} {config.preset.value} {config.algorithm.value})")


QUANTIZED_OPT = typer.Option(None, "--quantized", help="Folder (or file) from `dgh quantize`; omit to evaluate the float model.")
BACKEND_OPT = typer.Option("pytorch", "--backend", help="pytorch: the float or fake-quant PyTorch model; onnxruntime: the exported --onnx file (from `dgh export`), run by onnxruntime.")
ONNX_OPT = typer.Option(None, "--onnx", help="model.onnx (or its folder) from `dgh export`; used with --backend onnxruntime.")


def _backend(value: str) -> Backend:
    try:
        return Backend(value)
    except ValueError:
        raise CliError(f"--backend must be one of {', '.join(b.value for b in Backend)}, got {value!r}") from None


@app.command("export")
@friendly
def export_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    imgsz: Optional[int] = IMGSZ_OPT,
    quantized: Path = typer.Option(..., "--quantized", help="Folder (or file) from `dgh quantize`."),
    out: Path = typer.Option(..., "--out", help="Output folder: model.onnx (QuantizeLinear/DequantizeLinear) and export.json."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Images for the onnxruntime check (same sources as `dgh quantize --calib`). Default: random images over the valid pixel range."),
    n_sample: int = typer.Option(8, "--n-sample", min=1, help="Number of images run through onnxruntime and PyTorch on export."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", min=MIN_OPSET, max=MAX_OPSET, help="ONNX opset."),
) -> None:
    """Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear and check it in onnxruntime.

    Fails (and writes nothing) when a quantized tensor differs from the fake-quant model by more than one
    quantization step; export.json holds the file size, the QDQ counts and the agreement in steps.
    """
    loaded = load_model(model, str(weights) if weights else None, imgsz)
    sample = load_calibration_set(calib, loaded, n_images=n_sample) if calib else None
    record = {"model": model, "weights": str(weights) if weights else None, "quantized": str(quantized)}
    summary = export_to_dir(loaded, quantized, out, sample_nchw=sample, opset=opset, record=record)
    a = summary["agreement"]
    typer.echo(f"wrote {out}/model.onnx ({summary['size_bytes'] / 1e6:.3f} MB, {summary['activation_qdq']} "
               f"activation QDQ, {summary['weight_dq']} weight DQ); onnxruntime vs fake-quant: outputs within "
               f"{a['max_output_steps']:g} steps (PyTorch vs itself with its other conv kernels: "
               f"{a['reference_output_steps']:g}), every tensor within {a['max_local_steps']:g} step given equal inputs")


@app.command("stats")
@friendly
def stats_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    imgsz: Optional[int] = IMGSZ_OPT,
    data: str = typer.Option(..., "--data", help="The set: a folder with images.pt (from `dgh generate`) or the file, an ImageFolder, a folder of images, or 'noise'."),
    n_images: Optional[int] = typer.Option(None, "--n-images", min=1, help="Use at most this many images (real folders: class-balanced subset; noise: default 1024)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the real-image subset / noise images."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Real images of the same model (same forms as --data) whose output coverage is stored next to the set's (stats.output_range_ratio)."),
    n_reference: Optional[int] = typer.Option(None, "--n-reference", min=1, help="Use at most this many reference images."),
    label: Optional[str] = typer.Option(None, "--label", help="Name of the set in stats.json and the figures. Default: the --data value's last path part."),
    quantized: Optional[Path] = typer.Option(None, "--quantized", help="Also the per-site clipping rates of this quantized model (`dgh quantize` folder) on --data: quant_stats.json."),
    clip_mode: ClipMode = typer.Option(ClipMode.QUANTIZED, "--clip-mode", help="quantized: values each quantizer sees in the quantized model; float: with every quantizer off."),
    out: Path = typer.Option(..., "--out", help="Output folder: stats.json, stats_layers.csv, stats_output_ranges.csv, stats_bn_layers.png, stats_output_ranges.png (+ quant_stats.json, quant_clipping.png)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per forward pass (memory only)."),
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
) -> None:
    """Statistics of a calibration set (generated, real or noise) through the float model: per-layer BN distance
    (mean and std terms), pixel mean/std and clamp fractions, output range per image, prediction entropy; with
    --quantized, the clipping rate of every activation quantizer."""
    _check_device(device)
    check_output_dir(out)
    with output_lock(out):
        loaded = load_model(model, str(weights) if weights else None, imgsz)
        images = load_calibration_set(data, loaded, n_images=n_images, seed=seed, progress=progress)
        ref = None
        if reference is not None:
            ref_images = load_calibration_set(reference, loaded, n_images=n_reference, seed=seed, progress=progress)
            ref = stats_to_dir(loaded, ref_images, out / "reference", source=Path(reference).name or "real",
                               batch_size=batch_size, device=device, plots=False).stats
        name = label or Path(data).name or data
        doc = stats_to_dir(loaded, images, out, source=name, reference=ref, batch_size=batch_size, device=device)
        if quantized is not None:
            qs = quant_stats_to_dir(loaded, quantized, images, out, source=name, mode=ClipMode(clip_mode),
                                    batch_size=batch_size, device=device)
            doc_q = qs.summary()
        else:
            doc_q = {}
    typer.echo(json.dumps({**doc.summary, **doc_q}))


@app.command("evaluate-imagenet")
@friendly
def evaluate_imagenet_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    quantized: Optional[Path] = QUANTIZED_OPT,
    data: Path = typer.Option(..., "--data", help="ImageFolder (ImageNet val layout): one sub-folder per class, named by the model's class names (ImageNet wnids, CIFAR-10 names)."),
    class_layout: ClassLayout = typer.Option(ClassLayout.NAMES, "--class-layout", help="names: class folders are the model's class names; numbered: folders 0..C-1 are class indices."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only this many images (deterministic subset). Default: all."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    metrics_out: Path = typer.Option(..., "--metrics-out", help="JSON file: top1, top5 (percent), n_images."),
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
    backend: str = BACKEND_OPT,
    onnx: Optional[Path] = ONNX_OPT,
) -> None:
    """Top-1 / top-5 accuracy (percent) of the float or quantized classifier on an ImageFolder."""
    runtime = _backend(backend)
    _check_device(device)
    _check_metrics_out(metrics_out)
    loaded = load_model(model, str(weights) if weights else None, None)
    metrics = evaluate_to_file(loaded, ClassificationData(data, limit, batch_size, ClassLayout(class_layout)),
                               metrics_out, quantized=quantized, device=device, progress=progress, backend=runtime,
                               onnx=onnx)
    typer.echo(json.dumps(metrics))


@app.command("evaluate-coco")
@friendly
def evaluate_coco_cmd(
    model: str = MODEL_OPT,
    weights: Optional[Path] = WEIGHTS_OPT,
    quantized: Optional[Path] = QUANTIZED_OPT,
    images: Path = typer.Option(..., "--images", help="Folder of images to detect on."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO instances json (original 91-id categories)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="YOLO label folder (class cx cy w h, normalized, 0..79)."),
    imgsz: Optional[int] = IMGSZ_OPT,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    metrics_out: Path = typer.Option(..., "--metrics-out", help="JSON file: map (mAP@[.5:.95], 0-1), map50 (0-1), n_images."),
    device: str = DEVICE_OPT,
    progress: bool = PROGRESS_OPT,
    backend: str = BACKEND_OPT,
    onnx: Optional[Path] = ONNX_OPT,
) -> None:
    """COCO mAP (pycocotools) of the float or quantized detector; letterboxed input, decoding and NMS in float."""
    runtime = _backend(backend)
    data = DetectionData(images, labels=labels, annotations=annotations, imgsz=imgsz, batch_size=batch_size)
    _check_device(device)
    _check_metrics_out(metrics_out)
    loaded = load_model(model, str(weights) if weights else None, imgsz)
    metrics = evaluate_to_file(loaded, data, metrics_out, quantized=quantized, device=device, progress=progress,
                               backend=runtime, onnx=onnx)
    typer.echo(json.dumps(metrics))


PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", help="The params file (its folder is the project root).")


@app.command("report")
@friendly
def report_cmd(params: Path = PARAMS_OPT) -> None:
    """Write reports/results.md (one table per task), accuracy.png and calibration_images.png from the metrics."""
    out = run_report(open_project(params))
    typer.echo(f"wrote {out}")


@app.command("check")
@friendly
def check_cmd(params: Path = PARAMS_OPT) -> None:
    """Validate params.yaml: every path it names exists, and every entry builds what its stage builds (model spec
    at its imgsz, device, generation and quantization configs, class folders, detection ground truth)."""
    p = load_params(params)
    problems = check_paths(p) + check_project(p)
    for line in problems[1:]:
        typer.echo(line, err=True)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) above)" if len(problems) > 1 else ""
        raise ParamsError(f"{params}: {problems[0]}{more}")
    n_exp = len(p.experiment_ids())
    typer.echo(f"{params}: ok ({len(p.models)} models, {len(p.generate)} calibration sets, {n_exp} experiments; "
               f"assets at {p.assets_root})")


STAGES: dict[str, Callable[[Project, str], Path]] = {
    "generate": run_generate,
    "quantize": run_quantize,
    "export": run_export,
    "evaluate": run_evaluate,
    "evaluate_imagenet_float": lambda project, model: run_evaluate_float(project, "imagenet", model),
    "evaluate_coco_float": lambda project, model: run_evaluate_float(project, "coco", model),
    "set_stats": run_set_stats,
    "quant_stats": run_quant_stats,
    "stats": run_stats,
    "report": run_report,
}


@app.command("stage")
@friendly
def stage_cmd(
    stage: str = typer.Argument(..., help=" | ".join(STAGES)),
    item: str = typer.Argument("", help="Calibration-set id (generate, set_stats), experiment id (quantize, export, evaluate, quant_stats) or model key (*_float, stats)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Run one pipeline stage by hand (dvc.yaml runs the same functions as python -m dgh.pipeline.<stage>)."""
    if stage not in STAGES:
        raise CliError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    if stage != "report" and not item:
        raise CliError(f"stage {stage!r} needs an id (a calibration set, experiment or model key)")
    out = STAGES[stage](open_project(params), item)
    typer.echo(f"{stage} {item}: wrote {out}")


def main() -> None:
    """Console-script entry point: offline environment first, then the Typer app."""
    configure_offline()
    app()


if __name__ == "__main__":
    main()

