"""``dgh report``: paper-style tables, a plot and an image grid from the pipeline's metrics.

Reads ``stages/evaluate_{imagenet,coco}/<id>/metrics.json`` (and the float baselines ``<model>-float``) for the
experiments defined in ``params.yaml`` and writes, under ``params.report.out_dir`` (default ``reports/``):

- ``results.md``: one table per task and model. Rows are calibration sources in the order
  float, real, dgh, batch-bns, image-bns, noise; columns are the ``WxAy preset algorithm`` settings; each cell is
  the metric and, in parentheses, its difference to the float model on the same images (classification: top-1
  in percent, difference in percentage points; detection: mAP@[.5:.95] on a 0-1 scale, difference in mAP).
  A missing cell (stage not run) is ``—``.
- ``results.json``: the same numbers, machine-readable (every metric of every cell).
- ``accuracy.png``: the metric by calibration source and bit setting, float as a dashed line.
- ``calibration_images.png``: the first images of each generated calibration set next to real images.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image

from dgh.io import atomic_write, load_images, write_json, write_text
from dgh.layout import StageLayout, float_id
from dgh.models import get_spec
from dgh.params import REAL, Params
from dgh.report_ablation import AblationRow, ablation_claim, ablation_markdown, detection_claim, fixes_of
from dgh.stats.outputs import STATS_DIR, STATS_FILE, StatsFile, read_stats, stats_table_markdown
from dgh.stats.quant_outputs import SUMMARY_FILE, ExperimentSummary, quant_table_markdown
from dgh.tracking import git_commit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the Agg backend must be chosen before pyplot is imported

SOURCE_ORDER: tuple[str, ...] = ("float", "real", "dgh", "batch-bns", "image-bns", "noise")
PRIMARY = {"imagenet": ("top1", "top-1 (%)", 2, 1.0), "coco": ("map", "mAP@[.5:.95] (0-1)", 3, 1.0)}


@dataclass
class Cell:
    """One table cell: the metric of an experiment (or of the float model) and its delta to float."""

    task: str
    model: str
    experiment: str
    row: str  # calibration source label
    setting: str  # column: "W8A8 pot mse" (or "float")
    value: float | None
    delta: float | None
    metrics: dict[str, Any]
    ablation: str | None = None  # the calibration set's ablation variant; such cells go to the ablation table


def _read_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def collect(params: Params, root: Path) -> list[Cell]:
    """Every cell the report shows, read from the stage outputs under ``root`` (missing metrics -> value None)."""
    cells: list[Cell] = []
    layout = StageLayout(root)
    for task in ("imagenet", "coco"):
        section = getattr(params, task)
        key = PRIMARY[task][0]
        for model in section.eval:
            fm = _read_metrics(layout.metrics_file(task, float_id(model)))
            fval = _finite(fm.get(key)) if fm else None
            cells.append(Cell(task, model, f"{model}-float", "float", "float", fval, 0.0 if fval is not None else None,
                              fm or {}))
            # a source with several calibration sets for this model gets the set id in its row label
            sets_per_source: dict[str, set[str]] = {}
            for e in section.experiments.values():
                if e.model == model and not params.generate[e.calib].ablation:
                    sets_per_source.setdefault(params.generate[e.calib].source, set()).add(e.calib)
            for eid, e in section.experiments.items():
                if e.model != model:
                    continue
                src = params.generate[e.calib].source
                ablation = params.generate[e.calib].ablation
                if ablation:
                    row = ablation
                else:
                    row = src if len(sets_per_source[src]) == 1 else f"{src} ({e.calib})"
                m = _read_metrics(layout.metrics_file(task, eid))
                val = _finite(m.get(key)) if m else None
                delta = val - fval if (val is not None and fval is not None) else None
                cells.append(Cell(task, model, eid, row, e.setting, val, delta, m or {}, ablation))
    return cells


def _row_sort_key(label: str) -> tuple[int, str]:
    base = label.split(" (")[0]
    return (SOURCE_ORDER.index(base) if base in SOURCE_ORDER else len(SOURCE_ORDER), label)


def _fmt(value: float | None, delta: float | None, digits: int, is_float_row: bool) -> str:
    if value is None:
        return "—"
    if is_float_row or delta is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({delta:+.{digits}f})"


ONNX_MARK = " †"


def _backend_mark(cell: Cell) -> str:
    """`` †`` for a cell scored by onnxruntime on the exported ``model.onnx`` (metrics ``backend``), else empty."""
    return ONNX_MARK if cell.value is not None and cell.metrics.get("backend") == "onnxruntime" else ""


def table_markdown(cells: list[Cell], task: str, model: str) -> str:
    """The markdown table of one task and model (rows: sources; columns: settings; float row repeated).
    Cells of ablation sets are left out (they form :func:`ablation_markdown`)."""
    mine = [c for c in cells if c.task == task and c.model == model and c.ablation is None]
    settings = list(dict.fromkeys(c.setting for c in mine if c.setting != "float"))
    rows = sorted({c.row for c in mine}, key=_row_sort_key)
    digits = PRIMARY[task][2]
    float_cell = next((c for c in mine if c.row == "float"), None)
    lines = ["| calibration | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for row in rows:
        out = []
        for s in settings:
            if row == "float":
                out.append(_fmt(float_cell.value if float_cell else None, None, digits, True))
                continue
            c = next((c for c in mine if c.row == row and c.setting == s), None)
            out.append("" if c is None else _fmt(c.value, c.delta, digits, False) + _backend_mark(c))
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def dgh_comparison_markdown(cells: list[Cell], task: str, model: str) -> str:
    """Per setting: the ``dgh`` cell minus float, real and noise (same units as the table); empty if no dgh row."""
    mine = [c for c in cells if c.task == task and c.model == model and c.ablation is None]
    settings = [s for s in dict.fromkeys(c.setting for c in mine if c.row == "dgh")]
    if not settings:
        return ""
    digits = PRIMARY[task][2]
    others = [r for r in SOURCE_ORDER if r != "dgh" and any(c.row == r for c in mine)]
    lines = ["| setting | " + " | ".join(f"dgh − {r}" for r in others) + " |", "|---|" + "---:|" * len(others)]
    for s in settings:
        d = next(c for c in mine if c.row == "dgh" and c.setting == s)
        vals = []
        for r in others:
            o = next((c for c in mine if c.row == r and (c.setting == s or r == "float")), None)
            if d.value is None or o is None or o.value is None:
                vals.append("—")
            else:
                vals.append(f"{d.value - o.value:+.{digits}f}")
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# how close to real data counts as "on par" (the paper's claim): 1 top-1 point, 0.01 mAP
ON_PAR = {"imagenet": 1.0, "coco": 0.01}


def main_table_claim(cells: list[Cell], task: str, model: str) -> str:
    """One sentence naming the paper claim a main table tests and whether these numbers support it.

    The claim (DGH abstract, tables 1-3): DGH images calibrate a fully quantized model on par with real data
    (within :data:`ON_PAR`) and better than earlier generators (batch-/image-wise BN statistics) and noise. Counted
    per setting over the cells present: DGH minus real >= -ON_PAR, and DGH above each other generated/noise row.
    Empty when the table has no dgh row.
    """
    mine = [c for c in cells if c.task == task and c.model == model and c.value is not None]
    dgh = {c.setting: c.value for c in mine if c.row == "dgh"}
    if not dgh:
        return ""
    tol, digits = ON_PAR[task], PRIMARY[task][2]
    real = {c.setting: c.value for c in mine if c.row == "real" and c.setting in dgh}
    par = {s: dgh[s] - v for s, v in real.items()}
    rivals = [c for c in mine if c.row in ("batch-bns", "image-bns", "noise") and c.setting in dgh]
    ahead = sum(dgh[c.setting] > c.value for c in rivals)
    on_par = sum(g >= -tol for g in par.values())
    total, hits = len(par) + len(rivals), on_par + ahead
    verdict = "support it" if total and hits == total else ("do not support it" if hits == 0 else "support it in part")
    gaps = "; ".join(f"DGH − real {g:+.{digits}f} at {s}" for s, g in par.items()) or "no real-data row"
    return (f"Claim tested: DGH images calibrate the fully quantized model on par with real data (within {tol:g}) and "
            f"better than prior generators and noise; these numbers {verdict} ({gaps}; DGH ahead in {ahead} of "
            f"{len(rivals)} comparisons with batch-bns/image-bns/noise).")


def _set_description(params: Params, set_id: str) -> str:
    g = params.generate[set_id]
    c = g.config
    if g.method == REAL:
        return f"{c.n_images} real images from `{g.data}` (seed {c.seed})"
    if not g.is_generated:
        return f"{c.n_images} N(0,1) noise images clipped to the pixel range (seed {c.seed})"
    preset = type(c).for_method(c.method).model_dump(mode="json")
    changed = {k: v for k, v in c.model_dump(mode="json").items()
               if k not in ("method", "n_images", "iterations", "batch_size", "seed") and v != preset[k]}
    extra = f", options {changed}" if changed else ""
    return f"{c.n_images} images x {c.iterations} iterations, batch {c.batch_size}, seed {c.seed}{extra}"


def read_set_stats(params: Params, root: Path, model: str) -> dict[str, StatsFile]:
    """``{set id: stats.json}`` of the calibration sets of ``model`` that the stage ``stats`` has written."""
    out = {}
    for set_id, g in params.generate.items():
        path = StageLayout(root).stage_dir(STATS_DIR, model) / set_id / STATS_FILE
        if g.model == model and path.is_file():
            out[set_id] = read_stats(path)
    return dict(sorted(out.items(), key=lambda kv: _row_sort_key(kv[1].stats.source)))


def read_experiment_stats(params: Params, root: Path, model: str) -> list[ExperimentSummary]:
    """The ``summary.json`` rows the stage ``stats`` wrote for the (non-ablation) experiments of ``model``, by
    setting, then source."""
    out = []
    for exp_id in params.experiment_ids():
        e = params.experiment(exp_id)
        path = StageLayout(root).stage_dir(STATS_DIR, model) / "quantized" / exp_id / SUMMARY_FILE
        if e.model == model and not params.generation(e.calib).ablation and path.is_file():
            out.append(ExperimentSummary.model_validate_json(path.read_text()))
    settings = list(dict.fromkeys(r.setting for r in out))
    return sorted(out, key=lambda r: (settings.index(r.setting), _row_sort_key(r.calib_source)))


def detection_sentence(cells: list[Cell], model: str) -> str:
    """The claim sentence under a detection table (:func:`dgh.report_ablation.detection_claim`)."""
    mine = [c for c in cells if c.task == "coco" and c.model == model and c.ablation is None]
    settings = list(dict.fromkeys(c.setting for c in mine if c.setting != "float"))
    values: dict[str, dict[str, float | None]] = {}
    for c in mine:
        values.setdefault(c.row, {})[c.setting] = c.value
    return detection_claim(values, settings)


def ablation_sections(params: Params, cells: list[Cell]) -> list[str]:
    """Markdown lines of the "Ablation" section: per (task, model) with ablation sets, the table of
    :func:`dgh.report_ablation.ablation_markdown` (rows in ``params.yaml`` order, float/real/noise of the main table
    as references), its claim sentence and the sets' budgets. Empty when no set has an ``ablation`` label."""
    out: list[str] = []
    for task in ("imagenet", "coco"):
        section = getattr(params, task)
        for model in section.eval:
            mine = [c for c in cells if c.task == task and c.model == model]
            ab = [c for c in mine if c.ablation is not None]
            if not ab:
                continue
            key, label, digits, _ = PRIMARY[task]
            settings = list(dict.fromkeys(c.setting for c in ab))
            sets = list(dict.fromkeys(params.experiment(c.experiment).calib for c in ab))
            rows = []
            for sid in sets:
                g = params.generate[sid]
                vals = {c.setting: c.value for c in ab if params.experiment(c.experiment).calib == sid}
                rows.append(AblationRow(g.ablation or sid, fixes_of(g.config), vals))
            refs = []
            for src in ("float", "real", "noise"):
                vals = {s: next((c.value for c in mine if c.ablation is None and c.row == src
                                 and (c.setting == s or src == "float")), None) for s in settings}
                if any(v is not None for v in vals.values()):
                    refs.append((src, vals))
            out += [f"## Ablation: {model}, {label}", "",
                    "DGH's three fixes switched on one at a time from batch-wise BN matching (GENIE/DeepInversion), "
                    "and removed one at a time from DGH, all at the same generation budget; ✓ = on, read from each "
                    "set's generation config.", "",
                    ablation_markdown(rows, refs, settings, digits), "",
                    ablation_claim(rows, settings[0], digits, label), ""]
            for sid in sets:
                out.append(f"- `{sid}` ({params.generate[sid].ablation}): {_set_description(params, sid)}")
            out.append("")
    return out


