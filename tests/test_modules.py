"""FusedSequential and MLP against eager nn.Sequential copies of the same model."""
import copy
import io

import pytest
import torch
from torch import nn

import dwfast
from dwfast import MLP, FusedSequential
from dwfast import chain as dw_chain
from dwfast import modules as dw_modules
from dwfast.chain import Block

# float64 runs the eager path on every backend (the kernels take fp32/fp16/bf16): tight tolerance.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def plain_mlp(in_features, hidden, out_features, batchnorm=True, dropout=0.0, bias=True, dtype=None):
    """The nn.Sequential MLP is documented to match, built by hand."""
    layers, prev = [], in_features
    for h in hidden:
        layers += [nn.Linear(prev, h, bias=bias, dtype=dtype)]
        layers += [nn.BatchNorm1d(h, dtype=dtype)] if batchnorm else []
        layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        prev = h
    return nn.Sequential(*layers, nn.Linear(prev, out_features, bias=bias, dtype=dtype))


def assert_same_state(a: nn.Module, b: nn.Module, **tol):
    """Parameters and buffers (running stats, num_batches_tracked) of two models agree."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], equal_nan=True, msg=lambda m: f"{key}: {m}", **tol)


def check_same(fused: nn.Module, eager: nn.Module, x: torch.Tensor, *, steps=1, lr=0.05, **tol):
    """Run both models for ``steps`` SGD steps on ``x`` and compare everything after each step.

    Outputs, the input's grad, every parameter's grad, then parameters and buffers. Dropout
    masks agree because both forwards start from the same RNG seed.
    """
    opt_f = torch.optim.SGD(fused.parameters(), lr=lr)
    opt_e = torch.optim.SGD(eager.parameters(), lr=lr)
    for step in range(steps):
        xf, xe = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        torch.manual_seed(100 + step)
        yf = fused(xf)
        torch.manual_seed(100 + step)
        ye = eager(xe)
        torch.testing.assert_close(yf, ye, **tol)
        grad_out = torch.randn(ye.shape, dtype=ye.dtype, generator=torch.Generator().manual_seed(step))
        yf.backward(grad_out)
        ye.backward(grad_out)
        torch.testing.assert_close(xf.grad, xe.grad, **tol)
        for (name, pf), (_, pe) in zip(fused.named_parameters(), eager.named_parameters()):
            # A Linear bias before a training-mode BN has a ~0 grad: the atol covers it.
            torch.testing.assert_close(pf.grad, pe.grad, msg=lambda m: f"{name}.grad: {m}", **tol)
        opt_f.step()
        opt_e.step()
        opt_f.zero_grad()
        opt_e.zero_grad()
        assert_same_state(fused, eager, **tol)


def fused_copy(eager: nn.Sequential) -> FusedSequential:
    """A FusedSequential holding deep copies of ``eager``'s children."""
    return FusedSequential(*copy.deepcopy(list(eager)))


def eager_copy(model: nn.Sequential) -> nn.Sequential:
    """A plain nn.Sequential holding deep copies of ``model``'s children (same state_dict keys)."""
    return nn.Sequential(*copy.deepcopy(list(model)))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("hidden,batchnorm,dropout,bias", [
    ([16], True, 0.0, True),
    ([16, 12], True, 0.0, False),
    ([12, 16, 8], False, 0.0, True),
    ([16, 12], True, 0.3, True),
    ([], True, 0.0, True),
])
def test_mlp_matches_sequential(backend, hidden, batchnorm, dropout, bias, train):
    model = MLP(10, hidden, 3, batchnorm=batchnorm, dropout=dropout, bias=bias)
    eager = plain_mlp(10, hidden, 3, batchnorm=batchnorm, dropout=dropout, bias=bias)
    eager.load_state_dict(model.state_dict())
    model.train(train)
    eager.train(train)
    check_same(model, eager, torch.randn(32, 10), steps=3, **TOL[torch.float32])


