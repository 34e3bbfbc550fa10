"""Where the DVC stages put their outputs: one object, used by the stages (:mod:`dgh.pipeline`) and the report.

Layout under the project root (the folder of ``params.yaml``)::

    stages/inputs/<kind>/<key>.json      fingerprints of the weights files and data folders
    stages/generate/<set-id>/            images.pt, meta.json, preview.png, losses.json  (generated sets)
                                         calib.json                                      (every set)
    stages/quantize/<exp-id>/            quantized.pt, quantization_report.csv, meta.json
    stages/evaluate_<task>/<exp-id>/     metrics.json
    stages/evaluate_<task>/<model>-float/metrics.json   (float baseline, once per model)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dgh.generation.output import META_FILE, PREVIEW_FILE
from dgh.io import IMAGES_FILE

STAGES_DIR = "stages"
CALIB_FILE = "calib.json"
LOSSES_FILE = "losses.json"
QUANTIZED_FILE = "quantized.pt"
QUANT_REPORT_FILE = "quantization_report.csv"
METRICS_FILE = "metrics.json"


def float_id(model: str) -> str:
    """The id of a model's float baseline: ``<model>-float``."""
    return f"{model}-float"


@dataclass(frozen=True)
class StageLayout:
    """The stage output paths of one project (``root`` = the folder holding ``params.yaml``)."""

    root: Path

    def stage_dir(self, stage: str, item: str) -> Path:
        """``<root>/stages/<stage>/<item>``."""
        return self.root / STAGES_DIR / stage / item

    def generate_dir(self, set_id: str) -> Path:
        """Folder of calibration set ``set_id``."""
        return self.stage_dir("generate", set_id)

    def images_file(self, set_id: str) -> Path:
        """``images.pt`` of a generated calibration set (see :func:`dgh.io.load_images`)."""
        return self.generate_dir(set_id) / IMAGES_FILE

    def calib_file(self, set_id: str) -> Path:
        """``calib.json``: the record of a calibration set (present once the set is complete)."""
        return self.generate_dir(set_id) / CALIB_FILE

    def losses_file(self, set_id: str) -> Path:
        """``losses.json``: the generation loss terms per iteration."""
        return self.generate_dir(set_id) / LOSSES_FILE

    def quantize_dir(self, experiment_id: str) -> Path:
        """Folder of a quantized experiment."""
        return self.stage_dir("quantize", experiment_id)

    def quantized_file(self, experiment_id: str) -> Path:
        """``quantized.pt`` of an experiment."""
        return self.quantize_dir(experiment_id) / QUANTIZED_FILE

    def input_file(self, kind: str, key: str) -> Path:
        """Fingerprint of an input (``kind``: ``model`` | ``calib`` | ``imagenet`` | ``coco``; see
        :mod:`dgh.pipeline.inputs`)."""
        return self.stage_dir("inputs", kind) / f"{key}.json"

    def metrics_file(self, task: str, experiment_id: str) -> Path:
        """``metrics.json`` of an experiment (or of :func:`float_id`) on ``task`` (``imagenet`` | ``coco``)."""
        return self.stage_dir(f"evaluate_{task}", experiment_id) / METRICS_FILE
