"""Known-answer tests of the generation engine. Tiny models built in code, CPU, seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dgh.generation import (
    GenerationConfig,
    GenerationConfigError,
    GenerationError,
    LastBN,
    NoBatchNormError,
    Speed,
    bn_distance,
    generate_images,
)
from dgh.generation.bn_stats import (
    BNTarget,
    MomentRecorder,
    dataset_moments,
    find_bn_layers,
    global_moments,
    image_moments,
)
from dgh.generation.losses import bn_alignment_loss, std_from_moments
from dgh.generation.pipeline import (
    ImagePipeline,
    gaussian_kernel_3x3,
    smooth,
    ste_clamp,
)
from dgh.generation.scheduler import ReduceOnPlateauWithReset
from dgh.generation.targets import find_last_bns
from dgh.models.spec import LoadedModel, ModelSpec


class TinyNet(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear; input (N, 3, 8, 8) -> logits (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TwoLevelHead(nn.Module):
    """A detector-like net with two output levels, each fed by its own branch ending in a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.p3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.p4 = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.out3 = nn.Conv2d(4, 6, 1)
        self.out4 = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = self.stem(x)
        a = self.p3(s)
        b = self.p4(a)
        return [self.out3(a), self.out4(b)]


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _tiny_loaded(model: nn.Module | None = None, size: int = 8, pad: int = 2, task: str = "classification") -> LoadedModel:
    torch.manual_seed(0)
    model = _randomize_bn(model if model is not None else TinyNet())
    spec = ModelSpec(name="tiny", family="test", task=task, input_size=(size, size), pad=pad, num_classes=4,
                     output_loss_weight=1e-3)
    return LoadedModel(spec=spec, model=model)


def _cfg(**kw) -> GenerationConfig:
    base = dict(n_images=10, iterations=3, batch_size=4, checkpoint_every=0, device=None)
    base.pop("device")
    base.update(kw)
    return GenerationConfig.for_method(base.pop("method", "dgh"), **base)


# --- statistics --------------------------------------------------------------------------------------------------
def test_global_moments_equal_concatenated_statistics_unequal_batches():
    g = torch.Generator().manual_seed(1)
    sizes = [5, 3, 7, 1]
    acts = [torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]
    full = torch.cat(acts)
    true_mean = full.mean((0, 2, 3))
    true_var = full.var((0, 2, 3), unbiased=False)
    cached_m = torch.stack([image_moments(a)[0].mean(0) for a in acts])
    cached_s = torch.stack([image_moments(a)[1].mean(0) for a in acts])
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    for active in range(len(sizes)):
        live_m, live_s = image_moments(acts[active])
        stale = torch.zeros_like(cached_m)  # the active batch's cached entry must not matter
        stale[:] = cached_m
        stale[active] = 123.0
        stale_s = cached_s.clone()
        stale_s[active] = -7.0
        mu, sec = global_moments(stale, stale_s, w, active, live_m.mean(0), live_s.mean(0))
        var = sec - mu**2
        assert torch.allclose(mu, true_mean, rtol=1e-6, atol=0)
        assert torch.allclose(var, true_var, rtol=1e-6, atol=0)


