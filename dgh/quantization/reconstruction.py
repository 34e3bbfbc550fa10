"""Reconstruction PTQ: AdaRound (layer by layer) and BRECQ (block by block) on a fake-quantized model.

Sources: AdaRound (Nagel et al., ICML 2020, arXiv 2004.10568) and BRECQ (Li et al., ICLR 2021, arXiv 2102.05426);
defaults as in the DGH paper code (ssi-research/DGH, built on the BRECQ code): 20,000 iterations per unit, batch 32,
rounding-regularizer weight 0.01 (0.1 for MobileNetV2), beta 20 -> 2 after a 20 % warm-up, activation step sizes
learned with Adam at lr 4e-4 (cosine decay), 5,000 iterations.

Algorithm (:func:`reconstruct`), for each reconstruction *unit* in call order:

1. Cache the unit's **input** on the whole calibration set from the quantized model (weights and activations
   quantized, earlier units already reconstructed: BRECQ's "quantized input"), and its **target** output from the
   float model (``float_model``, the same submodule name without the ``model.`` prefix of the wrapper) or, when
   none is given, from the quantized model with quantization off (BN is folded, so that is the float output --
   unless bias correction changed the biases, in which case the targets carry that shift). Only this unit's tensors are
   cached, plus the previous unit's while the next one's are derived from them: peak memory is two units' inputs
   and outputs over the calibration set.

   Chained units (``ReconstructionConfig.chain_cache``, on by default; exact): when the tensor a unit receives in a
   forward pass is the very tensor the previous unit returns (checked once per model with one image,
   :func:`_chain_links`), its quantized input is the previous unit's quantized output on the cached inputs -- already
   computed for that unit's ``loss_after`` -- and its float target is the float unit applied to the previous unit's
   float target. Otherwise (an activation, pooling or flatten lies between) the model is run from the network input
   as above. Both ways run the same modules on the same ``cache_batch_size`` chunks, so the caches are equal
   (``tests/test_reconstruction.py`` checks bitwise equality); chaining turns the caching cost from quadratic in the
   number of units into linear. efficientnet_lite0 (measured with 20 units, its first block then split in two; 16
   of them chained; 128 images, 1 CPU thread): the full capture took 757 s (516 s quantized inputs + 241 s float
   targets); a whole chained BRECQ run at 20 + 5 steps per unit took 263 CPU-s (``docs/brecq_efficientnet_lite0.md``).
2. Replace each weight quantizer's round-to-nearest in the unit by a learned :class:`AdaRoundWeight` and minimize
   ``||unit(x_q) - y_fp||^2 + reg_weight * f_reg`` (BRECQ eq. 9) with the activations of the unit quantized and their
   step sizes learned jointly (LSQ-style, Esser et al. 2020; power-of-two steps through the quantizer's
   straight-through ``2^round(log2 s)``, so they stay powers of two).
3. Optionally refine the activation step sizes alone with the weights hard-rounded (``act_iters``, paper code).
4. Keep the learned hard rounding as the layer's ``weight_rounding`` while the next units are reconstructed (the
   float weight stays untouched, so the float path that gives later units their targets stays float). At the end,
   write the hard-rounded weight into the layer's weight tensor (:func:`bake_learned_rounding`). It lies on the
   quantizer's grid, so the layer's own round-to-nearest reproduces it exactly: ``quantized.pt`` (the state dict) therefore carries the
   learned rounding, and ``load_quantized`` rebuilds the exact model with no extra field or key (the weight
   quantizer's scale must be a stored tensor, not recomputed from the weight at load time).

Units (the block partition, :func:`partition_units`):

- ``adaround``: every quantized weight layer (conv / linear) alone.
- ``brecq``:
  - residual blocks: modules whose class is ``BasicBlock``, ``Bottleneck`` (CIFAR and torchvision ResNets),
    ``InvertedResidual`` (MobileNetV2; timm's EfficientNet/-Lite) or ``DepthwiseSeparableConv`` (timm's block without
    expansion: depthwise + pointwise conv, the first block of EfficientNet-Lite, which torchvision's MobileNetV2
    writes as an ``InvertedResidual`` with expansion 1 and BRECQ reconstructs as one block);
  - ultralytics / YOLOv5: each top-level layer ``model.model[i]`` (Conv, C3, C2f, SPPF, ...; recognised by the
    ``f``/``i`` attributes ultralytics sets) is one block; the Detect head is split into its per-level branches
    (``cv2[i]`` and ``cv3[i]`` for anchor-free heads, the final convs ``m[i]`` for YOLOv5);
  - every quantized weight layer not inside such a block (the stem conv, the final linear) is its own unit.

A unit must be a module that the model calls once per forward with one tensor, and that returns one tensor.

Interface used from the quantized model (:mod:`dgh.quantization`):

- quantized weight layers (``QuantConv2d``/``QuantLinear``...) with ``weight_quantizer`` (a ``FakeQuantizer``:
  ``to_integer_domain``, ``broadcast``, ``zero_point``, ``qmin``, ``qmax``) and ``weight_rounding`` (here set to
  :class:`LearnedRounding` during the optimization, ``None`` afterwards: the rounding is baked into ``weight``);
- activation quantizers (``FakeQuantizer`` with a role other than ``weight``) with ``make_learnable``;
- ``set_quant_state(qmodel, weights, activations)``;
- any submodule called on its own applies the same quantizers as in the full forward (the capture runtime); the
  input of a unit is read as the runtime would quantize it (``runtime.resolve``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dgh.env import resolve_device
from dgh.quantization.adaround import (
    AdaRoundWeight,
    RoundingOptimization,
    optimize_rounding,
    reconstruction_loss,
)
from dgh.quantization.capture import QuantizedModel
from dgh.quantization.config import ReconstructionConfig, ReconstructionMode
from dgh.quantization.quantizers import FakeQuantizer
from dgh.quantization.state import set_quant_state

RESIDUAL_BLOCK_CLASSES = frozenset({"BasicBlock", "Bottleneck", "InvertedResidual", "DepthwiseSeparableConv"})
DETECT_HEAD_CLASSES = frozenset({"Detect", "Segment", "Pose", "OBB", "v10Detect", "WorldDetect", "YOLOEDetect"})
MOBILENET_V2_BLOCK = "InvertedResidual"


class ReconstructionError(ValueError):
    """Bad input to reconstruction (empty calibration set, a model without quantized layers, a unit the model
    calls more than once...). The message is one line."""


# ----------------------------------------------------------------------------------------------- quantizer adapters


def is_weight_layer(module: nn.Module) -> bool:
    """A quantized weight layer: has a ``weight`` tensor and a ``weight_quantizer`` module."""
    return isinstance(getattr(module, "weight", None), torch.Tensor) and isinstance(
        getattr(module, "weight_quantizer", None), nn.Module
    )


class LearnedRounding(nn.Module):
    """``v -> floor(v) + h(V)``: AdaRound's rounding of ``v = w / s``, set as a layer's ``weight_rounding``.

    The layer's weight quantizer keeps applying its zero point, clamp and rescale
    (``FakeQuantizer.forward(x, rounding=...)``), so the fake-quantized weight is
    ``s * (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z)`` (AdaRound eq. 22).
    """

    def __init__(self, rounding: AdaRoundWeight) -> None:
        super().__init__()
        self.adaround = rounding

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - floor(v) is cached in the AdaRoundWeight
        return self.adaround.weight_floor + self.adaround.rounding()


def _adaround_for(layer: nn.Module) -> AdaRoundWeight:
    """An :class:`AdaRoundWeight` in the integer domain of ``layer``'s weight quantizer (scale 1, same zero point
    and range), initialized so that ``h(V)`` is the fractional part of ``w / s``.

    Raises:
        ReconstructionError: the weight quantizer is not calibrated.
    """
    wq = layer.weight_quantizer
    if not getattr(wq, "initialized", True):
        raise ReconstructionError(f"weight quantizer of {type(layer).__name__} is not calibrated; run quantize first")
    with torch.no_grad():
        v = wq.to_integer_domain(layer.weight.detach().float())
        zero_point = wq.broadcast(wq.zero_point.detach().float(), v)
    return AdaRoundWeight(v, torch.ones((), device=v.device), zero_point, int(wq.qmin), int(wq.qmax))


def _activation_quantizers(unit: nn.Module) -> list[nn.Module]:
    """Calibrated, active activation quantizers inside ``unit`` (layer output sites, add/cat/pool sites)."""
    return [
        m
        for m in unit.modules()
        if isinstance(m, FakeQuantizer) and m.role != "weight" and m.initialized and not m.bypass
    ]


def _make_act_scales_learnable(unit: nn.Module) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """Turn the unit's activation step sizes into ``nn.Parameter`` s (LSQ gradient; power-of-two scales are learned
    through the quantizer's straight-through ``2^round(log2 s)`` projection, so they stay powers of two).

    Returns:
        ``(parameters, quantizers that were made learnable here)`` (the latter are switched back afterwards).
    """
    params, switched = [], []
    for q in _activation_quantizers(unit):
        if not getattr(q, "learnable", False):
            q.make_learnable(True)
            switched.append(q)
        q.scale.requires_grad_(True)
        params.append(q.scale)
    return params, switched


def _output_clip(unit: nn.Module) -> tuple[float, float] | None:
    """For a single-layer unit whose output quantizer is active: its representable range ``[(qmin-z)s, (qmax-z)s]``.

    A layer called on its own quantizes its output at the boundary, while in the full network that quantizer may act
    after a following activation (e.g. ReLU) that lies outside the unit; clipping the float target to that range
    removes the error the unit cannot (and need not) reduce. Blocks end inside the unit: ``None``.
    """
    oq = getattr(unit, "output_quantizer", None)
    if not is_weight_layer(unit) or oq is None or not getattr(oq, "enabled", False) or getattr(oq, "bypass", False):
        return None
    if not getattr(oq, "initialized", False):
        return None
    with torch.no_grad():
        s = oq.effective_scale().detach().float()
        z = oq.zero_point.detach().float()
        lo = float(((oq.qmin - z) * s).min())
        hi = float(((oq.qmax - z) * s).max())
    return lo, hi


# ---------------------------------------------------------------------------------------------------- partition


@dataclass
class Unit:
    """One reconstruction unit: ``name`` (its module path in the model) and ``module``."""

    name: str
    module: nn.Module


def _has_weight_layer(module: nn.Module) -> bool:
    return any(is_weight_layer(m) for m in module.modules())


def _is_ultralytics_layer(module: nn.Module) -> bool:
    # ultralytics / YOLOv5 parse_model sets `.f` (input index) and `.i` (layer index) on each top-level layer
    return hasattr(module, "f") and hasattr(module, "i") and isinstance(getattr(module, "i"), int)


def partition_units(model: nn.Module, mode: ReconstructionMode | str = ReconstructionMode.BRECQ) -> list[Unit]:
    """The reconstruction units of ``model`` in module order (see the module docstring for the rules).

    Args:
        model: a quantized model (weight layers have a ``weight_quantizer``).
        mode: ``adaround`` (every weight layer) or ``brecq`` (blocks, plus the layers outside any block).

    Returns:
        Units covering every quantized weight layer exactly once.

    Raises:
        ReconstructionError: the model has no quantized weight layer.
    """
    mode = ReconstructionMode(mode)
    units: list[Unit] = []

    def visit(name: str, module: nn.Module) -> None:
        if not _has_weight_layer(module):
            return
        if mode is ReconstructionMode.ADAROUND:
            if is_weight_layer(module):
                units.append(Unit(name, module))
                return
        else:
            cls = type(module).__name__
            if cls in DETECT_HEAD_CLASSES:
                # per-level branches: recurse into the head's ModuleLists, one unit per list entry
                for child_name, child in module.named_children():
                    prefix = f"{name}.{child_name}" if name else child_name
                    if isinstance(child, nn.ModuleList):
                        for j, level in enumerate(child):
                            visit_as_unit(f"{prefix}.{j}", level)
                    else:
                        visit(prefix, child)
                return
            if cls in RESIDUAL_BLOCK_CLASSES or _is_ultralytics_layer(module) or is_weight_layer(module):
                units.append(Unit(name, module))
                return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    def visit_as_unit(name: str, module: nn.Module) -> None:
        if _has_weight_layer(module):
            units.append(Unit(name, module))

    visit("", model)
    if not units:
        raise ReconstructionError("the model has no quantized weight layer (no module with a weight_quantizer)")
    return units


# ------------------------------------------------------------------------------------------------------ caching


class _StopForward(Exception):
    """Raised by a hook once the unit's tensor is captured, to skip the rest of the network."""


