"""The sweep: every implementation, side by side, over budgets x depths x batches x dtypes x modes.

For each configuration one reference model is built with ``dwfast.mlp_by_budget`` and one
seeded input; each implementation copies the model, runs a few untimed steps (torch.compile
and Triton compile and autotune there), then is timed (:mod:`bench.timing`). A failure
(compile error, out of memory, unsupported shape) is recorded in that record's ``error`` and
the sweep goes on.
"""
import itertools
import traceback
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import dwfast

from . import device as dev
from . import models, records, timing

CPU_NOTE = ("CPU timings are not GPU timings: on the CPU dwfast runs its pure-PyTorch reference "
            "path, so it should match eager; run on a CUDA GPU for the numbers dwfast is about.")
UNTIMED_STEPS = 3


@dataclass
class SweepConfig:
    """What to sweep. ``budgets`` are parameter counts; ``warmup_ms``/``rep_ms`` per measurement."""
    budgets: List[float]
    depths: List[int]
    batches: List[int]
    dtypes: List[str]
    modes: List[str]
    impls: List[str]
    features: int = 128
    outputs: int = 1
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0
    notes: List[str] = field(default_factory=list)


def default_config(device_type: str, compile_on_cpu: bool = False) -> SweepConfig:
    """The bare ``python -m bench`` sweep: full size on a GPU, a small one on the CPU.

    On the CPU torch.compile is off unless asked for (its first compile of each shape costs
    seconds there); ``max-autotune`` runs only on CUDA.
    """
    if device_type == "cuda":
        return SweepConfig(budgets=[1e5, 1e6, 1e7, 5e7], depths=[1, 2, 4, 8, 16, 32, 64],
                           batches=[4096], dtypes=["bf16"], modes=["train", "infer"],
                           impls=list(models.IMPLS))
    return SweepConfig(budgets=[2e4, 1e5], depths=[1, 2, 4, 8], batches=[256], dtypes=["fp32"],
                       modes=["train", "infer"],
                       impls=["eager", "compile", "dwfast"] if compile_on_cpu else ["eager", "dwfast"],
                       warmup_ms=10.0, rep_ms=60.0)


def _error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


