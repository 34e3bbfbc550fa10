"""ONNX export benchmark: onnxruntime speed on the exported QDQ model vs float PyTorch, and file sizes.

Usage (from the repo root, venv active)::

    python benchmarks/export.py --model resnet20_cifar10 --weights W.th --quantized out/q --images cifar10/test
    python benchmarks/export.py --model yolov5n --weights yolov5n.pt --imgsz 320 --quantized out/q \\
        --images coco/val2017-128/images --out bench/yolo

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
from dgh.export import (  # noqa: E402
    GraphOptimization,
    OnnxRuntimeModel,
    export_float_onnx,
    export_quantized,
)
from dgh.models import load_model  # noqa: E402
from dgh.quantization import load_quantized  # noqa: E402


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
    (out / "export_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\n{args.model}: batch {x.shape[0]}, min of {args.repeats} interleaved repeats, {args.threads} thread(s)")
    for k, v in times.items():
        print(f"  {k:22s} {v * 1000:9.2f} ms  x{v / base:.2f} vs float PyTorch")
    print(f"  size: QDQ {result.graph.size_bytes / 1e6:.3f} MB vs float ONNX {float_path.stat().st_size / 1e6:.3f} MB "
          f"(x{report['size_ratio_qdq_to_float']})")


if __name__ == "__main__":
    main()