def _abort_forward(qmodel: nn.Module) -> None:
    """Leave the quantized model's capture runtime idle after a forward pass stopped by :class:`_StopForward`
    (its entry post-hook, which normally exits the TorchFunctionMode and resets the call stack, did not run)."""
    if isinstance(qmodel, QuantizedModel):
        qmodel.runtime.abort()


def _resolve_pending(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized value of ``x`` if the runtime holds it as a pending site output (a tensor whose quantizer acts
    at its first consumer, i.e. inside the unit), else ``x``."""
    return qmodel.runtime.resolve(x) if isinstance(qmodel, QuantizedModel) else x


def _capture(
    qmodel: nn.Module,
    unit: Unit,
    images_nchw: torch.Tensor,
    device: torch.device,
    batch_size: int,
    which: str,
) -> torch.Tensor:
    """See :func:`_capture_from`; ``unit.module`` is hooked and ``qmodel`` is run."""
    return _capture_from(qmodel, unit.name, unit.module, images_nchw, device, batch_size, which)


def _capture_from(
    qmodel: nn.Module,
    name: str,
    module: nn.Module,
    images_nchw: torch.Tensor,
    device: torch.device,
    batch_size: int,
    which: str,
) -> torch.Tensor:
    """Run ``qmodel`` over the calibration set and stack the unit's ``which`` = "input" | "output" tensors.

    The input is taken as the unit sees it (a pending site output is quantized first); the forward stops right
    after the unit's tensor is captured.

    Returns:
        ``(N, ...)`` float32 on ``device``.

    Raises:
        ReconstructionError: the unit is not called, or its input/output is not one tensor.
    """
    chunks: list[torch.Tensor] = []
    calls = [0]

    def pre_hook(_m, args):
        calls[0] += 1
        if not args or not isinstance(args[0], torch.Tensor):
            raise ReconstructionError(f"unit {name!r} does not take one tensor; it cannot be reconstructed alone")
        with torch._C.DisableTorchFunction():
            chunks.append(_resolve_pending(qmodel, args[0]).detach().float().clone())
        raise _StopForward

    def post_hook(_m, _args, output):
        calls[0] += 1
        if not isinstance(output, torch.Tensor):
            raise ReconstructionError(f"unit {name!r} does not return one tensor; it cannot be reconstructed")
        with torch._C.DisableTorchFunction():
            chunks.append(_resolve_pending(qmodel, output).detach().float().clone())
        raise _StopForward

    handle = (
        module.register_forward_pre_hook(pre_hook)
        if which == "input"
        else module.register_forward_hook(post_hook)
    )
    try:
        with torch.no_grad():
            for start in range(0, images_nchw.shape[0], batch_size):
                calls[0] = 0
                try:
                    qmodel(images_nchw[start : start + batch_size].to(device))
                except _StopForward:
                    pass
                finally:
                    _abort_forward(qmodel)
                if calls[0] != 1:
                    raise ReconstructionError(f"unit {name!r} was not called during the forward pass")
    finally:
        handle.remove()
    return torch.cat(chunks)


def _call_order(qmodel: nn.Module, units: list[Unit], sample_nchw: torch.Tensor) -> list[Unit]:
    """Sort ``units`` by the order of their first call in a forward pass; raise if one is called twice."""
    order: dict[int, int] = {}
    counts: dict[int, int] = {}
    handles = []
    for k, u in enumerate(units):

        def hook(_m, _args, k=k):
            counts[k] = counts.get(k, 0) + 1
            order.setdefault(k, len(order))

        handles.append(u.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            qmodel(sample_nchw)
    finally:
        for h in handles:
            h.remove()
    for k, c in counts.items():
        if c > 1:
            raise ReconstructionError(
                f"unit {units[k].name!r} is called {c} times per forward; reconstruct it with mode='adaround'"
            )
    missing = [units[k].name for k in range(len(units)) if k not in order]
    if missing:
        raise ReconstructionError(f"units never called in the forward pass: {', '.join(missing[:4])}")
    return [units[k] for k in sorted(order, key=order.get)]


def _chain_links(model: nn.Module, modules: list[nn.Module], sample_nchw: torch.Tensor) -> list[bool]:
    """For units in call order: ``links[k]`` is True when, in one forward pass of ``model`` on ``sample_nchw``, the
    tensor that unit ``k`` receives as its input *is* (same object) the tensor unit ``k - 1`` returns, unmodified (its
    ``_version`` counter unchanged: an in-place activation in between, e.g. ``ReLU6(inplace=True)``, breaks the
    link); ``links[0]`` is False. Then unit ``k``'s input on any data is unit ``k - 1``'s output (resolved by the
    same pending-site quantizer in a quantized model), and can be computed from unit ``k - 1``'s cached input alone.

    Args:
        model: the quantized model or the float model; modules: the units' modules in it, in call order.
        sample_nchw: ``(1, C, H, W)`` float32 on the model's device.

    Returns:
        One bool per unit. A unit called with no tensor or called twice gives False for itself and its successor.
    """
    outputs: dict[int, tuple[torch.Tensor, int]] = {}
    links = [False] * len(modules)
    calls = [0] * len(modules)
    handles = []
    for k, module in enumerate(modules):

        def pre(_m, args, k=k):
            calls[k] += 1
            prev = outputs.get(k - 1)
            links[k] = bool(
                k > 0 and calls[k] == 1 and args and prev is not None and args[0] is prev[0]
                and args[0]._version == prev[1]  # not changed in place in between (e.g. an inplace ReLU6)
            )

        def post(_m, _args, output, k=k):
            if isinstance(output, torch.Tensor) and calls[k] == 1:
                outputs[k] = (output, output._version)
            else:
                outputs.pop(k, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(sample_nchw)
    finally:
        for h in handles:
            h.remove()
        _abort_forward(model)
    return [link and calls[k] == 1 and calls[k - 1] == 1 for k, link in enumerate(links)]


def _unit_outputs(module: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``module`` applied to ``inputs`` (``(N, ...)`` float32) in chunks of ``batch_size``, no gradient: ``(N, ...)``
    float32 (a unit of the quantized model called on its own returns its quantized output)."""
    with torch.no_grad():
        chunks = [module(inputs[s : s + batch_size]).detach().float() for s in range(0, inputs.shape[0], batch_size)]
    return torch.cat(chunks)


# -------------------------------------------------------------------------------------------------- reconstruct


def _default_reg_weight(model: nn.Module) -> float:
    """BRECQ's rounding-regularizer weight for ``model``: 0.1 where it has a block class named ``InvertedResidual``,
    else 0.01 (the BRECQ code README: ``--weight 0.1`` for MobileNetV2, the default 0.01 for ResNets). Both
    torchvision's MobileNetV2 and timm's EfficientNet-Lite use that class name: the depthwise inverted-residual
    structure the 0.1 was chosen for."""
    return 0.1 if any(type(m).__name__ == MOBILENET_V2_BLOCK for m in model.modules()) else 0.01


def _unit_loss(
    module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, keep: list | None = None
) -> float:
    """Mean :func:`reconstruction_loss` of ``module`` over ``inputs`` vs ``targets`` (chunks of ``batch_size``); the
    outputs (float32 chunks) are appended to ``keep`` when given."""
    with torch.no_grad():
        total = 0.0
        for s in range(0, inputs.shape[0], batch_size):
            out = module(inputs[s : s + batch_size])
            if keep is not None:
                keep.append(out.detach().float())
            total += reconstruction_loss(out, targets[s : s + batch_size]).item() * out.shape[0]
    return total / inputs.shape[0]


def reconstruct_unit(
    unit: Unit,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: ReconstructionConfig,
    reg_weight: float,
    generator: torch.Generator,
    progress: bool = True,
    outputs: list | None = None,
) -> dict[str, float]:
    """Reconstruct one unit in place from cached inputs and float targets (steps 2-4 of the module docstring).

    The caller sets the quantized model's state to weights and activations quantized.

    Args:
        unit: the unit (its weight layers carry a calibrated ``weight_quantizer``).
        inputs: ``(N, ...)`` the unit's inputs in the quantized model, float32, on the unit's device.
        targets: ``(N, ...)`` the unit's float outputs (clipped here to the output quantizer's range for a
            single-layer unit, see :func:`_output_clip`).
        config: settings; reg_weight: rounding-regularizer weight; generator: seeded CPU generator.
        outputs: when given, filled with the reconstructed unit's quantized outputs on ``inputs`` (float32 chunks of
            ``config.cache_batch_size``; ``torch.cat`` gives ``(N, ...)``): the next unit's inputs when chained.

    Returns:
        ``{"loss_before", "loss_after", "reverted"}``: the reconstruction loss (:func:`reconstruction_loss`) of the
        unit over all cached inputs with nearest rounding and after reconstruction; ``reverted`` is 1.0 when
        ``keep_best`` restored nearest rounding.
    """
    clip = _output_clip(unit.module)
    if clip is not None:
        targets = targets.clamp(*clip)
    layers = [m for m in unit.module.modules() if is_weight_layer(m)]
    loss_before = _unit_loss(unit.module, inputs, targets, config.cache_batch_size)
    snapshot = {k: v.detach().clone() for k, v in unit.module.state_dict().items() if isinstance(v, torch.Tensor)}
    roundings = [_adaround_for(layer).to(layer.weight.device) for layer in layers]
    act_scales, switched = _make_act_scales_learnable(unit.module) if config.learn_act_scales else ([], [])
    opt = RoundingOptimization(
        iters=config.iters,
        batch_size=config.batch_size,
        reg_weight=reg_weight,
        lr=config.lr,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        warmup=config.warmup,
        act_lr=config.act_lr,
    )
    done = False
    try:
        for layer, r in zip(layers, roundings, strict=True):
            layer.weight_rounding = LearnedRounding(r)
        optimize_rounding(
            unit.module, roundings, inputs, targets, opt, act_scales, generator, progress, desc=f"rounding {unit.name}"
        )
        if act_scales and config.act_iters > 0:
            act_opt = RoundingOptimization(iters=config.act_iters, batch_size=config.batch_size, act_lr=config.act_lr)
            optimize_rounding(
                unit.module, [], inputs, targets, act_opt, act_scales, generator, progress, desc=f"act {unit.name}"
            )
        # the hard rounding stays set as `weight_rounding` (the float weight is untouched, so the float path that
        # gives later units their targets stays float); `reconstruct` bakes it into the weights at the end
        done = True
    finally:
        if not done:
            for layer in layers:
                layer.weight_rounding = None
        for a in act_scales:
            a.requires_grad_(False)
        for q in switched:
            q.make_learnable(False)
    kept: list = []
    loss_after = _unit_loss(unit.module, inputs, targets, config.cache_batch_size, kept)
    reverted = bool(config.keep_best and not loss_after <= loss_before)
    if reverted:
        for layer in layers:
            layer.weight_rounding = None
        unit.module.load_state_dict(snapshot, strict=False)
        kept = []
        loss_after = _unit_loss(unit.module, inputs, targets, config.cache_batch_size, kept)
    if outputs is not None:
        outputs[:] = kept
    return {"loss_before": loss_before, "loss_after": loss_after, "reverted": float(reverted)}


def bake_learned_rounding(qmodel: nn.Module) -> None:
    """Write every weight layer's fake-quantized weight into its ``weight`` and clear ``weight_rounding``, in place.

    Layers with a learned rounding get ``s * (clamp(floor(w/s) + h + z, qmin, qmax) - z)`` with the hard ``h``;
    layers without one (units that ``keep_best`` reverted) get their round-to-nearest value. Either lies on the
    quantizer's grid, so the layer's round-to-nearest reproduces it exactly: the state dict (``quantized.pt``)
    carries the rounding with no extra key.
    """
    for layer in qmodel.modules():
        if not is_weight_layer(layer) or not hasattr(layer, "quantized_weight"):
            continue
        rounding = getattr(layer, "weight_rounding", None)
        if isinstance(rounding, LearnedRounding):
            rounding.adaround.soft = False
        was_enabled = layer.weight_quantizer.enabled
        layer.weight_quantizer.enabled = True
        with torch.no_grad():
            w_q = layer.quantized_weight().detach().clone()
        layer.weight_quantizer.enabled = was_enabled
        layer.weight_rounding = None
        with torch.no_grad():
            layer.weight.copy_(w_q)


def reconstruct(
    qmodel: nn.Module,
    calib_images_nchw: torch.Tensor,
    config: ReconstructionConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    float_model: nn.Module | None = None,
) -> nn.Module:
    """AdaRound / BRECQ reconstruction of a calibrated fake-quantized model, in place.

    Args:
        qmodel: the quantized model from ``quantize_model`` (thresholds already selected); same forward contract as
            the float model. Its weight layers' weights are replaced by their hard-rounded values.
        calib_images_nchw: ``(N, 3, H, W)`` float32 calibration images in the model's normalized space.
        config: :class:`ReconstructionConfig` (defaults: BRECQ, paper-code settings).
        device: ``None``/"auto" = CUDA when present, else CPU. Runs in float32 (no AMP: rounding logits and the
            block MSE are sensitive to fp16 error).
        progress: one tqdm bar per unit.
        float_model: the float model ``qmodel`` was built from (``loaded.model``): the source of the float targets.
            Recommended: without it the targets come from ``qmodel`` with quantization off, which differs from the
            float model where bias correction shifted biases. It is moved to ``device`` and left in eval mode.

    Returns:
        ``qmodel`` (the same object), in eval mode, with weights and activations quantized, and a
        ``reconstruction_report`` attribute: a list of ``{"unit", "loss_before", "loss_after"}`` dicts.

    Raises:
        ReconstructionError: empty or malformed calibration set, no quantized layer, a unit that cannot be run alone.
    """
    config = config or ReconstructionConfig()
    if not isinstance(calib_images_nchw, torch.Tensor) or calib_images_nchw.dim() != 4 or calib_images_nchw.shape[0] == 0:
        shape = tuple(calib_images_nchw.shape) if isinstance(calib_images_nchw, torch.Tensor) else type(calib_images_nchw)
        raise ReconstructionError(f"calibration images must be a non-empty (N, C, H, W) tensor, got {shape}")
    dev = resolve_device(None if device is None else str(device))
    images = calib_images_nchw.detach().float().cpu()
    qmodel.to(dev).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if float_model is not None:
        float_model.to(dev).eval()
    elif (getattr(qmodel, "quant_config", None) or {}).get("bias_correction"):
        warnings.warn(
            "reconstruction without float_model on a bias-corrected model: float targets carry the bias shift; "
            "pass float_model=loaded.model or quantize with bias_correction=False",
            stacklevel=2,
        )
    reg_weight = config.reg_weight if config.reg_weight is not None else _default_reg_weight(qmodel)
    units = partition_units(qmodel, config.mode)
    set_quant_state(qmodel, True, True)
    units = _call_order(qmodel, units, images[:1].to(dev))
    float_units: list[tuple[str, nn.Module]] = []
    if float_model is not None:
        for unit in units:
            float_name = unit.name.removeprefix("model.") if hasattr(qmodel, "input_quantizer") else unit.name
            try:
                float_units.append((float_name, float_model.get_submodule(float_name)))
            except AttributeError:
                raise ReconstructionError(
                    f"float model has no submodule {float_name!r} for unit {unit.name!r}"
                ) from None
    q_links = [False] * len(units)
    f_links = [False] * len(units)
    if config.chain_cache:
        sample = images[:1].to(dev)
        q_links = _chain_links(qmodel, [u.module for u in units], sample)
        if float_units:
            f_links = _chain_links(float_model, [m for _, m in float_units], sample)
    torch.manual_seed(config.seed)
    report = []
    prev_outputs: list = []  # the previous unit's quantized outputs on its cached inputs (chunks)
    prev_targets: torch.Tensor | None = None  # the previous unit's float outputs
    bar = tqdm(units, desc=f"{config.mode.value} units", disable=not progress)
    for k, unit in enumerate(bar):
        set_quant_state(qmodel, True, True)
        if q_links[k] and prev_outputs:
            inputs = torch.cat(prev_outputs)
        else:
            inputs = _capture(qmodel, unit, images, dev, config.cache_batch_size, "input")
        prev_outputs = []
        if float_units:
            float_name, float_unit = float_units[k]
            if f_links[k] and prev_targets is not None:
                targets = _unit_outputs(float_unit, prev_targets, config.cache_batch_size)
            else:
                targets = _capture_from(float_model, float_name, float_unit, images, dev, config.cache_batch_size,
                                        "output")
        else:
            set_quant_state(qmodel, False, False)
            targets = _capture(qmodel, unit, images, dev, config.cache_batch_size, "output")
        prev_targets = targets if k + 1 < len(units) and f_links[k + 1] else None
        set_quant_state(qmodel, True, True)
        generator = torch.Generator().manual_seed(config.seed * 1000003 + k)
        keep = prev_outputs if k + 1 < len(units) and q_links[k + 1] else None
        stats = reconstruct_unit(unit, inputs, targets, config, reg_weight, generator, progress, outputs=keep)
        report.append({"unit": unit.name, **stats})
        bar.set_postfix(unit=unit.name, loss=f"{stats['loss_after']:.4g}")
        del inputs, targets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    set_quant_state(qmodel, True, True)
    bake_learned_rounding(qmodel)
    qmodel.reconstruction_report = report
    if not all(math.isfinite(r["loss_after"]) for r in report):
        raise ReconstructionError("reconstruction diverged (non-finite loss); lower the learning rates")
    return qmodel
