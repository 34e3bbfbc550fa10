"""Output distribution stretching loss, the data-free lambda_out rule, and the input pseudo-layer target."""

from __future__ import annotations

import pytest
import torch

from dgh.generation import GenerationConfig, GenerationConfigError, generate_images
from dgh.generation.bn_stats import BNTarget, bn_targets, find_bn_layers, image_moments
from dgh.generation.losses import (
    balanced_output_weight,
    bn_alignment_loss,
    output_range,
    output_stretching_loss,
    std_from_moments,
)
from dgh.generation.pipeline import ImagePipeline, batch_slices, init_canvases
from dgh.generation.targets import input_target
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from tests.test_generation import _tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(mean: tuple, std: tuple) -> ModelSpec:
    return ModelSpec(name="t", family="test", task="classification", input_size=(8, 8), mean=mean, std=std)


# --- input pseudo-layer target -----------------------------------------------------------------------------------
def test_input_target_is_natural_pixel_statistics_in_the_models_space():
    imagenet = input_target(_spec(IMAGENET_MEAN, IMAGENET_STD))
    assert torch.equal(imagenet.mean, torch.zeros(3)) and torch.equal(imagenet.std, torch.ones(3))
    identity = input_target(_spec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert torch.allclose(identity.mean, torch.tensor(IMAGENET_MEAN)) and torch.allclose(identity.std, torch.tensor(IMAGENET_STD))
    # (x - 127) / 128 for x in 0..255: mean 127/255, std 128/255 on the 0-1 scale
    lite = input_target(_spec((127 / 255,) * 3, (128 / 255,) * 3))
    expected_mean = (torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255 - 127) / 128
    expected_std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255 / 128
    assert torch.allclose(lite.mean.double(), expected_mean, atol=1e-6)
    assert torch.allclose(lite.std.double(), expected_std, atol=1e-6)
    assert torch.equal(input_target(None).std, torch.ones(3))
    # eps enters as sqrt(std^2 + eps)
    assert torch.allclose(input_target(None, std_eps=0.21).std, torch.full((3,), 1.1), atol=1e-6)


# --- the loss itself ---------------------------------------------------------------------------------------------
def test_output_range_gradient_is_minus_one_at_argmax_plus_one_at_argmin_over_n():
    z = torch.tensor([[1.0, 5.0, -2.0, 0.0], [3.0, -1.0, 0.5, 2.0]], requires_grad=True)
    loss = output_stretching_loss([z])
    assert loss.item() == pytest.approx(-((5 + 2) + (3 + 1)) / 2)
    (g,) = torch.autograd.grad(loss, z)
    expected = torch.tensor([[0.0, -0.5, 0.5, 0.0], [-0.5, 0.5, 0.0, 0.0]])
    assert torch.equal(g, expected)
    assert torch.equal(output_range([z, 2 * z]), torch.tensor([21.0, 12.0]))


def test_hinges_are_zero_inside_the_margin_and_quadratic_outside():
    target = BNTarget("bn", torch.zeros(2), torch.ones(2))
    # per-image spatial moments: image 0 at the target (mean 0, E[a^2] 1 -> std 1), image 1 with mean (2, 0)
    mean_img = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    sq_img = torch.tensor([[1.0, 1.0], [4.0 + 1.0, 1.0]])
    z = torch.zeros(2, 3)
    loss = output_stretching_loss([z], [(mean_img, sq_img)], [target], margin=0.5, eps=0.0)
    # image 1: ||mu - 0||^2 / C = 4 / 2 = 2 -> hinge 1.5; std sqrt(5-4) = 1 -> 0; mean over 2 images -> 0.75
    assert loss.item() == pytest.approx(0.75)


# --- data-free lambda_out ------------------------------------------------------------------------------------------
def test_balanced_output_weight_known_answer_and_errors():
    assert balanced_output_weight(2.0, 0.5, 0.1) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="output-loss gradient norm"):
        balanced_output_weight(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="BN-loss gradient norm"):
        balanced_output_weight(float("nan"), 1.0, 1.0)
    with pytest.raises(ValueError, match="ratio"):
        balanced_output_weight(1.0, 1.0, 0.0)
    with pytest.raises(GenerationConfigError, match="not both"):
        GenerationConfig.for_method("dgh", output_loss_weight=1e-3, output_loss_ratio=1.0)


