"""Matplotlib figures for sweeps, the roofline and the study; every function writes PNGs and
returns their paths. Inputs are the JSON records, so the report redraws them from files alone."""
import math
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from .models import FUSED  # noqa: E402
from .sweep import group_records, si  # noqa: E402


def _panels(records: List[dict]) -> Dict[tuple, Dict[float, List[dict]]]:
    """Records by figure ``(mode, dtype, batch)`` then by budget (one panel each)."""
    figs: Dict[tuple, Dict[float, List[dict]]] = {}
    for r in records:
        figs.setdefault((r["mode"], r["dtype"], r["batch"]), {}).setdefault(r["budget"], []).append(r)
    return figs


def _grid(n: int, title: str):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat)


def _where(doc: dict) -> str:
    """Where a record was measured, for titles; CPU figures say so."""
    env = doc["env"]
    return f"on {env['device']}" if env["device_type"] == "cuda" else f"on the CPU ({env['device']}): not GPU timings"


def log_ticks(lo: float, hi: float) -> List[float]:
    """Tick values for a log axis spanning ``lo..hi``: powers of ten, else 1-2-5 steps, else
    every digit, else (less than a factor of two) four round linear steps; at least two."""
    if lo <= 0 or hi <= lo:
        return [lo, hi]
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for subs in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** k for k in decades for m in subs if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            return ticks
    return [float(t) for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi] or [lo, hi]


def label_log_axis(axis) -> None:
    """Give a log ``axis`` (``ax.xaxis`` or ``ax.yaxis``) enough labelled ticks, in k/M/G units,
    however narrow its range (matplotlib labels only powers of ten by default)."""
    lo, hi = sorted(axis.get_view_interval())
    axis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: si(v)))
    axis.set_minor_formatter(NullFormatter())


def _depth_axis(ax, recs: List[dict]):
    """Depth along the bottom (log 2) and each depth's width along the top."""
    widths = {r["depth"]: r.get("width") for r in recs}
    depths = sorted(widths)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("hidden layers (depth)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(depths, ["?" if widths[d] is None else str(widths[d]) for d in depths], fontsize=8)
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xlabel("width", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figures(doc: dict, out_dir: Path, stem: str) -> List[Path]:
    """Throughput vs depth (one line per implementation) and each fused implementation's
    speedup over each baseline (bars: the 20-80% range of the rounds' ratios), one figure per
    (mode, dtype, batch) with a panel per parameter budget. Each panel's top axis gives the
    width at each depth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    impls, where = doc["config"]["impls"], _where(doc)
    fused = [i for i in FUSED if i in impls]
    paths = []
    for (mode, dtype, batch), budgets in _panels(doc["records"]).items():
        tag = f"{stem}_{mode}_{dtype}_b{batch}"
        fig, axes = _grid(len(budgets), f"{mode}, {dtype}, batch {batch} {where}")
        for ax, (budget, recs) in zip(axes, budgets.items()):
            for impl in impls:
                pts = [(r["depth"], r["samples_per_s"]) for r in recs if r["impl"] == impl and r.get("samples_per_s")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            _depth_axis(ax, recs)
            ax.set_yscale("log")
            label_log_axis(ax.yaxis)
            ax.set_ylabel("throughput (samples/s)")
            ax.set_title(f"{si(budget)} parameters", fontsize=10)
            ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"{tag}_throughput.png"))
        if not fused or len(impls) < 2:
            continue
        fig, axes = _grid(len(budgets), f"speedup, {mode}, {dtype}, batch {batch} {where}")
        for ax, (budget, recs) in zip(axes, budgets.items()):
            groups = [{r["impl"]: r for r in g} for g in group_records(recs).values()]
            for f, base in ((f, b) for f in fused for b in impls if b not in FUSED):
                pts = [(g[f]["depth"], g[f]["speedup"][base]) for g in groups
                       if (g.get(f, {}).get("speedup") or {}).get(base)]
                if pts:
                    depths, ratios = zip(*pts)
                    mid = [q["median"] for q in ratios]
                    bars = [[m - q["q20"] for m, q in zip(mid, ratios)], [q["q80"] - m for m, q in zip(mid, ratios)]]
                    ax.errorbar(depths, mid, yerr=bars, marker="o", capsize=3, label=f"{f} vs {base}")
            ax.axhline(1.0, color="gray", lw=1, ls="--")
            _depth_axis(ax, recs)
            ax.set_ylabel("speedup (baseline time / fused time)")
            ax.set_title(f"{si(budget)} parameters", fontsize=10)
            ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"{tag}_speedup.png"))
    return paths


def roofline_figure(points: List[dict], path: Path, title: str, peak_tflops: Optional[float],
                    peak_gbps: Optional[float]) -> Path:
    """Achieved TFLOP/s against arithmetic intensity (FLOP/byte), one marker per
    implementation and layer width, under the device's compute and bandwidth roofs if known."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for impl in dict.fromkeys(p["impl"] for p in points):
        pts = [p for p in points if p["impl"] == impl and p.get("tflops")]
        ax.plot([p["intensity"] for p in pts], [p["tflops"] for p in pts], marker="o", ls=":", label=impl)
        for p in pts:
            ax.annotate(str(p["width"]), (p["intensity"], p["tflops"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if peak_tflops and peak_gbps:
        lo, hi = ax.get_xlim()
        xs = [min(lo, 1.0), peak_tflops * 1e3 / peak_gbps, max(hi, 2e3)]
        ax.plot(xs, [min(peak_tflops, x * peak_gbps / 1e3) for x in xs], color="k", lw=1.5,
                label=f"roof: {peak_tflops:g} TFLOP/s, {peak_gbps / 1e3:g} TB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    label_log_axis(ax.xaxis)
    label_log_axis(ax.yaxis)
    ax.set_xlabel("arithmetic intensity (FLOP/byte, minimal traffic)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_figure(doc: dict, path: Path) -> Path:
    """Test accuracy (mean, error bar = std over seeds) against training samples/s, one line
    per task, each point labelled with its depth and width."""
    tasks = dict.fromkeys(r["task"] for r in doc["rows"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        rows = [r for r in doc["rows"] if r["task"] == task]
        ax.errorbar([r["samples_per_s"] for r in rows], [r["acc_mean"] for r in rows],
                    yerr=[r["acc_std"] for r in rows], marker="o", capsize=3)
        for r in rows:
            ax.annotate(f"depth {r['depth']}, width {r.get('width')}", (r["samples_per_s"], r["acc_mean"]),
                        fontsize=8, textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        label_log_axis(ax.xaxis)
        ax.set_xlabel("training throughput (samples/s)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: {si(doc['config']['budget'])} parameters {_where(doc)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
