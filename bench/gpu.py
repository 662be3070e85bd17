"""``python -m bench gpu OUTDIR`` (or ``bash bench/gpu.sh OUTDIR``): validate, tune and time on a GPU
in one command of at most 9 minutes on an H100.

Steps, in order. Each runs in its own process under a time budget; its output is appended to
``OUTDIR/kit.log`` and its outcome (ok, failed, timeout, skipped, missing) to ``OUTDIR/kit.json``;
a step that fails does not stop the next:

1. ``tests``: the GPU test suite, ``DWFAST_TEST_GPU=1 python -m pytest`` (bf16, CUDA graphs,
   indexing past 2^31 elements);
2. ``memcheck``, ``racecheck``, ``synccheck``: ``compute-sanitizer`` on a small fused chain,
   forward and backward (``python -m bench.sanitize_chain``);
3. ``tune``: the tile table, ``python -m bench.tune --out OUTDIR/tiles.json``;
4. ``sweep``: the key shapes (budgets 1e6, 1e7, 5e7; depths 1, 4, 16, 64; batches 4096 and
   32768; bf16; train and infer) for eager, compile-max-autotune, compile-graphs, dwfast and
   dwfast-graphs. It gets the time the steps before it left over; configurations that would not
   fit are skipped and recorded as such, and the record is written as it goes;
5. ``ncu-wide``, ``ncu-narrow``: Nsight Compute on dwfast's kernels of one training step of a
   4096-wide and a 128-wide layer (the details page goes to the log);
6. ``report``: ``OUTDIR/REPORT.md`` from the sweep record and this kit's summary (no figures:
   ``python -m bench report`` redraws them once the record is copied to ``bench/results/``).

OUTDIR ends up with at most 8 files: ``kit.json``, ``kit.log``, the sweep record, ``tiles.json``
and ``REPORT.md``. Exit status 1 if a step failed, timed out or is missing.

``--dry-run`` runs the same steps at tiny sizes on the CPU: the tests, the sanitizer tools,
the tuning and ncu need CUDA and are recorded as skipped, except that the chain that
compute-sanitizer would check and the first step ncu would profile are run bare.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from rich.console import Console

from . import device as dev
from . import records

KIT_S = 520.0  # the whole kit, leaving a minute of 9 for start-up and slack
REPORT_S, NCU_S = 30.0, 40.0
SWEEP = {"budgets": "1e6,1e7,5e7", "depths": "1,4,16,64", "batches": "4096,32768", "dtypes": "bf16",
         "modes": "train,infer", "impls": "eager,compile-max-autotune,compile-graphs,dwfast,dwfast-graphs",
         "warmup-ms": "10", "rep-ms": "50"}
DRY_SWEEP = dict(SWEEP, budgets="2e4", depths="1", batches="32", **{"warmup-ms": "1", "rep-ms": "5"})
# (features, depth, budget, batch): one hidden layer 4096 wide; sixteen 128 wide.
NCU_SHAPES = {"ncu-wide": ("4096", "1", "1.68e7", "8192"), "ncu-narrow": ("128", "16", "2.7e5", "8192")}
DRY_NCU_SHAPES = {"ncu-wide": ("256", "1", "7e4", "64"), "ncu-narrow": ("32", "4", "5e3", "64")}


def add_arguments(p) -> None:
    """The kit's flags on the ``gpu`` subparser."""
    p.add_argument("outdir", type=Path, help="a new or empty folder for the kit's files (at most 8)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps at tiny sizes on the CPU; CUDA-only tools are skipped")


class Kit:
    """Runs the steps, keeps ``kit.json`` and ``kit.log`` up to date, tracks the deadline."""

    def __init__(self, outdir: Path, dry_run: bool, console: Console):
        self.out, self.dry_run, self.console = outdir, dry_run, console
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "kit.log"
        self.log.write_text("")
        self.start = time.perf_counter()
        self.doc = {"schema": records.SCHEMA_VERSION, "kind": "gpu-kit", "env": _env(dry_run),
                    "dry_run": dry_run, "steps": []}

    def left(self) -> float:
        """Seconds left of the kit's budget."""
        return KIT_S - (time.perf_counter() - self.start)

    def record(self, name: str, status: str, note: str = "", command: Optional[List[str]] = None,
               seconds: float = 0.0) -> dict:
        """Add a step's outcome to ``kit.json`` and print it."""
        step = {"name": name, "status": status, "seconds": round(seconds, 1), "note": note,
                "command": " ".join(command or [])}
        self.doc["steps"].append(step)
        records.write(self.doc, self.out / "kit.json")
        color = {"ok": "green", "skipped": "yellow"}.get(status, "bold red")
        self.console.print(f"[{color}]{status:>7}[/] {name} ({seconds:.0f} s){': ' + note if note else ''}",
                           highlight=False)
        return step

    def run(self, name: str, command: List[str], budget: float, env: Optional[Dict[str, str]] = None,
            note: str = "") -> dict:
        """Run ``command`` for at most ``budget`` seconds (and never past the kit's deadline),
        its output appended to the log; records ok, failed (non-zero exit) or timeout."""
        budget = max(1.0, min(budget, self.left()))
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(command)} (budget {budget:.0f} s)\n")
            log.flush()
            t0 = time.perf_counter()
            # A session of its own, so a timeout ends the whole tree (compute-sanitizer's child too).
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            seconds = time.perf_counter() - t0
            log.write(f"===== {name}: {'timeout' if rc is None else f'exit {rc}'} after {seconds:.0f} s\n")
        status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
        return self.record(name, status, note if rc == 0 else f"exit {rc}" if rc else f"over {budget:.0f} s",
                           command, seconds)


