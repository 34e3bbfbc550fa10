"""``speed: auto``: resolved per device to the mode that wins there, recorded in the run's settings."""

from __future__ import annotations

import pytest
import torch

from dgh.generation import GenerationConfig, generate_images
from dgh.generation import engine
from dgh.generation.config import Speed
from dgh.generation.engine import resolve_speed
from tests.test_generation_init import _loaded


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_is_fast_on_cuda_and_bf16_cpus_and_exact_elsewhere(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(engine, "_cpu_bf16_supported", lambda: bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_speed(Speed.AUTO, cpu) is (Speed.FAST if bf16 else Speed.EXACT)
    assert resolve_speed(Speed.AUTO, cuda) is Speed.FAST
    for explicit in (Speed.EXACT, Speed.FAST):  # an explicit choice is kept on every device
        assert resolve_speed(explicit, cpu) is explicit and resolve_speed(explicit, cuda) is explicit


def test_auto_without_bf16_gives_the_exact_images_and_records_both_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_cpu_bf16_supported", lambda: False)
    loaded = _loaded()
    kw = dict(n_images=6, iterations=2, batch_size=4, checkpoint_every=0, seed=3)
    exact = generate_images(loaded, GenerationConfig.for_method("dgh", speed="exact", **kw), progress=False,
                            device="cpu")
    auto = generate_images(loaded, GenerationConfig.for_method("dgh", speed="auto", **kw), progress=False,
                           device="cpu")
    assert torch.equal(exact.images_nchw, auto.images_nchw)
    assert auto.meta["settings"]["speed"] == "exact" and auto.meta["settings"]["speed_setting"] == "auto"
    assert exact.meta["settings"]["speed"] == exact.meta["settings"]["speed_setting"] == "exact"
