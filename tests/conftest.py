"""Shared pytest fixtures. The real assets live outside the repo (``../shared/assets`` or ``$DGH_ASSETS``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dgh.env import configure_offline

configure_offline()

REPO_ROOT = Path(__file__).resolve().parents[1]


def _assets_root() -> Path:
    return Path(os.environ.get("DGH_ASSETS", REPO_ROOT.parent / "shared" / "assets")).resolve()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The read-only real-asset folder. Absent: tests that need it skip with the path, except under CI
    (``CI=true``), where the real-asset checks must run and a missing folder fails them."""
    root = _assets_root()
    if not (root / "cifar10").is_dir():
        message = f"real assets not found at {root} (set DGH_ASSETS)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def resnet20_weights(assets: Path) -> Path:
    return assets / "cifar10" / "models" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def yolov5n_weights(assets: Path) -> Path:
    return assets / "coco" / "models" / "yolov5n.pt"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one intra-op thread (threading only adds sync overhead there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
