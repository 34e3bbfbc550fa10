"""Quantization configuration: :class:`QuantConfig` (pydantic) with the :class:`Preset` and :class:`Algorithm` enums.

The presets themselves (what each one quantizes and how) are defined in :mod:`dgh.quantization.presets`.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgh.quantization.quantizers import SUPPORTED_BITS
from dgh.quantization.reconstruction import ReconstructionConfig, ReconstructionMode


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
        reconstruction: :class:`~dgh.quantization.reconstruction.ReconstructionConfig` (a dict is converted) used
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
