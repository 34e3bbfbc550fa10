"""Public entry points: :func:`quantize_model`, :func:`save_quantized`, :func:`load_quantized`,
:func:`write_quantization_report` (:func:`set_quant_state` lives in :mod:`dgh.quantization.state`).

Calibration (post-training, no labels):

1. :func:`~dgh.quantization.capture.build_quantized_model`: BN folded on a copy, quantized conv/linear layers,
   activation sites (see :mod:`dgh.quantization.capture`).
2. Weights: per-channel thresholds/ranges from the weights alone (:mod:`dgh.quantization.thresholds`).
3. Activations: one observe pass over the calibration images with every quantizer transparent (statistics of the
   float network, as MCT collects them); per site the exact min/max and a bounded random subsample. The same pass
   records each layer's per-channel input mean for weight bias correction (on by default under ``pot``).
4. Each site's quantizer is set by the preset (signedness from the observed min under ``pot``) and the algorithm
   (``minmax`` or ``mse``; ``adaround``/``brecq`` start from ``mse`` and then call
   :func:`dgh.quantization.reconstruction.reconstruct`).

Runs on CUDA when available (float32 throughout: fake quantization under fp16 autocast would round twice).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import platform
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import dgh
from dgh.env import model_device, resolve_device
from dgh.errors import first_line
from dgh.io import save_torch, write_text
from dgh.models.spec import LoadedModel
from dgh.quantization.capture import (
    QuantizedModel,
    SiteInfo,
    build_quantized_model,
    discover_sites,
    iter_quantizers,
)
from dgh.quantization.config import Algorithm, QuantConfig
from dgh.quantization.layers import QUANT_LAYER_TYPES
from dgh.quantization.presets import PresetSpec, preset_spec
from dgh.quantization.quantizers import FakeQuantizer, is_power_of_two
from dgh.quantization.reconstruction import bake_learned_rounding, reconstruct
from dgh.quantization.thresholds import (
    ActivationObserver,
    SiteStats,
    minmax_threshold,
    search_asymmetric_range,
    search_symmetric_threshold,
    weight_ranges_asymmetric,
    weight_thresholds_symmetric,
)

FORMAT = "dgh.quantized/1"


class CalibrationError(ValueError):
    """Bad calibration input (empty set, wrong shape). The message is one line."""


class QuantizedFileError(ValueError):
    """A ``quantized.pt`` that cannot be loaded for this model. The message is one line."""


# ------------------------------------------------------------------------------------------------ helpers
def _quant_layers(qmodel: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def _configure_weights(qmodel: QuantizedModel, config: QuantConfig, spec: PresetSpec, bits_of: dict[str, int]) -> None:
    method = "minmax" if config.algorithm == Algorithm.MINMAX else "mse"
    for name, layer in _quant_layers(qmodel).items():
        q: FakeQuantizer = layer.weight_quantizer
        q.configure(bits_of.get(name, config.w_bits), symmetric=spec.weight_symmetric, signed=spec.weight_symmetric,
                    power_of_two=False)
        weight = layer.weight_out_channels_first()  # (C_out, ...): the per-channel axis first
        if spec.weight_symmetric:
            q.set_threshold(weight_thresholds_symmetric(weight, q.bits, method, config.weight_candidates))
        else:
            lo, hi = weight_ranges_asymmetric(weight, q.bits, method, config.weight_candidates)
            q.set_range(lo, hi)


def _configure_activation(
    q: FakeQuantizer, stats: SiteStats, bits: int, spec: PresetSpec, config: QuantConfig
) -> None:
    q.configure(bits, symmetric=spec.act_symmetric, signed=spec.act_symmetric and stats.min < 0,
                power_of_two=spec.act_power_of_two)
    lo = stats.min if math.isfinite(stats.min) else 0.0
    hi = stats.max if math.isfinite(stats.max) else 1.0
    samples = stats.sample_tensor()
    if spec.act_symmetric:
        max_abs = max(abs(lo), abs(hi))
        if config.algorithm == Algorithm.MINMAX:
            t = minmax_threshold(max_abs, q.power_of_two)
        else:
            t = search_symmetric_threshold(samples, max_abs, bits, q.signed, q.power_of_two, config.n_candidates)
        q.set_threshold(t)
    else:
        if config.algorithm != Algorithm.MINMAX:
            lo, hi = search_asymmetric_range(samples, lo, hi, bits, config.n_candidates)
        q.set_range(lo, hi)


def _first_last_layers(qmodel: QuantizedModel, sites: dict[str, SiteInfo]) -> tuple[str | None, set[str]]:
    """First quantized layer executed, and the layers that produce (directly or through one op) a model output."""
    order = list(qmodel.runtime.layer_order)
    layers = _quant_layers(qmodel)
    first = next((p for p in order if p in layers), None)
    last: set[str] = set()
    for info in sites.values():
        if not info.is_output:
            continue
        for cand in [info.name, *info.producers]:
            if cand in layers:
                last.add(cand)
    if not last and order:
        last.add(order[-1])
    return first, last


def _validate_calibration(images_nchw: torch.Tensor) -> None:
    if not isinstance(images_nchw, torch.Tensor):
        raise CalibrationError(f"calibration images must be a tensor, got {type(images_nchw).__name__}")
    if images_nchw.dim() != 4:
        raise CalibrationError(f"calibration images must be (N, C, H, W), got shape {tuple(images_nchw.shape)}")
    if images_nchw.shape[0] == 0:
        raise CalibrationError("the calibration set is empty (0 images); pass images.pt, an image folder or noise")
    if not images_nchw.is_floating_point() or not torch.isfinite(images_nchw).all():
        raise CalibrationError("calibration images must be finite float tensors in the model's normalized space")


class _InputMeans:
    """Temporary pre-hooks accumulating the per-channel mean of every quantized layer's input (axis 1 for convs,
    the last axis for linears) over the calibration set."""

    def __init__(self, qmodel: nn.Module) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = []
        for name, layer in _quant_layers(qmodel).items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(name, layer)))

    def _hook(self, name: str, layer: nn.Module):
        def hook(_mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            with torch._C.DisableTorchFunction():
                x = args[0].detach().float()
                if isinstance(layer, nn.Linear):
                    x2 = x.reshape(-1, x.shape[-1])
                else:
                    x2 = x.transpose(0, 1).reshape(x.shape[1], -1).t()
                self.sums[name] = self.sums.get(name, 0) + x2.sum(0)
                self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
            return None

        return hook

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def correct_biases(qmodel: nn.Module, input_means: dict[str, torch.Tensor]) -> None:
    """Weight-quantization bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2; MCT's default
    ``weights_bias_correction``): ``b <- b - E[(W_q - W) x]``, with ``E[x]`` the per-channel input mean over the
    calibration set (padding ignored). Biases stay float (32-bit accumulators on integer hardware)."""
    for name, layer in _quant_layers(qmodel).items():
        mean = input_means.get(name)
        if mean is None:
            continue
        with torch.no_grad():
            delta = (layer.quantized_weight() - layer.weight).double()  # the weight's layout
            shift = layer.weight_error_output_shift(delta, mean.double().to(delta.device))  # (C_out,)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(shift.shape[0], device=delta.device), requires_grad=False)
            layer.bias.sub_(shift.to(layer.bias.dtype))


# --------------------------------------------------------------------------------------------- quantize
def quantize_model(
    loaded: LoadedModel,
    calib_images_nchw: torch.Tensor,
    config: QuantConfig,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Post-training quantization of ``loaded.model`` calibrated on ``calib_images_nchw``.

    Args:
        loaded: the float model (unchanged; its BN is folded into a copy).
        calib_images_nchw: ``(N, 3, H, W)`` float32 in the model's normalized space, N >= 1 (any N, also below
            ``config.batch_size``).
        config: :class:`QuantConfig` (preset, WxAy, algorithm).
        device: ``None``/"auto" (CUDA when present), "cpu", "cuda:0" ...
        progress: tqdm bar over calibration batches.

    Returns:
        :class:`~dgh.quantization.capture.QuantizedModel` in eval mode on ``device``: same forward contract as the
        float model, every weight, the input, every activation/add/cat/pool/upsample output and every model output
        fake-quantized (outputs float under ``academic``). ``.quant_config`` holds ``config.to_json_dict()``.

    Raises:
        CalibrationError: empty or malformed calibration set.
        CaptureError / FoldError: the model cannot run eagerly on the images.
    """
    _validate_calibration(calib_images_nchw)
    dev = resolve_device(device if device is None else str(device))
    spec = preset_spec(config.preset)
    images = calib_images_nchw.float()
    qmodel = build_quantized_model(loaded.model, images[:1].to(model_device(loaded.model))).to(dev)

    # activation statistics on the float network (all quantizers transparent in the observe phase)
    n = images.shape[0]
    bs = min(config.batch_size, n)
    n_batches = math.ceil(n / bs)
    observer = ActivationObserver(max(1, config.samples_per_site // n_batches), seed=config.seed)
    qmodel.runtime.sites = {}
    sites: dict[str, SiteInfo] = {}
    # default: the preset's choice for plain PTQ; off before AdaRound/BRECQ (reconstruction corrects the error and
    # disables quantization to get its float targets, which a shifted bias would spoil)
    reconstructs = config.algorithm in (Algorithm.ADAROUND, Algorithm.BRECQ)
    bias_correction = (
        (spec.bias_correction and not reconstructs) if config.bias_correction is None else config.bias_correction
    )
    input_means = _InputMeans(qmodel) if bias_correction else None
    try:
        for i in tqdm(range(n_batches), desc="calibrate", disable=not progress, leave=False):
            batch = images[i * bs : (i + 1) * bs].to(dev)
            sites = discover_sites(qmodel, batch, observer)
    finally:
        if input_means is not None:
            input_means.remove()

    first, last = _first_last_layers(qmodel, sites)
    bits_of: dict[str, int] = {}
    if spec.first_last_bits is not None:
        for name in [first, *last]:
            if name is not None:
                bits_of[name] = spec.first_last_bits
    _configure_weights(qmodel, config, spec, bits_of)
    if input_means is not None:
        correct_biases(qmodel, input_means.means())

    for name, info in sites.items():
        stats = observer.stats.get(name)
        q = info.quantizer
        if stats is None:  # a site never reached by the calibration data
            continue
        bits = config.a_bits
        if name == "input" and spec.first_last_bits is not None:
            bits = spec.first_last_bits
        _configure_activation(q, stats, bits, spec, config)
        if info.is_output:
            q.role = "output"
            q.bypass = not spec.quantize_output
    qmodel.quant_config = {**config.to_json_dict(), "bias_correction": bool(bias_correction)}
    qmodel.example_shape = [1, *images.shape[1:]]
    qmodel.eval()

    if config.algorithm in (Algorithm.ADAROUND, Algorithm.BRECQ):
        qmodel = reconstruct(qmodel, images, config.reconstruction, dev, progress, float_model=loaded.model)
        qmodel.quant_config = {**config.to_json_dict(), "bias_correction": bool(bias_correction)}
        qmodel.example_shape = [1, *images.shape[1:]]
    return qmodel.eval()


# ------------------------------------------------------------------------------------------ save / load
def bake_weight_rounding(qmodel: QuantizedModel) -> None:
    """Replace each layer's weight by its fake-quantized value (hard learned rounding where AdaRound/BRECQ set one,
    nearest otherwise) and drop the rounding modules, in place; see
    :func:`dgh.quantization.reconstruction.bake_learned_rounding`. Round-to-nearest of the baked weight gives the
    same integers (``w_q / s`` is integral)."""
    bake_learned_rounding(qmodel)


def save_quantized(qmodel: QuantizedModel, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``quantized.pt`` atomically: folded float weights, every quantizer's parameters and settings (in the
    state dict), the quantization config (preset, bits), the input shape, versions and ``meta``.

    Only tensors and plain types are stored (loadable with ``torch.load(weights_only=True)``). Learned AdaRound
    rounding is baked into the stored weights (:func:`bake_weight_rounding`, on a copy).
    """
    model = qmodel
    if any(getattr(m, "weight_rounding", None) is not None for m in _quant_layers(qmodel).values()):
        model = copy.deepcopy(qmodel)
        bake_weight_rounding(model)
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "config": getattr(qmodel, "quant_config", None),
        "input_shape": list(getattr(qmodel, "example_shape", [])),
        "folded_pairs": [list(p) for p in qmodel.folded_pairs],
        "state_dict": state,
        "versions": {
            "dgh": str(getattr(dgh, "__version__", "0")),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "meta": meta or {},
    }
    return save_torch(payload, path)


def read_quantized_file(path: str | Path) -> dict:
    """The payload of a ``quantized.pt`` (``weights_only=True``).

    Raises:
        QuantizedFileError: missing file, not a torch file, or not written by :func:`save_quantized`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "quantized.pt"
    if not p.is_file():
        raise QuantizedFileError(f"quantized model not found: {p} (run `dgh quantize` first)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise QuantizedFileError(f"{p} is not a weights-only torch file ({first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QuantizedFileError(f"{p} is not a dgh quantized model (expected format {FORMAT})")
    return payload


def load_quantized(loaded: LoadedModel, path: str | Path, device: str | torch.device | None = "cpu") -> QuantizedModel:
    """Rebuild the exact quantized model saved by :func:`save_quantized` on top of ``loaded`` (same architecture).

    Args:
        loaded: the float model the file was made from (only its architecture is used; weights come from the file).
        path: ``quantized.pt`` or its folder.
        device: target device (default CPU).

    Raises:
        QuantizedFileError: unreadable file, or a file made for a different architecture.
    """
    payload = read_quantized_file(path)
    shape = payload.get("input_shape") or [1, 3, *loaded.spec.input_size]
    example = torch.zeros(shape, dtype=torch.float32, device=model_device(loaded.model))
    qmodel = build_quantized_model(loaded.model, example)
    discover_sites(qmodel, example)
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise QuantizedFileError(
            f"{path} does not fit model {loaded.spec.name}: {' '.join(first[:2])[:300]}"
        ) from None
    qmodel.quant_config = payload.get("config")
    qmodel.example_shape = shape
    dev = resolve_device(device if device is None else str(device))
    return qmodel.to(dev).eval()


# -------------------------------------------------------------------------------------------------- report
REPORT_COLUMNS = [
    "name", "kind", "role", "bits", "signed", "symmetric", "granularity", "n_channels", "scale", "scale_min",
    "scale_max", "threshold", "zero_point", "pot", "quantized",
]


def quantization_report_rows(qmodel: nn.Module) -> list[dict]:
    """One dict per quantizer (columns :data:`REPORT_COLUMNS`). ``scale`` is the per-tensor scale or the per-channel
    mean; ``threshold`` the largest representable magnitude (max over channels); ``quantized`` False for bypassed or
    never-calibrated quantizers."""
    rows = []
    for name, q in iter_quantizers(qmodel):
        s = q.effective_scale().detach().float().cpu()
        thr = q.threshold().float().cpu()
        rows.append({
            "name": name,
            "kind": "weight" if q.role == "weight" else "activation",
            "role": q.role,
            "bits": q.bits,
            "signed": q.signed,
            "symmetric": q.symmetric,
            "granularity": "per-channel" if q.is_per_channel else "per-tensor",
            "n_channels": s.numel(),
            "scale": f"{float(s.mean()):.8g}",
            "scale_min": f"{float(s.min()):.8g}",
            "scale_max": f"{float(s.max()):.8g}",
            "threshold": f"{float(thr.abs().max()):.8g}",
            "zero_point": f"{float(q.zero_point.float().mean()):.6g}",
            "pot": bool(is_power_of_two(s)),
            "quantized": bool(q.initialized and not q.bypass),
        })
    return rows


def write_quantization_report(qmodel: nn.Module, csv_path: str | Path) -> Path:
    """Write ``quantization_report.csv`` atomically: one row per quantized tensor (see
    :func:`quantization_report_rows`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(quantization_report_rows(qmodel))
    return write_text(buf.getvalue(), csv_path)
