"""Speed paths of the generation engine give the same numbers as the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgh.generation import GenerationConfig
from dgh.generation.bn_stats import MomentRecorder, find_bn_layers, image_moments
from dgh.generation.engine import _Run
from dgh.models.spec import LoadedModel, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv-BN-ReLU x2 then a head after the last BN; input (N, 3, 8, 8) -> logits (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        self.head_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        self.head_calls += 1
        return self.fc(x.mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.copy_(torch.randn(bn.num_features) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
    return net


def _loaded(net: nn.Module) -> LoadedModel:
    spec = ModelSpec(name="net", family="test", task="classification", input_size=(8, 8), pad=2, num_classes=4)
    return LoadedModel(spec=spec, model=net)


def test_stop_when_complete_records_the_same_moments_and_skips_the_head() -> None:
    net = _net()
    rec = MomentRecorder(find_bn_layers(net))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), rec.active():
        net(x)
    full = [tuple(t.clone() for t in m) for m in rec.moments]
    calls = net.head_calls
    with torch.no_grad(), rec.active(stop_when_complete=True):
        net(x)  # stops inside bn2's hook; the context manager ends it
    assert net.head_calls == calls  # the head did not run
    for (m0, s0), (m1, s1) in zip(full, rec.moments):
        assert torch.equal(m0, m1) and torch.equal(s0, s1)


def test_channels_last_moments_match_contiguous() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 7, 5, 6, generator=g) * 3 + 1
    cl = a.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref = a.clone().requires_grad_(True)
    m0, s0 = image_moments(ref)
    m1, s1 = image_moments(cl)
    torch.testing.assert_close(m1, m0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    w_m, w_s = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    (m0 * w_m + s0 * w_s).sum().backward()
    (m1 * w_m + s1 * w_s).sum().backward()
    torch.testing.assert_close(cl.grad, ref.grad, rtol=1e-6, atol=1e-6)
    # bf16 channels-last input: fp32 moments, close to the fp32 ones at bf16 input precision (2^-8 relative)
    m2, s2 = image_moments(a.bfloat16().contiguous(memory_format=torch.channels_last))
    assert m2.dtype == torch.float32
    torch.testing.assert_close(s2, s0.detach(), rtol=2**-7, atol=2**-7)


def test_skipped_refresh_of_a_single_batch_changes_nothing() -> None:
    """With one batch its own cache entry cancels out of the global moments, so skipping its refresh is exact."""
    results = []
    for refresh in (True, False):
        net = _net()
        for p in net.parameters():
            p.requires_grad_(False)
        cfg = GenerationConfig.for_method("dgh", n_images=3, iterations=3, batch_size=4, seed=5, checkpoint_every=0)
        run = _Run(_loaded(net), cfg, torch.device("cpu"))
        run.check_input_and_find_last_bns()
        state = run.new_state()
        for _ in range(cfg.iterations):
            run.step(0, state, refresh=refresh)
        results.append(run.final_images(state))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], torch.zeros_like(results[0]))


# SHA-256 of the float32 bytes of ``images_nchw`` from the generation code as it stood when the speed work on exact
# mode began (commit 7a23dac; engine unchanged since dd27d43), recorded on the project's machine. Floating-point
# results depend on the CPU's kernels and the torch build, so the check runs only where these match.
_KNOWN_PLATFORM = ("2.14.1", "AVX512")
_KNOWN_EXACT_IMAGES = {
    False: "974940fd7097909d87082c6e9dcb6abc1f4a42311104c55cddd2f161ae0f9d3b",
    True: "333133fb4ad58ce9061d090e785de21f4e467bfbc2f0728e942dd2eaec602bd7",
}


@pytest.mark.parametrize("lazy", [False, True])
def test_exact_mode_images_are_bit_identical_to_the_recorded_ones(lazy: bool) -> None:
    """Exact mode must keep producing the same images for the same seed (a reproduction run relies on it): a speed
    change of the engine may not alter one bit. ResNet-20 with seeded random weights and BN statistics, 6 images in
    batches of 4 and 2 (global statistics with the cache refresh), 3 iterations."""
    import hashlib

    from dgh.generation import generate_images
    from dgh.models import load_model

    platform = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    if platform != _KNOWN_PLATFORM:
        pytest.skip(f"known answer recorded on torch {_KNOWN_PLATFORM[0]} / {_KNOWN_PLATFORM[1]}, here {platform}")
    torch.manual_seed(0)
    loaded = load_model("resnet20_cifar10", "random")
    g = torch.Generator().manual_seed(0)
    for m in loaded.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    cfg = GenerationConfig.for_method("dgh", n_images=6, iterations=3, batch_size=4, seed=0, speed="exact",
                                      checkpoint_every=0, lazy_refresh=lazy)
    res = generate_images(loaded, cfg, progress=False, device="cpu")
    assert hashlib.sha256(res.images_nchw.numpy().tobytes()).hexdigest() == _KNOWN_EXACT_IMAGES[lazy]