@pytest.mark.parametrize("bn_kwargs", [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"eps": 0.1},
    {"momentum": 0.5, "eps": 1e-3},
    {"bias": False},
])
def test_batchnorm_options(backend, bn_kwargs):
    eager = nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20, **bn_kwargs), nn.ReLU(),
                          nn.Linear(20, 8), nn.BatchNorm1d(8, **bn_kwargs), nn.ReLU(), nn.Linear(8, 2))
    model = fused_copy(eager)
    x = torch.randn(24, 12)
    check_same(model, eager, x, steps=3, **TOL[torch.float32])
    model.eval()
    eager.eval()
    check_same(model, eager, x, steps=1, **TOL[torch.float32])


@pytest.mark.parametrize("train", [True, False])
def test_float64_falls_back_exactly(backend, train):
    model = MLP(6, [8, 8], 2, dropout=0.2, dtype=torch.float64).train(train)
    eager = plain_mlp(6, [8, 8], 2, dropout=0.2, dtype=torch.float64).train(train)
    eager.load_state_dict(model.state_dict())
    check_same(model, eager, torch.randn(16, 6, dtype=torch.float64), steps=3, **TOL[torch.float64])


def test_inplace_relu_and_relu_without_bn(backend):
    eager = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(inplace=True), nn.Linear(16, 4), nn.BatchNorm1d(4))
    check_same(fused_copy(eager), eager, torch.randn(16, 8), steps=2, **TOL[torch.float32])


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_and_input_without_grad(backend, train):
    model = MLP(8, [16, 16], 3).train(train)
    eager = eager_copy(model)
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), **TOL[torch.float32])
    assert_same_state(model, eager, **TOL[torch.float32])
    # The input needs no grad, the parameters still get theirs.
    model(x).sum().backward()
    eager(x).sum().backward()
    for pf, pe in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, **TOL[torch.float32])
    assert_same_state(model, eager, **TOL[torch.float32])


@pytest.mark.parametrize("make_input", [
    lambda: torch.randn(10, 24).t(),  # transposed view
    lambda: torch.randn(24, 20)[:, ::2],  # strided columns
    lambda: torch.randn(48, 10)[::2],  # strided rows
])
def test_non_contiguous_input(backend, make_input):
    x = make_input()
    assert x.shape == (24, 10) and not x.is_contiguous()
    model = MLP(10, [16, 8], 2)
    eager = plain_mlp(10, [16, 8], 2)
    eager.load_state_dict(model.state_dict())
    check_same(model, eager, x, steps=2, **TOL[torch.float32])


def test_3d_input_falls_back(backend):
    # BatchNorm1d on (N, C, L) normalises dim 1; the Linears act on the last dim.
    eager = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(6, 3))
    model = fused_copy(eager)
    x = torch.randn(8, 4, 5)
    check_same(model, eager, x, steps=2, **TOL[torch.float32])
    model.eval()
    eager.eval()
    check_same(model, eager, x, steps=1, **TOL[torch.float32])


def test_empty_batch_matches_eager(backend):
    # Eager accepts an empty batch (and then tracks a nan mean); the fused model does the same.
    model = MLP(6, [8], 2)
    eager = eager_copy(model)
    x = torch.randn(0, 6)
    torch.testing.assert_close(model(x), eager(x))
    assert_same_state(model, eager)


