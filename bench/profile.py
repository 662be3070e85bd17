"""``python -m bench.profile``: one training step of each implementation under ``torch.profiler``.

For each implementation: build it from the same reference model, run a few synchronised
untimed steps (compilation, autotuning), then profile with ``schedule(wait=1, warmup=1,
active=1)``. Prints, per implementation, every kernel of the active step (count, time, share)
and the kernels per Linear layer, and writes a Chrome trace (open in https://ui.perfetto.dev).

What counts as a kernel: on CUDA, every GPU activity (kernels, memsets, copies). On the CPU,
the outermost op that does work: an ``aten::`` op with a CPU kernel of its own that is neither
a view nor an allocation, not inside another such op (``addmm`` with its bias copy, the whole
of ``native_batch_norm``, ``mul_`` with its scalar conversion), timed with everything inside
it; and Inductor's generated C++ kernels (``cpp_fused_*``). Composite ops such as ``linear``
or ``batch_norm`` only dispatch to those, and views cost no kernel.

``--nvtx-only`` skips torch.profiler and just runs the steps inside NVTX ranges named after each
implementation, for Nsight tools (see ``bench/ncu.sh``).
"""
import argparse
import contextlib
import functools
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from . import BUDGET_BELOW, at_least, comma_list, folder
from . import device as dev
from . import models, records

STEPS = 3  # wait, warmup, active
KERNEL_KEYS = ("CPU", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_"}
# Lines the profiler's C++ side writes to stderr on every start and stop.
PROFILER_CHATTER = ("USDT:", "STAGE:")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def does_work(name: str) -> bool:
    """Whether the CPU op called ``name`` (``aten::addmm``) runs a kernel of its own: one of its
    overloads has a CPU kernel (or one for every backend) and is not a view (a result aliasing an
    input without writing it); allocations don't count either."""
    if not name.startswith("aten::") or name[6:] in ALLOCATIONS:
        return False
    packet = getattr(torch.ops.aten, name[6:], None)
    if packet is None:
        return False
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        if any(arg.is_out for arg in schema.arguments):  # out= variants: another registration
            continue
        alias = schema.returns[0].alias_info if schema.returns else None
        view = alias is not None and not alias.is_write
        if not view and _has_cpu_kernel(name if overload == "default" else f"{name}.{overload}"):
            return True
    return False


def _has_cpu_kernel(qualified: str) -> bool:
    """A CPU kernel, or one for every backend (``copy_``); not a composite of other ops."""
    try:
        return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key) for key in KERNEL_KEYS)
    except RuntimeError:  # an overload TorchScript knows but the dispatcher does not (copy_.Tensor)
        return False


def cpu_kernel(event) -> bool:
    """Whether a CPU profiler event stands for a kernel: the outermost op that does work of its
    own, or Inductor's generated C++ (module docstring)."""
    if "cpp_fused" in event.name:  # Inductor's generated C++ (cpp.enable_kernel_profile)
        return True
    if not does_work(event.name):
        return False
    parent = event.cpu_parent
    while parent is not None:  # the outermost op that does work is the kernel
        if does_work(parent.name):
            return False
        parent = parent.cpu_parent
    return True


def kernels(prof, device) -> dict:
    """``{name: [count, microseconds]}`` of the kernels profiled (see the module docstring)."""
    table = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        keep = e.device_type == DeviceType.CUDA if device.type == "cuda" else cpu_kernel(e)
        if keep:
            table[e.name][0] += 1
            # a GPU activity's own span; a CPU op's span includes the ops it calls (module docstring)
            table[e.name][1] += e.time_range.elapsed_us() if device.type == "cuda" else e.cpu_time_total
    return dict(table)


