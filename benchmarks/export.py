"""ONNX export benchmark: accuracy from onnxruntime vs the fake-quant model, agreement in steps, onnxruntime speed on
the exported QDQ model vs float PyTorch, and file sizes.

Usage (from the repo root, venv active)::

    python benchmarks/export.py --model resnet20_cifar10 --weights W.th --quantized out/q --images cifar10/test \\
        --eval-data cifar10/test
    python benchmarks/export.py --model yolov5n --weights yolov5n.pt --imgsz 320 --quantized out/q \\
        --images coco/val2017-128/images --eval-data coco/val2017-128/images --labels coco/val2017-128/labels \\
        --out bench/yolo

Accuracy (with ``--eval-data``): top-1 (percent) or COCO mAP@[.5:.95] of the fake-quant model as the report computes
it (``dgh.runs.evaluate.model_to_evaluate``), of the exported file in onnxruntime (the ``--backend onnxruntime``
path, graph optimization ``none``), and of the fake-quant model with PyTorch's other convolution kernels (oneDNN
off): the float-order reference, i.e. how far the figure moves when only the float summation order changes
(``dgh.export.verify`` explains why runtimes differ by that much); and, for information, onnxruntime with graph
optimization ``all`` (integer ``QLinearConv`` kernels where it fuses, the fast path). The issue's tolerance is 0.1
point top-1 or 0.002 mAP.

Everything is measured in one run on the same images (a batch read from ``--images`` with the model's evaluation
preprocessing; classification: resize/crop, detection: letterbox): float PyTorch, fake-quant PyTorch, onnxruntime on
the float ONNX and onnxruntime on the QDQ ONNX (graph optimization ``all`` and ``none``). Repeats are interleaved
(one call of each runner per round) and the minimum wall time per runner is reported, with its ratio to float
PyTorch. Sizes: the QDQ ``model.onnx`` against the float model's ONNX (same exporter, opset, dynamic batch).
One thread for PyTorch and onnxruntime unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dgh.env import configure_offline

configure_offline()

from dgh.data.calibration import load_calibration_set  # noqa: E402
from dgh.evaluation import evaluate_classification, evaluate_coco  # noqa: E402
from dgh.export import (  # noqa: E402
    GraphOptimization,
    OnnxRuntimeModel,
    evaluate_coco_onnx,
    export_float_onnx,
    export_quantized,
)
from dgh.export.verify import alternate_kernels  # noqa: E402
from dgh.models import load_model  # noqa: E402
from dgh.quantization import load_quantized  # noqa: E402
from dgh.runs.evaluate import model_to_evaluate  # noqa: E402

TOLERANCE = {"top1": 0.1, "map": 0.002}  # issue 15: top-1 points, mAP (0-1)


def interleaved_min_times(runners: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """One warm-up call per runner, then ``repeats`` rounds calling every runner once per round; the minimum wall
    time per runner in seconds."""
    with torch.inference_mode():
        for fn in runners.values():
            fn(x)
        best = {name: float("inf") for name in runners}
        for _ in range(repeats):
            for name, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                best[name] = min(best[name], time.perf_counter() - t)
    return best


class TopOneRecorder(torch.nn.Module):
    """Passes a classifier's logits through and records its top-1 predictions, batch by batch (evaluation order)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.predictions: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        self.predictions.append(y.argmax(dim=1).cpu())
        return y

    def all(self) -> torch.Tensor:
        return torch.cat(self.predictions)


