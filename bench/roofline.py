"""``python -m bench.roofline``: per layer shape, achieved TFLOP/s and GB/s against the peaks.

Each point is a chain of ``--layers`` square blocks ``Linear(W, W) -> BatchNorm1d -> ReLU`` plus a
``Linear(W, W)`` head, run at batch ``B``, so every GEMM has the one shape ``B x W x W``.
Work and traffic per Linear layer, with ``e`` bytes per element:

- FLOPs: ``2 B W^2`` forward; 3x that for a training step (see :mod:`bench.models`).
- bytes: the minimal traffic of each GEMM, reading both operands and writing the result once:
  ``e (2 B W + W^2)`` forward; each of the two backward GEMMs (grad-input, grad-weight) moves
  the same, so 3x for training. BatchNorm/ReLU traffic is left out: that is what fusion removes,
  so an implementation that pays it shows up below the roof rather than moved along it.

Arithmetic intensity is FLOPs / bytes = ``B W / (e (B + W/2))``, the same for both modes.
Writes one PNG per mode and prints the table.
"""
import argparse
import sys

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import dwfast

from . import at_least, comma_list, folder
from . import device as dev
from . import models, plots, records
from .sweep import cell, fmt, measure


def layer_bytes(batch: int, width: int, dtype: torch.dtype, mode: str) -> int:
    """Minimal bytes moved per Linear layer per step (see the module docstring)."""
    e = torch.finfo(dtype).bits // 8
    forward = e * (2 * batch * width + width * width)
    return 3 * forward if mode == "train" else forward


def main(argv=None) -> int:
    """Measure the square chains and plot them; see ``python -m bench.roofline --help``. Returns
    the exit status: 1 if an implementation failed (each failure is printed), else 0."""
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=comma_list(int, minimum=1),
                   help="comma-separated W (default 64..8192 on CUDA, 32..512 on the CPU)")
    p.add_argument("--batch", type=at_least(2), help="B (default 8192 on CUDA, 256 on the CPU)")
    p.add_argument("--layers", type=at_least(0), default=4, help="hidden blocks per chain (default 4)")
    p.add_argument("--dtype", choices=list(models.DTYPES), help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--modes", type=comma_list(str, models.MODES), default=["train", "infer"])
    p.add_argument("--impls", type=comma_list(str, models.IMPLS), default=None,
                   help="comma-separated (default eager,compile,dwfast on CUDA, eager,dwfast on the CPU)")
    p.add_argument("--warmup-ms", type=at_least(0, float), help="warm-up time per measurement (ms)")
    p.add_argument("--rep-ms", type=at_least(1e-3, float), help="timed repetitions per measurement (ms)")
    p.add_argument("--device", type=dev.device_arg, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=at_least(1), default=1, help=dev.THREADS_HELP)
    p.add_argument("--out", type=folder, help="folder for the PNGs (default as for the sweep)")
    args = p.parse_args(argv)
    device = dev.pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    widths = args.widths or ([64, 128, 256, 512, 1024, 2048, 4096, 8192] if cuda else [32, 64, 128, 256, 512])
    batch = args.batch if args.batch is not None else (8192 if cuda else 256)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = models.DTYPES[dtype_name]
    impls = args.impls or (["eager", "compile", "dwfast"] if cuda else ["eager", "dwfast"])
    out = args.out or records.default_out(device.type)
    out.mkdir(parents=True, exist_ok=True)  # before measuring: a bad folder fails at once
    name = dev.device_name(device)
    where = f"on {name}" if cuda else "on the CPU (not GPU timings)"
    peak_t, peak_b = dev.peak_tflops(name, dtype), dev.peak_gbps(name)
    console = Console()
    if not cuda:
        console.print("[bold yellow]CPU timings are not GPU timings; no CPU peaks are known, so no roof.[/]")
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (25.0 if cuda else 10.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100.0 if cuda else 50.0)
    failed = []
    for mode in args.modes:
        console.print(f"{mode}, {dtype_name}, batch {batch}, {args.layers + 1} layers of W x W {where}",
                      highlight=False, markup=False)
        table = Table(box=None, pad_edge=False, collapse_padding=True)
        for col in ["impl", "W", "FLOP/byte", "TFLOP/s", "GB/s", "% peak FLOP/s", "% peak GB/s"]:
            table.add_column(col, justify="left" if col == "impl" else "right", no_wrap=True)
        points = []
        for width in widths:
            torch.manual_seed(0)
            reference = dwfast.MLP(width, [width] * args.layers, width, device=device)
            n_layers = args.layers + 1
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, width, generator=gen).to(device)
            target = torch.randn(batch, width, generator=gen).to(device)
            flops = models.step_flops(reference, batch, mode) / n_layers
            nbytes = layer_bytes(batch, width, dtype, mode)
            for rec in measure(impls, reference, mode, dtype_name, x, target, warmup_ms, rep_ms, name):
                if rec["status"] == "failed":
                    failed.append(rec)
                    console.print(f"[bold red]FAILED[/] {rec['impl']} {mode} W={width}: {escape(rec['error'])}")
                gbps = None if rec["median_ms"] is None else nbytes * n_layers / rec["median_ms"] / 1e6
                points.append(dict(rec, width=width, intensity=flops / nbytes, gbps=gbps))
                table.add_row(rec["impl"], str(width), f"{flops / nbytes:.1f}", cell(rec, fmt(rec["tflops"], ".3g")),
                              cell(rec, fmt(gbps, ".3g")), cell(rec, fmt(rec["peak_fraction"], ".1%")),
                              cell(rec, fmt(None if gbps is None or not peak_b else gbps / peak_b, ".1%")))
        console.print(table)
        path = plots.roofline_figure(points, out / f"roofline_{mode}_{dtype_name}_b{batch}.png",
                                     f"{mode}, {dtype_name}, batch {batch} {where}", peak_t, peak_b)
        console.print(f"plot: {path}", soft_wrap=True, highlight=False, markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