def test_gradient_to_active_batch_equals_autograd_through_full_set_statistics():
    model = _randomize_bn(TinyNet()).double()
    layers = find_bn_layers(model)
    targets = [BNTarget(n, m.running_mean.double(), torch.sqrt(m.running_var.double() + 1e-6)) for n, m in layers]
    g = torch.Generator().manual_seed(2)
    sizes = [3, 5, 2]
    batches = [torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) for n in sizes]
    rec = MomentRecorder(layers)

    # reference: one forward of all images, global statistics straight from the concatenated activations
    full = torch.cat(batches).requires_grad_(True)
    with rec.active():
        model(full)
    mus = [m.mean(0) for m, _ in rec.moments]
    stds = [std_from_moments(m.mean(0), s.mean(0), 1e-6) for m, s in rec.moments]
    bn_alignment_loss(mus, stds, targets, 10.0).backward()
    ref_grads = torch.split(full.grad, sizes)

    # engine scheme: cached detached moments of the other batches + live moments of the active batch
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    cache_m, cache_s = [], []
    with torch.no_grad():
        for x in batches:
            with rec.active():
                model(x)
            cache_m.append([m.mean(0) for m, _ in rec.moments])
            cache_s.append([s.mean(0) for _, s in rec.moments])
    cm = [torch.stack([c[l] for c in cache_m]) for l in range(len(layers))]
    cs = [torch.stack([c[l] for c in cache_s]) for l in range(len(layers))]
    for b, x in enumerate(batches):
        xb = x.clone().requires_grad_(True)
        with rec.active():
            model(xb)
        mus, stds = [], []
        for l, (m_img, s_img) in enumerate(rec.moments):
            mu, sec = global_moments(cm[l], cs[l], w, b, m_img.mean(0), s_img.mean(0))
            mus.append(mu)
            stds.append(std_from_moments(mu, sec, 1e-6))
        bn_alignment_loss(mus, stds, targets, 10.0).backward()
        assert torch.allclose(xb.grad, ref_grads[b], rtol=1e-9, atol=1e-14)
        assert xb.grad.abs().sum() > 0


def test_bn_loss_is_zero_when_statistics_match_exactly():
    model = _randomize_bn(TinyNet()).double()
    layers = find_bn_layers(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64) * 1.7 + 0.4
    # standardize per channel so the input pseudo-layer target (mean 0, sqrt(var + eps) = 1) is met exactly
    eps = 1e-6
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), unbiased=False, keepdim=True) * math.sqrt(1 - eps)
    for i, (_, bn) in enumerate(layers):  # set each layer's running stats to its exact dataset statistics
        means, seconds, _, _ = dataset_moments(model, x, layers, batch_size=5)
        bn.running_mean.copy_(means[i])
        bn.running_var.copy_(seconds[i] - means[i] ** 2)
    assert bn_distance(model, x, batch_size=5) < 1e-12
    assert bn_distance(model, x * 1.1, batch_size=5) > 1e-3


# --- image pipeline ---------------------------------------------------------------------------------------------
def test_smoothing_kernel_weights_known_answer():
    k = gaussian_kernel_3x3(1.25)
    a, b = math.exp(-1 / (2 * 1.25**2)), math.exp(-2 / (2 * 1.25**2))  # edge and corner weight before normalizing
    z = 1 + 4 * a + 4 * b
    expected = torch.tensor([[b, a, b], [a, 1, a], [b, a, b]]) / z
    assert torch.allclose(k, expected, atol=1e-7)
    assert abs(float(k[1, 1]) - 0.166285) < 1e-5
    # depthwise and zero padded: a delta in the corner gives the kernel's lower-right 2x2 block
    img = torch.zeros(1, 3, 5, 5)
    img[:, :, 0, 0] = 1.0
    out = smooth(img, k)
    assert torch.allclose(out[0, 1, :2, :2], k[1:, 1:])
    assert torch.allclose(out[0, 2, :2, :2], k[1:, 1:])
    assert float(out[0, 0, 2:, 2:].abs().sum()) == 0.0


def test_clamp_passes_gradient_straight_through():
    x = torch.tensor([-3.0, -0.5, 0.25, 4.0]).view(1, 1, 2, 2).requires_grad_(True)
    lo, hi = torch.tensor(-1.0).view(1, 1, 1, 1), torch.tensor(1.0).view(1, 1, 1, 1)
    y = ste_clamp(x, lo, hi)
    assert y.flatten().tolist() == [-1.0, -0.5, 0.25, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)).sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_pipeline_views_shapes_and_center_crop():
    lo, hi = torch.full((1, 3, 1, 1), -1e4), torch.full((1, 3, 1, 1), 1e4)
    pipe = ImagePipeline((4, 4), pad=2, lo=lo, hi=hi, smoothing=False)
    canvas = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(pipe.final_view(canvas), canvas[:, :, 1:5, 1:5])
    g = torch.Generator().manual_seed(0)
    views = [pipe.train_view(canvas, g) for _ in range(20)]
    assert all(v.shape == (2, 3, 4, 4) for v in views)
    assert len({v.sum().item() for v in views}) > 1  # crops/flips vary