def accuracy(args: argparse.Namespace, loaded, qmodel, onnx_path: Path) -> dict:  # noqa: ANN001
    """Top-1 or mAP of the fake-quant model (report path), onnxruntime (exported file) and the fake-quant model with
    PyTorch's other convolution kernels, with wall times, differences and the issue's tolerance."""
    detection = loaded.spec.task == "detection"
    key = "map" if detection else "top1"

    recorders: dict[str, TopOneRecorder] = {}

    def torch_eval(model, tag: str = "fake_quant") -> dict:  # noqa: ANN001
        if detection:
            return evaluate_coco(model, loaded, args.eval_data, labels=args.labels, annotations=args.annotations,
                                 imgsz=args.imgsz, batch_size=args.eval_batch, device="cpu", progress=False,
                                 limit=args.limit)
        recorders[tag] = rec = TopOneRecorder(model)
        return evaluate_classification(rec, loaded.spec, args.eval_data, limit=args.limit,
                                       batch_size=args.eval_batch, device="cpu", progress=False)

    def ort_eval(optimization: GraphOptimization = GraphOptimization.none) -> dict:
        if detection:
            return evaluate_coco_onnx(onnx_path, loaded, args.eval_data, labels=args.labels,
                                      annotations=args.annotations, imgsz=args.imgsz, batch_size=args.eval_batch,
                                      progress=False, limit=args.limit, threads=args.threads,
                                      optimization=optimization)
        # what evaluate_classification_onnx runs (OnnxRuntimeModel on the CPU, no autocast), with the predictions
        # recorded
        recorders[f"onnxruntime/{optimization.value}"] = rec = TopOneRecorder(
            OnnxRuntimeModel(onnx_path, False, args.threads, optimization))
        return {**evaluate_classification(rec, loaded.spec, args.eval_data, limit=args.limit,
                                          batch_size=args.eval_batch, device="cpu", progress=False, amp=False),
                "backend": "onnxruntime"}

    def kernels_eval() -> dict:
        with alternate_kernels("cpu"):
            return torch_eval(qmodel, "fake_quant_other_kernels")

    values, seconds = {}, {}
    for name, fn in (("fake_quant", lambda: torch_eval(model_to_evaluate(loaded, args.quantized))),
                     ("onnxruntime", ort_eval), ("fake_quant_other_kernels", kernels_eval),
                     ("onnxruntime_optimized", lambda: ort_eval(GraphOptimization.all))):
        t = time.perf_counter()
        metrics = fn()
        seconds[name] = round(time.perf_counter() - t, 1)
        values[name] = round(float(metrics[key]), 5)
        n_images = metrics["n_images"]
    tol = TOLERANCE[key]
    fq, ort, other = values["fake_quant"], values["onnxruntime"], values["fake_quant_other_kernels"]
    differing = {}
    if recorders:  # classification: how many top-1 predictions differ from the fake-quant model's
        ref = recorders["fake_quant"].all()
        differing = {"top1_predictions_differing_from_fake_quant": {
            name: int((rec.all() != ref).sum()) for name, rec in recorders.items() if name != "fake_quant"}}
    return {"metric": key, "n_images": n_images, **values, "seconds": seconds, **differing,
            "onnxruntime_minus_fake_quant": round(ort - fq, 5),
            "float_order_spread": round(other - fq, 5),
            "onnxruntime_minus_other_kernels": round(ort - other, 5),
            "tolerance": tol, "within_tolerance": abs(ort - fq) <= tol + 1e-9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--quantized", required=True, help="quantized.pt or its folder")
    ap.add_argument("--images", required=True, help="image folder (ImageFolder or flat) for the timed batch")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/export", help="folder for model.onnx, float.onnx and export_bench.json")
    ap.add_argument("--eval-data", default=None, help="evaluation images (ImageFolder / detection image folder)")
    ap.add_argument("--labels", default=None, help="detection: YOLO label folder")
    ap.add_argument("--annotations", default=None, help="detection: COCO instances json")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only this many images")
    ap.add_argument("--eval-batch", type=int, default=50)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.weights, imgsz=args.imgsz)
    qmodel = load_quantized(loaded, args.quantized, device="cpu")
    x = load_calibration_set(args.images, loaded, n_images=args.batch, seed=0)
    out = Path(args.out)
    result = export_quantized(loaded, qmodel, out / "model.onnx", sample_nchw=x)
    float_path = export_float_onnx(loaded.model, out / "float.onnx", x[:1])
    as_list = loaded.spec.task == "detection"
    runners = {
        "torch_float": loaded.model.eval(),
        "torch_fakequant": qmodel,
        "ort_float": OnnxRuntimeModel(float_path, as_list, args.threads, GraphOptimization.all),
        "ort_qdq": OnnxRuntimeModel(result.graph.path, as_list, args.threads, GraphOptimization.all),
        "ort_qdq_unoptimized": OnnxRuntimeModel(result.graph.path, as_list, args.threads, GraphOptimization.none),
    }
    times = interleaved_min_times(runners, x, args.repeats)
    base = times["torch_float"]
    report = {
        "model": args.model, "batch": int(x.shape[0]), "input_shape": list(x.shape), "threads": args.threads,
        "repeats": args.repeats,
        "min_seconds": {k: round(v, 5) for k, v in times.items()},
        "ratio_to_torch_float": {k: round(v / base, 3) for k, v in times.items()},
        "size_bytes": {"qdq_onnx": result.graph.size_bytes, "float_onnx": float_path.stat().st_size},
        "size_ratio_qdq_to_float": round(result.graph.size_bytes / float_path.stat().st_size, 3),
        "agreement": result.agreement.summary(), **result.graph.counts(),
    }
    if args.eval_data:
        report["accuracy"] = accuracy(args, loaded, qmodel, result.graph.path)
    (out / "export_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\n{args.model}: batch {x.shape[0]}, min of {args.repeats} interleaved repeats, {args.threads} thread(s)")
    for k, v in times.items():
        print(f"  {k:22s} {v * 1000:9.2f} ms  x{v / base:.2f} vs float PyTorch")
    print(f"  size: QDQ {result.graph.size_bytes / 1e6:.3f} MB vs float ONNX {float_path.stat().st_size / 1e6:.3f} MB "
          f"(x{report['size_ratio_qdq_to_float']})")
    ag = result.agreement
    print(f"  agreement ({ag.n_images} images): outputs {ag.max_output_steps:g} steps "
          f"({ag.frac_output_differing:.1%} of elements), float-order reference {ag.reference_output_steps:g} steps "
          f"({ag.reference_frac_differing:.1%}); layer-local max {ag.max_local_steps:g} step")
    if "accuracy" in report:
        a = report["accuracy"]
        print(f"  {a['metric']} on {a['n_images']} images: onnxruntime {a['onnxruntime']} vs fake-quant "
              f"{a['fake_quant']} (diff {a['onnxruntime_minus_fake_quant']:+g}, tolerance {a['tolerance']}); "
              f"fake-quant with other conv kernels {a['fake_quant_other_kernels']} "
              f"(spread {a['float_order_spread']:+g}); onnxruntime optimized {a['onnxruntime_optimized']}")
        if "top1_predictions_differing_from_fake_quant" in a:
            print(f"  top-1 predictions differing from fake-quant: {a['top1_predictions_differing_from_fake_quant']}")


if __name__ == "__main__":
    main()
