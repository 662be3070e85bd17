"""Autocast: a fused fp32 model under `torch.autocast` behaves as eager does under it.

Eager's autocast runs F.linear in the low dtype and BatchNorm1d with the low-dtype input
and its fp32 parameters and running statistics (statistics in fp32, output low), so the
fused model's outputs are low, its gradients and buffers fp32. Values follow the three-way
rule against an fp64 model: within twice eager-under-autocast's own error plus an atol.
"""
import copy

import pytest
import torch

import dwfast
from conftest import requires_cuda
from test_compile import small_model
from test_kernels import assert_three_way


def _step(model, x, grad, device, dtype, call=None):
    """Output, parameter gradients and buffers after a forward under autocast (`call`, or
    `model` itself, runs it) and a backward."""
    model.zero_grad()
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = (call or model)(x)
    if model.training:
        out.backward(grad.to(out.dtype))
    return {"out": out.detach(), **{f"{n}.grad": p.grad for n, p in model.named_parameters() if model.training},
            **{n: b.clone() for n, b in model.named_buffers()}}


def _check_autocast(device, dtype, compiler=None):
    """Two training steps and an eval step, fused and eager under autocast, fp64 eager plain."""
    eager = small_model().to(device)
    ref = copy.deepcopy(eager).double()
    fused = dwfast.fuse(copy.deepcopy(eager))
    run = fused if compiler is None else torch.compile(fused, fullgraph=True, backend=compiler)
    for training in (True, True, False):
        for m in (fused, eager, ref):
            m.train(training)
        x, grad = torch.randn(40, 6, device=device), torch.randn(40, 3, device=device)
        got, same = _step(fused, x, grad, device, dtype, run), _step(eager, x, grad, device, dtype)
        want = _step(ref, x.double(), grad.double(), device, None)
        assert_three_way(got, same, want, dtype)
    assert got["out"].dtype == dtype
    return run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_eager(backend, dtype):
    _check_autocast("cpu", dtype)


def test_autocast_compiled(backend):
    torch._dynamo.reset()
    run = _check_autocast("cpu", torch.bfloat16, compiler="aot_eager")
    assert run(torch.randn(40, 6)).dtype == torch.float32  # autocast's state is part of the guards


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_eager_cuda(dtype):
    _check_autocast("cuda", dtype)


def test_outside_autocast_nothing_changes(backend):
    """After an autocast step, plain fp32 runs in fp32, and a bf16 input to an fp32 model
    raises as eager does."""
    eager = small_model()
    fused = dwfast.fuse(copy.deepcopy(eager))
    x = torch.randn(40, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
        eager(x)
    out, want = fused(x), eager(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    for model in (eager, fused):
        with pytest.raises(RuntimeError, match="dtype"):
            model(x.bfloat16())
