"""The tile table (kernels/tiles.py) and its tuner (bench/tune.py), without a GPU: the tuner's dry
run writes a table that the launchers read back, and an entry of the table is what a launch
compiles. In subprocesses: the stand-in driver compiles for real (no interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

_LAUNCH = """
import json, sys, torch
from bench.standin import standin_gpu
from dwfast import kernels as K
from dwfast.kernels import tiles

def launch():
    # fp32: a forward 256 -> 252 and a first block's backward without input gradient (dW only)
    with standin_gpu(record_args=True) as drv:
        x, w = torch.randn(4096, 256), torch.randn(252, 256)
        K.linear_fwd(x, w)
        K.linear_bwd(torch.randn(4096, 252), torch.randn(4096, 252), w, K.NO_NORM, x, input_grad=False)
    out = []
    for l in drv.launches:
        names = l.src.fn.arg_names
        values = {names[k[0]]: getattr(v, "value", v) for k, v in l.src.constants.items()}
        values.update((n, a) for n, a in zip(names, l.args) if isinstance(a, int))
        out.append(dict(values, num_warps=l.metadata.num_warps, num_stages=l.metadata.num_stages))
    return out

table = json.loads(sys.argv[1])
out = {"heuristic": launch()}
with tiles.using(table):
    out["table"] = launch()
out["shipped"] = tiles.lookup("fwd", 4096, 252, 256, torch.float32, torch.device("cpu"))
print(json.dumps(out, default=str))
"""


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args, **kw):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
                         **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_dry_run_writes_the_heuristics_table(tmp_path):
    """`python -m bench.tune --out FILE --dry-run`: every GEMM of every shape class of the given
    sweep, for an H100, as the launchers would choose it, untimed."""
    out = tmp_path / "tiles.json"
    text = _run(["-m", "bench.tune", "--out", str(out), "--dry-run", "--batches", "4096", "--budgets", "1e6",
                 "--depths", "1,8"])
    doc = json.loads(out.read_text())
    assert doc["version"] == 1 and doc["timed"] is False and "untimed" in text
    table = doc["gpus"]["NVIDIA H100 80GB HBM3"]["bf16"]
    # MLP(128, [W], 1) and MLP(128, [W'] * 8, 1): first, hidden (depth 8) and last layers
    gemms = {key.split()[0] for key in table}
    assert gemms == {"fwd", "dx", "dw"} and len(table) == 3 * 5
    assert all(len(c) == (6 if key.startswith("dw") else 5) for key, c in table.items())
    # W = 367 at depth 8: 32 x 3 tiles of 128 x 128 would leave SMs idle, 32 x 6 of 128 x 64 do not
    assert table["fwd 4096x512x512"][:2] == [128, 64]
    assert table["dw 16x512x4096"][0] == 64  # the head's dW [1, 367]: no 128-row tiles


def test_table_entry_is_what_compiles():
    """A table entry replaces the heuristic's configuration for its shape class and GPU: the
    forward's tiles, warps and stages, and the dW's tiles and batch chunks."""
    table = {"NVIDIA H100 80GB HBM3": {"fp32": {"fwd 4096x256x256": [128, 64, 32, 8, 4],
                                                "dw 256x256x4096": [64, 32, 32, 4, 2, 4]}}}
    out = json.loads(_run(["-c", _LAUNCH, json.dumps(table)]))
    assert out["shipped"] is None  # outside `using`, the shipped table (empty until a GPU run)
    (fwd, bwd), (h_fwd, h_bwd) = out["table"], out["heuristic"]
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    assert [fwd[k] for k in keys] == [128, 64, 32, 8, 4] != [h_fwd[k] for k in keys]
    got = [bwd[k] for k in ("DW_BLOCK_M", "DW_BLOCK_N", "DW_BLOCK_K", "num_warps", "num_stages", "ROWS_PER_SPLIT")]
    assert got == [64, 32, 32, 4, 2, 4096 // 4]
    assert bwd["DW_PROGRAMS"] == 4 * 8 * 4 != h_bwd["DW_PROGRAMS"]  # 4 x 8 tiles of 252 x 256, 4 chunks
