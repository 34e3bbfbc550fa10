"""Exact-mode generation of this checkout against an earlier commit: wall time and bit-identical images.

Each run is a subprocess (``generate_images`` with ``speed=exact``, fp32, one thread) importing ``dgh`` either from
this checkout or from ``git archive <ref>`` unpacked into a temporary folder; the two alternate ``--repeats`` times
and the minimum wall time of each is kept. The images of both must be equal bit for bit.

Usage::

    python benchmarks/exact_before_after.py --ref 2a79d48 --n-images 64 --iters 10 --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import sys, time, torch
torch.set_num_threads(1)
from dgh.generation import GenerationConfig, generate_images
from dgh.models.registry import load_model
n, iters, bs, weights, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
loaded = load_model("resnet20_cifar10", weights)
cfg = GenerationConfig.for_method("dgh", n_images=n, iterations=iters, batch_size=bs, seed=0, speed="exact",
                                  checkpoint_every=0)
t = time.perf_counter()
res = generate_images(loaded, cfg, progress=False, device="cpu")
print(time.perf_counter() - t)
torch.save(res.images_nchw, out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="2a79d48", help="git commit of the baseline")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights", default=str(REPO.parent / "shared/assets/cifar10/models/resnet20-12fca82f.th"))
    a = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="dgh-before-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.ref, "dgh"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        best = {a.ref: float("inf"), "this checkout": float("inf")}
        images = {}
        for _ in range(a.repeats):
            for key, root in ((a.ref, old), ("this checkout", REPO)):
                out = Path(tmp) / f"{key.replace(' ', '_')}.pt"
                env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
                proc = subprocess.run([sys.executable, "-c", WORKER, str(a.n_images), str(a.iters), str(a.batch_size),
                                       a.weights, str(out)], env=env, capture_output=True, text=True, cwd=tmp)
                if proc.returncode != 0:
                    raise SystemExit(f"{key} failed: {proc.stderr.strip().splitlines()[-1]}")
                best[key] = min(best[key], float(proc.stdout.strip().splitlines()[-1]))
                images[key] = torch.load(out, weights_only=True)
        same = torch.equal(images[a.ref].view(torch.int32), images["this checkout"].view(torch.int32))
    print(f"# exact generation, resnet20_cifar10, N={a.n_images}, iterations={a.iters}, batch={a.batch_size}, "
          f"1 thread, min of {a.repeats} alternating runs; load average {os.getloadavg()[0]:.1f}")
    for key, v in best.items():
        print(f"{key}: {v:.1f} s")
    print(f"speed-up {best[a.ref] / best['this checkout']:.3f}x; images bit-identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
