"""Benchmark BRECQ block reconstruction (default CIFAR ResNet-20): seconds per 1,000 iterations per unit, peak memory.

For every reconstruction unit (ResNet-20: stem conv, 9 BasicBlocks, final linear; efficientnet_lite0: stem, the
first block's two convs, 16 InvertedResiduals, head conv, classifier) at batch 32 (the paper code's):

- ``s/1k rec``: seconds per 1,000 rounding-optimization steps (soft-rounded weights, activations quantized with
  learnable step sizes, forward + backward + two Adam steps), timed over ``--iters`` steps and scaled;
- ``s/1k float``: the baseline measured in the same run: 1,000 forward + backward + Adam steps of the *float* unit
  (the same module of the float model, its weights trained) on the same cached inputs;
- ``ratio``: rec / float;
- ``cache MiB``: the unit's cached calibration inputs + float targets (``--n-images`` images): the part of peak
  memory that reconstruction adds, bounded by one unit;
- ``cache s``: seconds to cache the unit's quantized inputs by running the network from its input (what
  ``chain_cache`` avoids for units fed straight by the previous one);
- peak memory: process peak RSS on CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA.

Usage: ``python benchmarks/reconstruct.py [--model resnet20_cifar10] [--weights W] [--iters 50] [--n-images 256]
[--device cpu]``. Measured (efficientnet_lite0, 128 images, 1 thread, 2 shared cores): see
``docs/brecq_efficientnet_lite0.md``.
Numbers depend on the machine; print them, never assert them.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from dgh.env import configure_offline, resolve_device
from dgh.models import load_model
from dgh.quantization import QuantConfig, quantize_model, set_quant_state
from dgh.quantization.reconstruction import (
    ReconstructionConfig,
    _call_order,
    _capture,
    _capture_from,
    partition_units,
    reconstruct_unit,
)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_float_unit(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, iters: int,
                     batch: int, dev: torch.device) -> float:
    module = module.to(dev).train(False)
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-6) if params else None
    g = torch.Generator().manual_seed(0)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=g).to(dev)
        out = module(inputs[idx])
        loss = F.mse_loss(out, targets[idx])
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(dev)
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar10", help="registry name (`dgh models`)")
    ap.add_argument("--weights", default=None, help="checkpoint (random weights when omitted)")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per unit (scaled to 1,000)")
    ap.add_argument("--n-images", type=int, default=256, help="calibration images (random, normalized space)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    configure_offline()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    loaded = load_model(args.model, args.weights)
    calib = torch.randn(args.n_images, 3, *loaded.spec.input_size, generator=torch.Generator().manual_seed(0))
    qmodel = quantize_model(loaded, calib, QuantConfig(preset=args.preset, w_bits=4, a_bits=4, bias_correction=False),
                            device=dev, progress=False)
    float_model = loaded.model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    set_quant_state(qmodel, True, True)
    units = _call_order(qmodel, partition_units(qmodel, "brecq"), calib[:1].to(dev))
    cfg = ReconstructionConfig(iters=args.iters, act_iters=0, batch_size=args.batch_size, keep_best=False)
    print(f"device {dev}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.n_images} calibration images, {args.iters} timed steps per unit, W4A4 {args.preset}")
    print(f"{'unit':<26}{'s/1k rec':>10}{'s/1k float':>12}{'ratio':>8}{'cache MiB':>11}{'cache s':>9}")
    tot_rec = tot_float = 0.0
    for k, unit in enumerate(units):
        set_quant_state(qmodel, True, True)
        _sync(dev)
        t_cache = time.perf_counter()
        inputs = _capture(qmodel, unit, calib, dev, 64, "input")
        _sync(dev)
        t_cache = time.perf_counter() - t_cache
        fname = unit.name.removeprefix("model.")
        targets = _capture_from(float_model, fname, float_model.get_submodule(fname), calib, dev, 64, "output")
        cache_mib = (inputs.numel() + targets.numel()) * 4 / 2**20
        t_float = _time_float_unit(float_model.get_submodule(fname), inputs, targets, args.iters, args.batch_size, dev)
        # reconstruct_unit also evaluates the unit over the whole cache (loss before/after): time a 0-step run
        # and subtract it, so the column is the optimization loop alone
        times = []
        for steps in (0, args.iters):
            _sync(dev)
            t0 = time.perf_counter()
            reconstruct_unit(unit, inputs, targets, cfg.model_copy(update={"iters": steps}), 0.01,
                             torch.Generator().manual_seed(k), progress=False)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        t_rec = max(times[1] - times[0], 0.0)
        scale = 1000.0 / max(args.iters, 1)
        tot_rec += t_rec * scale
        tot_float += t_float * scale
        print(f"{unit.name:<26}{t_rec * scale:>10.1f}{t_float * scale:>12.1f}{t_rec / max(t_float, 1e-9):>8.2f}"
              f"{cache_mib:>11.2f}{t_cache:>9.1f}")
        del inputs, targets
    print(f"{'total':<26}{tot_rec:>10.1f}{tot_float:>12.1f}{tot_rec / max(tot_float, 1e-9):>8.2f}")
    print(f"paper default (20,000 steps per unit) would take about {tot_rec * 20 / 3600:.2f} h on this machine")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB (before reconstruction {rss0:.0f} MiB)")
    if dev.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
