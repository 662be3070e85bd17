"""Every command line that README.md and bench/README.md document, run on the CPU at tiny sizes
with torch.compile included, plus what a user meets around them: failures that are loud and
set the exit status, records kept when a sweep is stopped, output that fits 80 columns,
generated files that stay out of git.

Commands run in this process where they can (``bench.__main__.main`` and friends return the
exit status), and as real processes where the process itself is the point (exit status, the
shell scripts, pytest-benchmark).
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bench import __main__ as cli
from bench import gpu, models, profile, records, report, roofline, study, sweep
from test_bench_smoke import KEEP_THREADS, TINY

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")


def _run(*command, env=None, timeout=300):
    return subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """bench/results/ and bench/REPORT.md moved into a temporary folder."""
    monkeypatch.setattr(records, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "REPORT", tmp_path / "REPORT.md")
    return tmp_path


# ---------------------------------------------------------------- the documented commands

def test_bare_bench(results, monkeypatch):
    """`python -m bench`: the default sweep, into bench/results/cpu/ (shrunk, compile added)."""
    def tiny(device_type, compile_on_cpu=False):
        return sweep.SweepConfig(budgets=[2e4], depths=[1], batches=[32], dtypes=["fp32"], modes=["infer"],
                                 impls=["eager", "compile", "dwfast"], warmup_ms=1, rep_ms=5)
    monkeypatch.setattr(sweep, "default_config", tiny)
    assert cli.main(KEEP_THREADS) == 0
    (doc,) = records.load([records.default_out("cuda" if torch.cuda.is_available() else "cpu")])
    assert [r["status"] for r in doc["records"]] == ["ok"] * 3


def test_sweep_both_dtypes(tmp_path):
    """`python -m bench sweep --budgets ... --depths ... --batches ... --dtypes bf16,fp32`."""
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--dtypes", "bf16,fp32", "--modes", "train",
                     "--impls", "eager,compile,dwfast", "--out", str(tmp_path), *KEEP_THREADS]) == 0
    (doc,) = records.load([tmp_path])
    assert {(r["dtype"], r["precision"]) for r in doc["records"]} == {("bf16", "autocast bf16, fp32 params"),
                                                                       ("fp32", "fp32")}
    assert all(r["status"] == "ok" for r in doc["records"])


def test_sweep_impls_modes_out(tmp_path):
    """`python -m bench sweep --impls eager,dwfast --modes infer --out DIR` (DIR created)."""
    out = tmp_path / "runs" / "new"
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--impls", "eager,dwfast", "--modes", "infer",
                     "--out", str(out), *KEEP_THREADS]) == 0
    (doc,) = records.load([out])
    assert [(r["impl"], r["mode"]) for r in doc["records"]] == [("eager", "infer"), ("dwfast", "infer")]


def test_report_defaults(results):
    """`python -m bench report`: CPU records make bench/results/cpu/REPORT.md, GPU records
    bench/REPORT.md from themselves alone."""
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--impls", "eager,dwfast", "--modes", "infer",
                     *KEEP_THREADS]) == 0
    assert cli.main(["report"]) == 0
    cpu_report = results / "results" / "cpu" / "REPORT.md"
    assert "Only CPU records" in cpu_report.read_text() and (cpu_report.parent / "figures").is_dir()
    assert not (results / "REPORT.md").exists()
    (doc,) = records.load([results / "results" / "cpu"])
    doc["env"] = dict(doc["env"], device_type="cuda", device="NVIDIA H100 80GB HBM3")
    records.save(doc, results / "results")
    assert cli.main(["report"]) == 0
    text = (results / "REPORT.md").read_text()
    assert text.count("## Sweep on NVIDIA H100") == 1 and "## Sweep on" in text and "Only CPU" not in text
    assert (results / "figures").is_dir()


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["report", "--help"], ["study", "--help"],
                                  ["gpu", "--help"]])
def test_help(argv, capsys):
    """`python -m bench --help` and `python -m bench sweep --help` (and the other subcommands)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 0 and "usage: python -m bench" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["sweep", "--batches", "0"], "--batches"), (["sweep", "--depths", "-1"], "--depths"),
    (["sweep", "--budgets", "0"], "--budgets"), (["sweep", "--threads", "0"], "--threads"),
    (["sweep", "--rep-ms", "-5"], "--rep-ms"), (["sweep", "--device", "tpu"], "not a device"),
    (["study", "--device", "cuda:99"], "--device"),
])
def test_bad_arguments(argv, says, capsys):
    """Bad values are argparse's errors (exit status 2, the flag named), not tracebacks later."""
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv, says", [
    ("launches", ["--depth", "-1"], "--depth"), ("launches", ["--steps", "0"], "--steps"),
    ("launches", ["--dropout", "1.5"], "--dropout"), ("kernels", ["--widths", "0"], "--widths"),
    ("kernels", ["--json", "/no/such/folder/x.json"], "no such folder"), ("profile", ["--batch", "0"], "--batch"),
    ("profile", ["--impls", "nonesuch"], "--impls"), ("profile", ["--device", "foo"], "not a device"),
    ("roofline", ["--modes", "foo"], "--modes"), ("roofline", ["--rep-ms", "nan"], "--rep-ms"),
    ("tune", ["--out", "t.json", "--batches", "0"], "--batches"), ("tune", ["--out", ".", "--dry-run"], "a folder"),
    ("sweep", ["--rep-ms", "nan"], "--rep-ms"), ("sweep", ["--budgets", "inf"], "--budgets"),
    ("sweep", ["--budgets", "1e30"], "--budgets"), ("sweep", ["--time-limit", "-1"], "--time-limit"),
    ("sweep", ["--out", "README.md"], "not a folder"), ("study", ["--epochs", "-1"], "--epochs"),
])
def test_bad_arguments_of_every_tool(tool, argv, says, capsys):
    """Every command line refuses bad values up front, as argparse errors (exit status 2): NaN
    and infinity too, and files where folders are due (and the other way round)."""
    import importlib
    main = cli.main if tool in ("sweep", "study") else importlib.import_module(f"bench.{tool}").main
    with pytest.raises(SystemExit) as exit:
        main([tool, *argv] if tool in ("sweep", "study") else argv)
    assert exit.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("module", ["sweep", "report", "study"])
