"""Device launches per training step, and dwfast's host time per step, on any machine.

    python -m bench.launches [--depth 8 --width 256 --batch 4096 --dtype bf16 --no-batchnorm ...]

A training step here is a model's forward and backward (`model(x).backward(grad)`) after its
gradients are set to None as optimizer.zero_grad() sets them; the loss and the rest of the
optimizer aside (they cost every implementation the same). Two counts per step:
- Triton kernels: dwfast's, recorded by the stand-in GPU (bench/standin.py) while the step runs
  down the kernel path: each launch compiled for sm_90 as a real launch is, then dropped.
- PyTorch ops that launch a kernel on a GPU: every ATen op the step runs, autograd's own
  included (zeros for gradients, sums, casts) and those inside dwfast's custom ops, recorded by
  torch.profiler and counted as `bench.profile` counts CPU kernels: the outermost op that does
  work of its own (allocations, views and composites of other ops launch nothing). Eager
  PyTorch runs for real on the CPU, where it runs the ops it would on a GPU (most launch one
  kernel each; a few, like BatchNorm's backward, launch more, so eager's count is a lower
  bound).
Host time: dwfast's step under the stand-in, where a launch costs its Python and Triton work up
to the driver call (a real launch adds the driver's own few microseconds), as the CPU time of
the thread (median of steps), which other load on the machine disturbs less than wall time;
of it, the launches themselves (each plan's call, timed again with the step's arguments:
launch_us), the rest being the chain's checks and autograd around them.
Beside it, eager's step run for real on the CPU at 2 rows in fp32 (the CPU's 16-bit matmuls
are slow) on one thread: its ops' dispatch and a little arithmetic, about what eager's host
spends per step on a GPU (less the driver calls). On a GPU a narrow-deep step takes the longer
of its host time and its GPU time, so fusing must not cost the host more than eager does.
With `--instructions`, both steps also run under `valgrind --tool=callgrind` (collection
switched on around the steps only), which counts the instructions a step executes:
repeatable to a fraction of a percent where CPU times on a shared machine move by tens of
percent. With `--reference` too, the same counts for eager's and dwfast's training step and eval
forward run for real on the CPU at `--batch` in fp32, where dwfast's `auto` backend runs its
pure-PyTorch reference path: the ATen ops are eager's, so the counts differ by the Python
around them, which fusing must not add to. These are counts and host times, not GPU timings.

Runs in a process without Triton's interpreter (``TRITON_INTERPRET`` unset).
"""
import argparse
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

import dwfast
from bench import at_least
from bench.profile import cpu_kernel, quiet_profiler
from bench.standin import standin_gpu


def _torch_ops(fn) -> Counter:
    """The ATen ops that `fn()` runs which would launch a kernel on a GPU, by name."""
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name.split("::")[-1] for e in prof.events() if cpu_kernel(e))


class Step(NamedTuple):
    """One training step's launches: Triton kernels and PyTorch ops, by name."""
    triton: Counter
    torch: Counter

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.torch.values())


_PARAMS = weakref.WeakKeyDictionary()  # per model, its parameters


def _step(model, x, grad):
    """Forward and backward (gradients set to None first, as optimizer.zero_grad() does: over a
    list of parameters, not model.zero_grad()'s walk of the modules), or with `grad` None a
    forward under no_grad."""
    if grad is None:
        with torch.no_grad():
            model(x)
        return
    params = _PARAMS.get(model)
    if params is None:
        params = _PARAMS[model] = list(model.parameters())
    for p in params:
        p.grad = None
    model(x).backward(grad)


def eager_step(model, x, grad) -> Step:
    """The launches of one eager training step of `model` (run for real, on x's device); with
    `grad` None, of a no-grad forward."""
    _step(model, x, grad)  # warm-up
    return Step(Counter(), _torch_ops(lambda: _step(model, x, grad)))


