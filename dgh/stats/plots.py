"""Figures of :mod:`dgh.stats` (matplotlib's object API with the Agg renderer, no pyplot state; PNG written
atomically).

- :func:`plot_bn_layers`: per-layer BN distance of several calibration sources of one model on one chart.
- :func:`plot_output_ranges`: per-image output-range histograms of several sources (synthetic against real), one
  panel per model output (per head level for detectors).
- :func:`plot_clipping`: per-site clipping rate of quantized models on the same data.
- :func:`plot_setting`: the experiments of one model and quantization setting: per-site clipping rate on the
  evaluation images and the per-site range against the real-calibrated experiment's.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dgh.io import write_bytes
from dgh.stats.calibration import CalibrationStats, StatsError
from dgh.stats.quantized import QuantizedStats, SiteThresholds

# one colour per usual source, so that the same source looks the same on every chart
SOURCE_COLOURS = {"real": "#2ca02c", "dgh": "#1f77b4", "batch-bns": "#ff7f0e", "image-bns": "#9467bd", "noise": "#7f7f7f"}


def _colour(label: str, i: int) -> str:
    for key, colour in SOURCE_COLOURS.items():
        if label == key or label.endswith("-" + key):
            return colour
    return f"C{i % 10}"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes(buf.getvalue(), path)


def plot_bn_layers(sources: Mapping[str, CalibrationStats], path: str | Path, title: str | None = None) -> Path:
    """Per-layer BN distance (``mean_term + std_term``, log scale) against the layer index ``l`` (0 = input), one
    line per source; a second panel splits each layer into its mean and std terms.

    Args:
        sources: ``{label: stats}`` of one model (the same BN layers).
        path: PNG to write.

    Raises:
        StatsError: no source, sources without BN layers, or sources of different layer lists.
    """
    items = [(k, v) for k, v in sources.items() if v.bn_layers]
    if not items:
        raise StatsError("plot_bn_layers needs at least one source with BN layers")
    names = [layer.name for layer in items[0][1].bn_layers]
    for label, st in items:
        if [layer.name for layer in st.bn_layers] != names:
            raise StatsError(f"source {label!r} has other BN layers than {items[0][0]!r} (another model?)")
    x = np.arange(len(names))
    fig = _figure(max(7.0, 0.22 * len(names) + 3), 7.5)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    floor = 1e-12
    for i, (label, st) in enumerate(items):
        c = _colour(label, i)
        total = np.array([max(layer.distance, floor) for layer in st.bn_layers])
        ax.plot(x, total, "o-", color=c, ms=3, lw=1.4, label=f"{label}  (L_BN {st.bn_distance:.3g})")
        ax2.plot(x, [max(layer.mean_term, floor) for layer in st.bn_layers], "o-", color=c, ms=3, lw=1.2,
                 label=f"{label} mean term")
        ax2.plot(x, [max(layer.std_term, floor) for layer in st.bn_layers], "s--", color=c, ms=3, lw=1.0,
                 alpha=0.8, label=f"{label} std term")
    ax.set_yscale("log")
    ax2.set_yscale("log")
    ax.set_ylabel("layer share of L_BN")
    ax2.set_ylabel("mean term (o) / std term (s)")
    ax.set_title(title or f"{items[0][1].model}: BN distance per layer")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    for a in (ax, ax2):
        a.grid(True, which="major", alpha=0.3)
    ax2.set_xticks(x)
    ax2.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 30 else 7)
    ax2.set_xlabel("BN layer (l = 0 is the input pseudo-layer)")
    return _save(fig, path)


def plot_output_ranges(sources: Mapping[str, CalibrationStats], path: str | Path, title: str | None = None) -> Path:
    """Histograms of the per-image output range ``max - min`` per source (densities, shared bins), one panel per
    model output (logits, or each detection head level).

    Raises:
        StatsError: no source, or sources with different numbers of outputs.
    """
    items = list(sources.items())
    if not items:
        raise StatsError("plot_output_ranges needs at least one source")
    n_out = len(items[0][1].outputs)
    if any(len(st.outputs) != n_out for _, st in items):
        raise StatsError("all sources must come from the same model (different numbers of outputs)")
    fig = _figure(4.6 * n_out, 3.6)
    axes = fig.subplots(1, n_out, squeeze=False)
    for k in range(n_out):
        ax = axes[0][k]
        values = [np.asarray(st.outputs[k].ranges, dtype=np.float64) for _, st in items]
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        for i, ((label, st), v) in enumerate(zip(items, values)):
            c = _colour(label, i)
            ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color=c)
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, color=c,
                    label=f"{label} (mean {st.outputs[k].range_mean:.3g}, N={st.n_images})")
        shape = "x".join(str(s) for s in items[0][1].outputs[k].shape)
        ax.set_title(f"output {k} ({shape})" if n_out > 1 else f"logits ({shape})", fontsize=9)
        ax.set_xlabel("per-image output range max - min")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or f"{items[0][1].model}: output range per image, synthetic vs real", fontsize=10)
    return _save(fig, path)


def plot_clipping(runs: Mapping[str, QuantizedStats], path: str | Path, title: str | None = None) -> Path:
    """Per-site clipping rate (low + high, log scale, floor 1e-6) of quantized models, one line per calibration,
    sites in the order of the first entry.

    Raises:
        StatsError: no entry.
    """
    items = list(runs.items())
    if not items:
        raise StatsError("plot_clipping needs at least one entry")
    names = [s.name for s in items[0][1].sites if s.quantized]
    x = np.arange(len(names))
    fig = _figure(max(7.0, 0.18 * len(names) + 3), 4.5)
    ax = fig.subplots()
    for i, (label, qs) in enumerate(items):
        by_name = {s.name: s for s in qs.sites}
        y = [max(by_name[n].clip, 1e-6) if n in by_name else np.nan for n in names]
        ax.plot(x, y, "o-", ms=3, lw=1.2, color=_colour(label, i), label=f"{label} ({qs.source}, {qs.mode.value})")
    ax.set_yscale("log")
    ax.set_ylabel("clipping rate (fraction of values; floor 1e-6)")
    short = [n.removeprefix("model.").replace(".output_quantizer", "").replace("act_quantizers.", "") for n in names]
    ax.set_xticks(x)
    ax.set_xticklabels(short, rotation=90, fontsize=6)
    ax.set_title(title or "clipping rate per activation quantizer")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _short_site(name: str) -> str:
    return name.removeprefix("model.").replace(".output_quantizer", "").replace("act_quantizers.", "")


def plot_setting(clipping: Mapping[str, QuantizedStats], thresholds: Mapping[str, list[SiteThresholds]],
                 path: str | Path, title: str | None = None) -> Path:
    """Two panels over the quantized sites of one model and setting, one line per calibration source: the clipping
    rate on the evaluation images (log scale, floor 1e-6), and ``log2`` of each site's upper range end over the
    real-calibrated experiment's (0 = the same threshold, -1 = half).

    Args:
        clipping: ``{label: evaluation QuantizedStats}``; the first entry fixes the site order.
        thresholds: ``{label: compare_thresholds(...)}`` (labels without an entry draw no threshold line).

    Raises:
        StatsError: no entry.
    """
    items = list(clipping.items())
    if not items:
        raise StatsError("plot_setting needs at least one experiment")
    names = [s.name for s in items[0][1].sites if s.quantized]
    x = np.arange(len(names))
    fig = _figure(max(8.0, 0.16 * len(names) + 3), 7.5)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    for i, (label, qs) in enumerate(items):
        c = _colour(label, i)
        by_name = {s.name: s for s in qs.sites}
        y = [max(by_name[n].clip, 1e-6) if n in by_name else np.nan for n in names]
        ax.plot(x, y, "o-", ms=3, lw=1.2, color=c, label=label)
        if label in thresholds:
            t = {s.name: s.log2_high for s in thresholds[label]}
            y2 = [t[n] if t.get(n) is not None else np.nan for n in names]
            ax2.plot(x, y2, "o-", ms=3, lw=1.2, color=c, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("clipping rate on evaluation images\n(fraction of values; floor 1e-6)")
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set_ylabel("log2(range end / real-calibrated)")
    ax.set_title(title or "clipping and range per activation quantizer")
    for a in (ax, ax2):
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    ax2.set_xticks(x)
    ax2.set_xticklabels([_short_site(n) for n in names], rotation=90, fontsize=6)
    ax2.set_xlabel("activation quantizer (model order)")
    return _save(fig, path)
