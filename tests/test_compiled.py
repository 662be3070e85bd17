"""Every kernel as real launches compile it for sm_90, without a GPU.

The interpreter the other tests use misses compiled-only errors (a loop-carried name changing
type, shared memory over the limit, an unsupported cast) and says nothing of registers or
instructions. Here ``python -m bench.kernels`` (bench/kernels.py) runs dwfast's training step,
eval forward and whole-net path under a stand-in sm_90 driver, so the launchers' own tiles and
Triton's argument specialisation are compiled with Triton's bundled ptxas, then reads each
compiled kernel back. In a subprocess: the tests set TRITON_INTERPRET=1, which compiles nothing.

EXPECT says what must hold, per (run, kernel); a property for later is one more line. Those
marked ``later`` fail today: they run as strict xfails, so the report keeps seeing the problem
and the day it is fixed the line turns red until ``later`` is dropped.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SM90_SMEM = 232448  # bytes of shared memory a CTA may use on an H100
SM90_SMS = 132

# Representative cases, (name, dtypes, mode, features, hidden widths, outputs), B = 4096: the
# per-layer training step at a width that is a multiple of 8 in every dtype and at one that is
# not, the eval forward (BatchNorm folded) and the whole-net path (no BatchNorm, widths <= 128; a
# 10-wide head, so its backward's partials are not a multiple of 16 elements per program);
# a one-output head and an 8-feature input, whose forward and input gradient are GEMMs too
# narrow for 64-row tiles to fill the SMs; fp32 layers so wide that their weights' TF32 splits
# do not fit behind z (2 x 2600 rows > B), so the launch before each GEMM splits them apart.
# The unaligned case pads the hidden layers only: the chain's input and its output's gradient
# are the user's tensors, read as they are laid out (the sweep's have 128 features).
CASES = [
    ("aligned", ("fp16", "bf16", "fp32"), "train", 256, (256, 256), 256),
    ("unaligned", ("bf16",), "train", 128, (252, 252), 128),
    ("narrow", ("bf16", "fp32"), "train", 8, (252,), 1),
    ("eval", ("bf16", "fp32"), "infer", 256, (256,), 256),
    ("whole", ("bf16", "fp32"), "whole", 64, (64,), 10),
    ("apart", ("fp32",), "train", 128, (2600, 2600), 128),
]
_REPORT = """
import json, sys
from bench import kernels
cases = [kernels.Case(90, dtype, mode, 4096, features, tuple(widths), outputs)
         for dtype, mode, features, widths, outputs in json.loads(sys.argv[1])]
print(json.dumps([kernels.run(case) for case in cases]))
"""


def _has_dot(row):
    return bool(row["mma"])


def fits_shared_memory(row):
    return row["shared"] <= SM90_SMEM


def wgmma(row):
    return not _has_dot(row) or row["mma"] == ["wgmma"]


def tensor_cores(row):
    return not _has_dot(row) or "fma" not in row["mma"]


def no_spills(row):
    return row["spill_stores"] == row["spill_loads"] == 0


def vector_loads(row):
    """Every global load of the main loop moves 16 bytes (or is TMA). In a 16-bit kernel a
    4-byte cp.async can only be an fp32 per-feature vector (BatchNorm's, for the transform a
    k-step applies): 64 values for 128 or 256 threads, which no layout loads 16 bytes at a
    time (aligned widths load them so too); the operand tiles are what must not narrow."""
    sixteen_bit = row["mma_instr"] and all(i.endswith(("BF16", ".F16")) for i in row["mma_instr"])
    return all(k == "tma" or k.endswith(" 16") or (sixteen_bit and k == "cp 4") for k in row["loads"])


def no_narrow_loads(row):
    """No global load of the main loop moves fewer than 8 bytes. For the whole-net backward,
    whose per-row-tile read-modify-writes of its fp32 partial slots are plain loads: its tiles
    load 16 bytes, and its per-feature vectors (db) 8, two per thread in the MMA's layout."""
    return all(k == "tma" or int(k.split()[1]) >= 8 for k in row["loads"])


def overlapped(row):
    return not _has_dot(row) or row["overlap"]


def overlapped_but_first_forward(row):
    """Overlapped, but for the first block's forward, which reads the user's input and first
    weight as stored: in fp32 nothing has split the weight ahead of time."""
    first = row["kernel"] == "linear_fwd" and row["flags"]["IN_MODE"] == 0 and row["flags"]["W_COPY"] == 0
    return first or overlapped(row)


def full_wave(row):
    return not _has_dot(row) or row["ctas"] >= SM90_SMS


