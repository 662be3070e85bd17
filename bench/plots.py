"""Matplotlib figures for sweeps, the roofline and the study; every function writes PNGs and
returns their paths. Inputs are the JSON records, so the report redraws them from files alone."""
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .sweep import group_records, si, speedup  # noqa: E402


def _panels(records: List[dict]) -> Dict[tuple, Dict[float, List[dict]]]:
    """Records by figure ``(mode, dtype, batch)`` then by budget (one panel each)."""
    figs: Dict[tuple, Dict[float, List[dict]]] = {}
    for r in records:
        figs.setdefault((r["mode"], r["dtype"], r["batch"]), {}).setdefault(r["budget"], []).append(r)
    return figs


def _grid(n: int, title: str):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat)


def _depth_axis(ax, depths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("hidden layers (depth)")
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figures(doc: dict, out_dir: Path, stem: str) -> List[Path]:
    """Throughput vs depth (one line per implementation) and dwfast's speedup over each
    baseline, one figure per (mode, dtype, batch) with a panel per parameter budget."""
    out_dir.mkdir(parents=True, exist_ok=True)
    impls, device = doc["config"]["impls"], doc["env"]["device"]
    paths = []
    for (mode, dtype, batch), budgets in _panels(doc["records"]).items():
        tag = f"{stem}_{mode}_{dtype}_b{batch}"
        fig, axes = _grid(len(budgets), f"{mode}, {dtype}, batch {batch} on {device}")
        for ax, (budget, recs) in zip(axes, budgets.items()):
            for impl in impls:
                pts = [(r["depth"], r["samples_per_s"]) for r in recs if r["impl"] == impl and r.get("samples_per_s")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            _depth_axis(ax, sorted({r["depth"] for r in recs}))
            ax.set_yscale("log")
            ax.set_ylabel("throughput (samples/s)")
            ax.set_title(f"{si(budget)} parameters")
            ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"{tag}_throughput.png"))
        if "dwfast" not in impls or len(impls) < 2:
            continue
        fig, axes = _grid(len(budgets), f"dwfast speedup, {mode}, {dtype}, batch {batch} on {device}")
        for ax, (budget, recs) in zip(axes, budgets.items()):
            groups = list(group_records(recs).values())
            for base in (i for i in impls if i != "dwfast"):
                pts = [(g[0]["depth"], speedup({r["impl"]: r for r in g}, base)) for g in groups]
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"vs {base}")
            ax.axhline(1.0, color="gray", lw=1, ls="--")
            _depth_axis(ax, sorted({r["depth"] for r in recs}))
            ax.set_ylabel("speedup (baseline time / dwfast time)")
            ax.set_title(f"{si(budget)} parameters")
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
    ax.set_xlabel("arithmetic intensity (FLOP/byte, minimal traffic)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_figure(doc: dict, path: Path) -> Path:
    """Test accuracy (mean, error bar = std over seeds) against training samples/s, one line
    per task, each point labelled with its depth."""
    tasks = dict.fromkeys(r["task"] for r in doc["rows"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        rows = [r for r in doc["rows"] if r["task"] == task]
        ax.errorbar([r["samples_per_s"] for r in rows], [r["acc_mean"] for r in rows],
                    yerr=[r["acc_std"] for r in rows], marker="o", capsize=3)
        for r in rows:
            ax.annotate(f"depth {r['depth']}", (r["samples_per_s"], r["acc_mean"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("training throughput (samples/s)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: {si(doc['config']['budget'])} parameters, {doc['env']['device']}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
