"""Quantization benchmarks: fake-quant inference (reference and lean) vs float, calibration time vs MCT, capture options.

Usage (from the repo root, venv active)::

    python benchmarks/quantize.py --repeats 3            # ResNet-20 and YOLOv5n (real weights if assets exist)
    python benchmarks/quantize.py --mct-python /tmp/speed-mct-venv/bin/python --calib-only --repeats 3
    python benchmarks/quantize.py --capture              # fx / export / eager capture comparison on 4 families
    python benchmarks/quantize.py --device cuda --n-calib 256

Inference: for each model the float model, the reference fake-quant model (:class:`QuantizedModel`) and its lean
forward (:mod:`dgh.quantization.lean`, fused in place and ``torch.compile``d) are timed on the same batch,
``--repeats`` interleaved rounds of ``--inner`` calls each, minimum kept; every lean output is checked bit for bit
against the reference before timing (the run stops otherwise). The compile time of the compiled lean forward (its
first call) is reported separately.

Calibration (``--mct-python``, an interpreter that imports both ``dgh`` and ``model_compression_toolkit`` 2.6.1, see
``benchmarks/generation.py``): dgh's ``quantize_model`` (``pot``, W8A8, MSE threshold search) and MCT's
``pytorch_post_training_quantization`` (its defaults: imx500 TPC, W8A8 power-of-two, MSE error method, bias
correction) on the same model and the same images, interleaved, minimum wall time.

Weights from ``$DGH_ASSETS`` (default ``../shared/assets``) when present, else random; inputs are random (speed
does not depend on the values).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dgh.env import configure_offline, resolve_device

configure_offline()

from dgh.models import load_model  # noqa: E402
from dgh.models.registry import RANDOM_WEIGHTS  # noqa: E402
from dgh.quantization import QuantConfig, iter_quantizers, quantize_model  # noqa: E402
from dgh.quantization.fold import fold_batch_norms  # noqa: E402
from dgh.quantization.lean import lean_forward_model, traced_lean_forward  # noqa: E402
from dgh.threads import apply_threads  # noqa: E402

ASSETS = Path(os.environ.get("DGH_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
R20 = ASSETS / "cifar10/models/resnet20-12fca82f.th"
Y5 = ASSETS / "coco/models/yolov5n.pt"


def _flat(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _same_bits(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(
        torch.equal(x.contiguous().view(torch.int32), y.contiguous().view(torch.int32)) for x, y in zip(fa, fb)
    )


def bench_model(name: str, weights: str, imgsz: int | None, n_calib: int, batch: int, device: torch.device,
                repeats: int, inner: int, compile_lean: bool, clock_name: str = "wall") -> dict:
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    loaded = load_model(name, weights, imgsz=imgsz)
    loaded.model.to(device)
    h, w = loaded.spec.input_size
    g = torch.Generator().manual_seed(0)
    randn = loaded.spec.task == "classification"
    calib = torch.randn(n_calib, 3, h, w, generator=g) if randn else torch.rand(n_calib, 3, h, w, generator=g)
    t = time.perf_counter()
    qm = quantize_model(loaded, calib, QuantConfig(preset="pot", batch_size=min(batch, 64)), device=str(device),
                        progress=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t_cal = time.perf_counter() - t
    x = calib[:batch].to(device)
    folded, _ = fold_batch_norms(loaded.model, x)  # a deep copy: the float model as the quantized one computes it
    models = {"float": loaded.model, "float (BN folded)": folded.eval(), "fake-quant (reference)": qm,
              "lean (fused, eager)": lean_forward_model(qm)}
    compile_s = float("nan")
    if compile_lean:
        models["lean (compiled)"] = lean_forward_model(qm, compile=True)
    t = time.perf_counter()
    models["lean (traced replay)"] = traced_lean_forward(qm, x)  # checks bit-identity itself
    trace_s = time.perf_counter() - t
    with torch.no_grad():
        ref = qm(x)
        for key, m in models.items():
            if key.startswith("lean"):
                t = time.perf_counter()
                out = m(x)
                sync()
                if key == "lean (compiled)":
                    compile_s = time.perf_counter() - t
                if not _same_bits(out, ref):
                    raise SystemExit(f"{name}: {key} output differs from the reference fake-quant model")
        best = {k: float("inf") for k in models}
        for _ in range(repeats):  # interleaved rounds; the minimum per model is kept (shared CPU)
            for key, m in models.items():
                m(x)  # warm-up of this round
                sync()
                t = clock()
                for _ in range(inner):
                    m(x)
                sync()
                best[key] = min(best[key], (clock() - t) / inner)
    n_q = sum(1 for _ in iter_quantizers(qm))
    kind = "real" if weights != RANDOM_WEIGHTS else "random"
    print(f"\n## {name} ({kind} weights, {n_q} quantizers): forward of batch {batch} "
          f"{tuple(x.shape)}, {clock_name} clock, min of {repeats} interleaved rounds x {inner} calls; calibration of {n_calib} images "
          f"(pot W8A8 mse) {t_cal:.1f} s")
    print("| forward | ms / batch | x float | x float (BN folded) |")
    print("|---|---|---|---|")
    for key, v in best.items():
        print(f"| {key} | {v * 1e3:.1f} | {v / best['float']:.2f} | {v / best['float (BN folded)']:.2f} |")
    print(f"all lean outputs bit-identical to the reference: yes; trace of the replay {trace_s:.1f} s"
          + (f"; first call of the compiled lean forward (compile) {compile_s:.1f} s" if compile_lean else ""))
    return {"name": name, "best_s": best, "calib_s": t_cal, "compile_s": compile_s}


# ------------------------------------------------------------------------------------------------ calibration
def calib_worker(a: argparse.Namespace) -> dict:
    """Run inside the MCT interpreter: dgh ``quantize_model`` vs MCT PTQ, same model and images, interleaved."""
    import model_compression_toolkit as mct

    apply_threads(a.threads)
    loaded = load_model("resnet20_cifar10", str(R20) if R20.exists() else RANDOM_WEIGHTS)
    h, w = loaded.spec.input_size
    images = torch.randn(a.n_calib, 3, h, w, generator=torch.Generator().manual_seed(0))
    bs = min(64, a.n_calib)

    def run_dgh() -> None:
        quantize_model(loaded, images, QuantConfig(preset="pot", algorithm="mse", batch_size=bs), device="cpu",
                       progress=False)

    def run_mct() -> None:
        def data_gen():
            for i in range(0, a.n_calib, bs):
                yield [images[i : i + bs]]

        mct.ptq.pytorch_post_training_quantization(copy.deepcopy(loaded.model), data_gen)

    best = {"dgh quantize_model (pot W8A8, mse)": float("inf"), f"MCT {mct.__version__} PTQ (defaults)": float("inf")}
    fns = dict(zip(best, (run_dgh, run_mct)))
    for _ in range(a.repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    return best


def bench_calibration(a: argparse.Namespace) -> None:
    python = a.mct_python or sys.executable
    out = Path(f"/tmp/dgh-calib-bench-{os.getpid()}.json")
    cmd = [python, __file__, "--calib-worker", str(out), "--n-calib", str(a.n_calib), "--repeats", str(a.repeats),
           "--threads", str(a.threads)]
    env = dict(os.environ, PYTHONPATH=f"{Path(__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("calibration worker failed: " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
    best = json.loads(out.read_text())
    out.unlink()
    print(f"\n## calibration, resnet20_cifar10, the same {a.n_calib} images, threads={a.threads}, "
          f"min of {a.repeats} interleaved repeats")
    print("| calibration | wall s | vs MCT |")
    print("|---|---|---|")
    mct_wall = [v for k, v in best.items() if k.startswith("MCT")][0]
    for key, v in best.items():
        print(f"| {key} | {v:.1f} | {v / mct_wall:.2f} |")


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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the minimum is kept")
    ap.add_argument("--inner", type=int, default=3, help="forward calls per round and model")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = auto (dgh.threads)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd lean forward")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="inference timing: wall time, or this thread's CPU time (one thread, CPU only: insensitive "
                         "to other jobs taking the cores, which inflate wall-time ratios on a loaded machine)")
    ap.add_argument("--mct-python", default=None, help="interpreter with dgh + MCT: run the calibration comparison")
    ap.add_argument("--calib-only", action="store_true", help="only the calibration comparison")
    ap.add_argument("--models", nargs="+", default=["resnet20_cifar10", "yolov5n"],
                    help="registry names; other than these two: random weights (speed only), batch 32")
    ap.add_argument("--batch", type=int, default=None, help="forward batch (default: 64 ResNet-20, 8 YOLOv5n, 32 other)")
    ap.add_argument("--calib-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calib_worker:
        Path(args.calib_worker).write_text(json.dumps(calib_worker(args)))
        return
    apply_threads(args.threads)
    if args.capture:
        bench_capture()
        return
    if args.mct_python:
        bench_calibration(args)
    if args.calib_only:
        return
    device = resolve_device(args.device)
    if args.clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock thread measures this thread's CPU time: it needs --device cpu and --threads 1")
    print(f"# quantized inference vs float, device {device}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    known = {  # name -> (weights, imgsz, batch, calibration images)
        "resnet20_cifar10": (str(R20) if R20.exists() else RANDOM_WEIGHTS, None, 64, args.n_calib),
        "yolov5n": (str(Y5) if Y5.exists() else RANDOM_WEIGHTS, 320, 8, max(8, args.n_calib // 4)),
    }
    for name in args.models:
        weights, imgsz, batch, n_calib = known.get(name, (RANDOM_WEIGHTS, None, 32, args.n_calib))
        bench_model(name, weights, imgsz, n_calib, args.batch or batch, device, args.repeats, args.inner,
                    not args.no_compile, args.clock)


if __name__ == "__main__":
    main()