def test_dotted_module_forms(module):
    """`python -m bench.sweep` is `python -m bench sweep` (and so for report and study)."""
    res = subprocess.run([sys.executable, "-m", f"bench.{module}", "--help"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0 and f"usage: python -m bench {module}" in res.stdout, res.stderr[-2000:]


def test_report_without_records(tmp_path, capsys):
    """`python -m bench report` of a path that does not exist, or of a folder without records:
    an error, and the last report stays as it was."""
    output = tmp_path / "REPORT.md"
    output.write_text("the last report")
    assert cli.main(["report", str(tmp_path / "missing"), "--output", str(output)]) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.json").write_text("{not json")
    assert cli.main(["report", str(tmp_path / "empty"), "--output", str(output)]) == 1
    assert output.read_text() == "the last report" and "no records" in capsys.readouterr().out


def test_study_flags(tmp_path):
    """`python -m bench study` with every documented flag."""
    assert cli.main(["study", "--device", "cpu", "--tasks", "teacher", "--depths", "1", "--budget", "2e4",
                     "--epochs", "1", "--seeds", "0", "--teacher-samples", "320", "--linear-depth", "2",
                     "--out", str(tmp_path), *KEEP_THREADS]) == 0
    assert len(list(tmp_path.glob("*_study_*.png"))) == 1


def test_profile(tmp_path, capfd):
    """`python -m bench.profile --budget --depth --batch --dtype --impls eager,compile,dwfast`: kernels
    counted as work done (GEMMs and BatchNorm included), no profiler chatter, a trace each."""
    threads = torch.get_num_threads()
    try:
        assert profile.main(["--device", "cpu", "--budget", "2e4", "--depth", "1", "--batch", "32", "--dtype",
                             "fp32", "--impls", "eager,compile,dwfast", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler_start" not in out + err
    for impl in ("eager", "compile", "dwfast"):
        assert re.search(rf"^{impl}: \d+ kernels per step", out, re.M), out
    eager = out.split("eager:")[1].split("compile:")[0]
    for kernel in ("aten::addmm", "aten::mm", "aten::native_batch_norm", "aten::native_batch_norm_backward"):
        assert kernel in eager
    assert "aten::t " not in eager and "aten::empty" not in eager  # views and allocations are no kernels
    assert len(list(tmp_path.glob("*.trace.json"))) == 3


def test_roofline(tmp_path):
    """`python -m bench.roofline --widths --batch --layers` with --threads, into a new --out."""
    threads = torch.get_num_threads()
    try:
        assert roofline.main(["--device", "cpu", "--widths", "32", "--batch", "32", "--layers", "1",
                              "--modes", "train", "--impls", "eager,compile,dwfast", "--warmup-ms", "1",
                              "--rep-ms", "5", "--threads", "1", "--out", str(tmp_path / "a" / "b")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "a" / "b" / "roofline_train_fp32_b32.png").exists()


def test_pytest_benchmark(tmp_path):
    """`pytest bench --benchmark-only` with `--benchmark-group-by=param:shape` and
    `--benchmark-json=F` (one run for both flags), then `pytest-benchmark compare F`, at tiny sizes."""
    saved = tmp_path / "bench-test.json"
    run = _run(sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--benchmark-group-by=param:shape",
               f"--benchmark-json={saved}", "-k", "train-wide", "--benchmark-min-rounds=1",
               "--benchmark-max-time=0.001", "--benchmark-warmup=off", env=dict(ENV, DWFAST_BENCH_SIZE="tiny"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = [i for i in models.IMPLS if i != "compile-max-autotune" and not models.not_applicable(i, device)]
    assert run.returncode == 0 and f"{len(impls)} passed" in run.stdout, run.stdout + run.stderr
    assert f"benchmark 'shape=train-wide-d1': {len(impls)} tests" in run.stdout
    names = {b["name"] for b in json.loads(saved.read_text())["benchmarks"]}
    assert names == {f"test_step[{i}-train-wide-d1]" for i in impls}
    compare = _run(str(Path(sys.executable).parent / "pytest-benchmark"), "compare", str(saved))
    assert compare.returncode == 0 and "test_step[compile-train-wide-d1]" in compare.stdout


def test_ncu_script(tmp_path):
    """`bench/ncu.sh [bench.profile flags]` with a stand-in `ncu` that runs the profiled command:
    the flags reach ncu and the step it profiles runs."""
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$NCU_ARGS"\n'
                    'while [ $# -gt 0 ] && [[ "$1" != *python* ]]; do shift; done\nexec "$@"\n')
    fake.chmod(0o755)
    env = dict(ENV, PATH=f"{fake.parent}:{os.environ['PATH']}", NCU_ARGS=str(tmp_path / "args"),
               NCU_OUT=str(tmp_path / "ncu"), NCU_SET="basic")
    run = _run("bash", "bench/ncu.sh", "--device", "cpu", "--budget", "2e4", "--depth", "1", "--batch", "32",
               env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:4] == ["--nvtx", "--nvtx-include", "dwfast/", "--set"] and "--nvtx-only" in args
    assert f"wrote {tmp_path}/ncu/dwfast_" in run.stdout and "1 hidden layers" in run.stdout


def test_gpu_kit_dry_run(tmp_path):
    """`bash bench/gpu.sh OUTDIR --dry-run`: every step recorded, CUDA-only tools skipped, the
    tiny sweep and the report made, at most 8 files."""
    run = _run("bash", "bench/gpu.sh", str(tmp_path), "--dry-run", timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"kit.json", "kit.log", "REPORT.md"} <= set(files), files
    steps = {s["name"]: s["status"] for s in json.loads((tmp_path / "kit.json").read_text())["steps"]}
    assert {steps[s] for s in ("tests", "memcheck", "racecheck", "synccheck", "tune", "ncu-wide", "ncu-narrow")} \
        == {"skipped"}
    assert {steps[s] for s in ("chain", "sweep", "ncu-wide-step", "report")} == {"ok"}
    (doc,) = [d for d in records.load([tmp_path]) if d["kind"] == "sweep"]
    assert doc["config"]["impls"] == gpu.SWEEP["impls"].split(",") and doc["config"]["dtypes"] == ["bf16"]
    assert {r["impl"]: r["status"] for r in doc["records"]}["compile-max-autotune"] == "ok"
    text = (tmp_path / "REPORT.md").read_text()
    assert "## GPU kit (dry run on the CPU)" in text and "## Sweep" in text and "![" not in text


def test_gpu_kit_needs_cuda_and_a_new_folder(tmp_path, capsys):
    """`python -m bench gpu OUTDIR` without a GPU fails at once and says how to check the kit;
    a folder with files in it is refused (its records would mix with the kit's)."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "kit.json").write_text("{}")
    assert cli.main(["gpu", str(tmp_path / "old"), "--dry-run"]) == 2
    assert "is not empty" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["gpu", str(tmp_path / "new")]) == 1
    assert "--dry-run" in capsys.readouterr().out


def test_sanitize_chain_on_cpu(capsys):
    """The chain the kit runs under compute-sanitizer matches eager (here on the CPU)."""
    from bench import sanitize_chain
    precision = torch.get_float32_matmul_precision()
    try:
        sanitize_chain.main(["--device", "cpu"])
    finally:
        torch.set_float32_matmul_precision(precision)
    assert "all chains ran" in capsys.readouterr().out


# ---------------------------------------------------------------- what a user meets around them

def test_failure_is_loud(tmp_path, monkeypatch, capsys):
    """An implementation that fails is named with its error on the console, as it happens and at
    the end, and the exit status is 1; the others are still measured."""
    real = models.make_step

    def broken(impl, *args):
        if impl == "compile":
            raise RuntimeError("boom: compile broke")
        return real(impl, *args)
    monkeypatch.setattr(models, "make_step", broken)
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--modes", "infer", "--impls", "eager,compile,dwfast",
                     "--out", str(tmp_path), *KEEP_THREADS]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED compile") >= 2 and "RuntimeError: boom: compile broke" in out
    (doc,) = records.load([tmp_path])
    assert [r["status"] for r in doc["records"]] == ["ok", "failed", "ok"]


def test_exit_status(tmp_path, capsys):
    """`python -m bench sweep`, as a process, exits 1 when a configuration fails (here: a budget
    too small for any model), after saying so; a bad flag exits 2."""
    run = _run(sys.executable, "-m", "bench", "sweep", "--device", "cpu", "--budgets", "10", "--depths", "1",
               "--batches", "8", "--modes", "infer", "--impls", "eager", "--out", str(tmp_path))
    assert run.returncode == 1 and "FAILED eager" in run.stdout, run.stdout + run.stderr
    with pytest.raises(SystemExit) as exit:
        cli.main(["sweep", "--impls", "nonesuch"])
    assert exit.value.code == 2 and "unknown ['nonesuch']" in capsys.readouterr().err


def test_stopped_sweep_keeps_its_records(tmp_path, monkeypatch):
    """The record is on disk from the start and rewritten after each configuration: a sweep
    stopped in its second configuration keeps the first."""
    real, calls = sweep.measure, []

    def stop_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(sweep, "measure", stop_second)
    cfg = sweep.SweepConfig(budgets=[2e4], depths=[1, 2], batches=[32], dtypes=["fp32"], modes=["infer"],
                            impls=["eager", "dwfast"], warmup_ms=1, rep_ms=5)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg, torch.device("cpu"), Console(file=io.StringIO()), tmp_path)
    (doc,) = records.load([tmp_path])
    assert doc["complete"] is False and [r["depth"] for r in doc["records"]] == [1, 1]
    assert "**incomplete**" in "\n".join(report.sweep_section(dict(doc), None))


def test_estimate_and_time_limit(tmp_path, capsys):
    """A sweep says how long it will take before it starts, warns when it is sized for a GPU,
    and skips (and records) what would end past --time-limit."""
    # sized for a GPU: hours on any CPU (the estimate follows the machine's speed, so a sweep
    # near the threshold would pass on one CPU and fail on a faster one)
    big = sweep.SweepConfig(budgets=[1e6, 1e7, 5e7], depths=[1, 8, 64], batches=[1024, 8192, 65536],
                            dtypes=["bf16", "fp32"], modes=["train", "infer"], impls=["eager", "dwfast"])
    assert sum(sweep.estimate(big, torch.device("cpu"))) > 10 * sweep.LONG_CPU_S
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--depths", "1,2", "--impls", "eager", "--time-limit", "0",
                     "--out", str(tmp_path), *KEEP_THREADS]) == 0  # skipped is no failure
    out = capsys.readouterr().out
    assert re.search(r"4 configurations × 1 implementations on .*: about \d+ s", out) and "skipped (time limit)" in out
    (doc,) = records.load([tmp_path])
    assert {r["status"] for r in doc["records"]} == {"skipped"} and doc["complete"]


def _gpu_like_doc():
    """A sweep document as a GPU run with every implementation would write it (large numbers)."""
    recs = []
    for depth, width in ((1, 378787), (64, 125)):
        for impl in models.IMPLS:
            rec = dict(impl=impl, status="ok", mode="train", dtype="bf16", batch=32768, budget=5e7, depth=depth,
                       width=width, median_ms=12.3456, q20_ms=12.1, q80_ms=12.9, samples_per_s=123456789.0,
                       tflops=612.345, peak_fraction=0.62, peak_mem_mb=54321.0, error=None, speedup=None)
            if impl in models.FUSED:
                rec["speedup"] = {b: {"median": 12.345, "q20": 11.0, "q80": 13.5}
                                  for b in models.IMPLS if b not in models.FUSED}
            recs.append(rec)
    return {"env": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"},
            "config": {"impls": list(models.IMPLS), "notes": []}, "records": recs}


def test_tables_fit_80_columns():
    """At 80 columns (a file, a narrow terminal) nothing is cut or wrapped: every header and
    number whole, a ratio next to its spread, a path on one line."""
    console = Console(file=io.StringIO(), width=80)
    sweep.print_table(_gpu_like_doc(), console)
    text = console.file.getvalue()
    assert "…" not in text and "compile-max-autotune" in text and "12.35±1.25" in text and "123M" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    doc = {"env": {"device": "AMD EPYC"}, "config": {"budget": 2e4, "notes": []}, "linear_collapse": [],
           "rows": [dict(task="teacher", depth=16, width=34, n_params=20200, acc_mean=0.985, acc_std=0.004,
                         samples_per_s=3900.0, dead_relu=[0.1] * 16)]}
    console = Console(file=io.StringIO(), width=80)
    study.print_table(doc, console)
    assert "0.985±0.004" in console.file.getvalue() and "…" not in console.file.getvalue()
    console = Console(file=io.StringIO(), width=80)
    long = "/tmp/" + "x" * 90 + "/20261123T120000_sweep_amd-epyc.json"
    cli._say_path(console, "record", long)
    assert console.file.getvalue() == f"record: {long}\n"


def test_generated_files_stay_out_of_git():
    """CPU output is ignored; GPU records, the report and its figures are not."""
    if shutil.which("git") is None or _run("git", "rev-parse").returncode != 0:
        pytest.skip("not a git checkout")
    ignored = ["bench/results/cpu/a_sweep_cpu.json", "bench/results/cpu/REPORT.md", "bench/results/cpu/figures/a.png",
               "bench-abc1234.json", "bench/results/profile_eager.trace.json", "bench/results/a_train.png",
               "bench/results/ncu/dwfast_1.ncu-rep", "bench/results/a_sweep.tmp"]
    kept = ["bench/results/a_sweep_nvidia-h100.json", "bench/REPORT.md", "bench/figures/a_throughput.png"]
    check = _run("git", "check-ignore", "--no-index", *ignored, *kept)
    assert check.stdout.split() == ignored


DOCUMENTED = {  # each documented command (its first words) and the test above that runs it
    "python -m bench": test_bare_bench,  # exactly this; every other key is a prefix
    "python -m bench --help": test_help,
    "python -m bench sweep --help": test_help,
    "python -m bench sweep --budgets": test_sweep_both_dtypes,
    "python -m bench sweep --impls": test_sweep_impls_modes_out,
    "python -m bench sweep --time-limit": test_estimate_and_time_limit,
    "python -m bench report": test_report_defaults,
    "python -m bench study": test_study_flags,
    "python -m bench gpu": test_gpu_kit_dry_run,
    "python -m bench.profile": test_profile,
    "python -m bench.roofline": test_roofline,
    "python -m bench.sanitize_chain": test_sanitize_chain_on_cpu,
    "pytest bench": test_pytest_benchmark,
    "pytest-benchmark compare": test_pytest_benchmark,
    "bash bench/ncu.sh": test_ncu_script,
    "bash bench/gpu.sh": test_gpu_kit_dry_run,
    "python -m bench.launches": None,  # tests/test_launches.py (a process without the interpreter)
    "python -m bench.kernels": None,  # tests/test_compiled.py runs the report
    "python -m bench.tune": None,  # tests/test_tiles.py (its dry run); the kit runs it on a GPU
    "python -m pytest": None,  # CI's own command (.ci/run)
    "DWFAST_TEST_GPU=1 python -m pytest": None,  # GPU only: the kit's first step
    "pip install": None,  # CI's set-up (.ci/run)
}


def _commands(text):
    """Command lines in a README: lines of its code blocks and `inline` code, that start with a
    command word this project documents."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = [re.sub(r"\s+#.*", "", line).strip() for b in blocks for line in b.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", text)
    starts = ("python -m", "pytest", "bash bench/", "pip install", "DWFAST_TEST_GPU")
    return [line for line in lines if line.startswith(starts) and " " in line]  # not a bare name


def test_every_documented_command_has_a_test():
    commands = _commands((ROOT / "README.md").read_text()) + _commands((ROOT / "bench" / "README.md").read_text())
    assert len(commands) > 10
    for command in commands:
        covered = command == "python -m bench" or any(command == key or command.startswith(key + " ")
                                                      for key in DOCUMENTED if key != "python -m bench")
        assert covered, f"no test runs `{command}`"
