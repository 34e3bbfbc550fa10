"""Benchmark: generation in 2 processes x 1 thread against 1 process x 2 threads (issue 14).

Same total cores, same work, same algorithm: both runs use ``schedule=synchronous`` (the multi-process schedule; one
process runs it too), the same model, N, batch size, iterations and seed. Each run is a fresh ``dgh generate``
command (the 2-process one through ``--processes 2``, i.e. ``torchrun``); the two kinds alternate, ``--repeats``
times, and the minimum wall time of each counts (least disturbed by other load).

Reported per kind: the engine's own wall time (``meta.json`` ``wall_time_s``: setup, iterations, gathering the
images and the final BN distance; no interpreter start) and the whole command's wall time (with Python, torch and
torchrun start-up), and the throughput ratio ``t(1 x 2 threads) / t(2 x 1 thread)`` (> 1: processes are faster).
Also whether the two kinds gave the same images (they need not be bit-identical: 2 intra-op threads may reduce in
another order than 1).

Usage (from the repository root, project environment active)::

    nice -n 10 python benchmarks/distributed.py --weights ../shared/assets/cifar10/models/resnet20-12fca82f.th \
        [--model resnet20_cifar10] [--n-images 128] [--batch-size 32] [--iters 20] [--repeats 3] [--device cpu] \
        [--with-1x1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


KINDS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # processes, threads per process


def run_once(kind: str, a: argparse.Namespace, out: Path) -> dict:
    """One ``dgh generate``; ``kind`` = ``1x2`` (1 process, 2 threads), ``2x1`` (2 processes, 1 thread each) or
    ``1x1`` (1 process, 1 thread: the reference for the speed-up of either over one core)."""
    procs, threads = KINDS[kind]
    cmd = [sys.executable, "-m", "dgh.cli", "--threads", str(threads), "generate", "--model", a.model,
           "--weights", a.weights, "--out", str(out), "--n-images", str(a.n_images), "--batch-size",
           str(a.batch_size), "--iterations", str(a.iters), "--seed", "0", "--set", "schedule=synchronous",
           "--set", "checkpoint_every=0", "--device", a.device, "--no-progress"]
    if procs > 1:
        cmd += ["--processes", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"engine_s": float(meta["wall_time_s"]), "command_s": wall, "processes": meta["settings"]["processes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--weights", required=True)
    p.add_argument("--n-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--with-1x1", action="store_true", help="also 1 process x 1 thread (the one-core reference)")
    a = p.parse_args()
    import torch

    from dgh.io import load_images

    kinds = ["1x2", "2x1"] + (["1x1"] if a.with_1x1 else [])
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    images: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):  # interleaved, order alternating
                out = Path(tmp) / f"{kind}_{r}"
                res = run_once(kind, a, out)
                results[kind].append(res)
                images[kind] = load_images(out / "images.pt")
                print(f"repeat {r} {kind}: engine {res['engine_s']:.2f} s, command {res['command_s']:.2f} s",
                      flush=True)
    best = {k: {m: min(x[m] for x in v) for m in ("engine_s", "command_s")} for k, v in results.items()}
    work = a.n_images * a.iters
    diff = float((images["1x2"] - images["2x1"]).abs().max())
    summary = {
        "model": a.model, "n_images": a.n_images, "batch_size": a.batch_size, "iterations": a.iters,
        "repeats": a.repeats, "device": a.device, "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "1x2_engine_s": best["1x2"]["engine_s"], "2x1_engine_s": best["2x1"]["engine_s"],
        "1x2_command_s": round(best["1x2"]["command_s"], 2), "2x1_command_s": round(best["2x1"]["command_s"], 2),
        "1x2_images_iter_per_s": round(work / best["1x2"]["engine_s"], 2),
        "2x1_images_iter_per_s": round(work / best["2x1"]["engine_s"], 2),
        "throughput_ratio_2x1_over_1x2_engine": round(best["1x2"]["engine_s"] / best["2x1"]["engine_s"], 3),
        "throughput_ratio_2x1_over_1x2_command": round(best["1x2"]["command_s"] / best["2x1"]["command_s"], 3),
        **({"1x1_engine_s": best["1x1"]["engine_s"],
            "speedup_over_1x1_engine": {k: round(best["1x1"]["engine_s"] / best[k]["engine_s"], 3) for k in kinds}}
           if a.with_1x1 else {}),
        "same_images_bitwise": bool(torch.equal(images["1x2"], images["2x1"])),
        "max_abs_image_difference": diff,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
