"""Reduce-on-plateau with reset (method.md section 4), one per batch.

Rule, stepped once per iteration with the batch's total loss ``v``:

- improvement: ``v < best - threshold * |best|`` (relative threshold; ``best`` starts at +inf) -> ``best = v``,
  ``bad = 0``; otherwise ``bad += 1``. For ``best > 0`` this is torch's ``ReduceLROnPlateau`` rule
  ``v < best * (1 - threshold)``; the ``|best|`` keeps it right for the negative totals that the output-stretching
  term (``-range``) can produce, where torch's form would count a slightly worse value as an improvement;
- when ``bad > patience``: ``lr = max(lr * factor, min_lr)`` for every parameter group, and the plateau tracker
  restarts (``best = +inf``, ``bad = 0``), so the next value becomes the new reference.
"""

from __future__ import annotations

import math

import torch


class ReduceOnPlateauWithReset:
    """See the module docstring. ``state_dict``/``load_state_dict`` make it checkpointable.

    Args:
        optimizer: its ``param_groups[*]["lr"]`` are changed in place.
        factor: multiplier in (0, 1) (paper 0.5).
        patience: bad steps tolerated (paper ``n_iter / 50``).
        threshold: relative improvement needed (paper 1e-4).
        min_lr: floor of the learning rate (paper 1e-4).

    Raises:
        ValueError: factor not in (0, 1), negative patience/threshold/min_lr.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: float = 0.5,
        patience: int = 20,
        threshold: float = 1e-4,
        min_lr: float = 1e-4,
    ) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if patience < 0 or threshold < 0 or min_lr < 0:
            raise ValueError("patience, threshold and min_lr must be >= 0")
        self.optimizer = optimizer
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.min_lr = min_lr
        self.best = math.inf
        self.num_bad = 0
        self.num_reductions = 0

    def step(self, value: float) -> bool:
        """Record one loss value; return True when the learning rate was reduced by this step."""
        value = float(value)
        if self.best == math.inf or value < self.best - self.threshold * abs(self.best):
            self.best = value
            self.num_bad = 0
            return False
        self.num_bad += 1
        if self.num_bad <= self.patience:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = max(group["lr"] * self.factor, self.min_lr)
        self.best = math.inf
        self.num_bad = 0
        self.num_reductions += 1
        return True

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad": self.num_bad, "num_reductions": self.num_reductions}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.num_reductions = int(state["num_reductions"])
