"""``python -m bench report``: regenerate a report and its figures from JSON records.

Every number in a report comes from a record file; nothing is typed by hand. Each sweep gets a
section (environment, the depth-gap summary, a full table with each speedup's spread,
failures, figures); each study its table and figure.

Which records, and where the report goes:
- no paths: the GPU records under ``bench/results/`` make ``bench/REPORT.md`` and
  ``bench/figures/`` (committed). Without GPU records, the CPU ones under
  ``bench/results/cpu/`` make ``bench/results/cpu/REPORT.md`` (git-ignored, as are they).
- paths: those records; the report goes to ``bench/REPORT.md`` if one of them comes from a
  GPU, else to ``bench/results/cpu/REPORT.md``. ``--output`` overrides either.
"""
from pathlib import Path
from typing import List, Optional, Tuple

from . import plots, records
from .sweep import cell, fmt, fused_columns, group_records, ratio_text, si, speedup

HERE = Path(__file__).resolve().parent
REPORT = HERE / "REPORT.md"


def _cpu_report() -> Path:
    return records.RESULTS / "cpu" / "REPORT.md"


def sources(paths: Optional[List[Path]] = None, output: Optional[Path] = None) -> Tuple[List[dict], Path]:
    """The records to report and the report's path, by the rules in the module docstring."""
    docs = records.load(paths or [records.RESULTS])
    gpu = [d for d in docs if d["env"]["device_type"] == "cuda"]
    if not paths:
        docs = gpu or docs
    return docs, output or (REPORT if gpu else _cpu_report())


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _env_lines(doc: dict) -> List[str]:
    env = doc["env"]
    return [f"- device: **{env['device']}** ({env['device_type']}), dwfast backend `{env['dwfast_backend']}`, "
            f"{env['cpu_threads']} CPU thread(s)",
            f"- torch {env['torch']}, triton {env['triton']}, dwfast {env['dwfast']}, python {env['python']}, "
            f"fp32 matmul precision `{env['float32_matmul_precision']}`",
            f"- commit `{env['git_commit']}`, {env['timestamp']}, record `{Path(doc['path']).name}`"]


def depth_gap(doc: dict) -> List[str]:
    """The headline: at each budget, how much faster the shallowest net runs than the deepest,
    with eager PyTorch and with dwfast (the gap fusion leaves)."""
    rows = []
    recs = [r for r in doc["records"] if r.get("samples_per_s")]
    keys = dict.fromkeys((r["mode"], r["dtype"], r["batch"], r["budget"]) for r in recs)
    for mode, dtype, batch, budget in keys:
        same = [r for r in recs if (r["mode"], r["dtype"], r["batch"], r["budget"]) == (mode, dtype, batch, budget)]
        lo, hi = min(r["depth"] for r in same), max(r["depth"] for r in same)

        def thr(impl, depth):
            return next((r["samples_per_s"] for r in same if r["impl"] == impl and r["depth"] == depth), None)
        gaps = []
        for impl in ("eager", "dwfast"):
            a, b = thr(impl, lo), thr(impl, hi)
            gaps += [si(a), si(b), fmt(None if a is None or b is None else a / b, ".2f")]
        rows.append([mode, dtype, str(batch), si(budget), f"{lo} vs {hi}", *gaps])
    header = ["mode", "dtype", "batch", "params", "depths", "eager shallow", "eager deep", "eager gap",
              "dwfast shallow", "dwfast deep", "dwfast gap"]
    return _md_table(header, rows)