# --- scheduler --------------------------------------------------------------------------------------------------
def test_scheduler_halves_and_resets():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.RAdam([p], lr=16.0)
    s = ReduceOnPlateauWithReset(opt, factor=0.5, patience=2, threshold=1e-4, min_lr=3.0)
    assert not s.step(1.0)  # first value sets best
    assert not s.step(0.99995)  # relative improvement 5e-5 < 1e-4: bad 1
    assert not s.step(2.0)  # bad 2
    assert s.step(1.0) and s.lr == 8.0  # bad 3 > patience: halve, reset tracker
    assert s.best == math.inf and s.num_bad == 0
    assert not s.step(5.0)  # after the reset a worse value is the new reference, not a bad step
    assert s.best == 5.0 and s.num_bad == 0
    assert not s.step(4.0) and s.num_bad == 0  # improvement
    for _ in range(2):
        assert not s.step(4.0)
    assert s.step(4.0) and s.lr == 4.0
    for _ in range(4):
        s.step(4.0)
    assert s.lr == 3.0  # floored at min_lr


def test_scheduler_relative_threshold_with_negative_losses():
    """best = -1: an improvement needs v < -1 - 1e-4; -0.99995 (worse) and -1.00005 (too small) are bad steps."""
    p = torch.zeros(1, requires_grad=True)
    s = ReduceOnPlateauWithReset(torch.optim.RAdam([p], lr=16.0), factor=0.5, patience=5, threshold=1e-4)
    s.step(-1.0)
    s.step(-0.99995)
    s.step(-1.00005)
    assert s.best == -1.0 and s.num_bad == 2
    s.step(-1.0002)
    assert s.best == -1.0002 and s.num_bad == 0


