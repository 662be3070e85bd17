"""``python -m bench.profile``: one training step of each implementation under ``torch.profiler``.

For each implementation: build it from the same reference model, run a few synchronised
untimed steps (compilation, autotuning), then profile with ``schedule(wait=1, warmup=1,
active=1)``. Prints, per implementation, every kernel of the active step (count, time, share)
and the launches per Linear layer, and writes a Chrome trace (open in chrome://tracing or
https://ui.perfetto.dev). On CUDA a "kernel" is a GPU kernel; on the CPU it is a leaf
``aten::`` op (an op that calls no other), the closest analogue.

``--nvtx-only`` skips torch.profiler and just runs the steps inside NVTX ranges named after each
implementation, for Nsight tools (see ``bench/ncu.sh``).
"""
import argparse
import contextlib
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from . import device as dev
from . import models, records

STEPS = 3  # wait, warmup, active


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels(prof, device):
    """``{name: [count, microseconds]}`` of the kernels (CUDA) or leaf aten ops (CPU) profiled."""
    table = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if device.type == "cuda":
            keep = e.device_type == DeviceType.CUDA
        else:
            keep = e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children)
        if keep:
            table[e.name][0] += 1
            table[e.name][1] += e.time_range.elapsed_us()
    return dict(table)


def print_kernels(impl, table, n_linear, console, top):
    """The per-kernel table of one implementation, most expensive first, and a summary line."""
    total_n = sum(c for c, _ in table.values())
    total_us = sum(t for _, t in table.values()) or 1.0
    view = Table(title=f"{impl}: {total_n} kernels per step, {total_n / n_linear:.1f} per Linear layer, "
                       f"{total_us:.0f} us of kernel time")
    for name in ["kernel", "count", "us", "share"]:
        view.add_column(name, justify="left" if name == "kernel" else "right")
    for name, (count, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
        view.add_row(name[:70], str(count), f"{us:.1f}", f"{us / total_us:.1%}")
    console.print(view)


def main(argv=None):
    """Profile one step per implementation; see ``python -m bench.profile --help``."""
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, help="parameter count (default 1e6 on CUDA, 1e5 on the CPU)")
    p.add_argument("--depth", type=int, default=8, help="hidden layers (default 8)")
    p.add_argument("--batch", type=int, help="batch size (default 4096 on CUDA, 256 on the CPU)")
    p.add_argument("--features", type=int, default=128, help="input width (default 128)")
    p.add_argument("--dtype", choices=list(models.DTYPES), help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--mode", choices=models.MODES, default="train")
    p.add_argument("--impls", default=None, help="comma-separated (default eager,compile,dwfast)")
    p.add_argument("--top", type=int, default=15, help="rows per kernel table")
    p.add_argument("--nvtx-only", action="store_true", help="no torch.profiler; NVTX ranges for ncu/nsys")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", type=Path, help="folder for the traces (default as for the sweep)")
    args = p.parse_args(argv)
    device = dev.pick_device(args.device)
    cuda = device.type == "cuda"
    budget = args.budget or (1e6 if cuda else 1e5)
    batch = args.batch or (4096 if cuda else 256)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    impls = (args.impls or "eager,compile,dwfast").split(",")
    out = args.out or records.default_out(device.type)
    console = Console()
    if not cuda:
        console.print("[bold yellow]CPU profile: leaf aten ops stand in for kernels, and dwfast runs its "
                      "PyTorch reference path; run on CUDA to see dwfast's kernels.[/]")
    reference = models.reference_model(args.features, budget, args.depth, 1, 0, device)
    n_linear = len(models.linear_layers(reference))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, args.features, generator=gen).to(device)
    target = torch.randn(batch, 1, generator=gen).to(device)
    console.print(f"{args.mode} step, {dtype_name}, batch {batch}, {args.depth} hidden layers of width "
                  f"{reference[0].out_features} ({n_linear} Linear layers), {budget:.0e} parameters")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for impl in impls:
        step, _ = models.make_step(impl, reference, args.mode, models.DTYPES[dtype_name], x, target)
        for _ in range(STEPS):
            step()
        _sync(device)
        nvtx = torch.cuda.nvtx.range(impl) if cuda else contextlib.nullcontext()
        if args.nvtx_only:
            with nvtx:
                step()
            _sync(device)
            continue
        trace = out / f"profile_{impl}_{args.mode}_{dtype_name}_d{args.depth}_b{batch}.trace.json"
        out.mkdir(parents=True, exist_ok=True)
        with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1),
                     on_trace_ready=lambda prof, path=trace: prof.export_chrome_trace(str(path))) as prof:
            for _ in range(STEPS):
                step()
                _sync(device)
                prof.step()
        print_kernels(impl, kernels(prof, device), n_linear, console, args.top)
        console.print(f"trace: {trace}")


if __name__ == "__main__":
    main()
