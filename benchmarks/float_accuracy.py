"""Float accuracy of the real assets through the product's own loaders and evaluators.

Not a speed benchmark: it reproduces the assets README table and prints each number next to its reference.

Usage (from the project root; ``DGH_ASSETS`` defaults to ``../shared/assets``)::

    python benchmarks/float_accuracy.py                 # all five rows (~15 min on 2 busy CPU cores)
    python benchmarks/float_accuracy.py r20 y640        # a subset: r20 r56 y640 y320 ytrain
    python benchmarks/float_accuracy.py y640 --single-label   # NMS with the best class only (ablation)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dgh.env import configure_offline

configure_offline()

from dgh.evaluation import evaluate_classification, evaluate_coco  # noqa: E402
from dgh.models import load_model  # noqa: E402

# row -> (reference from the assets README, tolerance)
REFERENCE = {
    "r20": ("top1", 81.03, 0.05),
    "r56": ("top1", 83.20, 0.05),
    "y640": ("map", 0.340, 0.005),
    "y320": ("map", 0.288, 0.005),
    "ytrain": ("map", 0.360, 0.005),
}


def run_row(row: str, assets: Path, multi_label: bool) -> dict:
    """Evaluate one row; returns the metrics dict."""
    if row in ("r20", "r56"):
        file = {"r20": "resnet20-12fca82f.th", "r56": "resnet56-4bfd9763.th"}[row]
        loaded = load_model(f"resnet{row[1:]}_cifar10", str(assets / "cifar10" / "models" / file))
        return evaluate_classification(loaded.model, loaded.spec, assets / "cifar10" / "test", progress=False)
    loaded = load_model("yolov5n", str(assets / "coco" / "models" / "yolov5n.pt"), imgsz=320 if row == "y320" else 640)
    if row == "ytrain":
        train = assets / "coco" / "train2017-128"
        return evaluate_coco(loaded.model, loaded, train / "images", multi_label=multi_label, progress=False,
                             annotations=train / "annotations" / "instances_train2017.json")
    val = assets / "coco" / "val2017-128"
    return evaluate_coco(loaded.model, loaded, val / "images", labels=val / "labels", multi_label=multi_label,
                         progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", default=list(REFERENCE), choices=list(REFERENCE))
    parser.add_argument("--single-label", action="store_true", help="NMS keeps only the best class per box")
    args = parser.parse_args()
    assets = Path(os.environ.get("DGH_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
    if not (assets / "cifar10").is_dir():
        raise SystemExit(f"real assets not found at {assets} (set DGH_ASSETS)")
    for row in args.rows or list(REFERENCE):
        start = time.perf_counter()
        metrics = run_row(row, assets, multi_label=not args.single_label)
        key, ref, tol = REFERENCE[row]
        status = "ok" if abs(metrics[key] - ref) <= tol else "OUT OF TOLERANCE"
        print(f"{row}: {key} {metrics[key]:.4f} (reference {ref} +- {tol}: {status}) "
              f"{json.dumps(metrics)} [{time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