# --- the engine -------------------------------------------------------------------------------------------------
def test_same_seed_identical_images_and_outputs(tmp_path):
    loaded = _tiny_loaded()
    cfg = _cfg(n_images=10, batch_size=4, iterations=3, augment_draw="image")
    a = generate_images(loaded, cfg, out_dir=tmp_path / "a", progress=False, device="cpu")
    b = generate_images(loaded, cfg, progress=False, device="cpu")
    c = generate_images(loaded, _cfg(n_images=10, batch_size=4, iterations=3, augment_draw="image", seed=1),
                        progress=False, device="cpu")
    assert a.images_nchw.shape == (10, 3, 8, 8) and a.images_nchw.dtype == torch.float32
    assert torch.equal(a.images_nchw, b.images_nchw)
    assert not torch.equal(a.images_nchw, c.images_nchw)
    saved = torch.load(tmp_path / "a" / "images.pt", weights_only=True)
    assert torch.equal(saved, a.images_nchw)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["method"] == "dgh" and meta["settings"]["canvas_pad"] == 2 and meta["seed"] == 0
    assert meta["settings"]["output_loss_weight"] == 1e-3 and meta["settings"]["last_bn_layers"] == ["bn2"]
    assert set(meta["final_loss_terms"]) >= {"loss", "bn", "out", "bn_distance"}
    assert (tmp_path / "a" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    lo, hi = loaded.spec.pixel_range()
    assert bool((a.images_nchw >= lo - 1e-6).all() and (a.images_nchw <= hi + 1e-6).all())


def test_optimization_lowers_bn_distance_and_callback_per_iteration():
    loaded = _tiny_loaded()
    seen: list[tuple[int, float]] = []
    cfg = _cfg(n_images=8, batch_size=4, iterations=30, output_loss="none")
    res = generate_images(loaded, cfg, callback=lambda i, m: seen.append((i, m["loss"])), progress=False, device="cpu")
    noise = generate_images(loaded, _cfg(method="noise", n_images=8), progress=False, device="cpu")
    assert [i for i, _ in seen] == list(range(1, 31))
    assert seen[-1][1] < 0.5 * seen[0][1]
    assert res.loss_terms["bn_distance"] < 0.8 * noise.loss_terms["bn_distance"]


@pytest.mark.parametrize("method", ["batch-bns", "image-bns"])
def test_prior_art_presets_run_and_match_their_statistics(method):
    loaded = _tiny_loaded()
    cfg = _cfg(method=method, n_images=6, batch_size=4, iterations=2)
    assert cfg.canvas_pad == 0 and cfg.output_loss.value == "none" and not cfg.flip
    res = generate_images(loaded, cfg, progress=False, device="cpu")
    assert res.images_nchw.shape == (6, 3, 8, 8) and math.isfinite(res.loss_terms["loss"])


def test_n_smaller_than_batch_and_not_divisible():
    loaded = _tiny_loaded()
    assert generate_images(loaded, _cfg(n_images=3, batch_size=8, iterations=1), progress=False).images_nchw.shape[0] == 3
    assert generate_images(loaded, _cfg(n_images=7, batch_size=3, iterations=1), progress=False).images_nchw.shape[0] == 7


def test_noise_baseline_is_clipped_gaussian():
    loaded = _tiny_loaded()
    res = generate_images(loaded, _cfg(method="noise", n_images=50), progress=False)
    lo, hi = loaded.spec.pixel_range()
    x = res.images_nchw
    assert x.shape == (50, 3, 8, 8)
    assert torch.equal(x, torch.maximum(torch.minimum(x, hi), lo))
    assert bool(((x > lo) & (x < hi)).any())  # not all clipped


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    loaded = _tiny_loaded()
    cfg = _cfg(n_images=9, batch_size=4, iterations=5, checkpoint_every=2)
    full = generate_images(loaded, cfg, out_dir=tmp_path / "full", progress=False, device="cpu")

    class Killed(Exception):
        pass

    def kill_at_3(i: int, _m: dict) -> None:
        if i == 3:
            raise Killed

    with pytest.raises(Killed):
        generate_images(loaded, cfg, out_dir=tmp_path / "cut", callback=kill_at_3, progress=False, device="cpu")
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and not (tmp_path / "cut" / "images.pt").exists()
    resumed = generate_images(loaded, cfg, out_dir=tmp_path / "cut", resume=True, progress=False, device="cpu")
    assert torch.equal(resumed.images_nchw, full.images_nchw)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    with pytest.raises(Killed):
        generate_images(loaded, cfg, out_dir=tmp_path / "cut2", callback=kill_at_3, progress=False)
    with pytest.raises(GenerationError, match="different settings"):
        generate_images(loaded, cfg.model_copy(update={"lr": 1.0}), out_dir=tmp_path / "cut2", resume=True,
                        progress=False)


class NaNAfter(nn.Module):
    """Identity until the n-th call, then multiplies by NaN."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float("nan") if self.calls > self.n else x


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    net = TinyNet()
    net.conv1 = nn.Sequential(NaNAfter(0), net.conv1)
    loaded = _tiny_loaded(net)
    trap = net.conv1[0]
    # setup forwards (size check, last-BN search, cache of 2 batches) + 2 iterations x 2 batches x (step + refresh)
    trap.n = 1 + 1 + 2 + 2 * 2 * 2
    with pytest.raises(GenerationError, match="loss became nan at iteration 3"):
        generate_images(loaded, _cfg(n_images=8, batch_size=4, iterations=6, checkpoint_every=2),
                        out_dir=tmp_path, progress=False, device="cpu")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not (tmp_path / "images.pt").exists()


def test_model_without_bn_is_refused_with_cause():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    spec = ModelSpec(name="fused", family="test", task="classification", input_size=(8, 8))
    with pytest.raises(NoBatchNormError, match="fused"):
        generate_images(LoadedModel(spec=spec, model=plain), _cfg(), progress=False)


def test_input_size_the_model_cannot_take_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    spec = ModelSpec(name="fixed8", family="test", task="classification", input_size=(10, 10), pad=0)
    with pytest.raises(GenerationConfigError, match="cannot take a 10x10 input"):
        generate_images(LoadedModel(spec=spec, model=_randomize_bn(net)), _cfg(), progress=False)


def test_bad_settings_are_value_errors():
    with pytest.raises(GenerationConfigError, match="unknown generation method"):
        GenerationConfig.for_method("deepinversion")
    with pytest.raises(ValueError):
        GenerationConfig.for_method("dgh", n_images=0)
    with pytest.raises(GenerationConfigError, match="unknown generation setting"):
        GenerationConfig.for_method("dgh", n_imgs=3)


def test_last_bn_per_output_level_for_a_two_level_head():
    model = _randomize_bn(TwoLevelHead())
    layers = find_bn_layers(model)
    names = [n for n, _ in layers]
    x = torch.zeros(1, 3, 8, 8)
    feeding = [names[i] for i in find_last_bns(model, x, layers, LastBN.FEEDING)]
    last = [names[i] for i in find_last_bns(model, x, layers, LastBN.LAST)]
    assert feeding == ["p3.1", "p4.1"]
    assert last == ["p4.1"]
    tiny = _randomize_bn(TinyNet())
    assert [find_bn_layers(tiny)[i][0] for i in find_last_bns(tiny, x, find_bn_layers(tiny), LastBN.FEEDING)] == ["bn2"]


def test_detector_from_ultralytics_yaml_generates():
    pytest.importorskip("ultralytics")
    from dgh.models.registry import load_model

    loaded = load_model("yolov8n", "yolov8n.yaml", imgsz=64)
    cfg = _cfg(n_images=2, batch_size=2, iterations=1)
    res = generate_images(loaded, cfg, progress=False, device="cpu")
    assert res.images_nchw.shape == (2, 3, 64, 64)
    assert math.isfinite(res.loss_terms["loss"]) and res.loss_terms["out"] < 0
    assert len(res.meta["settings"]["last_bn_layers"]) >= 3  # one per head level at least
    assert bool((res.images_nchw >= 0).all() and (res.images_nchw <= 1).all())  # YOLO: RGB in [0, 1]


def test_fast_mode_runs_restores_model_and_stays_close_to_exact():
    loaded = _tiny_loaded()
    cfg = _cfg(n_images=8, batch_size=4, iterations=20, output_loss="none")
    exact = generate_images(loaded, cfg, progress=False, device="cpu")
    fast = generate_images(loaded, cfg.model_copy(update={"speed": Speed.FAST, "lazy_refresh": False}),
                           progress=False, device="cpu")
    lazy = generate_images(loaded, _cfg(n_images=8, batch_size=4, iterations=20, output_loss="none", speed="fast",
                                        lazy_refresh=True), progress=False, device="cpu")
    assert lazy.meta["settings"]["lazy_refresh"] is True and fast.meta["settings"]["lazy_refresh"] is False
    noise = generate_images(loaded, _cfg(method="noise", n_images=8), progress=False, device="cpu")
    assert fast.images_nchw.shape == exact.images_nchw.shape and fast.images_nchw.is_contiguous()
    assert loaded.model.conv1.weight.is_contiguous()  # channels-last is undone after the run
    # same algorithm, bf16 forward: ends near the fp32 result (tiny net; measured gap ~1e-4 relative)
    assert abs(fast.loss_terms["bn_distance"] - exact.loss_terms["bn_distance"]) < 0.05 * exact.loss_terms["bn_distance"]
    assert lazy.loss_terms["bn_distance"] < 0.99 * noise.loss_terms["bn_distance"]
    assert not torch.equal(lazy.images_nchw, exact.images_nchw)