@contextlib.contextmanager
def quiet_profiler():
    """Hide the profiler's C++ chatter (``USDT: ... profiler_start``) from stderr, which no
    setting turns off; every other line written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(PROFILER_CHATTER):
                    sys.stderr.write(line)
            sys.stderr.flush()


def print_kernels(impl, table, n_linear, console, top):
    """The per-kernel table of one implementation, most expensive first, and a summary line."""
    total_n = sum(c for c, _ in table.values())
    total_us = sum(t for _, t in table.values()) or 1.0
    console.print(f"{impl}: {total_n} kernels per step, {total_n / n_linear:.1f} per Linear layer, "
                  f"{total_us:.0f} us of kernel time", highlight=False)
    view = Table(box=None, pad_edge=False, collapse_padding=True)
    # Long kernel names are cut, numbers never.
    view.add_column("kernel", no_wrap=True, overflow="ellipsis", max_width=max(20, console.width - 26))
    for name, width in (("count", 5), ("us", 9), ("share", 6)):
        view.add_column(name, justify="right", no_wrap=True, min_width=width)
    for name, (count, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
        view.add_row(escape(name), str(count), f"{us:.1f}", f"{us / total_us:.1%}")
    console.print(view)


def profile_step(step, device, trace: Path) -> dict:
    """Profile one ``step`` (after ``STEPS - 1`` scheduled ones), write its Chrome trace, and
    return its kernel table."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_profiler(), profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1),
                                   on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace))) as prof:
        for _ in range(STEPS):
            step()
            _sync(device)
            prof.step()
    return kernels(prof, device)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.profile``."""
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=at_least(1, float, below=BUDGET_BELOW),
                   help="parameter count (default 1e6 on CUDA, 1e5 on the CPU)")
    p.add_argument("--depth", type=at_least(0), default=8, help="hidden layers (default 8)")
    p.add_argument("--batch", type=at_least(2), help="batch size (default 4096 on CUDA, 256 on the CPU)")
    p.add_argument("--features", type=at_least(1), default=128, help="input width (default 128)")
    p.add_argument("--dtype", choices=list(models.DTYPES), help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--mode", choices=models.MODES, default="train")
    p.add_argument("--impls", type=comma_list(str, models.IMPLS), default=None,
                   help="comma-separated (default eager,compile,dwfast)")
    p.add_argument("--top", type=at_least(1), default=15, help="rows per kernel table")
    p.add_argument("--nvtx-only", action="store_true", help="no torch.profiler; NVTX ranges for ncu/nsys")
    p.add_argument("--device", type=dev.device_arg, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=at_least(1), default=1, help=dev.THREADS_HELP)
    p.add_argument("--out", type=folder, help="folder for the traces (default as for the sweep)")
    p.add_argument("--launches", action="store_true",
                   help="instead: launches per training step (Triton kernels and PyTorch ops) of eager and dwfast, "
                        "and dwfast's host time per step, on the stand-in GPU (any machine; bench/launches.py)")
    return p


def main(argv=None) -> int:
    """Profile one step per implementation; see ``python -m bench.profile --help``. Returns the
    exit status: 1 if an implementation failed (its error is printed), else 0."""
    args = parser().parse_args(argv)
    device = dev.pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
        inductor_config.cpp.enable_kernel_profile = True  # name Inductor's C++ kernels in the profile
    budget = args.budget if args.budget is not None else (1e6 if cuda else 1e5)
    batch = args.batch if args.batch is not None else (4096 if cuda else 256)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    if args.launches:
        from . import launches  # (it imports this module's kernel counting)
        width = models.reference_model(args.features, budget, args.depth, 1, 0, torch.device("cpu"))[0].out_features
        launches.main(["--depth", str(args.depth), "--width", str(width), "--batch", str(batch),
                       "--in-features", str(args.features), "--out-features", "1", "--dtype", dtype_name])
        return 0
    impls = args.impls or ["eager", "compile", "dwfast"]
    out = args.out or records.default_out(device.type)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not cuda:
        console.print("[bold yellow]CPU profile: the outermost aten ops that do work stand in for kernels, "
                      "and dwfast runs its PyTorch reference path; run on CUDA to see dwfast's kernels.[/]")
    reference = models.reference_model(args.features, budget, args.depth, 1, 0, device)
    n_linear = len(models.linear_layers(reference))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, args.features, generator=gen).to(device)
    target = torch.randn(batch, 1, generator=gen).to(device)
    console.print(f"{args.mode} step, {dtype_name}, batch {batch}, {args.depth} hidden layers of width "
                  f"{reference[0].out_features} ({n_linear} Linear layers), {budget:.0e} parameters")
    failed = 0
    for impl in impls:
        reason = models.not_applicable(impl, device)
        if reason:
            console.print(f"{impl}: n/a ({reason})")
            continue
        try:
            models.forget_compiled()
            step, _ = models.make_step(impl, reference, args.mode, models.DTYPES[dtype_name], x, target)
            for _ in range(STEPS):
                step()
            _sync(device)
            if args.nvtx_only:
                with torch.cuda.nvtx.range(impl) if cuda else contextlib.nullcontext():
                    step()
                _sync(device)
                continue
            trace = out / f"profile_{impl}_{args.mode}_{dtype_name}_d{args.depth}_b{batch}.trace.json"
            print_kernels(impl, profile_step(step, device, trace), n_linear, console, args.top)
        except Exception as exc:  # one implementation failing must not hide the others
            failed += 1
            console.print(f"[bold red]FAILED[/] {impl}: {escape(f'{type(exc).__name__}: {exc}')}")
            continue
        console.print(f"trace: {trace}", soft_wrap=True, highlight=False, markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
