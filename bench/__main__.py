"""``python -m bench [sweep|report|study]``: see ``python -m bench --help``."""
import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from . import device as dev
from . import models, plots, records, report, study, sweep


THREADS_HELP = ("CPU threads for torch (default 1: with more, a busy machine's other processes make "
                "OpenMP timings swing 100x)")


def _device(args):
    """The device the flags ask for, with the CPU thread count applied."""
    device = dev.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device


def _floats(text):
    return [float(v) for v in text.split(",")]


def _ints(text):
    return [int(v) for v in text.split(",")]


def _names(choices):
    def parse(text):
        names = text.split(",")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line: ``sweep`` (the default), ``report`` and ``study``."""
    top = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="At the same parameter count, how much faster is a wide-shallow MLP than a "
                    "narrow-deep one, and how much of the gap does dwfast's fusion win back?\n\n"
                    "With no subcommand, runs `sweep` with its defaults: full size on a CUDA GPU, "
                    "a small (< 2 min) sweep on the CPU.",
        epilog="Examples:\n  python -m bench\n  python -m bench sweep --budgets 1e6 --depths 1,8,64 "
               "--dtypes bf16,fp32\n  python -m bench report\n  python -m bench study --epochs 5")
    sub = top.add_subparsers(dest="command")

    sw = sub.add_parser("sweep", help="time eager, torch.compile and dwfast side by side (default)",
                        description="Time every implementation on budgets x depths x batches x dtypes x "
                                    "modes; print a table, write a JSON record and PNG plots. "
                                    "Unset options take the device's defaults.")
    sw.add_argument("--budgets", type=_floats, help="parameter budgets, comma-separated (e.g. 1e5,1e6)")
    sw.add_argument("--depths", type=_ints, help="hidden-layer counts, comma-separated")
    sw.add_argument("--batches", type=_ints, help="batch sizes, comma-separated")
    sw.add_argument("--dtypes", type=_names(list(models.DTYPES)), help="fp32,bf16,fp16 (see bench.models.precision)")
    sw.add_argument("--modes", type=_names(models.MODES), help="train (fwd+bwd+SGD step) and/or infer")
    sw.add_argument("--impls", type=_names(models.IMPLS), help=f"subset of {','.join(models.IMPLS)}")
    sw.add_argument("--compile", action="store_true",
                    help="on the CPU, add torch.compile to the default implementations (about 2 min more "
                         "on 2 cores); on CUDA it is always in")
    sw.add_argument("--features", type=int, help="input width (default 128)")
    sw.add_argument("--warmup-ms", type=float, help="warm-up time per measurement (ms)")
    sw.add_argument("--rep-ms", type=float, help="timed repetitions per measurement (ms)")
    sw.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    sw.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    sw.add_argument("--out", type=Path, help="folder for the JSON and PNGs (default bench/results/ on "
                                             "CUDA, bench/results/cpu/ on the CPU)")

    rp = sub.add_parser("report", help="regenerate bench/REPORT.md and its figures from JSON records",
                        description="Rebuild the report from every record found; no number is typed by hand.")
    rp.add_argument("paths", nargs="*", type=Path, default=[records.RESULTS],
                    help="record files or folders, searched recursively (default bench/results/)")
    rp.add_argument("--output", type=Path, default=report.REPORT, help="report path (figures go beside it)")

    st = sub.add_parser("study", help="accuracy vs training throughput per depth at one parameter count",
                        description=study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = study.StudyConfig()
    st.add_argument("--tasks", type=_names(["digits", "teacher"]), default=defaults.tasks,
                    help="digits (needs scikit-learn) and/or teacher (default both)")
    st.add_argument("--depths", type=_ints, default=defaults.depths, help="hidden-layer counts (default 1,2,4,8,16)")
    st.add_argument("--budget", type=float, default=defaults.budget, help="parameter count (default 2e4)")
    st.add_argument("--epochs", type=int, default=defaults.epochs, help="Adam epochs (default 20)")
    st.add_argument("--seeds", type=_ints, default=defaults.seeds, help="seeds (default 0,1,2)")
    st.add_argument("--teacher-samples", type=int, default=defaults.teacher_samples,
                    help="size of the synthetic data set, 80%% train (default 5000)")
    st.add_argument("--linear-depth", type=int, default=defaults.linear_depth,
                    help="layers of the deep linear net in the collapse check (default 8)")
    st.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    st.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    st.add_argument("--out", type=Path, help="folder for the JSON and PNG (default as for sweep)")
    return top


def run_sweep(args, console: Console) -> None:
    """Build the configuration from defaults and flags, run it, print, save, plot."""
    device = _device(args)
    cfg = sweep.default_config(device.type, compile_on_cpu=args.compile)
    for name in ["budgets", "depths", "batches", "dtypes", "modes", "impls", "features", "warmup_ms", "rep_ms"]:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if device.type != "cuda":
        console.print(f"[bold yellow]{sweep.CPU_NOTE}[/]")
    start = time.perf_counter()
    doc = sweep.run(cfg, device, console)
    sweep.print_table(doc, console)
    path = records.save(doc, args.out or records.default_out(device.type))
    figures = plots.sweep_figures(doc, path.parent, path.stem)
    console.print(f"sweep took {time.perf_counter() - start:.0f} s; record {path}; "
                  f"{len(figures)} plots beside it; `python -m bench report` rebuilds bench/REPORT.md")


def run_study(args, console: Console) -> None:
    """Run the study with the flags, print, save, plot."""
    device = _device(args)
    cfg = study.StudyConfig(tasks=args.tasks, depths=args.depths, budget=args.budget, epochs=args.epochs,
                            seeds=args.seeds, teacher_samples=args.teacher_samples,
                            linear_depth=args.linear_depth)
    doc = study.run(cfg, device, console)
    study.print_table(doc, console)
    path = records.save(doc, args.out or records.default_out(device.type))
    fig = plots.study_figure(doc, path.with_suffix(".png"))
    console.print(f"record {path}; plot {fig}")


def main(argv=None) -> None:
    """Entry point of ``python -m bench``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("sweep", "report", "study", "-h", "--help"):
        argv = ["sweep"] + argv
    args = parser().parse_args(argv)
    console = Console()
    if args.command == "sweep":
        run_sweep(args, console)
    elif args.command == "study":
        run_study(args, console)
    else:
        path = report.write(records.load(args.paths), args.output)
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
