"""Initialization in ImageNet pixel units (``init: imagenet-pixels``) and canvas projection (``project_canvas``)."""

from __future__ import annotations

import math

import torch

from dgh.generation import GenerationConfig, generate_images
from dgh.generation.config import InitDistribution, init_affine
from dgh.generation.engine import _Run
from dgh.generation.pipeline import init_canvases
from dgh.models.spec import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec
from tests.test_generation import TinyNet, _randomize_bn

YOLO_MEAN, YOLO_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _loaded(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> LoadedModel:
    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", family="test", task="classification", input_size=(8, 8), pad=2, num_classes=4,
                     output_loss_weight=1e-3, mean=mean, std=std)
    return LoadedModel(spec=spec, model=_randomize_bn(TinyNet()))


def test_affine_is_identity_for_imagenet_normalization_and_maps_imagenet_pixels_otherwise():
    assert init_affine(IMAGENET_MEAN, IMAGENET_STD, InitDistribution.IMAGENET_PIXELS) is None
    assert init_affine(YOLO_MEAN, YOLO_STD, InitDistribution.NORMALIZED) is None
    scale, shift = init_affine(YOLO_MEAN, YOLO_STD, InitDistribution.IMAGENET_PIXELS)
    assert torch.allclose(scale.flatten(), torch.tensor(IMAGENET_STD)) and torch.allclose(shift.flatten(), torch.tensor(IMAGENET_MEAN))
    # (x - 127) / 128 models: pixel = 0.485 + 0.229 z  ->  normalized = (pixel - 127/255) / (128/255)
    scale, shift = init_affine((127 / 255,) * 3, (128 / 255,) * 3, InitDistribution.IMAGENET_PIXELS)
    assert abs(float(scale.flatten()[0]) - 0.229 * 255 / 128) < 1e-6
    assert abs(float(shift.flatten()[0]) - (0.485 - 127 / 255) * 255 / 128) < 1e-6


def test_fraction_of_pixels_clamped_to_zero_matches_the_normal_cdf():
    """YOLO (pixels in [0, 1] as is): N(0, 1) puts Phi(0) = 1/2 of the pixels at 0; ImageNet pixel statistics put
    Phi(-mean_c / std_c) there (1.7 / 2.1 / 3.6 %). Tolerance: 5 binomial standard deviations."""
    n, hw = 64, (32, 32)
    lo, hi = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    m = n * hw[0] * hw[1]
    plain = init_canvases(n, hw, lo, hi, torch.Generator().manual_seed(0))
    aff = init_affine(YOLO_MEAN, YOLO_STD, InitDistribution.IMAGENET_PIXELS)
    pix = init_canvases(n, hw, lo, hi, torch.Generator().manual_seed(0), aff)
    for c in range(3):
        for x, p in ((plain, 0.5), (pix, _phi(-IMAGENET_MEAN[c] / IMAGENET_STD[c]))):
            frac = float((x[:, c] == 0).float().mean())
            assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / m), (c, frac, p)
    assert float(pix.min()) >= 0.0 and float(pix.max()) <= 1.0


def test_imagenet_pixels_init_is_bit_identical_for_imagenet_normalized_models():
    loaded = _loaded()
    kw = dict(n_images=6, iterations=2, batch_size=4, checkpoint_every=0)
    a = generate_images(loaded, GenerationConfig.for_method("dgh", **kw), progress=False, device="cpu")
    b = generate_images(loaded, GenerationConfig.for_method("dgh", init="imagenet-pixels", **kw), progress=False,
                        device="cpu")
    assert torch.equal(a.images_nchw, b.images_nchw)


def test_projected_canvas_stays_in_the_pixel_box_and_the_plain_one_leaves_it():
    """lr 16 in YOLO pixel units (lr_units normalized) throws pixels far out of [0, 1] with the straight-through
    clamp; with ``project_canvas`` every canvas value stays inside after every step."""
    loaded = _loaded(YOLO_MEAN, YOLO_STD)
    out = {}
    for project in (False, True):
        cfg = GenerationConfig.for_method("dgh", n_images=4, iterations=8, batch_size=4, checkpoint_every=0,
                                          lr_units="normalized", project_canvas=project)
        run = _Run(loaded, cfg, torch.device("cpu"))
        run.check_input_and_find_last_bns()
        state = run.new_state()
        for _ in range(cfg.iterations):
            run.step(0, state)
        canvas = state.canvases[0].detach()
        out[project] = (float(canvas.min()), float(canvas.max()))
    assert out[True][0] >= 0.0 and out[True][1] <= 1.0
    assert out[False][0] < -0.5 or out[False][1] > 1.5