def sweep_section(doc: dict, figures: Optional[Path]) -> List[str]:
    """Markdown for one sweep record: environment, depth gap, full table, failures, figures."""
    impls = doc["config"]["impls"]
    fused = fused_columns(impls)
    baselines = [i for i in impls if i not in fused]
    out = [f"## Sweep on {doc['env']['device']} ({doc['env']['timestamp']})", ""] + _env_lines(doc)
    out += [f"- note: {n}" for n in doc["config"]["notes"]]
    if not doc.get("complete", True):
        out.append("- **incomplete**: the sweep stopped early; this is what it had measured")
    out += ["", "Shallowest vs deepest net at the same parameter count (samples/s; gap = shallow / deep):",
            ""] + depth_gap(doc)
    rows = []
    for (mode, dtype, batch, budget, depth), group in group_records(doc["records"]).items():
        by_impl = {r["impl"]: r for r in group}
        width = next((r["width"] for r in group if r.get("width")), None)
        d = by_impl.get("dwfast")
        rows.append([mode, dtype, str(batch), si(budget), str(depth), fmt(width, "d")]
                    + [cell(by_impl.get(i), si(by_impl.get(i, {}).get("samples_per_s"))) for i in impls]
                    + [cell(by_impl.get(b), ratio_text(speedup(by_impl, f, b), " ± "))
                       for f in fused for b in baselines]
                    + [cell(d, fmt(d and d["tflops"], ".3g")), cell(d, fmt(d and d["peak_fraction"], ".1%")),
                       cell(d, fmt(d and d["peak_mem_mb"], ".0f"))])
    header = (["mode", "dtype", "batch", "params", "depth", "width"] + [f"{i} samples/s" for i in impls]
              + [f"{f} × {b}" for f in fused for b in baselines]
              + ["dwfast TFLOP/s", "dwfast % peak", "dwfast MiB"])
    out += ["", "All configurations. 'F × X' = X's time / F's (> 1: F is faster), the median of the "
            "interleaved rounds' ratios ± half their 20-80% range; n/a: does not apply on this device.", ""]
    out += _md_table(header, rows)
    errors = [r for r in doc["records"] if r.get("status") in ("failed", "skipped")]
    if errors:
        out += ["", "Failed or skipped:", ""] + [f"- {r['status']}: {r['impl']} {r['mode']} {r['dtype']} "
                                                 f"B={r['batch']} P={si(r['budget'])} d={r['depth']}: "
                                                 f"`{r['error']}`" for r in errors]
    out.append("")
    if figures is not None:
        stem = Path(doc["path"]).stem
        for p in plots.sweep_figures(doc, figures, stem):
            out += [f"![{p.stem}](figures/{p.name})", ""]
    return out


def study_section(doc: dict, figures: Optional[Path]) -> List[str]:
    """Markdown for one study record: accuracy and throughput per depth, and the side checks."""
    cfg = doc["config"]
    out = [f"## Study on {doc['env']['device']} ({doc['env']['timestamp']})", ""] + _env_lines(doc)
    out += [f"- {si(cfg['budget'])} parameters, {cfg['epochs']} epochs of Adam (lr {cfg['lr']}), "
            f"batch {cfg['batch']}, seeds {cfg['seeds']}", ""]
    rows = [[r["task"], str(r["depth"]), fmt(r.get("width"), "d"), str(r["n_params"]),
             f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}", si(r.get("samples_per_s")),
             " ".join(f"{v:.0%}" for v in r.get("dead_relu", []))] for r in doc["rows"]]
    out += _md_table(["task", "depth", "width", "params", "test accuracy", "train samples/s",
                      "dead ReLU share per layer"], rows)
    out += ["", "Linear collapse (no activation): the deep linear net equals one matrix "
            "(max |deep - collapsed| output difference) and is no more accurate than one layer:", ""]
    out += [f"- {c['task']}: depth {c['depth']} linear {c['deep_acc']:.3f}, one layer {c['shallow_acc']:.3f}, "
            f"collapse error {c['collapse_err']:.2e}" for c in doc["linear_collapse"]]
    if figures is None:
        return out + [""]
    fig = plots.study_figure(doc, figures / f"{Path(doc['path']).stem}_study.png")
    return out + ["", f"![study](figures/{fig.name})", ""]


def kit_section(doc: dict, figures: Optional[Path]) -> List[str]:
    """Markdown for the GPU kit's summary: each step's outcome."""
    title = "GPU kit (dry run on the CPU)" if doc.get("dry_run") else "GPU kit"
    out = [f"## {title} on {doc['env']['device']} ({doc['env']['timestamp']})", ""] + _env_lines(doc) + [""]
    rows = [[s["name"], s["status"], f"{s['seconds']:.0f}", s["note"]] for s in doc["steps"]]
    return out + _md_table(["step", "status", "seconds", "note"], rows) + [""]


def write(docs: List[dict], path: Path = REPORT, figures: bool = True) -> Path:
    """Write the report for ``docs`` (from :func:`bench.records.load`, at least one) to ``path``,
    its figures to ``figures/`` beside it unless ``figures`` is false; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = path.parent / "figures" if figures else None
    if fig_dir is not None:
        fig_dir.mkdir(exist_ok=True)
    out = ["# dwfast benchmark report", "",
           "Generated by `python -m bench report` from the JSON records listed below; "
           "do not edit by hand.", ""]
    if all(d["env"]["device_type"] != "cuda" for d in docs):
        out += ["**Only CPU records are present. CPU timings are not GPU timings**: on the CPU "
                "dwfast runs its PyTorch reference path. Run `python -m bench` on a CUDA GPU for "
                "the numbers this project is about.", ""]
    sections = {"sweep": sweep_section, "study": study_section, "gpu-kit": kit_section}
    for doc in docs:
        out += sections[doc["kind"]](doc, fig_dir)
    path.write_text("\n".join(out) + "\n")
    return path


if __name__ == "__main__":  # `python -m bench.report`: the same as `python -m bench report`
    import sys

    from .__main__ import main
    sys.exit(main(["report", *sys.argv[1:]]))
