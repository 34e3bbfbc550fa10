"""Traced replay of the quantized model: this checkout's ``dgh/quantization/lean.py`` against an earlier commit's, in
one process, interleaved, against the float model.

The earlier ``lean.py`` is read with ``git show <ref>:dgh/quantization/lean.py`` and imported as a separate module
(the rest of ``dgh`` is this checkout's). Both replays are checked bit for bit against the reference fake-quant
model at trace time. ``--clock thread`` (default) times this thread's CPU time, which other jobs on a loaded machine
do not inflate; ``--clock wall`` times wall time.

Usage (one thread)::

    python benchmarks/lean_before_after.py --ref dd27d43 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dgh.env import configure_offline

configure_offline()

from dgh.models import load_model  # noqa: E402
from dgh.models.registry import RANDOM_WEIGHTS  # noqa: E402
from dgh.quantization import QuantConfig, quantize_model  # noqa: E402
from dgh.quantization.lean import traced_lean_forward  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DGH_ASSETS", REPO.parent / "shared" / "assets"))
CASES = {  # name -> (weights, imgsz, batch, calibration images)
    "resnet20_cifar10": (ASSETS / "cifar10/models/resnet20-12fca82f.th", None, 64, 64),
    "yolov5n": (ASSETS / "coco/models/yolov5n.pt", 320, 8, 16),
}


def _old_lean(ref: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:dgh/quantization/lean.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="dgh-lean-")) / "old_lean.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_lean", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="dd27d43", help="git commit of the baseline lean.py")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    a = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    old = _old_lean(a.ref)
    print(f"# traced replay, {a.ref} vs this checkout; {a.clock} clock, min of {a.repeats} interleaved rounds x "
          f"{a.inner} calls, one thread; load average {os.getloadavg()[0]:.1f}")
    print("| model | float ms | before ms (x float) | after ms (x float) |")
    print("|---|---|---|---|")
    for name in a.models:
        weights, imgsz, batch, n_calib = CASES[name]
        loaded = load_model(name, str(weights) if weights.exists() else RANDOM_WEIGHTS, imgsz=imgsz)
        h, w = loaded.spec.input_size
        g = torch.Generator().manual_seed(0)
        calib = (torch.randn if loaded.spec.task == "classification" else torch.rand)(n_calib, 3, h, w, generator=g)
        qm = quantize_model(loaded, calib, QuantConfig(preset="pot", batch_size=min(batch, 64)), device="cpu",
                            progress=False)
        x = calib[:batch]
        models = {"float": loaded.model, "before": old.traced_lean_forward(qm, x), "after": traced_lean_forward(qm, x)}
        best = {k: float("inf") for k in models}
        with torch.no_grad():
            for _ in range(a.repeats):
                for key, m in models.items():
                    m(x)
                    t = clock()
                    for _ in range(a.inner):
                        m(x)
                    best[key] = min(best[key], (clock() - t) / a.inner)
        f = best["float"]
        print(f"| {name} | {f * 1e3:.1f} | {best['before'] * 1e3:.1f} ({best['before'] / f:.2f}) | "
              f"{best['after'] * 1e3:.1f} ({best['after'] / f:.2f}) |")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
