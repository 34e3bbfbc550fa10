"""Dataset-level BN distance of generated calibration sets, method against method at equal budget.

The BN distance is L_BN (method.md section 3, lambda_sigma 10, input pseudo-layer included) evaluated on all N final
images at once, with no augmentation (:func:`dgh.generation.bn_distance`); lower is closer to the training data's BN
statistics. Expected order: dgh < batch-bns < noise.

Examples::

    python benchmarks/bn_distance.py --model resnet20_cifar10 \
        --weights ../shared/assets/cifar10/models/resnet20-12fca82f.th --n-images 256 --iters 200 --batch-size 64
    python benchmarks/bn_distance.py --model yolov5n --weights ../shared/assets/coco/models/yolov5n.pt --imgsz 320 \
        --n-images 16 --iters 20 --batch-size 8 --extra "dgh:last_bn=last"
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from dgh.env import configure_offline
from dgh.generation import GenerationConfig, generate_images
from dgh.models import load_model


def _variant(spec: str) -> tuple[str, dict]:
    """``"dgh"`` or ``"dgh:last_bn=last,lazy_refresh=true"`` -> (method, overrides)."""
    method, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return method, overrides


def main() -> None:
    configure_offline()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar10")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--imgsz", type=int, default=None, help="detection input size, pixels")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--methods", default="dgh,batch-bns,image-bns,noise")
    ap.add_argument("--extra", action="append", default=[], help="more variants, METHOD:key=value,...")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, args.weights, imgsz=args.imgsz)
    results = {}
    for spec in args.methods.split(",") + args.extra:
        method, overrides = _variant(spec)
        cfg = GenerationConfig.for_method(method, n_images=args.n_images, iterations=args.iters,
                                          batch_size=args.batch_size, seed=args.seed, checkpoint_every=0, **overrides)
        t0 = time.perf_counter()
        res = generate_images(loaded, cfg, progress=False)
        results[spec] = {"bn_distance": round(float(res.loss_terms["bn_distance"]), 4),
                         "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{spec:<28} bn_distance {results[spec]['bn_distance']:>9.4f}   ({results[spec]['wall_s']} s)", flush=True)
    budget = f"{args.model}, {args.n_images} images x {args.iters} iterations, batch {args.batch_size}, seed {args.seed}"
    print(f"budget: {budget}")
    if "noise" in results:
        for spec, r in results.items():
            print(f"  {spec:<26} / noise = {r['bn_distance'] / results['noise']['bn_distance']:.3f}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"budget": budget, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