BAD_INPUTS = {  # case: (error eager raises too, input, words the message must hold)
    "in_features": (RuntimeError, lambda: torch.randn(16, 7), "16x7"),
    "dtype": (RuntimeError, lambda: torch.randn(16, 6, dtype=torch.float64), "dtype"),
    "batch_of_one": (ValueError, lambda: torch.randn(1, 6), "more than 1 value"),
    "device": (RuntimeError, lambda: torch.randn(16, 6, device="meta"), "device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_changes_nothing(backend, case):
    error, make_input, words = BAD_INPUTS[case]
    x = make_input()
    model = MLP(6, [8, 8], 2)
    model(torch.randn(16, 6))  # running stats away from their initial values
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=words):
        model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
    with pytest.raises(error):
        plain_mlp(6, [8, 8], 2)(x)


@pytest.mark.parametrize("dtype,hint", [
    (torch.int64, "x.to(torch.float32)"),
    (torch.float64, "x.to(torch.float32) or the model with model.to(torch.float64)")])
def test_dtype_error_suggests_float_dtypes(backend, dtype, hint):
    """The dtype error's hint: cast the input, or the model only to a float dtype."""
    with pytest.raises(RuntimeError, match="must have the same dtype") as info:
        MLP(6, [8], 2)(torch.ones(16, 6, dtype=dtype))
    assert str(info.value).endswith(hint)


def test_error_in_a_later_layer_changes_no_state(backend):
    # Eager would update the first BN before failing at the second Linear; a fused run checks first.
    model = FusedSequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(9, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(torch.randn(16, 6))
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key


def test_batch_of_one_in_eval_is_fine(backend):
    model = MLP(6, [8], 2).eval()
    eager = eager_copy(model)
    x = torch.randn(1, 6)
    torch.testing.assert_close(model(x), eager(x), **TOL[torch.float32])


# Grouping: which children become fused runs.

def kinds(steps):
    """Steps as nested tuples of ('L', 'B', 'R' (activation), 'D') letters per block, or the
    module's class name."""
    return [[("L" + ("B" if b.bn is not None else "") + ("R" if b.act is not None else "")
              + ("D" if b.dropout is not None else "")) for b in s]
            if isinstance(s, list) else type(s).__name__ for s in steps]


class MyLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class MyBN(nn.BatchNorm1d):
    pass


@pytest.mark.parametrize("children,expected", [
    ([nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)],
     [["LBR", "LR", "L"]]),
    ([nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)],
     [["LD", "LB"], "BatchNorm1d"]),
    ([nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Dropout(0.2), nn.Linear(4, 4), nn.SiLU(), nn.Tanh(),
      nn.Linear(4, 4), nn.LeakyReLU(0.3), nn.Dropout(), nn.Dropout()],
     [["LRD", "LR"], "Tanh", ["LRD"], "Dropout"]),
    ([nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 4), nn.Dropout1d()],
     [["L"], "ELU", ["L"], "Dropout1d"]),
    ([nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU(), nn.ReLU()],
     ["ReLU", "BatchNorm1d", ["LR"], "ReLU"]),
    ([MyLinear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), MyBN(4), nn.ReLU()],
     ["MyLinear", "BatchNorm1d", "ReLU", ["L"], "MyBN", "ReLU"]),
    ([nn.Linear(4, 4), nn.SyncBatchNorm(4), nn.LazyLinear(4), nn.ReLU()],
     [["LB"], "LazyLinear", "ReLU"]),
    ([nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LeakyReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()],
     [["LBR", "LBR"]]),
    ([], []),
])
def test_plan(children, expected):
    steps = dw_chain.plan(children)
    assert kinds(steps) == expected
    flat = [m for s in steps for m in ([x for b in s for x in (b.linear, b.bn) if x is not None]
                                       if isinstance(s, list) else [s])]
    assert all(any(m is c for c in children) for m in flat)  # the very same modules


def test_subclasses_run_as_modules(backend):
    eager = nn.Sequential(MyLinear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), MyBN(8), nn.ReLU(),
                          nn.Linear(8, 2))
    check_same(fused_copy(eager), eager, torch.randn(16, 6), steps=2, **TOL[torch.float32])


@pytest.fixture
def count_chains(monkeypatch):
    """Records the block kinds of every run_chain call the modules make."""
    calls = []

    def spy(x, blocks):
        calls.append(kinds([blocks])[0])
        return dwfast.functional.run_chain(x, blocks)
    monkeypatch.setattr(dw_modules, "run_chain", spy)
    return calls


def test_forward_fuses_each_run(count_chains):
    model = MLP(6, [8, 8], 2, dropout=0.1)
    model(torch.randn(16, 6))
    assert count_chains == [["LBRD", "LBRD", "L"]]  # dropout fused too: one chain
    count_chains.clear()
    MLP(6, [8, 8], 2)(torch.randn(16, 6))
    assert count_chains == [["LBR", "LBR", "L"]]