def dwfast_step(model, x, grad) -> Step:
    """The launches of one dwfast training step of `model` on the stand-in GPU (CPU tensors);
    with `grad` None, of a no-grad forward."""
    with standin_gpu() as gpu:
        _step(model, x, grad)  # warm-up: compiles every kernel
        del gpu.launches[:]
        ops = _torch_ops(lambda: _step(model, x, grad))
        return Step(Counter(launch.name for launch in gpu.launches), ops)


@contextlib.contextmanager
def _host(standin: bool):
    """Steps on the stand-in GPU, or run for real on one CPU thread, as eager's ops run from one
    on a GPU (idle worker threads would be counted too)."""
    if standin:
        with standin_gpu():
            yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def host_us(model, x, grad, steps: int = 20, standin: bool = True) -> float:
    """Median host microseconds of one training step of `model`: dwfast's on the stand-in GPU,
    or with `standin` False run for real on x's device."""
    times = []
    with _host(standin):
        for _ in range(steps + 2):
            t0 = time.thread_time()  # this thread's CPU time: what the host spends, whatever else runs
            _step(model, x, grad)
            times.append(time.thread_time() - t0)
    return sorted(times[2:])[len(times[2:]) // 2] * 1e6


def launch_us(model, x, grad, samples: int = 15, calls: int = 50) -> dict:
    """Host microseconds of each launch itself in a training step of `model` on the stand-in GPU:
    the call of its launcher's plan (kernels/fused_linear.py, "plans": the output's allocation,
    the argument tuple, the compiled kernel's handle), per plan class (LinearFwd, LinearBwd, ...)
    the median over the step's launches of each launch's median over `samples` of `calls` calls,
    with the same arguments as in the step (nothing runs on the stand-in; what is allocated is
    dropped). The rest of a step's host time is the chain's checks and autograd around them."""
    from dwfast import kernels as K
    plans = (K.LinearFwd, K.LinearBwd, K.ActFwd, K.ActBwd)
    seen, originals = [], {cls: cls.__call__ for cls in plans}

    def spy(cls):
        def call(self, *args, **kwargs):
            seen.append((cls.__name__, self, args, kwargs))
            return originals[cls](self, *args, **kwargs)
        return call
    per_kind = {}
    with standin_gpu():
        _step(model, x, grad)  # (compiles)
        try:
            for cls in plans:
                cls.__call__ = spy(cls)
            _step(model, x, grad)
        finally:
            for cls, original in originals.items():
                cls.__call__ = original
        for name, plan, args, kwargs in seen:
            times = []
            for _ in range(samples):
                t0 = time.thread_time()
                for _ in range(calls):
                    plan(*args, **kwargs)
                times.append((time.thread_time() - t0) / calls)
            per_kind.setdefault(name, []).append(sorted(times)[samples // 2] * 1e6)
    return {name: sorted(us)[len(us) // 2] for name, us in per_kind.items()} | {
        "per step": sum(us for all_us in per_kind.values() for us in all_us),
        "launches": sum(map(len, per_kind.values()))}


class _Passthrough(torch.autograd.Function):
    """x, and in the backward ready-made gradients for every parameter: what autograd's engine
    costs a step for its parameters alone (engine_us)."""

    @staticmethod
    def forward(ctx, grads: list, x, *params):
        ctx.grads = grads
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        # handed over with no other reference, as a real backward's new gradients are: the
        # engine's AccumulateGrad then takes each as the parameter's .grad (a copy otherwise)
        grads, ctx.grads[:] = tuple(ctx.grads), []
        return (None, grad, *grads)


def _engine_step(params, x):
    """A backward that only hands `params` new gradients (set to None first), ready to run."""
    for p in params:
        p.grad = None
    out = _Passthrough.apply([torch.empty_like(p) for p in params], x, *params)
    return lambda: out.backward(torch.ones(1))


def engine_us(model, steps: int = 20) -> float:
    """Median host microseconds autograd's engine takes to hand a backward's gradients to
    `model`'s parameters (one AccumulateGrad node each), with nothing else computed: a part of
    any implementation's step."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, times = torch.zeros(1, requires_grad=True), []
    for _ in range(steps + 2):
        backward = _engine_step(params, x)
        t0 = time.thread_time()
        backward()
        times.append(time.thread_time() - t0)
    return sorted(times[2:])[len(times[2:]) // 2] * 1e6


def _collect(state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True)


def _counted_steps(model, x, grad, steps: int, standin: bool) -> None:
    """`steps` training steps with callgrind's collection on, after three without (warm-up and,
    on the stand-in, compiles); this process runs under valgrind --tool=callgrind
    --instr-atstart=no (instructions_per_step). With `x` None, the engine's backwards alone
    (engine_us), collection on around each."""
    if x is None:
        params, x = [p for p in model.parameters() if p.requires_grad], torch.zeros(1, requires_grad=True)
        for i in range(steps + 3):
            backward = _engine_step(params, x)
            if i >= 3:
                _collect("on")
            backward()
            if i >= 3:
                _collect("off")
        return
    with _host(standin):
        for _ in range(3):
            _step(model, x, grad)
        _collect("on")
        for _ in range(steps):
            _step(model, x, grad)
        _collect("off")


def instructions_per_step(argv, which: str, steps: int) -> float:
    """Instructions one training step of `which` ("dwfast" on the stand-in GPU, "eager" at 2
    rows in fp32, "engine" the engine's share of either, engine_us) executes, counted by
    callgrind in a child process run with `argv`."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian/Ubuntu: apt install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                        sys.executable, "-m", "bench.launches", *argv, "--count-in-child", which],
                       check=True, capture_output=True)
        with open(out) as f:
            totals = next(line for line in f if line.startswith("totals:"))
    return int(totals.split()[1]) / steps


# --reference's counts: (implementation)-(mode), run for real on the CPU
REFERENCE_COUNTS = ("dwfast-train", "eager-train", "dwfast-infer", "eager-infer")


def model_and_data(depth, width, batch, in_features, out_features, batchnorm, dropout, dtype):
    """A dwfast.MLP of `depth` hidden blocks of `width`, an unfused copy, an input and a grad."""
    torch.manual_seed(0)
    fused = dwfast.MLP(in_features, [width] * depth, out_features, batchnorm=batchnorm, dropout=dropout).to(dtype)
    eager = dwfast.unfuse(copy.deepcopy(fused))
    x = torch.randn(batch, in_features, dtype=dtype)
    grad = torch.randn(batch, out_features, dtype=dtype)
    return fused, eager, x, grad


def _table(title, step: Step, blocks: int):
    lines = [f"{title}: {step.total} launches per step, {step.total / blocks:.2f} per block "
             f"({sum(step.triton.values())} Triton kernels, {sum(step.torch.values())} PyTorch ops)"]
    for kind, counts in (("triton", step.triton), ("torch", step.torch)):
        for name, n in counts.most_common():
            lines.append(f"  {kind:6s} {n:4d}  {name}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=at_least(0), default=8, help="hidden Linear-BatchNorm-ReLU blocks (default 8)")
    p.add_argument("--width", type=at_least(1), default=256)
    p.add_argument("--batch", type=at_least(2), default=4096, help="dwfast's batch (eager runs 64 rows: same launches)")
    p.add_argument("--in-features", type=at_least(1), default=128)
    p.add_argument("--out-features", type=at_least(1), default=16)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    p.add_argument("--no-batchnorm", action="store_true")
    p.add_argument("--dropout", type=at_least(0.0, float, below=1.0), default=0.0)
    p.add_argument("--steps", type=at_least(1), default=20, help="steps timed for host time (median)")
    p.add_argument("--instructions", action="store_true",
                   help="also count the instructions per step under valgrind's callgrind (repeatable)")
    p.add_argument("--reference", action="store_true",
                   help="with --instructions: also count, at --batch in fp32 and run for real on the CPU, eager's and "
                        "dwfast's training steps and eval forwards there (dwfast's pure-PyTorch reference path, what "
                        "`auto` runs on the CPU: fusing must cost it nothing)")
    p.add_argument("--count-in-child", choices=["dwfast", "eager", "engine", *REFERENCE_COUNTS], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    spec = (args.depth, args.width, args.batch, args.in_features, args.out_features, not args.no_batchnorm,
            args.dropout, dtype)
    fused, unfused, x, grad = model_and_data(*spec)
    eager = model_and_data(*spec[:2], 64, *spec[3:])[1]
    host_eager = copy.deepcopy(eager).float(), x[:2].float(), grad[:2].float()  # eager's host time: 2 rows, fp32
    if args.count_in_child in REFERENCE_COUNTS:
        which, mode = args.count_in_child.split("-")
        model = (fused if which == "dwfast" else unfused).float().train(mode == "train")
        _counted_steps(model, x.float(), grad.float() if mode == "train" else None, args.steps, standin=False)
        return
    if args.count_in_child:
        model, x, grad = {"dwfast": (fused, x, grad), "eager": host_eager, "engine": (fused, None, None)}[
            args.count_in_child]
        _counted_steps(model, x, grad, args.steps, standin=args.count_in_child == "dwfast")
        return
    blocks = args.depth + 1
    print(f"MLP {args.in_features} -> {args.depth} x {args.width} -> {args.out_features}, "
          f"{'BatchNorm, ' if not args.no_batchnorm else ''}ReLU{f', dropout {args.dropout}' if args.dropout else ''}"
          f", batch {args.batch}, {args.dtype}: {blocks} Linear blocks. One training step (forward + backward), "
          "counted on the CPU (no GPU timings).")
    print(_table("eager", eager_step(eager, x[:64].float().to(dtype), grad[:64]), blocks))
    dw = dwfast_step(fused, x, grad)
    print(_table("dwfast", dw, blocks))
    us = dw_us = host_us(fused, x, grad, args.steps)
    print(f"dwfast host time: {us:.0f} us per step, {us / max(dw.total, 1):.1f} us per launch "
          "(stand-in GPU: Python and Triton work up to the driver call)")
    calls = launch_us(fused, x, grad)
    kinds = ", ".join(f"{name} {us:.1f}" for name, us in calls.items() if name not in ("per step", "launches"))
    n = calls["launches"]
    print(f"of it, the {n} launches themselves (their plans' calls): {calls['per step']:.0f} us per step, "
          f"{calls['per step'] / max(n, 1):.1f} us per launch (median per plan: {kinds} us)")
    us = host_us(*host_eager, args.steps, standin=False)
    print(f"eager host time: {us:.0f} us per step (run on the CPU at 2 rows, fp32: dispatch and a little arithmetic)")
    n_params = sum(1 for _ in fused.parameters())
    engine = engine_us(fused, args.steps)
    print(f"of either, autograd's engine handing {n_params} parameters their gradients: {engine:.0f}"
          " us (behind a node that computes nothing)")
    print(f"dwfast's host time less that share: {dw_us - engine:.0f} us per step, "
          f"{(dw_us - engine) / max(dw.total, 1):.1f} us per launch")
    if args.instructions:
        child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--instructions"]
        counts = {which: instructions_per_step(child, which, args.steps) for which in ("dwfast", "eager", "engine")}
        own = counts["dwfast"] - counts["engine"]
        print(f"instructions per step (callgrind): dwfast {counts['dwfast'] / 1e6:.2f} M, "
              f"eager {counts['eager'] / 1e6:.2f} M; of either, the engine's share {counts['engine'] / 1e6:.2f} M; "
              f"dwfast less that share {own / 1e6:.2f} M, {own / max(dw.total, 1) / 1e3:.0f} K per launch")
        if args.reference:
            counts = {which: instructions_per_step(child, which, args.steps) for which in REFERENCE_COUNTS}
            for mode in ("train", "infer"):
                d, e = counts[f"dwfast-{mode}"], counts[f"eager-{mode}"]
                print(f"CPU reference path, batch {args.batch} fp32, {mode}: dwfast {d / 1e6:.2f} M instructions per "
                      f"step, eager {e / 1e6:.2f} M (eager / dwfast {e / d:.3f})")


if __name__ == "__main__":
    main()
