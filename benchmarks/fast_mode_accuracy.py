"""Downstream accuracy of generation speed modes: exact vs fast (bf16 + channels-last) vs fast + lazy refresh.

For each mode and seed: generate N images (DGH defaults), quantize the model on them (``pot`` MSE; ``resnet20_cifar10``
at W4A8 on the CIFAR-10 test set, ``efficientnet_lite0`` at W8A8 on ImageNet ``val-sample`` with the params.yaml
output-loss ratio 0.5), evaluate top-1 on a class-balanced subset with the lean quantized forward. The spread over
seeds within a mode is the noise level a mode difference must exceed; the binomial standard error of the test subset
(``sqrt(p (1 - p) / n)``) is printed too.

Usage::

    python benchmarks/fast_mode_accuracy.py --n-images 64 --iters 100 --batch-size 32 --seeds 0 1 --limit 1000
    python benchmarks/fast_mode_accuracy.py --model efficientnet_lite0 --n-images 32 --iters 12 --batch-size 32 \
        --seeds 0 1 --limit 500
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from dgh.env import configure_offline

configure_offline()

from dgh.evaluation import evaluate_classification  # noqa: E402
from dgh.generation import GenerationConfig, generate_images  # noqa: E402
from dgh.models import load_model  # noqa: E402
from dgh.quantization import QuantConfig, quantize_model  # noqa: E402
from dgh.quantization.lean import lean_forward_model  # noqa: E402

ASSETS = Path(os.environ.get("DGH_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
# model -> (weights, evaluation folder, w_bits, a_bits, extra generation settings)
MODELS = {
    "resnet20_cifar10": ("cifar10/models/resnet20-12fca82f.th", "cifar10/test", 4, 8, {}),
    "efficientnet_lite0": ("imagenet/models/efficientnet-lite0-57934424.pth", "imagenet/val-sample", 8, 8,
                           {"output_loss_ratio": 0.5}),
}
MODES = {"exact": ("exact", False), "fast": ("fast", False), "fast + lazy refresh": ("fast", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar10", choices=list(MODELS))
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--limit", type=int, default=1000, help="evaluation images (class-balanced subset)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    weights, test, w_bits, a_bits, extra = MODELS[a.model]
    loaded = load_model(a.model, str(ASSETS / weights))
    test_dir = ASSETS / test
    print(f"# {a.model} W{w_bits}A{a_bits} pot mse; N={a.n_images}, iterations={a.iters}, batch={a.batch_size}, "
          f"test subset {a.limit}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[float]] = {m: [] for m in a.modes}
    for seed in a.seeds:
        for mode in a.modes:
            speed, lazy = MODES[mode]
            cfg = GenerationConfig.for_method("dgh", n_images=a.n_images, iterations=a.iters,
                                              batch_size=a.batch_size, seed=seed, speed=speed, lazy_refresh=lazy,
                                              checkpoint_every=0, **extra)
            t = time.perf_counter()
            gen = generate_images(loaded, cfg, progress=False, device="cpu")
            images, amp = gen.images_nchw, gen.meta["amp"]
            t_gen = time.perf_counter() - t
            qmodel = quantize_model(loaded, images, QuantConfig(preset="pot", w_bits=w_bits, a_bits=a_bits, seed=seed),
                                    device="cpu", progress=False)
            top1 = evaluate_classification(lean_forward_model(qmodel), loaded.spec, test_dir, limit=a.limit,
                                           device="cpu", progress=False)["top1"]
            results[mode].append(top1)
            print(f"seed {seed} | {mode} (bf16 autocast: {amp}) | generation {t_gen:.0f} s | top-1 {top1:.2f}", flush=True)
    print("\n| mode | top-1 per seed | mean | seed spread (max-min) |")
    print("|---|---|---|---|")
    for mode, v in results.items():
        print(f"| {mode} | {', '.join(f'{x:.2f}' for x in v)} | {statistics.mean(v):.2f} | {max(v) - min(v):.2f} |")
    p = statistics.mean(results[a.modes[0]]) / 100
    print(f"binomial standard error of one evaluation on {a.limit} images: {100 * math.sqrt(p * (1 - p) / a.limit):.2f} "
          "points")


if __name__ == "__main__":
    main()
