"""``python -m bench [sweep|report|study|gpu]``: see ``python -m bench --help``.

Exit status: 0; 1 when an implementation failed in a sweep (or a step of the GPU kit failed),
or a report found no records; 2 for bad arguments; 130 when stopped with Ctrl-C (a sweep's
record keeps what it measured).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from . import BUDGET_BELOW, at_least, comma_list, folder, new_file
from . import device as dev
from . import gpu, models, plots, records, report, study, sweep


def _device(args):
    """The device the flags ask for, with the CPU thread count applied."""
    device = dev.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device


def parser() -> argparse.ArgumentParser:
    """The command line: ``sweep`` (the default), ``report``, ``study`` and ``gpu``."""
    top = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="At the same parameter count, how much faster is a wide-shallow MLP than a "
                    "narrow-deep one, and how much of the gap does dwfast's fusion win back?\n\n"
                    "With no subcommand, runs `sweep` with its defaults: full size on a CUDA GPU, "
                    "a small (< 2 min) sweep on the CPU.",
        epilog="Examples:\n  python -m bench\n  python -m bench sweep --budgets 1e6 --depths 1,8,64 "
               "--dtypes bf16,fp32\n  python -m bench report\n  python -m bench study --epochs 5\n"
               "  python -m bench gpu /tmp/kit --dry-run\n\nExit status 1: an implementation failed.")
    sub = top.add_subparsers(dest="command")

    sw = sub.add_parser("sweep", help="time eager, torch.compile and dwfast side by side (the default)",
                        description="Time every implementation on budgets x depths x batches x dtypes x "
                                    "modes; print a table, write a JSON record and PNG plots. "
                                    "Unset options take the device's defaults.")
    sw.add_argument("--budgets", type=comma_list(float, minimum=1, below=BUDGET_BELOW),
                    help="parameter budgets, comma-separated (e.g. 1e5,1e6)")
    sw.add_argument("--depths", type=comma_list(int, minimum=0), help="hidden-layer counts, comma-separated")
    sw.add_argument("--batches", type=comma_list(int, minimum=2), help="batch sizes, comma-separated (at least 2: "
                    "BatchNorm's batch statistics)")
    sw.add_argument("--dtypes", type=comma_list(str, list(models.DTYPES)),
                    help="fp32,bf16,fp16 (see bench.models.precision)")
    sw.add_argument("--modes", type=comma_list(str, models.MODES), help="train (fwd+bwd+SGD step) and/or infer")
    sw.add_argument("--impls", type=comma_list(str, models.IMPLS), help=f"subset of {','.join(models.IMPLS)}")
    sw.add_argument("--compile", action="store_true",
                    help="on the CPU, add torch.compile to the default implementations (about 2 min more "
                         "on 2 cores); on CUDA it is always in")
    sw.add_argument("--features", type=at_least(1), help="input width (default 128)")
    sw.add_argument("--warmup-ms", type=at_least(0, float), help="warm-up time per measurement (ms)")
    sw.add_argument("--rep-ms", type=at_least(1e-3, float), help="timed repetitions per measurement (ms)")
    sw.add_argument("--time-limit", type=at_least(0, float), help="seconds: configurations that would end past it are "
                                                     "skipped and recorded as such")
    sw.add_argument("--device", type=dev.device_arg, help="cuda, cuda:1 or cpu (default: cuda if available)")
    sw.add_argument("--threads", type=at_least(1), default=1, help=dev.THREADS_HELP)
    sw.add_argument("--out", type=folder, help="folder for the JSON and PNGs (default bench/results/ on "
                                             "CUDA, bench/results/cpu/ on the CPU)")
    sw.add_argument("--no-plots", action="store_true", help="the JSON record only")

    rp = sub.add_parser("report", help="write a report and its figures from JSON records (bench/REPORT.md "
                                       "from GPU records)",
                        description=report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("paths", nargs="*", type=Path,
                    help="record files or folders, searched recursively (default: see above)")
    rp.add_argument("--output", type=new_file, help="report path (figures go beside it; default: see above)")
    rp.add_argument("--no-figures", action="store_true", help="tables only, no PNGs")

    st = sub.add_parser("study", help="accuracy vs training throughput per depth at one parameter count",
                        description=study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = study.StudyConfig()
    st.add_argument("--tasks", type=comma_list(str, ["digits", "teacher"]), default=defaults.tasks,
                    help="digits (needs scikit-learn) and/or teacher (default both)")
    st.add_argument("--depths", type=comma_list(int, minimum=0), default=defaults.depths,
                    help="hidden-layer counts (default 1,2,4,8,16)")
    st.add_argument("--budget", type=at_least(1, float, below=BUDGET_BELOW), default=defaults.budget,
                    help="parameter count (default 2e4)")
    st.add_argument("--epochs", type=at_least(1), default=defaults.epochs, help="Adam epochs (default 20)")
    st.add_argument("--seeds", type=comma_list(int), default=defaults.seeds, help="seeds (default 0,1,2)")
    st.add_argument("--teacher-samples", type=at_least(10), default=defaults.teacher_samples,
                    help="size of the synthetic data set, 80%% train (default 5000)")
    st.add_argument("--linear-depth", type=at_least(1), default=defaults.linear_depth,
                    help="layers of the deep linear net in the collapse check (default 8)")
    st.add_argument("--device", type=dev.device_arg, help="cuda or cpu (default: cuda if available)")
    st.add_argument("--threads", type=at_least(1), default=1, help=dev.THREADS_HELP)
    st.add_argument("--out", type=folder, help="folder for the JSON and PNG (default as for sweep)")

    kit = sub.add_parser("gpu", help="the GPU kit: tests, compute-sanitizer, tuning, the key sweep, ncu",
                         description=gpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu.add_arguments(kit)
    return top


def _say_path(console: Console, what: str, path) -> None:
    """A path on a line of its own that is never wrapped (it stays one name in a file or log)."""
    console.print(f"{what}: {path}", soft_wrap=True, highlight=False, markup=False)


def run_sweep(args, console: Console) -> int:
    """Build the configuration from defaults and flags, run it, print, save, plot; returns the
    exit status (1 if an implementation failed)."""
    device = _device(args)
    cfg = sweep.default_config(device.type, compile_on_cpu=args.compile)
    for name in ["budgets", "depths", "batches", "dtypes", "modes", "impls", "features", "warmup_ms", "rep_ms",
                 "time_limit"]:
        if getattr(args, name) is not None:
            setattr(cfg, "time_limit_s" if name == "time_limit" else name, getattr(args, name))
    if device.type != "cuda":
        console.print(f"[bold yellow]{sweep.CPU_NOTE}[/]")
    start = time.perf_counter()
    doc = sweep.run(cfg, device, console, args.out or records.default_out(device.type))
    sweep.print_table(doc, console)
    path = Path(doc["path"])
    figures = [] if args.no_plots else plots.sweep_figures(doc, path.parent, path.stem)
    console.print(f"sweep took {time.perf_counter() - start:.0f} s; {len(figures)} plots beside the record; "
                  "`python -m bench report` rebuilds the report")
    _say_path(console, "record", path)
    failed = sweep.failures(doc)
    for r in failed:
        console.print(f"[bold red]FAILED[/] {r['impl']} {r['mode']} {r['dtype']} B={r['batch']} "
                      f"P={sweep.si(r['budget'])} d={r['depth']}: {escape(r['error'])}", highlight=False)
    if failed:
        console.print(f"[bold red]{len(failed)} measurement(s) failed; exit status 1[/]")
    return 1 if failed else 0


def run_study(args, console: Console) -> int:
    """Run the study with the flags, print, save, plot; returns the exit status (0)."""
    device = _device(args)
    cfg = study.StudyConfig(tasks=args.tasks, depths=args.depths, budget=args.budget, epochs=args.epochs,
                            seeds=args.seeds, teacher_samples=args.teacher_samples,
                            linear_depth=args.linear_depth)
    doc = study.run(cfg, device, console)
    study.print_table(doc, console)
    path = records.save(doc, args.out or records.default_out(device.type))
    _say_path(console, "record", path)
    _say_path(console, "plot", plots.study_figure(doc, path.with_suffix(".png")))
    return 0


def run_report(args, console: Console) -> int:
    """Write the report from the records the flags name (or the defaults); returns 0, 1 where
    there are none (nothing written), 2 for a path that does not exist."""
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        console.print(f"[bold red]no such file or folder:[/] {', '.join(map(str, missing))}", highlight=False)
        return 2
    docs, output = report.sources(args.paths or None, args.output)
    if not docs:  # (a report of nothing would replace the last one)
        where = ", ".join(map(str, args.paths)) if args.paths else str(records.RESULTS)
        console.print(f"[bold red]no records in {escape(where)}[/]: run `python -m bench` (and `python -m bench "
                      "study`) first; nothing written", highlight=False)
        return 1
    path = report.write(docs, output, figures=not args.no_figures)
    _say_path(console, f"report of {len(docs)} record(s)", path)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("sweep", "report", "study", "gpu", "-h", "--help"):
        argv = ["sweep"] + argv
    args = parser().parse_args(argv)
    console = Console()
    run = {"sweep": run_sweep, "study": run_study, "report": run_report, "gpu": gpu.run}[args.command]
    try:
        return run(args, console)
    except KeyboardInterrupt:  # what was measured is already saved (and said so)
        return 130


if __name__ == "__main__":
    sys.exit(main())
