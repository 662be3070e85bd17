"""The sweep: every implementation, side by side, over budgets x depths x batches x dtypes x modes.

For each configuration one reference model is built with ``dwfast.mlp_by_budget`` and one
seeded input; each implementation copies the model and runs a few untimed steps (torch.compile
and Triton compile there, CUDA graphs are captured), then all are timed together in
interleaved rounds (:mod:`bench.timing`), so dwfast's speedup over each baseline comes with its
spread. Each record has a ``status``: ``ok``; ``failed`` (compile error, out of memory: the
``error`` says which, the console says so at once, and the exit status is 1); ``n/a`` (the
implementation does not apply here, e.g. CUDA graphs on the CPU); ``skipped`` (past the
sweep's time limit). The record file is rewritten after every configuration, so a sweep that
is stopped keeps what it measured.

Configurations run batch by batch and dtype by dtype, then budget, depth and mode (train and
infer of one model next to each other, where compile caches serve both).
"""
import itertools
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import dwfast

from . import device as dev
from . import models, records, timing

CPU_NOTE = ("CPU timings are not GPU timings: on the CPU dwfast runs its pure-PyTorch reference "
            "path, so it should match eager; run on a CUDA GPU for the numbers dwfast is about.")
SPEEDUP_NOTE = ("'dwfast ×' = this implementation's time / dwfast's, 'graphs ×' the same for "
                "dwfast-graphs (> 1: the fused one is faster): the median of the interleaved "
                "rounds' ratios ± half their 20-80% range.")
UNTIMED_STEPS = models.WARMUP_STEPS
# Rough costs for sizing a sweep before it runs (seconds): a compile per implementation and
# device; the host time per Linear layer of a train / infer step, which dominates narrow-deep
# nets; and the passes over each layer's B x width activations (BatchNorm, ReLU, their
# backward, the optimizer) besides the GEMMs.
COMPILE_S = {"cpu": {"compile": 8.0, "compile-max-autotune": 10.0},
             "cuda": {"compile": 20.0, "compile-max-autotune": 60.0, "compile-graphs": 25.0,
                      "dwfast": 3.0, "dwfast-graphs": 3.0}}
LAYER_S = {"cpu": {"train": 60e-6, "infer": 15e-6}, "cuda": {"train": 45e-6, "infer": 15e-6}}
PASSES = {"train": 16, "infer": 4}
LONG_CPU_S = 600.0  # a CPU sweep estimated past this is called sized for a GPU


@dataclass
class SweepConfig:
    """What to sweep. ``budgets`` are parameter counts; ``warmup_ms``/``rep_ms`` per measurement;
    past ``time_limit_s`` (if set) the configurations that would not fit are skipped."""
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
    time_limit_s: Optional[float] = None
    notes: List[str] = field(default_factory=list)


def default_config(device_type: str, compile_on_cpu: bool = False) -> SweepConfig:
    """The bare ``python -m bench`` sweep: full size on a GPU, a small one on the CPU.

    On the CPU torch.compile is off unless asked for (its first compile of each shape costs
    seconds there); ``max-autotune`` and the CUDA-graph implementations run only on CUDA.
    """
    if device_type == "cuda":
        return SweepConfig(budgets=[1e5, 1e6, 1e7, 5e7], depths=[1, 2, 4, 8, 16, 32, 64],
                           batches=[4096], dtypes=["bf16"], modes=["train", "infer"],
                           impls=list(models.IMPLS))
    return SweepConfig(budgets=[2e4, 1e5], depths=[1, 2, 4, 8], batches=[256], dtypes=["fp32"],
                       modes=["train", "infer"],
                       impls=["eager", "compile", "dwfast"] if compile_on_cpu else ["eager", "dwfast"],
                       warmup_ms=10.0, rep_ms=60.0)


