"""Quantization configuration: :class:`QuantConfig` (pydantic) with the :class:`Preset` and :class:`Algorithm` enums,
and the settings of AdaRound / BRECQ reconstruction (:class:`ReconstructionConfig`).

The presets themselves (what each one quantizes and how) are defined in :mod:`dgh.quantization.presets`.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgh.quantization.quantizers import SUPPORTED_BITS


class Preset(str, Enum):
    """Hardware-friendly quantization settings (method.md, "Hardware-friendly quantization").

    - ``pot``: MCT IMX500-like: symmetric per-channel weights; power-of-two per-tensor activations, signed or
      unsigned by the observed range; input and outputs quantized.
    - ``paper``: DGH paper code: asymmetric per-channel weights, asymmetric per-tensor activations, every layer and
      the output at the target bit-width.
    - ``academic``: as ``paper``, but first and last layers' weights and the network input at 8 bits, output float.
    """

    POT = "pot"
    PAPER = "paper"
    ACADEMIC = "academic"


class Algorithm(str, Enum):
    """PTQ algorithm: threshold selection only (``minmax``, ``mse``) or MSE init + reconstruction (``adaround``,
    ``brecq``; :mod:`dgh.quantization.reconstruction`)."""

    MINMAX = "minmax"
    MSE = "mse"
    ADAROUND = "adaround"
    BRECQ = "brecq"


class ReconstructionMode(str, Enum):
    """Granularity of the reconstruction: ``adaround`` = one weight layer at a time, ``brecq`` = one block."""

    ADAROUND = "adaround"
    BRECQ = "brecq"


class ReconstructionConfig(BaseModel):
    """Settings of :func:`dgh.quantization.reconstruction.reconstruct`; the defaults are the DGH paper code's (built on the BRECQ code).

    Attributes:
        mode: ``brecq`` (block reconstruction) or ``adaround`` (layer by layer).
        iters: rounding-optimization steps per unit (paper: 20,000). Lower it for CPU budgets.
        batch_size: calibration images per step (32).
        reg_weight: rounding-regularizer weight; ``None`` = 0.01, or 0.1 when the model has MobileNetV2
            ``InvertedResidual`` blocks (BRECQ code).
        lr: Adam learning rate of the rounding logits (1e-3).
        beta_start, beta_end, warmup: annealing of the regularizer exponent (20 -> 2 after 20 % of ``iters``).
        learn_act_scales: learn activation step sizes jointly with the rounding (LSQ-style). Power-of-two
            quantizers learn ``log2`` through their straight-through ``2^round(log2 s)`` projection: their step
            stays a power of two.
        act_lr: Adam learning rate of the activation step sizes (4e-4, DGH paper code), cosine decay to 0.
        act_iters: extra steps per unit that refine only the activation step sizes with the weights hard-rounded
            (paper code: 5,000). 0 disables.
        cache_batch_size: batch size of the forward passes that cache a unit's inputs and targets.
        chain_cache: derive a unit's cached input (target) from the previous unit's cached output (float output)
            when the model passes one straight to the other, instead of re-running the network from its input
            (exact: same modules, same chunks; :mod:`dgh.quantization.reconstruction`, step 1). Off: the BRECQ
            code's way, one partial forward per unit.
        keep_best: if a unit's loss on the calibration set ends above its loss with nearest rounding (possible with
            very short CPU budgets), restore the unit's nearest rounding and step sizes; the report says so.
        seed: seeds the batch draws (the result is deterministic for a seed and a device).
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    mode: ReconstructionMode = ReconstructionMode.BRECQ
    iters: int = Field(20000, ge=0)
    batch_size: int = Field(32, ge=1)
    reg_weight: float | None = Field(None, ge=0)
    lr: float = Field(1e-3, gt=0)
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1)
    learn_act_scales: bool = True
    act_lr: float = Field(4e-4, gt=0)
    act_iters: int = Field(5000, ge=0)
    cache_batch_size: int = Field(64, ge=1)
    chain_cache: bool = True
    keep_best: bool = True
    seed: int = 0


class QuantConfigError(ValueError):
    """Invalid quantization configuration. The message is one line."""


class QuantConfig(BaseModel):
    """Everything that defines a post-training quantization run.

    Attributes:
        preset: :class:`Preset`.
        w_bits, a_bits: weight / activation bit-widths (WxAy), each in 2..8 or 16.
        algorithm: :class:`Algorithm` (default ``mse``).
        batch_size: calibration forward batch size (any N >= 1 works, also N < batch_size).
        samples_per_site: bound on the activation values kept per site for the MSE search (memory bound).
        n_candidates: grid size of the non-power-of-two activation threshold searches.
        weight_candidates: grid size of the per-channel weight threshold search (shrink factors in [0.2, 1]).
        bias_correction: correct each layer's bias for the mean error of its quantized weight. ``None``: the
            preset's default (on for ``pot`` as in MCT; off for ``paper``/``academic`` as in the paper code) for
            ``minmax``/``mse``, off for ``adaround``/``brecq``. The resolved value is stored in
            ``qmodel.quant_config["bias_correction"]``.
        seed: seed of the activation subsampling.
        reconstruction: :class:`ReconstructionConfig` (a dict is converted) used
            by ``adaround``/``brecq``; its ``mode`` always follows ``algorithm``. Lower ``iters``/``act_iters`` for
            CPU budgets (paper code: 20,000 + 5,000 per block).
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    preset: Preset = Preset.POT
    w_bits: int = 8
    a_bits: int = 8
    algorithm: Algorithm = Algorithm.MSE
    batch_size: int = Field(default=64, ge=1)
    samples_per_site: int = Field(default=2**16, ge=1024)
    n_candidates: int = Field(default=100, ge=2)
    weight_candidates: int = Field(default=50, ge=2)
    bias_correction: bool | None = None
    seed: int = 0
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig)

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise QuantConfigError(f"bit-width must be one of {SUPPORTED_BITS}, got {v}")
        return v

    @field_validator("reconstruction", mode="before")
    @classmethod
    def _default_reconstruction(cls, v: object) -> object:
        return ReconstructionConfig() if v is None else v

    @model_validator(mode="after")
    def _sync_reconstruction_mode(self) -> QuantConfig:
        """``algorithm`` adaround/brecq decides the reconstruction granularity (one layer vs one block)."""
        if self.algorithm in (Algorithm.ADAROUND, Algorithm.BRECQ):
            mode = ReconstructionMode(self.algorithm.value)
            if self.reconstruction.mode is not mode:
                self.reconstruction = self.reconstruction.model_copy(update={"mode": mode})
        return self

    def to_json_dict(self) -> dict:
        """Plain-typed dict (enums as strings, nested config dumped) for files and MLflow params."""
        return self.model_dump(mode="json")
