"""Benchmark of the DGH generation engine. Every figure is a ratio measured in the same run.

Each measurement runs in its own subprocess (clean peak-RSS, no shared caches):

1. throughput (images x iterations / s) of ``generate_images`` (speed=exact; speed=fast = bf16 autocast +
   channels-last; each with and without lazy_refresh) against a bare forward+backward of the same model, batch and image size, in fp32 and in
   bf16+channels-last (the hooks/pipeline/loss overhead);
2. peak memory at N=64 vs N=1024 with the same batch size (peak RSS above the post-setup RSS; the image storage,
   i.e. canvases + gradients + 2 RAdam moments = 4 x N x 3 x (H+p) x (W+p) x 4 bytes, plus the returned final
   images N x 3 x H x W x 4 bytes, is reported separately);
3. side by side with Sony MCT's reference implementation
   (``mct.data_generation.pytorch_data_generation_experimental``, the ``bench`` extra) at equal N, iterations, batch
   size and image size: wall-time ratio, peak-memory ratio, and the dataset-level BN distance of both outputs
   (:func:`dgh.generation.bn_distance`, paper settings lambda_sigma 10).

Usage (2 CPU cores shared with others: timings are noisy, ratios are taken within one run)::

    python benchmarks/generation.py --weights ../shared/assets/cifar10/models/resnet20-12fca82f.th \
        --n-images 256 --iters 200 --batch-size 64 [--threads 1] [--mct-python /path/to/python/with/mct] [--skip-memory]

On an oversubscribed machine use ``--threads 1``: with 2 OpenMP threads and other jobs running, a step can be 6x
slower than with 1 thread (spinning barriers), which swamps every ratio.

``--mct-python`` is a Python interpreter that can import both ``dgh`` and ``model_compression_toolkit``
(default: this one). MCT's settings other than N, iterations, batch size, image size and extra pixels (= p) are
its defaults (lambda_sigma 1, -range output loss x 1e-5, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------ workers
def worker_dgh(a: argparse.Namespace) -> dict:
    import torch

    from dgh.generation import GenerationConfig, generate_images
    from dgh.models.registry import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.weights)
    cfg = GenerationConfig.for_method(
        "dgh", n_images=a.n_images, iterations=a.iters, batch_size=a.batch_size, seed=0, speed=a.speed,
        amp=a.amp, checkpoint_every=0, lazy_refresh=a.lazy,  # explicit on/off per row
    )
    base = _rss_mb()
    t = time.perf_counter()
    res = generate_images(loaded, cfg, progress=False, device="cpu")
    wall = time.perf_counter() - t
    torch.save(res.images_nchw, a.out_images)
    return {"wall_s": wall, "peak_mb": _peak_mb(), "base_mb": base, "bn_distance_self": res.loss_terms["bn_distance"]}


def worker_bare(a: argparse.Namespace) -> dict:
    """Bare forward + backward to the images (frozen weights), same batch/image size, same number of steps."""
    import torch

    from dgh.models.registry import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.weights)
    h, w = loaded.spec.input_size
    n_batches = -(-a.n_images // a.batch_size)
    fmt = torch.channels_last if a.bf16 else torch.contiguous_format
    model = loaded.model.to(memory_format=fmt)
    x = torch.randn(a.batch_size, 3, h, w).contiguous(memory_format=fmt).requires_grad_(True)
    steps = n_batches * a.iters
    t = time.perf_counter()
    for _ in range(steps):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            out = model(x)
        out.float().sum().backward()
    return {"wall_s": time.perf_counter() - t, "peak_mb": _peak_mb()}


def worker_mct(a: argparse.Namespace) -> dict:
    import model_compression_toolkit as mct
    import torch

    from dgh.models.registry import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.weights)
    cfg = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=a.iters, data_gen_batch_size=a.batch_size, extra_pixels=loaded.spec.pad
    )
    base = _rss_mb()
    t = time.perf_counter()
    imgs = mct.data_generation.pytorch_data_generation_experimental(
        model=loaded.model, n_images=a.n_images, output_image_size=tuple(loaded.spec.input_size),
        data_generation_config=cfg,
    )
    wall = time.perf_counter() - t
    torch.save(torch.cat([i.float().cpu() for i in imgs]), a.out_images)
    return {"wall_s": wall, "peak_mb": _peak_mb(), "base_mb": base, "mct_version": mct.__version__}


def worker_mem(a: argparse.Namespace) -> dict:
    """Peak RSS of a short DGH run at N images (memory does not depend on the iteration count)."""
    import torch

    from dgh.generation import GenerationConfig, generate_images
    from dgh.models.registry import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.weights)
    cfg = GenerationConfig.for_method(
        "dgh", n_images=a.n_images, iterations=a.iters, batch_size=a.batch_size, seed=0, checkpoint_every=0,
        speed=a.speed,
    )
    torch.ones(1).sum()  # allocator warm-up
    base = _rss_mb()
    generate_images(loaded, cfg, progress=False, device="cpu")
    h, w = loaded.spec.input_size
    p = loaded.spec.pad
    storage_mb = (4 * 3 * (h + p) * (w + p) + 3 * h * w) * a.n_images * 4 / 2**20  # canvases+grad+2 RAdam, final
    return {"peak_mb": _peak_mb(), "base_mb": base, "image_storage_mb": storage_mb}


def worker_timing(a: argparse.Namespace) -> dict:
    """All wall-time measurements in ONE process, interleaved ``--repeats`` times, minimum kept: on a shared CPU the
    load changes between processes, so ratios from the same process and the same minutes are the reliable ones."""
    import torch

    from dgh.generation import GenerationConfig, generate_images
    from dgh.models.registry import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.weights)
    h, w = loaded.spec.input_size
    steps = -(-a.n_images // a.batch_size) * a.iters
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for p in loaded.model.parameters():
        p.requires_grad_(False)

    def bare(bf16: bool) -> None:
        fmt = torch.channels_last if bf16 else torch.contiguous_format
        model = loaded.model.to(device=dev, memory_format=fmt)
        x = torch.randn(a.batch_size, 3, h, w, device=dev).contiguous(memory_format=fmt).requires_grad_(True)
        for _ in range(steps):
            x.grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out.float().sum().backward()
        sync()
        loaded.model.to(device="cpu", memory_format=torch.contiguous_format)

    def bare_nograd() -> None:
        """The exact mode's refresh at its floor: a no-grad fp32 forward per step."""
        model = loaded.model.to(device=dev)
        x = torch.randn(a.batch_size, 3, h, w, device=dev)
        with torch.no_grad():
            for _ in range(steps):
                model(x)
        sync()
        loaded.model.to(device="cpu")

    def dgh(speed: str, lazy: bool) -> None:
        cfg = GenerationConfig.for_method("dgh", n_images=a.n_images, iterations=a.iters, batch_size=a.batch_size,
                                          seed=0, speed=speed, lazy_refresh=lazy, checkpoint_every=0)
        generate_images(loaded, cfg, progress=False, device=dev)
        sync()

    from dgh.generation.engine import _cpu_bf16_supported

    plan = {
        "bare fwd+bwd": lambda: bare(False),
        "bare fwd+bwd bf16+channels-last": lambda: bare(True),
        "bare fwd no-grad": bare_nograd,
        "dgh exact": lambda: dgh("exact", False),
        "dgh fast (bf16 + channels-last)": lambda: dgh("fast", False),
        "dgh fast + lazy refresh": lambda: dgh("fast", True),
        "dgh exact + lazy refresh": lambda: dgh("exact", True),
    }
    if dev.type == "cpu" and not _cpu_bf16_supported():
        # no native bf16 kernels (e.g. AVX2-only): bf16 is emulated and ~14x slower than fp32; speed=fast runs fp32
        # channels-last there (amp auto), so the bf16 bare row measures nothing a user would run
        del plan["bare fwd+bwd bf16+channels-last"]
        print("# this CPU has no native bf16: speed=fast = fp32 channels-last; bf16 bare row skipped", file=sys.stderr)
    try:
        if a.skip_mct:
            raise ImportError("--skip-mct")
        import model_compression_toolkit as mct

        def run_mct() -> None:
            cfg = mct.data_generation.get_pytorch_data_generation_config(
                n_iter=a.iters, data_gen_batch_size=a.batch_size, extra_pixels=loaded.spec.pad)
            mct.data_generation.pytorch_data_generation_experimental(  # on a copy: MCT may keep hooks/wrappers
                model=copy.deepcopy(loaded.model), n_images=a.n_images, output_image_size=(h, w), data_generation_config=cfg)

        plan["mct"] = run_mct
    except ImportError:
        pass
    if a.plan:
        unknown = sorted(set(a.plan) - set(plan))
        if unknown:
            raise SystemExit(f"unknown --plan rows {unknown}; choose from {sorted(plan)}")
        plan = {k: v for k, v in plan.items() if k in a.plan or k == "bare fwd+bwd" or k == "mct"}
    best: dict[str, float] = {}
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    for _ in range(a.repeats):
        for name, fn in plan.items():
            t = clock()
            fn()
            best[name] = min(best.get(name, float("inf")), clock() - t)
    return {"wall_s": best}