def error_text(exc: BaseException) -> str:
    """The last line of ``exc``'s traceback (type and message), at most 500 characters."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _blank(impl: str, mode: str, dtype: torch.dtype) -> dict:
    return {"impl": impl, "status": "ok", "precision": models.precision(impl, mode, dtype)[2],
            "median_ms": None, "q20_ms": None, "q80_ms": None, "samples_per_s": None, "tflops": None,
            "peak_fraction": None, "peak_mem_mb": None, "speedup": None, "error": None}


def _fail(rec: dict, exc: BaseException, device: torch.device) -> None:
    rec.update(status="failed", error=error_text(exc))
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(impls: List[str], reference: torch.nn.Module, mode: str, dtype_name: str, x: torch.Tensor,
            target: torch.Tensor, warmup_ms: float, rep_ms: float, device_name: str) -> List[dict]:
    """Time ``impls`` on one configuration together; returns their records' timing parts.

    Never raises for a failing implementation: its record gets ``status`` ``failed`` and the
    ``error``; the others are timed without it. Each fused implementation's record gets
    ``speedup[baseline] = {"median", "q20", "q80"}`` of the per-round time ratios.
    """
    dtype, device = models.DTYPES[dtype_name], x.device
    recs = {impl: _blank(impl, mode, dtype) for impl in impls}
    steps = {}
    models.forget_compiled()
    for impl in impls:
        reason = models.not_applicable(impl, device)
        if reason:
            recs[impl].update(status="n/a", error=reason)
            continue
        try:
            held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            timing.peak_memory_reset(device)
            step, _ = models.make_step(impl, reference, mode, dtype, x, target)
            for _ in range(UNTIMED_STEPS):
                step()
            _sync(device)
            mem = timing.peak_memory_mb(device)
            recs[impl]["peak_mem_mb"] = None if mem is None else mem - held / 2**20
            steps[impl] = step
        except Exception as exc:  # one implementation failing must not stop the others
            _fail(recs[impl], exc, device)
    times, errors = timing.interleaved(steps, device, warmup_ms, rep_ms)
    for impl, exc in errors.items():
        _fail(recs[impl], exc, device)
    flops = models.step_flops(reference, x.shape[0], mode)
    peak = dev.peak_tflops(device_name, dtype)
    for impl, t in times.items():
        rec = recs[impl]
        rec.update(timing.summary(t))
        seconds = rec["median_ms"] / 1e3
        rec.update(samples_per_s=x.shape[0] / seconds, tflops=flops / seconds / 1e12)
        rec["peak_fraction"] = None if peak is None else rec["tflops"] / peak
    for fused in (i for i in models.FUSED if i in times):
        recs[fused]["speedup"] = {b: timing.ratio(times[b], times[fused])
                                  for b in times if b not in models.FUSED}
    return list(recs.values())


def configurations(cfg: SweepConfig) -> List[tuple]:
    """The ``(budget, depth, batch, dtype, mode)`` tuples, in the order the sweep runs them."""
    return [(budget, depth, batch, dtype, mode) for batch, dtype, budget, depth, mode
            in itertools.product(cfg.batches, cfg.dtypes, cfg.budgets, cfg.depths, cfg.modes)]


def _gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """This device's matmul FLOP/s in ``dtype``, from a few products (about 0.1 s)."""
    n = 4096 if device.type == "cuda" else 384
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _copy_rate(device: torch.device) -> float:
    """This device's bytes/s for a large fp32 copy, read and write counted (about 0.05 s)."""
    a = torch.randn(2**22, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def estimate(cfg: SweepConfig, device: torch.device) -> List[float]:
    """Rough seconds each configuration of ``cfg`` will take on ``device``, in run order.

    From matmul and copy rates measured now, the host cost per layer and per compile
    (``LAYER_S``, ``COMPILE_S``), the activation passes (``PASSES``) and the timing budget;
    models are sized on the ``meta`` device, so nothing big is built. Good to a factor of a
    few (seen on 2 CPU cores: 3x under for millisecond steps, 4x over for bf16 GEMMs): enough
    to tell minutes from hours.
    """
    kind = "cuda" if device.type == "cuda" else "cpu"
    rates = {name: _gemm_rate(device, models.DTYPES[name]) for name in cfg.dtypes}
    copy_rate = _copy_rate(device)
    impls = [i for i in cfg.impls if not models.not_applicable(i, device)]
    out = []
    for budget, depth, batch, dtype_name, mode in configurations(cfg):
        try:
            model = models.reference_model(cfg.features, budget, depth, cfg.outputs, cfg.seed,
                                           torch.device("meta"))
        except ValueError:  # budget too small for the depth: fails at once
            out.append(0.0)
            continue
        step = (models.step_flops(model, batch, mode) / rates[dtype_name]
                + len(models.linear_layers(model)) * LAYER_S[kind][mode]
                + depth * PASSES[mode] * batch * models.linear_layers(model)[0].out_features * 4 / copy_rate)
        rounds = max(5 * step * len(impls), cfg.rep_ms / 1e3 * len(impls))
        warm = max(step * len(impls), cfg.warmup_ms / 1e3)
        compiles = sum(COMPILE_S[kind].get(i, 0.0) for i in impls)
        out.append(compiles + len(impls) * UNTIMED_STEPS * step + warm + rounds
                   + dwfast.count_params(model) * len(impls) * 20e-9)  # building and copying
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _label(base: dict) -> str:
    return (f"{base['mode']} {base['dtype']} B={base['batch']} P={si(base['budget'])} "
            f"d={base['depth']}")


def run(cfg: SweepConfig, device: torch.device, console: Optional[Console] = None,
        out_dir: Optional[Path] = None) -> dict:
    """Run the sweep; returns the JSON-ready document.

    Prints the estimate first and one line per configuration as it is measured (failures with
    their errors at once). With ``out_dir`` the record is written there before the first
    configuration and rewritten after each one (``doc["path"]`` says where), with ``complete``
    false until the end.
    """
    console = console or Console()
    env = dev.environment(device)
    configs = configurations(cfg)
    est = estimate(cfg, device)
    total = sum(est)
    console.print(f"{len(configs)} configurations × {len(cfg.impls)} implementations on "
                  f"{escape(env['device'])}: about {_minutes(total)} (a rough estimate)", highlight=False)
    if device.type != "cuda" and total > LONG_CPU_S:
        console.print(f"[bold yellow]This sweep is sized for a GPU: about {_minutes(total)} on this "
                      "CPU. Fewer or smaller budgets, depths and batches, or --time-limit, keep it "
                      "short; records are kept as they are measured.[/]")
    notes = list(cfg.notes) + ([CPU_NOTE] if device.type != "cuda" else [])
    config = dict(asdict(cfg), notes=notes, flops="forward = 2*B*sum(in*out over Linear layers); "
                                                  "train = 3x forward; BN/ReLU/bias/optimizer ignored")
    doc = {"schema": records.SCHEMA_VERSION, "kind": "sweep", "env": env, "config": config,
           "complete": False, "records": []}
    path = records.save(doc, out_dir) if out_dir is not None else None
    start, done_est = time.perf_counter(), 0.0
    try:
        for k, ((budget, depth, batch, dtype_name, mode), guess) in enumerate(zip(configs, est), 1):
            base = {"mode": mode, "dtype": dtype_name, "budget": budget, "depth": depth, "batch": batch}
            elapsed = time.perf_counter() - start
            pace = elapsed / done_est if done_est > 0 else 1.0  # how the estimate has held up so far
            if cfg.time_limit_s is not None and elapsed + guess * pace > cfg.time_limit_s:
                doc["records"] += [{**base, **_blank(i, mode, models.DTYPES[dtype_name]), "status": "skipped",
                                    "error": f"time limit {cfg.time_limit_s:.0f} s"} for i in cfg.impls]
                console.print(f"{k}/{len(configs)} {_label(base)}: skipped (time limit)")
                continue
            doc["records"] += _configuration(cfg, base, device, env["device"])
            done_est += guess
            _print_line(console, k, len(configs), base, doc["records"][-len(cfg.impls):],
                        time.perf_counter() - start, total)
            if path is not None:
                records.write(doc, path)
    except KeyboardInterrupt:
        if path is not None:
            console.print(f"stopped; the record keeps what was measured: {path}", soft_wrap=True,
                          highlight=False, markup=False)
        raise
    doc["complete"] = True
    if path is not None:
        records.write(doc, path)
        doc["path"] = str(path)
    return doc


def _configuration(cfg: SweepConfig, base: dict, device: torch.device, device_name: str) -> List[dict]:
    """The records of one configuration: every implementation, or every one failed together
    when the model itself cannot be built (budget too small for the depth, out of memory)."""
    try:
        reference = models.reference_model(cfg.features, base["budget"], base["depth"], cfg.outputs,
                                           cfg.seed, device)
    except (ValueError, RuntimeError) as exc:
        dtype = models.DTYPES[base["dtype"]]
        return [{**base, **_blank(i, base["mode"], dtype), "status": "failed", "error": error_text(exc)}
                for i in cfg.impls]
    base = dict(base, width=models.linear_layers(reference)[0].out_features,
                n_params=dwfast.count_params(reference))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x = torch.randn(base["batch"], cfg.features, generator=gen).to(device)
    target = torch.randn(base["batch"], cfg.outputs, generator=gen).to(device)
    recs = measure(cfg.impls, reference, base["mode"], base["dtype"], x, target, cfg.warmup_ms,
                   cfg.rep_ms, device_name)
    return [dict(base, **r) for r in recs]


def _print_line(console: Console, k: int, n: int, base: dict, recs: List[dict], elapsed: float,
                total: float) -> None:
    """One configuration's progress line, and a line per failure."""
    width = next((r["width"] for r in recs if r.get("width")), None)
    times = ", ".join(f"{r['impl']} {ms_text(r['median_ms'])} ms" for r in recs if r["status"] == "ok")
    console.print(f"{k}/{n} {_label(base)} w={width}: {times or 'nothing timed'} "
                  f"[dim]({_minutes(elapsed)} of ~{_minutes(total)})[/]", highlight=False)
    for r in recs:
        if r["status"] == "failed":
            console.print(f"  [bold red]FAILED[/] {r['impl']}: {escape(r['error'])}", highlight=False)


def failures(doc: dict) -> List[dict]:
    """The records of implementations that failed (not those that don't apply or were skipped)."""
    return [r for r in doc["records"] if r.get("status") == "failed"]


def ms_text(ms: float) -> str:
    """Milliseconds in 3 significant digits, without an exponent."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


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


def ratio_text(ratio: Optional[dict], sep: str = "±") -> str:
    """A ratio with its spread, ``1.02±0.04`` (median +- half the 20-80% range), or ``n/a``."""
    if ratio is None:
        return "n/a"
    return f"{ratio['median']:.2f}{sep}{(ratio['q80'] - ratio['q20']) / 2:.2f}"


def speedup(by_impl: Dict[str, dict], fused: str, baseline: str) -> Optional[dict]:
    """``fused``'s speedup over ``baseline`` (``{"median", "q20", "q80"}``), or None."""
    return (by_impl.get(fused, {}).get("speedup") or {}).get(baseline)


def cell(rec: Optional[dict], value: str) -> str:
    """``value`` for a measured record; else what happened: failed, n/a, skipped, or blank."""
    if rec is None:
        return ""
    return value if rec.get("status", "ok") == "ok" else rec["status"]


def fused_columns(impls: List[str]) -> List[str]:
    """The fused implementations of a sweep, whose speedups get a column each."""
    return [i for i in models.FUSED if i in impls]


def print_table(doc: dict, console: Optional[Console] = None) -> None:
    """Per (mode, dtype, batch) a table, one row per configuration and implementation:
    samples/s, TFLOP/s and each fused implementation's speedup over it, with its spread.
    Sized for 80 columns."""
    console = console or Console()
    impls = doc["config"]["impls"]
    fused = fused_columns(impls)
    heads = {"dwfast": "dwfast ×", "dwfast-graphs": "graphs ×"}
    tables = {}
    for (mode, dtype_name, batch, budget, depth), group in group_records(doc["records"]).items():
        key = (mode, dtype_name, batch)
        if key not in tables:
            tables[key] = Table(box=None, pad_edge=False, collapse_padding=True)
            for name in ["params", "depth", "width", "impl", "samples/s", "TFLOP/s", *[heads[f] for f in fused]]:
                tables[key].add_column(name, justify="left" if name == "impl" else "right", no_wrap=True)
        by_impl = {r["impl"]: r for r in group}
        width = next((r["width"] for r in group if r.get("width")), None)
        params = next((r["n_params"] for r in group if r.get("n_params")), budget)  # (the budget, where unbuilt)
        for n, impl in enumerate(impls):
            rec = by_impl.get(impl)
            first = [si(params), str(depth), fmt(width, "d")] if n == 0 else ["", "", ""]
            ratios = [cell(rec, ratio_text(speedup(by_impl, f, impl))) if impl not in models.FUSED
                      else "" for f in fused]
            tables[key].add_row(*first, impl, cell(rec, si(rec and rec["samples_per_s"])),
                                cell(rec, fmt(rec and rec["tflops"], ".3g")), *ratios,
                                end_section=n == len(impls) - 1)
    for (mode, dtype_name, batch), table in tables.items():
        console.print(f"\n{mode} {dtype_name}, batch {batch}, on {doc['env']['device']}", highlight=False,
                      markup=False)
        console.print(table)
    if fused and len(impls) > 1:
        console.print(SPEEDUP_NOTE)
    for note in doc["config"]["notes"]:
        console.print(f"[bold yellow]{note}[/]")


def group_records(rows):
    """Records grouped by configuration ``(mode, dtype, batch, budget, depth)``, in order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["batch"], r["budget"], r["depth"]), []).append(r)
    return groups


if __name__ == "__main__":  # `python -m bench.sweep`: the same as `python -m bench sweep`
    import sys

    from .__main__ import main
    sys.exit(main(["sweep", *sys.argv[1:]]))