def _env(dry_run: bool) -> dict:
    return dev.environment(torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda"))


def _python(*args: str) -> List[str]:
    return [sys.executable, *args]


def _flags(values: Dict[str, str]) -> List[str]:
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def _has(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(args, console: Console) -> int:
    """Run the kit (see the module docstring); returns the exit status."""
    if args.outdir.exists() and any(args.outdir.iterdir()):
        # An earlier run's records would be reported again and the folder would pass 8 files.
        console.print(f"{args.outdir} is not empty: give the kit a new or empty folder", soft_wrap=True,
                      highlight=False, markup=False)
        return 2
    kit = Kit(args.outdir, args.dry_run, console)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = ["--device", "cuda" if cuda else "cpu"]
    console.print(f"GPU kit{' (dry run on the CPU)' if args.dry_run else ''}: files in {args.outdir}",
                  soft_wrap=True, highlight=False, markup=False)
    if not cuda and not args.dry_run:
        kit.record("cuda", "failed", "no CUDA device: run with --dry-run to check the kit on the CPU")
        return 1

    if cuda:
        # The harness's own tests are CPU tests that CI runs; the kit checks the harness by using it.
        kit.run("tests", _python("-m", "pytest", "-q", "-p", "no:warnings", "--ignore-glob=*/test_bench_*.py",
                                 str(Path(__file__).resolve().parent.parent / "tests")),
                150, env={"DWFAST_TEST_GPU": "1"})
    else:
        kit.record("tests", "skipped", "needs CUDA")

    chain = _python("-m", "bench.sanitize_chain", *device)
    if not cuda:
        kit.run("chain", chain, 60, note="the chain compute-sanitizer checks, run bare")
    for tool, budget in (("memcheck", 45), ("racecheck", 40), ("synccheck", 25)):
        if not cuda:
            kit.record(tool, "skipped", "needs CUDA")
        elif not _has("compute-sanitizer"):
            kit.record(tool, "missing", "compute-sanitizer is not on the PATH")
        else:
            # Without the caching allocator every tensor is its own allocation, so memcheck sees
            # an access past a tensor's end instead of one into a neighbour in the same block.
            kit.run(tool, ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *chain], budget,
                    env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else None)

    tiles = kit.out / "tiles.json"
    if importlib.util.find_spec("bench.tune") is None:
        kit.record("tune", "skipped" if not cuda else "missing", "bench/tune.py does not exist yet")
    elif cuda:
        kit.run("tune", _python("-m", "bench.tune", "--out", str(tiles)), 60)
    else:
        kit.record("tune", "skipped", "needs CUDA")

    sweep_s = kit.left() - 2 * NCU_S - REPORT_S
    sweep = _flags(SWEEP if cuda else DRY_SWEEP) + ["--time-limit", f"{max(sweep_s - 20, 1):.0f}"]
    kit.run("sweep", _python("-m", "bench", "sweep", *device, *sweep, "--no-plots", "--out", str(kit.out)),
            sweep_s)

    for n, (name, (features, depth, budget, batch)) in enumerate((NCU_SHAPES if cuda else DRY_NCU_SHAPES).items()):
        step = _python("-m", "bench.profile", "--impls", "dwfast", "--nvtx-only", *device, "--features", features,
                       "--depth", depth, "--budget", budget, "--batch", batch,
                       "--dtype", "bf16" if cuda else "fp32")
        if not cuda:
            if n == 0:  # once is enough to check the command; the shapes differ only in size
                kit.run(f"{name}-step", step, NCU_S, note="the step ncu profiles, run bare")
            kit.record(name, "skipped", "needs CUDA")
        elif not _has("ncu"):
            kit.record(name, "missing", "ncu is not on the PATH")
        else:
            kit.run(name, ["ncu", "--nvtx", "--nvtx-include", "dwfast/", "--launch-count", "12",
                           "--target-processes", "all", *step], NCU_S)

    sweeps = [str(p) for p in kit.out.glob("*_sweep_*.json")]
    kit.run("report", _python("-m", "bench", "report", *sweeps, str(kit.out / "kit.json"),
                              "--output", str(kit.out / "REPORT.md"), "--no-figures"), REPORT_S)
    bad = [s for s in kit.doc["steps"] if s["status"] in ("failed", "timeout", "missing")]
    files = sorted(p.name for p in kit.out.iterdir())
    console.print(f"kit took {time.perf_counter() - kit.start:.0f} s; {len(files)} files: {', '.join(files)}",
                  highlight=False)
    if bad:
        console.print(f"[bold red]{len(bad)} step(s) did not pass: {', '.join(s['name'] for s in bad)}[/]")
    return 1 if bad else 0