WORKERS = {"dgh": worker_dgh, "bare": worker_bare, "mct": worker_mct, "mem": worker_mem, "timing": worker_timing}


# ------------------------------------------------------------------------------------------------ driver
def _run(kind: str, args: argparse.Namespace, python: str | None = None, **over: object) -> dict:
    with tempfile.TemporaryDirectory(prefix="dgh-bench-") as tmp:
        out_json = Path(tmp) / "r.json"
        cli = [
            python or sys.executable, __file__, "--worker", kind, "--model", args.model, "--weights", str(args.weights),
            "--n-images", str(over.get("n_images", args.n_images)), "--iters", str(over.get("iters", args.iters)),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--speed", over.get("speed", "exact"),
            "--out-json", str(out_json), "--out-images", str(Path(tmp) / "images.pt"),
            "--amp", over.get("amp", "auto"), "--repeats", str(args.repeats), "--device", args.device,
            "--clock", args.clock,
        ] + (["--skip-mct"] if args.skip_mct else []) + (["--plan", *args.plan] if args.plan else []) + (["--bf16"] if over.get("bf16") else []) + (["--lazy"] if over.get("lazy") else [])
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run(cli, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"benchmark worker {kind} failed: {' | '.join(tail)}")
        result = json.loads(out_json.read_text())
        img = Path(tmp) / "images.pt"
        if img.exists():
            import torch

            result["images"] = torch.load(img, weights_only=True)
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar10")
    ap.add_argument("--weights", default=str(REPO.parent / "shared/assets/cifar10/models/resnet20-12fca82f.th"))
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", default="exact")
    ap.add_argument("--amp", default="auto", help="worker: GenerationConfig.amp")
    ap.add_argument("--lazy", action="store_true", help="worker dgh: GenerationConfig.lazy_refresh")
    ap.add_argument("--bf16", action="store_true", help="worker bare: bf16 autocast + channels-last")
    ap.add_argument("--device", default="cpu", help="timing: cpu or cuda (MCT runs on its own default device)")
    ap.add_argument("--plan", nargs="+", default=None,
                    help="timing: only these rows (names of the table, e.g. 'dgh exact' 'bare fwd+bwd')")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="timing: wall time, or the main thread's CPU time (--threads 1, CPU: insensitive to other "
                         "jobs taking the cores)")
    ap.add_argument("--mct-python", default=None)
    ap.add_argument("--skip-mct", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; min wall time kept")
    ap.add_argument("--memory-only", action="store_true", help="only the N=64 vs N=1024 peak-memory part")
    ap.add_argument("--timing-only", action="store_true",
                    help="all wall times in one process (needs --mct-python able to import dgh and MCT), no memory")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--out-json")
    ap.add_argument("--out-images")
    a = ap.parse_args()
    if a.worker:
        from dgh.env import configure_offline

        configure_offline()
        Path(a.out_json).write_text(json.dumps(WORKERS[a.worker](a)))
        return

    import torch

    from dgh.generation import bn_distance
    from dgh.models.registry import load_model

    loaded = load_model(a.model, a.weights)
    work = a.n_images * a.iters
    if a.timing_only:
        if a.clock == "thread" and (a.threads != 1 or a.device != "cpu"):
            raise SystemExit("--clock thread measures one thread's CPU time: it needs --threads 1 on the CPU")
        print(f"# {a.model}: N={a.n_images}, iterations={a.iters}, batch={a.batch_size}, threads={a.threads}; "
              f"one process, {a.repeats} interleaved repeats, min {a.clock} time, device {a.device}; "
              f"load average before {os.getloadavg()[0]:.1f}", flush=True)
        walls = _run("timing", a, python=a.mct_python)["wall_s"]
        print(f"load average after {os.getloadavg()[0]:.1f}")
        if "bare fwd no-grad" in walls:
            # exact mode = a forward+backward plus a no-grad refresh forward per step (method.md section 1): with every
            # other cost at zero it reaches bare / (bare + no-grad forward) of the bare fwd+bwd throughput
            ceiling = walls["bare fwd+bwd"] / (walls["bare fwd+bwd"] + walls["bare fwd no-grad"])
            print(f"exact-mode ceiling (zero overhead): {ceiling:.2f} of bare fwd+bwd"
                  + (f", {walls['mct'] / (walls['bare fwd+bwd'] + walls['bare fwd no-grad']):.2f}x MCT"
                     if "mct" in walls else ""))
        bare, mct_wall = walls["bare fwd+bwd"], walls.get("mct")
        print(f"| run | {a.clock} s | img*it/s | vs bare fwd+bwd (fp32) | speed-up vs MCT |")
        print("|---|---|---|---|---|")
        for name, wall in walls.items():
            sp = f"{mct_wall / wall:.2f}x" if mct_wall else "-"
            print(f"| {name} | {wall:.1f} | {work / wall:.0f} | {bare / wall:.2f} | {sp} |")
        return
    print(f"# {a.model}: N={a.n_images}, iterations={a.iters}, batch={a.batch_size}, threads={a.threads}, "
          f"repeats={a.repeats}", flush=True)
    plan = {} if a.memory_only else {
        "bare fwd+bwd": ("bare", {}),
        "bare fwd+bwd bf16+channels-last": ("bare", {"bf16": True}),
        "dgh exact": ("dgh", {"speed": "exact"}),
        "dgh fast (bf16 + channels-last)": ("dgh", {"speed": "fast"}),
        "dgh fast + lazy refresh": ("dgh", {"speed": "fast", "lazy": True}),
        "dgh exact + lazy refresh": ("dgh", {"speed": "exact", "lazy": True}),
    }
    if not a.skip_mct and not a.memory_only:
        plan["mct"] = ("mct", {"python": a.mct_python})
    runs: dict[str, dict] = {}
    for rep in range(a.repeats):  # interleaved repeats; the minimum wall time of each is kept (shared CPU)
        for name, (kind, over) in plan.items():
            r = _run(kind, a, **over)
            print(f"  repeat {rep + 1}: {name}: {r['wall_s']:.1f} s", flush=True)
            if name not in runs or r["wall_s"] < runs[name]["wall_s"]:
                runs[name] = r
    bare = runs["bare fwd+bwd"]["wall_s"] if runs else float("nan")
    print("\n## throughput (images x iterations / s) and ratios")
    print("| run | wall s | img*it/s | vs bare fwd+bwd | speed-up vs MCT | peak RSS MB | BN distance |")
    print("|---|---|---|---|---|---|---|")
    mct_wall = runs.get("mct", {}).get("wall_s")
    for name, r in runs.items():
        dist = bn_distance(loaded.model, r["images"], spec=loaded.spec) if "images" in r else float("nan")
        r["bn_distance"] = dist
        speedup = f"{mct_wall / r['wall_s']:.2f}x" if mct_wall else "-"
        print(
            f"| {name} | {r['wall_s']:.1f} | {work / r['wall_s']:.0f} | {bare / r['wall_s']:.2f} | {speedup} | "
            f"{r['peak_mb']:.0f} | {dist:.4f} |"
        )
    if "mct" in runs:
        d, m = runs["dgh exact"], runs["mct"]
        print(
            f"\nMCT side by side (dgh exact / MCT {m.get('mct_version')}): wall-time ratio {d['wall_s'] / m['wall_s']:.3f}, "
            f"peak-RSS ratio {d['peak_mb'] / m['peak_mb']:.3f} (above each process's post-load RSS: "
            f"{(d['peak_mb'] - d['base_mb']):.0f} vs {(m['peak_mb'] - m['base_mb']):.0f} MB), "
            f"BN distance {d['bn_distance']:.4f} vs {m['bn_distance']:.4f}"
        )
    if not a.skip_memory:
        print("\n## peak memory vs N (same batch size, 2 iterations)", flush=True)
        mem = {n: _run("mem", a, n_images=n, iters=2) for n in (64, 1024)}
        for n, r in mem.items():
            above = r["peak_mb"] - r["base_mb"]
            print(f"N={n}: peak RSS {r['peak_mb']:.0f} MB, above setup {above:.0f} MB, image storage {r['image_storage_mb']:.1f} MB, "
                  f"rest {above - r['image_storage_mb']:.0f} MB")
        r64, r1k = mem[64], mem[1024]
        rest64 = r64["peak_mb"] - r64["base_mb"] - r64["image_storage_mb"]
        rest1k = r1k["peak_mb"] - r1k["base_mb"] - r1k["image_storage_mb"]
        print(f"ratio N=1024 / N=64: peak RSS {r1k['peak_mb'] / r64['peak_mb']:.3f}; "
              f"non-image part {rest1k / max(rest64, 1e-9):.3f}")
    del torch


if __name__ == "__main__":
    main()