def measure(impl: str, reference: torch.nn.Module, mode: str, dtype_name: str, x: torch.Tensor,
            target: torch.Tensor, warmup_ms: float, rep_ms: float, device_name: str) -> dict:
    """Time one implementation on one configuration; returns the timing part of a record.

    Never raises for a failing implementation: the record then has ``error`` set and no times.
    """
    dtype, device = models.DTYPES[dtype_name], x.device
    rec = {"impl": impl, "precision": models.precision(impl, mode, dtype)[2], "median_ms": None,
           "q20_ms": None, "q80_ms": None, "samples_per_s": None, "tflops": None,
           "peak_fraction": None, "peak_mem_mb": None, "error": None}
    try:
        timing.peak_memory_reset(device)
        step, _ = models.make_step(impl, reference, mode, dtype, x, target)
        for _ in range(UNTIMED_STEPS):
            step()
        rec.update(timing.time_step(step, device, warmup_ms, rep_ms))
    except Exception as exc:  # one implementation failing must not stop the sweep
        rec["error"] = _error(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return rec
    seconds = rec["median_ms"] / 1e3
    tflops = models.step_flops(reference, x.shape[0], mode) / seconds / 1e12
    peak = dev.peak_tflops(device_name, dtype)
    rec.update(samples_per_s=x.shape[0] / seconds, tflops=tflops,
               peak_fraction=None if peak is None else tflops / peak,
               peak_mem_mb=timing.peak_memory_mb(device))
    return rec


def configurations(cfg: SweepConfig):
    """The (budget, depth, batch, dtype, mode) tuples, in sweep order."""
    return list(itertools.product(cfg.budgets, cfg.depths, cfg.batches, cfg.dtypes, cfg.modes))


def run(cfg: SweepConfig, device: torch.device, console: Optional[Console] = None) -> dict:
    """Run the sweep with a progress bar; returns the JSON-ready document (not yet saved)."""
    console = console or Console()
    env = dev.environment(device)
    configs = configurations(cfg)
    rows = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("sweep", total=len(configs) * len(cfg.impls))
        for budget, depth, batch, dtype_name, mode in configs:
            base = {"mode": mode, "dtype": dtype_name, "budget": budget, "depth": depth, "batch": batch}
            try:
                reference = models.reference_model(cfg.features, budget, depth, cfg.outputs, cfg.seed, device)
            except (ValueError, RuntimeError) as exc:  # budget too small for this depth, OOM
                rows += [dict(base, impl=impl, error=_error(exc)) for impl in cfg.impls]
                progress.advance(task, len(cfg.impls))
                continue
            base.update(width=models.linear_layers(reference)[0].out_features,
                        n_params=dwfast.count_params(reference))
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
            x = torch.randn(batch, cfg.features, generator=gen).to(device)
            target = torch.randn(batch, cfg.outputs, generator=gen).to(device)
            for impl in cfg.impls:
                progress.update(task, description=f"{mode} {dtype_name} B={batch} P={budget:.0e} "
                                                  f"d={depth} {impl}")
                rows.append(dict(base, **measure(impl, reference, mode, dtype_name, x, target,
                                                 cfg.warmup_ms, cfg.rep_ms, env["device"])))
                progress.advance(task)
            del reference, x, target
    notes = list(cfg.notes) + ([CPU_NOTE] if device.type != "cuda" else [])
    config = dict(asdict(cfg), notes=notes, flops="forward = 2*B*sum(in*out over Linear layers); "
                                                  "train = 3x forward; BN/ReLU/bias/optimizer ignored")
    return {"schema": records.SCHEMA_VERSION, "kind": "sweep", "env": env, "config": config, "records": rows}


def fmt(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` when missing."""
    return "n/a" if value is None else format(value, spec)


def si(value) -> str:
    """A count in 3 significant digits with a k/M/G suffix, or ``n/a``."""
    if value is None:
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def print_table(doc: dict, console: Optional[Console] = None) -> None:
    """Per (mode, dtype, batch): samples/s of every implementation side by side and dwfast's
    speedup over each baseline."""
    console = console or Console()
    impls = doc["config"]["impls"]
    baselines = [i for i in impls if i != "dwfast"] if "dwfast" in impls else []
    tables = {}
    for (mode, dtype_name, batch, budget, depth), group in group_records(doc["records"]).items():
        if (mode, dtype_name, batch) not in tables:
            table = tables[mode, dtype_name, batch] = Table(
                title=f"{mode} {dtype_name} batch {batch}: samples/s on {doc['env']['device']}")
            for name in ["budget", "depth", "width", *impls, *[f"vs {b}" for b in baselines], "dwfast TFLOP/s"]:
                table.add_column(name, justify="right")
        by_impl = {r["impl"]: r for r in group}
        width = next((r["width"] for r in group if r.get("width")), None)
        row = [si(budget), str(depth), fmt(width, "d")]
        row += [si(by_impl.get(i, {}).get("samples_per_s")) for i in impls]
        row += [fmt(speedup(by_impl, b), ".2f") for b in baselines]
        row.append(fmt(by_impl.get("dwfast", {}).get("tflops"), ".3g"))
        tables[mode, dtype_name, batch].add_row(*row)
    for table in tables.values():
        console.print(table)
    if baselines:
        console.print("'vs X' = X's median time / dwfast's (> 1: dwfast is faster). n/a: failed or not run.")
    for note in doc["config"]["notes"]:
        console.print(f"[bold yellow]{note}[/]")


def group_records(rows):
    """Records grouped by configuration ``(mode, dtype, batch, budget, depth)``, in order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["batch"], r["budget"], r["depth"]), []).append(r)
    return groups


def speedup(by_impl: dict, baseline: str) -> Optional[float]:
    """``baseline``'s median time over dwfast's (>1: dwfast is faster); None if either is missing."""
    d, b = by_impl.get("dwfast", {}).get("median_ms"), by_impl.get(baseline, {}).get("median_ms")
    return None if d is None or b is None else b / d
