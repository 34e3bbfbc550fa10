"""Quantization benchmarks: calibration time and fake-quant inference slowdown vs float, and graph-capture options.

Usage (from the repo root, venv active)::

    python benchmarks/quantize.py                       # ResNet-20 and YOLOv5n (real weights if assets exist)
    python benchmarks/quantize.py --capture             # fx / export / eager capture comparison on 4 families
    python benchmarks/quantize.py --device cuda --n-calib 256

Everything is measured in the same run; ratios are against the float model measured alongside.
Random inputs (speed does not depend on the values); weights from ``$DGH_ASSETS`` (default ``../shared/assets``)
when present, else random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from dgh.env import configure_offline, resolve_device

configure_offline()

from dgh.models import load_model  # noqa: E402
from dgh.models.registry import RANDOM_WEIGHTS  # noqa: E402
from dgh.quantization import QuantConfig, iter_quantizers, quantize_model  # noqa: E402

ASSETS = Path(os.environ.get("DGH_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, weights: str, imgsz: int | None, n_calib: int, batch: int, device: torch.device,
                repeats: int) -> None:
    loaded = load_model(name, weights, imgsz=imgsz)
    loaded.model.to(device)
    h, w = loaded.spec.input_size
    calib = torch.randn(n_calib, 3, h, w) if loaded.spec.task == "classification" else torch.rand(n_calib, 3, h, w)
    t = time.perf_counter()
    qm = quantize_model(loaded, calib, QuantConfig(preset="pot", batch_size=min(batch, 64)), device=str(device),
                        progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_cal = time.perf_counter() - t
    x = calib[:batch].to(device)

    def run(m):
        def f():
            with torch.no_grad():
                m(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return f

    t_float = _timeit(run(loaded.model.to(device)), repeats)
    t_q = _timeit(run(qm), repeats)
    n_q = sum(1 for _ in iter_quantizers(qm))
    print(f"{name:18s} weights={'real' if weights != RANDOM_WEIGHTS else 'random':6s} calib {n_calib} images: "
          f"{t_cal:6.1f} s | forward batch {batch}: float {t_float * 1e3:7.1f} ms, fake-quant {t_q * 1e3:7.1f} ms, "
          f"slowdown x{t_q / t_float:.2f} | {n_q} quantizers")


def _count_fx_sites(gm) -> int:
    keys = ("conv", "linear", "add", "cat", "pool", "interpolate", "upsample", "mean")
    n = 0
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            target = str(node.target).lower()
            if node.op == "call_module":
                target = type(gm.get_submodule(node.target)).__name__.lower()
            if any(k in target for k in keys):
                n += 1
    return n


def bench_capture() -> None:
    from torch.fx import symbolic_trace

    from dgh.quantization.capture import build_quantized_model, discover_sites

    cases = [("resnet20_cifar10", None), ("resnet18", None), ("resnet50", None), ("mobilenet_v2", None),
             ("yolov8n", 64), ("yolov5n", 64)]
    print(f"{'model':18s} {'method':8s} {'ok':4s} {'sites':>6s} {'time s':>8s}  note")
    for name, imgsz in cases:
        try:
            loaded = load_model(name, RANDOM_WEIGHTS, imgsz=imgsz)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:18s} (cannot build: {str(exc)[:80]})")
            continue
        h, w = loaded.spec.input_size
        if name in ("resnet18", "resnet50", "mobilenet_v2"):
            h = w = 64  # speed; capture does not depend on the size
        x = torch.rand(1, 3, h, w)
        for method in ("fx", "export", "eager"):
            t = time.perf_counter()
            try:
                if method == "fx":
                    gm = symbolic_trace(loaded.model)
                    sites, note = _count_fx_sites(gm), "graph nodes (hierarchy flattened into one GraphModule)"
                elif method == "export":
                    ep = torch.export.export(loaded.model, (x,), strict=False)
                    gm = ep.module()
                    sites, note = _count_fx_sites(ep.graph_module), "ATen nodes, no module hierarchy"
                else:
                    qm = build_quantized_model(loaded.model, x)
                    found = discover_sites(qm, x)
                    sites, note = len(found), "activation sites incl. input; module tree kept"
                ok = "yes"
            except Exception as exc:  # noqa: BLE001 - the point is to record failures
                ok, sites, note = "NO", 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            print(f"{name:18s} {method:8s} {ok:4s} {sites:6d} {time.perf_counter() - t:8.2f}  {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", action="store_true", help="compare torch.fx / torch.export / eager capture")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.capture:
        bench_capture()
        return
    device = resolve_device(args.device)
    r20 = ASSETS / "cifar10/models/resnet20-12fca82f.th"
    y5 = ASSETS / "coco/models/yolov5n.pt"
    bench_model("resnet20_cifar10", str(r20) if r20.exists() else RANDOM_WEIGHTS, None, args.n_calib, 64, device,
                args.repeats)
    bench_model("yolov5n", str(y5) if y5.exists() else RANDOM_WEIGHTS, 320, max(8, args.n_calib // 4), 8, device,
                args.repeats)


if __name__ == "__main__":
    main()
