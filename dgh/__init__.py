"""dgh: Data Generation for Hardware-friendly post-training quantization (DGH, arXiv 2410.22110).

The float model's own BatchNorm statistics synthesize a calibration set (no real data), which then
calibrates a post-training quantization (PTQ) in which every layer, input and output is quantized.

Subpackages, one concern each:

- :mod:`dgh.models`: the model registry (name -> builder, weights, preprocessing, task, padding ``p``).
- :mod:`dgh.data`: real labelled datasets (ImageFolder, COCO json, YOLO labels).
- :mod:`dgh.generation`: the DGH data-generation engine and its baselines.
- :mod:`dgh.quantization`: hardware-friendly fake quantization, threshold selection, reconstruction.
- :mod:`dgh.evaluation`: top-1/top-5 and COCO mAP.
- :mod:`dgh.runs`: the steps that write a folder (generate, quantize, evaluate), shared by the CLI and the stages.
- :mod:`dgh.pipeline`: the DVC stages, one module each (``python -m dgh.pipeline.<stage>``); :mod:`dgh.params`
  validates ``params.yaml``, :mod:`dgh.layout` says where stage outputs go, :mod:`dgh.report` renders them.
- :mod:`dgh.cli`: the ``dgh`` command.
"""

__version__ = "0.1.0"
