"""Accuracy of float or quantized models on real labelled data: top-1/top-5 (percent) and COCO mAP (0-1)."""

from dgh.evaluation.classification import evaluate_classification, topk_correct
from dgh.evaluation.coco import coco_map, evaluate_coco, non_max_suppression

__all__ = ["coco_map", "evaluate_classification", "evaluate_coco", "non_max_suppression", "topk_correct"]
