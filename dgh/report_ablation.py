"""The report's ablation table and the claim sentences of the ablation and detection tables.

The ablation (arXiv 2410.22110, the three fixes of ``../shared/docs/method.md``) is a set of calibration sets of one
model that carry an ``ablation`` label in ``params.yaml``. Which fixes a set has on is read from its
:class:`~dgh.generation.GenerationConfig`, never from its label:

- ``global``: all-images statistics (``statistics: all``), method.md section 1;
- ``pipeline``: augmentation mimicry and smoothing (canvas with random crop, flip, smoothing, clamp), section 2;
- ``odsl``: the output distribution stretching loss (``output_loss`` not ``none`` and a weight above 0), section 3.

Each sentence says which claim a table tests and whether the numbers in it support it; the rule behind the verdict is
part of the sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dgh.generation import GenerationConfig
from dgh.generation.config import OutputLoss, Statistics

FIXES: tuple[str, ...] = ("global", "pipeline", "odsl")
FIX_NAMES = {
    "global": "all-images statistics",
    "pipeline": "augmentation mimicry + smoothing",
    "odsl": "output distribution stretching loss",
}


@dataclass(frozen=True)
class AblationRow:
    """One row of the ablation table: its label, which fixes are on, and the metric per setting (None = not run)."""

    label: str
    fixes: dict[str, bool]
    values: dict[str, float | None]


def fixes_of(config: GenerationConfig) -> dict[str, bool]:
    """Which of DGH's three fixes ``config`` has on: ``{"global", "pipeline", "odsl"} -> bool``.

    ``pipeline`` is on when any of random crop (with a canvas pad other than 0), flip or smoothing is on; a pad of
    ``None`` (the registry's p) counts as a canvas. ``odsl`` is on for ``output_loss`` paper/mct with a weight that is
    ``None`` (the registry's lambda_out, positive for every registered model) or above 0.
    """
    canvas = config.random_crop and (config.canvas_pad is None or config.canvas_pad > 0)
    return {
        "global": config.statistics is Statistics.ALL,
        "pipeline": bool(canvas or config.flip or config.smoothing),
        "odsl": config.output_loss is not OutputLoss.NONE
        and (config.output_loss_weight is None or config.output_loss_weight > 0),
    }


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ablation_markdown(rows: Sequence[AblationRow], references: Sequence[tuple[str, dict[str, float | None]]],
                      settings: Sequence[str], digits: int) -> str:
    """Markdown table: one row per ablation set (fixes as ✓/–, then the metric per setting), then reference rows
    (float, real, noise calibrated at the same settings) below a separator row."""
    head = "| variant | " + " | ".join(FIX_NAMES[f] for f in FIXES) + " | " + " | ".join(settings) + " |"
    lines = [head, "|---|" + ":---:|" * len(FIXES) + "---:|" * len(settings)]
    for r in rows:
        marks = " | ".join("✓" if r.fixes[f] else "–" for f in FIXES)
        lines.append(f"| {r.label} | {marks} | " + " | ".join(_fmt(r.values.get(s), digits) for s in settings) + " |")
    for label, vals in references:
        lines.append(f"| *{label}* |" + " |" * len(FIXES) + " " + " | ".join(_fmt(vals.get(s), digits) for s in settings)
                     + " |")
    return "\n".join(lines)


def _find(rows: Sequence[AblationRow], fixes: dict[str, bool]) -> AblationRow | None:
    return next((r for r in rows if r.fixes == fixes), None)


def fix_effects(rows: Sequence[AblationRow], setting: str) -> dict[str, Any]:
    """The effect of each fix at ``setting``, from the rows present.

    Returns:
        ``{"added": {fix: delta}, "removed": {fix: delta}, "total": delta | None}``. ``added[f]``: the ladder step
        that turns ``f`` on with the fixes before it (order :data:`FIXES`) on and the ones after it off;
        ``removed[f]``: full DGH minus DGH without ``f``; ``total``: full DGH minus the row with no fix. A delta is
        left out when a row it needs is missing or was not run.
    """
    def value(fixes: dict[str, bool]) -> float | None:
        r = _find(rows, fixes)
        return None if r is None else r.values.get(setting)

    full = {f: True for f in FIXES}
    added, removed = {}, {}
    for i, f in enumerate(FIXES):
        before = {g: j < i for j, g in enumerate(FIXES)}
        after = {g: j <= i for j, g in enumerate(FIXES)}
        a, b = value(after), value(before)
        if a is not None and b is not None:
            added[f] = a - b
        minus = {**full, f: False}
        a, b = value(full), value(minus)
        if a is not None and b is not None:
            removed[f] = a - b
    top, base = value(full), value({f: False for f in FIXES})
    return {"added": added, "removed": removed, "total": None if top is None or base is None else top - base}


def ablation_claim(rows: Sequence[AblationRow], setting: str, digits: int, unit: str) -> str:
    """One sentence: the claim the ablation tests, the measured effect of each fix at ``setting`` and the verdict.

    Verdict rule: *supported* when DGH beats the baseline and every measured fix helps both when added and when
    removed (every delta > 0); *partly supported* when DGH beats the baseline but some fix does not help;
    *not supported* when DGH does not beat the baseline; *not measured yet* when the two rows are missing.
    """
    eff = fix_effects(rows, setting)

    def d(x: float) -> str:
        return f"{x:+.{digits}f}"

    parts = []
    for f in FIXES:
        bits = []
        if f in eff["added"]:
            bits.append(f"added {d(eff['added'][f])}")
        if f in eff["removed"]:
            bits.append(f"removed from DGH {d(-eff['removed'][f])}")
        if bits:
            parts.append(f"{FIX_NAMES[f]}: {', '.join(bits)}")
    claim = ("Tests the paper's ablation claim that each of DGH's three fixes raises hardware-friendly PTQ accuracy "
             f"over batch-wise BN matching (GENIE/DeepInversion); at {setting} ({unit})")
    if eff["total"] is None:
        return claim + ": not measured yet."
    measured = list(eff["added"].values()) + list(eff["removed"].values())
    if eff["total"] <= 0:
        verdict = "not supported (DGH does not beat the baseline)"
    elif all(x > 0 for x in measured):
        verdict = "supported (every fix helps when added and when removed)"
    else:
        verdict = "partly supported (DGH beats the baseline, but not every fix helps on its own)"
    return f"{claim}, DGH − baseline {d(eff['total'])}; " + "; ".join(parts) + f": {verdict}."


def detection_claim(values: dict[str, dict[str, float | None]], settings: Sequence[str]) -> str:
    """One sentence on the detection table: the paper's claim that DGH calibrates a detector about as well as real
    data where calibration matters, measured at the lowest-bit setting where real and noise differ.

    Args:
        values: ``{source: {setting: mAP or None}}`` with sources ``real``, ``noise``, ``dgh``.
        settings: the table's columns, in order.

    Verdict rule: at the setting with the largest real − noise gap, *supported* when DGH recovers at least half of
    that gap (``dgh − noise >= 0.5 (real − noise)``), else *not supported*; *not measured* when a value is missing
    or real does not beat noise at any setting (then the table cannot tell calibration sources apart).
    """
    gaps = []
    for s in settings:
        r, n = values.get("real", {}).get(s), values.get("noise", {}).get(s)
        if r is not None and n is not None:
            gaps.append((r - n, s))
    claim = ("Tests the paper's claim that DGH images calibrate a fully quantized detector about as well as real "
             "images and far better than noise")
    if not gaps or max(gaps)[0] <= 0:
        return claim + ": not measured (no setting here where real calibration beats noise)."
    gap, s = max(gaps)
    dgh = values.get("dgh", {}).get(s)
    if dgh is None:
        return claim + f": at {s} real − noise is {gap:+.3f} mAP, DGH not measured yet."
    r, n = values["real"][s], values["noise"][s]
    share = (dgh - n) / gap
    verdict = "supported" if share >= 0.5 else "not supported"
    return (claim + f"; at {s}, where sources separate most (real − noise {gap:+.3f} mAP), DGH − real "
            f"{dgh - r:+.3f} and DGH − noise {dgh - n:+.3f}, i.e. DGH recovers {100 * share:.0f} % of the gap "
            f"(rule: supported at >= 50 %): {verdict}.")
