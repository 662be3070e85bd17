"""Launches per training step, counted as bench.launches counts them: Triton kernels recorded by
the stand-in sm_90 GPU (bench/standin.py), PyTorch ops that would launch a kernel on a GPU seen
by a TorchDispatchMode. Pins dwfast's two launches per block (one forward, one backward) and no
PyTorch op between its kernels. In a subprocess: the stand-in compiles for real (no interpreter).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

_COUNT = """
import json, sys, torch
import dwfast
from bench.launches import dwfast_step, eager_step, model_and_data

out = {}
for name, depth, batchnorm, dropout, act in [("bn", 3, True, 0.0, None), ("plain", 3, False, 0.0, None),
                                              ("dropout", 2, True, 0.25, None), ("gelu", 2, True, 0.0, "gelu")]:
    fused, eager, x, grad = model_and_data(depth, 48, 96, 20, 5, batchnorm, dropout, torch.float32)
    if act:
        for m in (fused, eager):
            for i, child in enumerate(m):
                if isinstance(child, torch.nn.ReLU):
                    m[i] = torch.nn.GELU()
    dw, ea = dwfast_step(fused, x, grad), eager_step(eager, x, grad)
    with torch.no_grad():
        fused.eval()
        infer = dwfast_step(fused, x, None)
    out[name] = dict(blocks=depth + 1, triton=dict(dw.triton), torch=dict(dw.torch), eager=sum(ea.torch.values()),
                     infer_triton=sum(infer.triton.values()), infer_torch=dict(infer.torch))
# the whole-net path (narrow, no BatchNorm in training; eval BatchNorm folded): a fixed count
dwfast.set_whole_net("auto")
for name, batchnorm in (("whole", False), ("whole_eval_bn", True)):
    fused, eager, x, grad = model_and_data(6, 38, 96, 20, 5, batchnorm, 0.0, torch.float32)
    if batchnorm:
        fused.eval()
    dw = dwfast_step(fused, x, None if batchnorm else grad)
    out[name] = dict(triton=dict(dw.triton), torch=dict(dw.torch))
json.dump(out, sys.stdout)
"""


def _counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DWFAST_WHOLE_NET"] = "never"  # the per-layer path: the whole-net path is one launch each way
    res = subprocess.run([sys.executable, "-c", _COUNT], env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_two_launches_per_block_and_no_pytorch_ops():
    """Per-layer path: two launches per block, one in eval; whole-net path: four per step, two
    in eval, whatever the depth; no PyTorch op in either."""
    counts = _counts()
    # the whole-net path: pack and forward; in training also backward and the gradients' sums
    whole = {"_pack_kernel": 1, "_mlp_fwd_kernel": 1, "_mlp_bwd_kernel": 1, "_unpack_kernel": 1}
    assert counts.pop("whole") == {"triton": whole, "torch": {}}
    assert counts.pop("whole_eval_bn") == {"triton": {"_pack_kernel": 1, "_mlp_fwd_kernel": 1}, "torch": {}}
    for name, c in counts.items():
        blocks = c["blocks"]
        # one forward GEMM and one backward launch (dX and dW) per block, nothing else
        assert c["triton"] == {"_linear_fwd_kernel": blocks, "_linear_bwd_kernel": blocks}, name
        # dropout draws its seeds on the device: one randint per Dropout; nothing else
        dropouts = blocks - 1 if name == "dropout" else 0
        assert c["torch"] == ({"randint": dropouts} if dropouts else {}), name
        assert c["eager"] >= 6 * (blocks - 1), name  # eager's own count, for the record
        # eval: one launch per block, no PyTorch op
        assert c["infer_triton"] == blocks and c["infer_torch"] == {}, name


def test_command_line():
    """`python -m bench.launches` (and `python -m bench.profile --launches`, which calls it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.launches", "--depth", "2", "--width", "32", "--batch", "64",
                          "--in-features", "16", "--out-features", "4", "--dtype", "fp32", "--steps", "3"],
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "dwfast: 6 launches per step, 2.00 per block (6 Triton kernels, 0 PyTorch ops)" in out, out
    assert "eager: " in out and "host time" in out, out
    assert re.search(r"autograd's engine handing 10 parameters their gradients: \d+ us", out), out
    assert re.search(r"of it, the 6 launches themselves \(their plans' calls\): \d+ us per step, [0-9.]+ us per launch "
                     r"\(median per plan: LinearFwd [0-9.]+, LinearBwd [0-9.]+ us\)", out), out


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (on every machine this project runs on)")
def test_instruction_counts():
    """`python -m bench.launches --instructions`: both steps counted under callgrind."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.launches", "--depth", "1", "--width", "32", "--batch", "64",
                          "--in-features", "16", "--out-features", "4", "--dtype", "fp32", "--steps", "2",
                          "--instructions"], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    found = re.search(r"instructions per step \(callgrind\): dwfast ([0-9.]+) M, eager ([0-9.]+) M", res.stdout)
    assert found and float(found[1]) > 0 and float(found[2]) > 0, res.stdout