# (case, dtypes or None for all, kernel-name substring, property, later). The backward kernel
# is a row per role: linear_dx, linear_dw, linear_dwn (the next block's dW, deferred).
EXPECT = [
    ("aligned", None, "", fits_shared_memory, False),
    ("unaligned", None, "", fits_shared_memory, False),
    ("eval", None, "", fits_shared_memory, False),
    ("whole", None, "", fits_shared_memory, False),
    ("narrow", None, "", fits_shared_memory, False),
    ("apart", None, "", fits_shared_memory, False),
    ("aligned", ("fp16", "bf16"), "", wgmma, False),
    ("eval", ("bf16",), "", wgmma, False),
    ("unaligned", None, "", wgmma, False),
    ("aligned", ("fp16", "bf16"), "linear_", overlapped, False),
    ("aligned", None, "", no_spills, False),
    ("unaligned", None, "", no_spills, False),
    ("eval", None, "", no_spills, False),
    ("whole", None, "", no_spills, False),
    ("narrow", None, "", no_spills, False),
    ("apart", None, "", no_spills, False),
    ("unaligned", None, "linear_", vector_loads, False),
    ("whole", None, "mlp_bwd", no_narrow_loads, False),
    ("unaligned", None, "linear_", overlapped, False),
    ("aligned", ("fp32",), "", tensor_cores, False),
    ("eval", ("fp32",), "", tensor_cores, False),
    ("whole", None, "", tensor_cores, False),
    ("narrow", None, "", tensor_cores, False),
    ("apart", None, "", tensor_cores, False),
    ("apart", None, "linear_", full_wave, False),
    ("aligned", None, "linear_", full_wave, False),
    ("unaligned", None, "linear_", full_wave, False),
    # fewer rows than a wgmma's 64 where that is what fills the SMs (mma.sync)
    ("narrow", None, "linear_", full_wave, False),
    ("whole", None, "", full_wave, False),
    # 3xTF32 where B is not split in memory ahead of time (the first block's forward, which reads
    # the user's first weight): Triton's "tf32x3" splits B in registers and stores it to shared
    # memory inside the loop, so it waits for each MMA. The other forwards and every dX read
    # the weight's split, the deferred dWs g_z's (with or without BatchNorm), the first block's
    # dW x's (which the launch before writes) (_gemm_core's SPLIT_B), and overlap: the next entries.
    ("aligned", ("fp32",), "linear_", overlapped, True),
    ("aligned", ("fp32",), "linear_", overlapped_but_first_forward, False),
    ("apart", None, "linear_", overlapped_but_first_forward, False),
    ("aligned", ("fp32",), "linear_dx", overlapped, False),
    ("aligned", ("fp32",), "linear_dwn", overlapped, False),
]


@pytest.fixture(scope="module")
def reports():
    """{case name: the report's results, one per dtype}, compiled in one subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = [(dtype, mode, features, widths, outputs) for _, dtypes, mode, features, widths, outputs in CASES
             for dtype in dtypes]
    res = subprocess.run([sys.executable, "-c", _REPORT, json.dumps(specs)], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=900)
    if "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0, res.stderr[-3000:]
    results = iter(json.loads(res.stdout))
    return {name: [next(results) for _ in dtypes] for name, dtypes, *_ in CASES}


def test_every_case_compiles(reports):
    """Every case ran its steps to the end (any compile error is reported per case) and
    launched kernels, all compiled for sm_90; the whole-net run launched kernels of its own."""
    for run, cases in reports.items():
        for case in cases:
            assert case["error"] is None and case["kernels"], (run, case["mode"], case["dtype"], case["error"])
            assert {r["arch"] for r in case["kernels"]} == {90}
    per_layer = {r["kernel"] for c in reports["aligned"] + reports["eval"] for r in c["kernels"]}
    assert {r["kernel"] for c in reports["whole"] for r in c["kernels"]} - per_layer


@pytest.mark.parametrize("run, dtypes, kernel, prop", [
    pytest.param(run, dtypes, kernel, prop, id=f"{run}-{'-'.join(dtypes or ['all'])}-{kernel or 'all'}-{prop.__name__}",
                 marks=pytest.mark.xfail(strict=True, reason="not yet: see the line's comment") if later else ())
    for run, dtypes, kernel, prop, later in EXPECT])
def test_property(reports, run, dtypes, kernel, prop):
    """`prop` holds for every kernel of case `run` whose name contains `kernel`."""
    rows = [(c["dtype"], c["mode"], r) for c in reports[run] if dtypes is None or c["dtype"] in dtypes
            for r in c["kernels"] if kernel in r["kernel"]]
    assert rows
    failing = [(dt, mode, r["label"]) for dt, mode, r in rows if not prop(r)]
    assert not failing, f"{prop.__name__} fails for {failing}"
