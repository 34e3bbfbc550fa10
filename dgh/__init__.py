"""dgh: Data Generation for Hardware-friendly post-training quantization (DGH, arXiv 2410.22110).

The float model's own BatchNorm statistics synthesize a calibration set (no real data), which then
calibrates a post-training quantization (PTQ) in which every layer, input and output is quantized.

Subpackages, one concern each:

- :mod:`dgh.models`: the model registry (name -> builder, weights, preprocessing, task, padding ``p``).
- :mod:`dgh.data`: real labelled datasets (ImageFolder, COCO json, YOLO labels).
- :mod:`dgh.generation`: the DGH data-generation engine and its baselines.
- :mod:`dgh.quantization`: hardware-friendly fake quantization, threshold selection, reconstruction.
- :mod:`dgh.evaluation`: top-1/top-5 and COCO mAP.
"""

__version__ = "0.1.0"