def _independent_balanced_weight(loaded, cfg: GenerationConfig) -> float:
    """The rule computed by hand: first batch of the seeded initial canvases, final view, batch statistics, L_BN with
    the input pseudo-layer, paper-form L_out with the hinge on the last BN, gradient norms, share n_0 / N."""
    model, spec = loaded.model, loaded.spec
    lo, hi = spec.pixel_range()
    pipe = ImagePipeline(out_hw=spec.input_size, pad=spec.pad, lo=lo, hi=hi)
    canvases = init_canvases(cfg.n_images, pipe.canvas_hw, lo, hi, torch.Generator().manual_seed(cfg.seed))
    first = batch_slices(cfg.n_images, cfg.batch_size)[0]
    canvas = canvases[first].clone().requires_grad_(True)
    view = pipe.final_view(canvas)
    layers = find_bn_layers(model)
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, o: inputs.append(i[0])) for _, m in layers]
    logits = model(view)
    for h in handles:
        h.remove()
    moments = [image_moments(a) for a in inputs] + [image_moments(view)]
    targets = bn_targets(layers, cfg.bn_std_eps, torch.device("cpu")) + [input_target(spec, cfg.bn_std_eps)]
    mus = [m.mean(0) for m, _ in moments]
    stds = [std_from_moments(m.mean(0), s.mean(0), cfg.bn_std_eps) for m, s in moments]
    l_bn = bn_alignment_loss(mus, stds, targets, cfg.lambda_sigma)
    l_out = output_stretching_loss([logits], [moments[len(layers) - 1]], [targets[len(layers) - 1]], 0.5, cfg.bn_std_eps)
    (g_bn,) = torch.autograd.grad(l_bn, canvas, retain_graph=True)
    (g_out,) = torch.autograd.grad(l_out, canvas)
    share = (first.stop - first.start) / cfg.n_images
    return cfg.output_loss_ratio * share * float(g_bn.norm()) / float(g_out.norm())


def test_balanced_rule_sets_the_gradient_ratio_at_initialization():
    loaded = _tiny_loaded()
    cfg = GenerationConfig.for_method("dgh", n_images=10, batch_size=4, iterations=1, checkpoint_every=0,
                                      output_loss_ratio=0.3)
    res = generate_images(loaded, cfg, progress=False, device="cpu")
    settings = res.meta["settings"]
    assert settings["output_loss_rule"] == "balanced" and settings["output_loss_ratio"] == 0.3
    assert settings["output_loss_weight"] == pytest.approx(_independent_balanced_weight(loaded, cfg), rel=1e-5)


def test_rule_selection_fixed_registry_and_untuned_models():
    loaded = _tiny_loaded()  # registry value 1e-3
    fixed = generate_images(loaded, GenerationConfig(n_images=4, batch_size=4, iterations=0), progress=False)
    assert fixed.meta["settings"]["output_loss_rule"] == "fixed"
    assert fixed.meta["settings"]["output_loss_weight"] == 1e-3
    loaded.spec = ModelSpec(**{**loaded.spec.__dict__, "output_loss_weight": None})  # an untuned model
    auto = generate_images(loaded, GenerationConfig(n_images=4, batch_size=4, iterations=0), progress=False)
    assert auto.meta["settings"]["output_loss_rule"] == "balanced" and auto.meta["settings"]["output_loss_weight"] > 0
    none = generate_images(loaded, GenerationConfig.for_method("batch-bns", n_images=4, batch_size=4, iterations=0),
                           progress=False)
    assert none.meta["settings"]["output_loss_weight"] == 0.0


def test_stretching_widens_the_per_image_output_range():
    loaded = _tiny_loaded()
    base = dict(n_images=8, batch_size=4, iterations=25, checkpoint_every=0)
    plain = generate_images(loaded, GenerationConfig.for_method("dgh", output_loss="none", **base), progress=False)
    stretched = generate_images(loaded, GenerationConfig.for_method("dgh", output_loss_ratio=1.0, **base), progress=False)
    with torch.no_grad():
        r_plain = output_range([loaded.model(plain.images_nchw)]).mean()
        r_stretched = output_range([loaded.model(stretched.images_nchw)]).mean()
    assert r_stretched > 1.5 * r_plain
