"""``python -m bench report``: regenerate ``bench/REPORT.md`` and its figures from JSON records.

Every number in the report comes from a record file; nothing is typed by hand. Each sweep
gets a section (environment, the depth-gap summary, a full table, figures); each study gets
its table and figure. When no record comes from a GPU, the report says so at the top.
"""
from pathlib import Path
from typing import List

from . import plots
from .sweep import fmt, group_records, si, speedup

HERE = Path(__file__).resolve().parent
REPORT = HERE / "REPORT.md"


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _env_lines(doc: dict) -> List[str]:
    env = doc["env"]
    return [f"- device: **{env['device']}** ({env['device_type']}), dwfast backend `{env['dwfast_backend']}`",
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


def sweep_section(doc: dict, figures: Path) -> List[str]:
    """Markdown for one sweep record: environment, depth gap, full table, figures."""
    stem = Path(doc["path"]).stem
    impls = doc["config"]["impls"]
    baselines = [i for i in impls if i != "dwfast"] if "dwfast" in impls else []
    out = [f"## Sweep on {doc['env']['device']} ({doc['env']['timestamp']})", ""] + _env_lines(doc)
    out += [f"- note: {n}" for n in doc["config"]["notes"]]
    out += ["", "Shallowest vs deepest net at the same parameter count (samples/s; gap = shallow / deep):",
            ""] + depth_gap(doc)
    rows = []
    for (mode, dtype, batch, budget, depth), group in group_records(doc["records"]).items():
        by_impl = {r["impl"]: r for r in group}
        width = next((r["width"] for r in group if r.get("width")), None)
        d = by_impl.get("dwfast", {})
        rows.append([mode, dtype, str(batch), si(budget), str(depth), fmt(width, "d")]
                    + [si(by_impl.get(i, {}).get("samples_per_s")) for i in impls]
                    + [fmt(speedup(by_impl, b), ".2f") for b in baselines]
                    + [fmt(d.get("tflops"), ".3g"), fmt(d.get("peak_fraction"), ".1%"),
                       fmt(d.get("peak_mem_mb"), ".0f")])
    header = (["mode", "dtype", "batch", "params", "depth", "width"] + [f"{i} samples/s" for i in impls]
              + [f"vs {b}" for b in baselines] + ["dwfast TFLOP/s", "dwfast % peak", "dwfast MiB"])
    out += ["", "All configurations ('vs X' = X's median time / dwfast's; > 1 means dwfast is faster):", ""]
    out += _md_table(header, rows)
    errors = [r for r in doc["records"] if r.get("error")]
    if errors:
        out += ["", "Failures:", ""] + [f"- {r['impl']} {r['mode']} {r['dtype']} B={r['batch']} "
                                        f"P={si(r['budget'])} d={r['depth']}: `{r['error']}`" for r in errors]
    out.append("")
    for p in plots.sweep_figures(doc, figures, stem):
        out += [f"![{p.stem}](figures/{p.name})", ""]
    return out


def study_section(doc: dict, figures: Path) -> List[str]:
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
    fig = plots.study_figure(doc, figures / f"{Path(doc['path']).stem}_study.png")
    return out + ["", f"![study](figures/{fig.name})", ""]


def write(docs: List[dict], path: Path = REPORT) -> Path:
    """Write the report for ``docs`` (from :func:`bench.records.load`) to ``path``, its figures
    to ``figures/`` beside it; returns ``path``."""
    figures = path.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    out = ["# dwfast benchmark report", "",
           "Generated by `python -m bench report` from the JSON records listed below; "
           "do not edit by hand.", ""]
    if not docs:
        out.append("No records found: run `python -m bench` (and `python -m bench study`) first.")
    elif all(d["env"]["device_type"] != "cuda" for d in docs):
        out += ["**Only CPU records are present. CPU timings are not GPU timings**: on the CPU "
                "dwfast runs its PyTorch reference path. Run `python -m bench` on a CUDA GPU for "
                "the numbers this project is about.", ""]
    for doc in docs:
        out += sweep_section(doc, figures) if doc["kind"] == "sweep" else study_section(doc, figures)
    path.write_text("\n".join(out) + "\n")
    return path