def render_markdown(params: Params, cells: list[Cell], commit: str = "unknown",
                    set_stats: dict[str, dict[str, StatsFile]] | None = None, root: Path | None = None) -> str:
    """The whole of ``results.md``; ``set_stats`` (``{model: {set id: stats.json}}``) adds a calibration-set
    statistics table per model, ``root`` (the project) a quantized-model statistics table per model."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# DGH reproduction: results",
        "",
        f"Written by `dgh report` (last stage of `dvc repro`) on {now}, code at git `{commit}`.",
        "Every layer, the input and the network output are quantized (hardware-friendly PTQ).",
        "Rows: where the calibration images came from; columns: `WxAy preset algorithm` (x-bit weights, y-bit",
        "activations); cells: the metric, and in parentheses its difference to the float model on the same images.",
        "`—` = not run yet. Calibration sets are listed under each table.",
        "Backend: quantized cells come from the PyTorch fake-quant model, except those marked `†`, which onnxruntime",
        "computed on the exported `model.onnx` (stage `export`, `export.evaluate_backend` in params.yaml).",
        "",
    ]
    for task, title in (("imagenet", "Classification"), ("coco", "Detection")):
        section = getattr(params, task)
        key, label, digits, _ = PRIMARY[task]
        for model, ev in section.eval.items():
            fcell = next((c for c in cells if c.task == task and c.model == model and c.row == "float"), None)
            n = fcell.metrics.get("n_images") if fcell else None
            data = ev.data if task == "imagenet" else ev.images
            out.append(f"## {title}: {model}, {label}")
            out.append("")
            out.append(f"Evaluated on `{data}`" + (f" ({n} images)." if n else "."))
            out.append("")
            out.append(table_markdown(cells, task, model))
            out.append("")
            claim = main_table_claim(cells, task, model)
            if claim:
                out += [claim, ""]
            comparison = dgh_comparison_markdown(cells, task, model)
            if comparison:
                out += ["DGH against the other calibration sources (positive = DGH higher):", "", comparison, ""]
            if task == "coco":
                out += [detection_sentence(cells, model), ""]
            used = list(dict.fromkeys(e.calib for e in section.experiments.values()
                                      if e.model == model and not params.generate[e.calib].ablation))
            for sid in used:
                out.append(f"- `{sid}` ({params.generate[sid].source}): {_set_description(params, sid)}")
            out.append("")
            table = stats_table_markdown((set_stats or {}).get(model, {}))
            if table:
                out += [f"Calibration-set statistics of {model} (stage `stats`, `stages/stats/{model}/`; L_BN as in "
                        "method.md section 3 on the whole set; pixels within half an 8-bit level of 0 or 1; output "
                        "range = max - min of one image's output):", "", table, ""]
            rows = read_experiment_stats(params, root, model) if root is not None else []
            if rows:
                digits = PRIMARY[task][2]
                metric = {c.experiment: f"{c.value:.{digits}f}" for c in cells
                          if c.model == model and c.value is not None}
                out += [f"Quantized-model statistics of {model} (stages `quant_stats_{task}` and `stats`; clipping "
                        "on 32 evaluation images, every quantizer on; ranges against the experiment calibrated on "
                        "real images with the same setting, log2 of the upper end per activation quantizer):", "",
                        quant_table_markdown(rows, metric), ""]
    out += ablation_sections(params, cells)
    out += ["## Figures", "", "![accuracy by calibration source](accuracy.png)", "",
            "![generated calibration images next to real images](calibration_images.png)", ""]
    return "\n".join(out)


def plot_accuracy(cells: list[Cell]) -> bytes:
    """PNG bytes: one panel per (task, model), grouped bars per setting, one bar per source, float dashed."""
    cells = [c for c in cells if c.ablation is None]
    panels = list(dict.fromkeys((c.task, c.model) for c in cells))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (task, model) in zip(axes[0], panels):
        mine = [c for c in cells if c.task == task and c.model == model]
        settings = list(dict.fromkeys(c.setting for c in mine if c.setting != "float"))
        rows = sorted({c.row for c in mine if c.row != "float"}, key=_row_sort_key)
        width = 0.8 / max(1, len(rows))
        for i, row in enumerate(rows):
            vals = []
            for s in settings:
                c = next((c for c in mine if c.row == row and c.setting == s), None)
                vals.append(c.value if c is not None and c.value is not None else 0.0)
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, vals, width=width, label=row)
        fcell = next((c for c in mine if c.row == "float"), None)
        if fcell is not None and fcell.value is not None:
            ax.axhline(fcell.value, color="k", linestyle="--", linewidth=1, label=f"float {fcell.value:.3g}")
        shown = [c.value for c in mine if c.value is not None]
        if shown:  # zoom on the range the values span, so sub-point differences stay visible
            lo, hi = min(shown), max(shown)
            pad = max(0.15 * (hi - lo), 0.02 * abs(hi), 1e-3)
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, fontsize=8)
        ax.set_ylabel(PRIMARY[task][1])
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _real_images(folder: Path, k: int, size: tuple[int, int]):
    """Up to ``k`` real images (spread over sub-folders/classes), resized to ``size`` (H, W), as (k,3,H,W) in [0,1]."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
    if not files:
        return None
    step = max(1, len(files) // k)
    picked = files[::step][:k]
    arrs = []
    for f in picked:
        with Image.open(f) as im:
            im = im.convert("RGB").resize((size[1], size[0]))
            arrs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(arrs)


def plot_images(params: Params, root: Path, k: int) -> bytes | None:
    """PNG bytes: per model, one row per calibration set of the main table (first ``k`` images; ablation sets are
    left out), labelled with the set's id."""
    layout = StageLayout(root)
    rows: list[tuple[str, Any]] = []
    for model_key, entry in params.models.items():
        try:
            spec = get_spec(entry.name or model_key)
        except ValueError:
            continue
        size = (entry.imgsz, entry.imgsz) if entry.imgsz else tuple(spec.input_size)
        for sid, g in params.generate.items():
            if g.model != model_key or g.ablation:
                continue
            if g.is_generated:
                path = layout.images_file(sid)
                if not path.is_file():
                    continue
                imgs = load_images(path)
                rows.append((sid, spec.denormalize(imgs[:k]).clamp(0, 1)))
            elif g.method == REAL:
                folder = params.resolve(g.data) if g.data else None
                if folder is not None and folder.is_dir():
                    real = _real_images(folder, k, size)
                    if real is not None:
                        rows.append((sid, real))
    if not rows:
        return None
    ncols = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.0, 1.4 * len(rows)), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < imgs.shape[0]:
                ax.imshow(imgs[j].permute(1, 2, 0).numpy())
        axes[i][0].set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=64)
    plt.close(fig)
    return buf.getvalue()


def write_report(params: Params, root: str | Path) -> Path:
    """Write ``results.md``, ``results.json``, ``accuracy.png`` and ``calibration_images.png``.

    Returns:
        the path of ``results.md``.
    """
    root = Path(root)
    out_dir = root / params.report.out_dir
    cells = collect(params, root)
    commit = git_commit(root)
    set_stats = {model: read_set_stats(params, root, model) for model in params.models}
    md = render_markdown(params, cells, commit, set_stats, root)
    write_json({"commit": commit, "cells": [asdict(c) for c in cells]}, out_dir / "results.json")
    png = plot_accuracy(cells)
    atomic_write(out_dir / "accuracy.png", lambda p: p.write_bytes(png))
    grid = plot_images(params, root, params.report.grid_images)
    if grid is None:  # nothing generated yet: an explicit placeholder keeps the declared output present
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no calibration images yet", ha="center")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        grid = buf.getvalue()
    atomic_write(out_dir / "calibration_images.png", lambda p: p.write_bytes(grid))
    return write_text(md, out_dir / "results.md")
