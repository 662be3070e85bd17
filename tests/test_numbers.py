"""Numbers that can't silently go wrong: NaN and Inf propagate exactly where eager's do, and
(on a GPU) a batch of more than 2^31 elements indexes correctly."""
import copy
import math

import pytest
import torch
from torch import nn

import dwfast
from conftest import requires_cuda
from test_compile import small_model

def _results(model, x, grad):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return {"out": out, "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in model.named_parameters()},
            **dict(model.named_buffers())}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("bn,training", [(True, True), (True, False), (False, True)],
                         ids=["batch_stats", "running_stats", "no_bn"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_propagates_as_in_eager(backend, bn, training, value):
    eager = small_model(bn=bn).train(training)
    fused = dwfast.fuse(copy.deepcopy(eager))
    x, grad = torch.randn(40, 6), torch.randn(40, 3)
    x[3, 2] = value
    x[17, 0] = value
    got, want = _results(fused, x, grad), _results(eager, x, grad)
    for key, e in want.items():
        # NaN where eager has NaN, the same infinities, the finite values close
        torch.testing.assert_close(got[key], e, equal_nan=True, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@requires_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batch_over_2_31_elements(training):
    """2^22 + 3 rows x 520 features in bf16 (> 2^31 elements per activation): rows at both ends
    and around the 2^31st element against eager. In eval each row is checked on its own slice;
    in training against eager on the whole batch, input gradient included."""
    rows, width = 2 ** 22 + 3, 520
    eager = nn.Sequential(nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU()).cuda().bfloat16().train(training)
    fused = dwfast.fuse(copy.deepcopy(eager))
    x = torch.randn(rows, 16, device="cuda", dtype=torch.bfloat16, requires_grad=training)
    edge = 2 ** 31 // width
    check = torch.tensor([0, 1, edge - 1, edge, edge + 1, rows - 2, rows - 1], device="cuda")
    with torch.set_grad_enabled(training):
        out = fused(x)
        assert out.shape == (rows, width)
        if not training:
            torch.testing.assert_close(out[check], eager(x[check]), atol=5e-2, rtol=5e-2)
            return
        grad = torch.randn_like(out)
        out.backward(grad)
        got_grad, x.grad = x.grad[check].clone(), None
        want = eager(x)
        want.backward(grad)
    torch.testing.assert_close(out[check], want[check], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got_grad, x.grad[check], atol=5e-2, rtol=5e-2)