def test_hooked_children_run_as_modules(count_chains, backend):
    model = MLP(6, [8, 8], 2)
    eager = eager_copy(model)
    seen = []
    handle = model[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    check_same(model, eager, torch.randn(16, 6), **TOL[torch.float32])
    assert seen == [(16, 8)]
    assert count_chains == [["LBR"], ["L"]]  # model[3:6] ran as modules: a run starts at a Linear
    handle.remove()
    count_chains.clear()
    model(torch.randn(16, 6))
    assert count_chains == [["LBR", "LBR", "L"]]


def test_children_replaced_after_forward(backend):
    model = MLP(6, [8, 8], 2)
    eager = plain_mlp(6, [8, 8], 2)
    eager.load_state_dict(model.state_dict())
    x = torch.randn(16, 6)
    check_same(model, eager, x)
    for m in (model, eager):
        m[1] = nn.Identity()
        m[5] = nn.Tanh()
        del m[2]
    eager.append(nn.Linear(2, 3))
    model.append(copy.deepcopy(eager[-1]))
    check_same(model, eager, x, **TOL[torch.float32])


# Module-level behaviour: repr, state_dict, construction.

@pytest.mark.parametrize("kwargs", [{}, {"batchnorm": False, "bias": False}, {"dropout": 0.5}])
def test_mlp_repr_and_state_dict_round_trip(kwargs):
    model = MLP(5, [7, 3], 2, **kwargs)
    plain = plain_mlp(5, [7, 3], 2, **kwargs)
    assert repr(model) == repr(plain).replace("Sequential", "MLP", 1)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    assert_same_state(plain, model, atol=0, rtol=0)
    back = MLP(5, [7, 3], 2, **kwargs)
    back.load_state_dict(plain.state_dict(), strict=True)
    assert_same_state(back, model, atol=0, rtol=0)
    x = torch.randn(8, 5)
    torch.testing.assert_close(back.eval()(x), plain.eval()(x))


def test_mlp_children_are_plain_modules():
    model = MLP(5, 4, 2, dropout=0.25)
    assert [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert (model[0].in_features, model[0].out_features, model[3].p, model[4].out_features) == (5, 4, 0.25, 2)
    assert [type(m) for m in MLP(5, [], 2)] == [nn.Linear]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mlp_factory_kwargs(dtype):
    model = MLP(5, [4], 2, dtype=dtype, device="meta")
    tensors = list(model.parameters()) + [model[1].running_mean, model[1].running_var]
    assert all(t.dtype == dtype and t.is_meta for t in tensors)


@pytest.mark.parametrize("args,kwargs,error", [
    ((5, [4, -1], 2), {}, ValueError),
    ((5, [4, 0], 2), {}, ValueError),
    ((0, [4], 2), {}, ValueError),
    ((5, [4], -2), {}, ValueError),
    ((5, -4, 2), {}, ValueError),
    ((5, [4], 2), {"dropout": 1.0}, ValueError),
    ((5, [4], 2), {"dropout": -0.1}, ValueError),
    ((5, [4.5], 2), {}, TypeError),
    ((5, [True], 2), {}, TypeError),
    ((5, "4", 2), {}, TypeError),
])
def test_mlp_bad_arguments(args, kwargs, error):
    with pytest.raises(error):
        MLP(*args, **kwargs)


def test_slicing_keeps_fusing():
    model = MLP(5, [4, 3], 2)
    for part in (model[:3], model[3:], FusedSequential(*model)[1:]):
        assert type(part) is FusedSequential
    assert model[:3][0] is model[0]
    assert model[-1] is model[6]


def test_mlp_pickles():
    model = MLP(5, [4], 2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is MLP
    assert_same_state(loaded, model, atol=0, rtol=0)


def test_block_fields():
    # run_chain is called with Block tuples naming the very modules of the model.
    model = MLP(5, [4], 2)
    (run,) = dw_chain.plan(list(model))
    assert run == [Block(model[0], model[1], model[2]), Block(model[3], None, None)]
