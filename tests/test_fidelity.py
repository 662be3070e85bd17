"""What users' code does to a fused Sequential, each against an eager copy of the same model:
second derivatives, torch.func, BatchNorm attributes changed between calls, eps checks,
frozen and shared parameters, no_grad / inference_mode, odd strides, dtype changes,
load_state_dict(assign=True), copies and pickles, torch.export.

The kernels run through Triton's interpreter (or on a GPU with DWFAST_TEST_GPU=1). Where
the fused ops are meant to run, a spy checks that they did, so a silent fallback to eager
cannot pass for them.
"""
import collections
import copy
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dwfast
from dwfast import ops, whole_net

TOL = dict(atol=1e-4, rtol=1e-4)


def mlp(widths=(7, 20, 20, 3), bn=True, act=nn.ReLU, dropout=0.0):
    """Linear [BatchNorm1d] act [Dropout] per hidden width, then a Linear; BatchNorm's affine
    parameters random, so none of it passes by being the identity."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i == len(widths) - 2:
            break
        if bn:
            norm = nn.BatchNorm1d(n_out)
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.normal_(norm.bias)
            layers.append(norm)
        layers.append(act())
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def pair(model, device):
    """(eager, fused): `model` on `device`, and a fused deep copy of it."""
    eager = model.to(device)
    return eager, dwfast.fuse(copy.deepcopy(eager))


@pytest.fixture
def fused_ops(monkeypatch):
    """Counts the fused forwards that run: the per-layer chain's (as "chain_forward", eager
    calls and the custom op alike) and the whole-net kernel's."""
    calls = collections.Counter()
    run_forward = ops._run_forward

    def chain_forward(*args, **kwargs):
        calls["chain_forward"] += bool(kwargs.get("output"))  # (chain_body's part runs no output)
        return run_forward(*args, **kwargs)
    monkeypatch.setattr(ops, "_run_forward", chain_forward)
    for name in ("mlp_train", "_train"):  # the op, and what eager calls run without it
        def counted(*args, _fn=getattr(whole_net, name)):
            calls["mlp_train"] += 1
            return _fn(*args)
        monkeypatch.setattr(whole_net, name, counted)
    return calls


def step(model, x, grad_out, seed=3):
    """Output, input gradient, parameter gradients and buffers after one forward and backward
    of `model` (from RNG seed `seed`: the same dropout masks)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    out.backward(grad_out)
    res = {"out": out, "x.grad": x.grad}
    res.update({f"{name}.grad": p.grad for name, p in model.named_parameters()})
    res.update(dict(model.named_buffers()))
    model.zero_grad()
    return res


def assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
        else:
            torch.testing.assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}", **(tol or TOL))


# ---------------------------------------------------------------- second derivatives


@pytest.mark.parametrize("case", ["batchnorm_dropout", "eval", "whole_net"])
def test_gradient_penalty(kernel_device, fused_ops, case):
    """WGAN-GP's gradient penalty: the input gradient, taken with create_graph=True, is itself
    differentiated, for the parameters' gradients."""
    model = {"batchnorm_dropout": mlp(act=nn.GELU, dropout=0.2), "eval": mlp().eval(), "whole_net": mlp(bn=False)}
    eager, fused = pair(model[case], kernel_device)
    x = torch.randn(16, 7, device=kernel_device)
    res = []
    for m in (eager, fused):
        xx = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = m(xx)
        grad_x, = torch.autograd.grad(out.sum(), xx, create_graph=True)
        loss = (grad_x.norm(dim=1) - 1).square().mean() + out.square().mean()
        loss.backward()
        res.append({"grad_x": grad_x, "x.grad": xx.grad, **{n: p.grad for n, p in m.named_parameters()}})
    assert_same(res[1], res[0])
    assert fused_ops == {"mlp_train" if case == "whole_net" else "chain_forward": 1}


def test_maml_and_hessian_vector_product(kernel_device, fused_ops):
    """MAML's inner step (parameters minus their create_graph gradient, run again through
    functional_call) and a Hessian-vector product, with SiLU (non-zero second derivatives)."""
    eager, fused = pair(mlp(act=nn.SiLU), kernel_device)
    x, x2, y = (torch.randn(12, n, device=kernel_device) for n in (7, 7, 3))
    res = []
    for m in (eager, fused):
        params = dict(m.named_parameters())
        grads = torch.autograd.grad(F.mse_loss(functional_call(m, params, (x,)), y), list(params.values()),
                                    create_graph=True)
        hvp = torch.autograd.grad(grads, list(params.values()), [torch.ones_like(g) for g in grads],
                                  retain_graph=True)
        fast = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
        F.mse_loss(functional_call(m, fast, (x2,)), y).backward()
        res.append({**{f"hvp.{n}": h for n, h in zip(params, hvp)}, **{n: p.grad for n, p in params.items()}})
    assert_same(res[1], res[0])
    assert fused_ops["chain_forward"] == 2


# ---------------------------------------------------------------- torch.func and autograd.functional


def test_torch_func_transforms(kernel_device, fused_ops):
    """Per-sample gradients (vmap of grad of functional_call), jacrev, jvp, forward-mode AD and
    autograd.functional's vectorised jacobian / hessian. Transforms run the chain eagerly;
    the autograd.functional ones run the fused forward and batch its backward's
    recomputation."""
    eager, fused = pair(mlp(act=nn.Tanh).eval(), kernel_device)
    x, v = torch.randn(6, 7, device=kernel_device), torch.randn(6, 7, device=kernel_device)
    res = []
    for m in (eager, fused):
        params = {n: p.detach() for n, p in m.named_parameters()}
        buffers = dict(m.named_buffers())

        def loss(p, xi):
            return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).square().sum()

        with torch.autograd.forward_ad.dual_level():
            dual = m(torch.autograd.forward_ad.make_dual(x, v))
            forward_ad = torch.autograd.forward_ad.unpack_dual(dual).tangent
        res.append({
            **{f"per_sample.{n}": g for n, g in torch.func.vmap(torch.func.grad(loss), (None, 0))(params, x).items()},
            "jacrev": torch.func.jacrev(m)(x),
            "jvp": torch.func.jvp(m, (x,), (v,))[1],
            "forward_ad": forward_ad,
            "jacobian": torch.autograd.functional.jacobian(m, x, vectorize=True),
            "hessian": torch.autograd.functional.hessian(lambda t: m(t).square().sum(), x, vectorize=True),
        })
    assert_same(res[1], res[0])
    assert fused_ops["chain_forward"] == 2  # jacobian's and hessian's forwards


def test_ensemble_vmap(kernel_device):
    """An ensemble of models in training (BatchNorm updating its stacked buffers) through
    torch.func.stack_module_state and vmap."""
    members = [mlp().to(kernel_device) for _ in range(3)]
    x = torch.randn(10, 7, device=kernel_device)
    res = []
    for ms in (members, [dwfast.fuse(copy.deepcopy(m)) for m in members]):
        params, buffers = torch.func.stack_module_state(ms)
        base = copy.deepcopy(ms[0]).to("meta")
        out = torch.func.vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        res.append({"out": out, **buffers})
    assert_same(res[1], res[0])


# ---------------------------------------------------------------- BatchNorm state


def test_attributes_read_at_every_call(kernel_device, fused_ops):
    """BatchNorm, activation and Dropout attributes changed between calls on the same model
    instances (a cached plan must not hold them): each step against eager. The ops run
    except where they can't follow (running statistics updated without counting the batch)."""
    eager, fused = pair(mlp(act=nn.LeakyReLU, dropout=0.1), kernel_device)
    bn1, bn2 = 1, 5  # children: Linear BN LeakyReLU Dropout Linear BN LeakyReLU Dropout Linear
    changes = [
        ("as built", lambda m: None, True),
        ("track_running_stats=False in training", lambda m: setattr(m[bn1], "track_running_stats", False), True),
        ("then eval: running statistics", lambda m: m[bn1].eval(), True),
        ("momentum=None, eps", lambda m: (setattr(m[bn2], "momentum", None), setattr(m[bn2], "eps", 1e-2)), True),
        ("no running statistics in eval: batch statistics",
         lambda m: (setattr(m[bn1], "running_mean", None), setattr(m[bn1], "running_var", None)), True),
        ("affine=False: forward reads weight, not affine", lambda m: setattr(m[bn2], "affine", False), True),
        ("weight=None", lambda m: setattr(m[bn2], "weight", None), True),
        ("slope, dropout p", lambda m: (setattr(m[2], "negative_slope", 0.3), setattr(m[3], "p", 0.5)), True),
        ("num_batches_tracked=None", lambda m: setattr(m[bn2], "num_batches_tracked", None), False),
    ]
    x = torch.randn(24, 7, device=kernel_device)
    for name, change, fused_runs in changes:
        change(eager)
        change(fused)
        before = fused_ops["chain_forward"]
        grad_out = torch.randn(24, 3, device=kernel_device)
        assert_same(step(fused, x, grad_out), step(eager, x, grad_out))
        assert (fused_ops["chain_forward"] > before) == fused_runs, name


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_checked_before_state_changes(kernel_device, eps, training):
    """Whatever F.batch_norm of the installed torch says of `eps` (its rule changed between
    versions), the fused model says too, before touching any state; eager's BatchNorm bumps
    num_batches_tracked first."""
    eager, fused = pair(mlp().train(training), kernel_device)
    for m in (eager, fused):
        m[4].eps = eps  # the second BatchNorm: the first one runs (and counts its batch) first in eager
    x = torch.randn(8, 7, device=kernel_device)
    before = copy.deepcopy(fused.state_dict())
    try:
        want = eager(x)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            fused(x)
        assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())
    else:
        torch.testing.assert_close(fused(x), want, **TOL)


# ---------------------------------------------------------------- what fine-tuning code does


def test_frozen_layers_and_frozen_batchnorm(kernel_device, fused_ops):
    """Fine-tuning: the first Linear and BatchNorm frozen (requires_grad_(False)), the second
    BatchNorm frozen and in eval inside a model in training; then everything frozen but the
    input (an attribution)."""
    eager, fused = pair(mlp(), kernel_device)
    for m in (eager, fused):
        m[0].requires_grad_(False)
        m[1].requires_grad_(False)
        m[4].eval().requires_grad_(False)
    x = torch.randn(16, 7, device=kernel_device)
    for _ in range(2):
        grad_out = torch.randn(16, 3, device=kernel_device)
        assert_same(step(fused, x, grad_out), step(eager, x, grad_out))
    for m in (eager, fused):
        m.requires_grad_(False)
    assert_same(step(fused, x, grad_out), step(eager, x, grad_out))
    assert fused_ops["chain_forward"] == 3


def test_in_place_updates_bump_versions(kernel_device, fused_ops):
    """The fused forward updates num_batches_tracked in place as eager's add_ does, version
    counter included (autograd's check that a tensor it saved was not modified since)."""
    eager, fused = pair(mlp(), kernel_device)
    x = torch.randn(16, 7, device=kernel_device)
    for m in (eager, fused):
        counters = [b for name, b in m.named_buffers() if name.endswith("num_batches_tracked")]
        before = [b._version for b in counters]
        m(x)
        assert [b._version > v for b, v in zip(counters, before)] == [True] * 2
    assert fused_ops["chain_forward"] == 1


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_and_inference_mode(kernel_device, mode, training):
    eager, fused = pair(mlp().train(training), kernel_device)
    x = torch.randn(16, 7, device=kernel_device)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    res = []
    for m in (eager, fused):
        with context():
            res.append({"out": m(x), **dict(m.named_buffers())})
    assert_same(res[1], res[0])


def test_odd_strides(kernel_device):
    """Column-major weights (what channels_last-style layouts leave behind), a column-major
    input and one broadcast along the features (stride 0)."""
    model = mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(m.weight.detach().t().contiguous().t())
    eager, fused = pair(model, kernel_device)
    assert fused[0].weight.stride() == (1, 20)
    grad_out = torch.randn(16, 3, device=kernel_device)
    for x in (torch.randn(7, 16, device=kernel_device).t(), torch.randn(16, 1, device=kernel_device).expand(16, 7)):
        assert_same(step(fused, x, grad_out), step(eager, x, grad_out))


def test_parameters_shared_between_linears(kernel_device, fused_ops):
    """One weight tied between two Linears of a chain (whole-net: no BatchNorm, narrow): its
    gradient sums both uses, also through a second derivative."""
    model = mlp(widths=(7, 20, 20, 20, 3), bn=False)
    model[4].weight = model[2].weight  # children 2 and 4: the 20 x 20 Linears
    eager, fused = pair(model, kernel_device)
    assert fused[4].weight is fused[2].weight
    x = torch.randn(16, 7, device=kernel_device)
    grad_out = torch.randn(16, 3, device=kernel_device)
    assert_same(step(fused, x, grad_out), step(eager, x, grad_out))
    res = []
    for m in (eager, fused):
        grads = torch.autograd.grad(m(x).square().mean(), m[2].weight, create_graph=True)
        grads[0].square().sum().backward()
        res.append({n: p.grad for n, p in m.named_parameters()})
    assert_same(res[1], res[0])
    assert fused_ops == {"mlp_train": 2}


def test_half_after_fuse(kernel_device):
    """model.half() on a fused model: fp16 parameters and buffers, fp16 runs (GELU: a ReLU's
    decisions near 0 may differ between fp16 runs, see test_kernels.compare)."""
    eager, fused = pair(mlp(act=nn.GELU), kernel_device)
    fused.half()
    eager.half()
    x = torch.randn(16, 7, device=kernel_device, dtype=torch.half)
    grad_out = torch.randn(16, 3, device=kernel_device, dtype=torch.half)
    assert_same(step(fused, x, grad_out), step(eager, x, grad_out), atol=2e-2, rtol=2e-2)


def test_load_state_dict_assign(kernel_device):
    """load_state_dict(assign=True) replaces the Parameters and buffers themselves."""
    eager, fused = pair(mlp(), kernel_device)
    donor = mlp().to(kernel_device).state_dict()
    old = fused[0].weight
    for m in (eager, fused):
        m.load_state_dict(copy.deepcopy(donor), assign=True)
    assert fused[0].weight is not old and torch.equal(fused[0].weight, donor["0.weight"])
    x = torch.randn(16, 7, device=kernel_device)
    grad_out = torch.randn(16, 3, device=kernel_device)
    assert_same(step(fused, x, grad_out), step(eager, x, grad_out))


class Tower(nn.Sequential):
    """A user's Sequential subclass (fuse makes a FusedTower class for it at run time)."""


def test_deepcopy_and_pickle(kernel_device):
    """Copies of a fused model (a run-time class) are fused models of their own: same class,
    own state, eager's results."""
    eager = Tower(*mlp()).to(kernel_device)
    fused = dwfast.fuse(copy.deepcopy(eager))
    x = torch.randn(16, 7, device=kernel_device)
    grad_out = torch.randn(16, 3, device=kernel_device)
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(twin) is type(fused) and twin[1].running_mean is not fused[1].running_mean
        assert_same(step(twin, x, grad_out), step(copy.deepcopy(eager), x, grad_out))


_LOAD = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
assert type(model).__name__ == "FusedSequential", type(model)
torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_torch_save_whole_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole fused model, loaded by a process that never imports dwfast
    itself (the pickle does, wherever dwfast is installed)."""
    fused = dwfast.fuse(mlp()).eval()
    x = torch.randn(16, 7)
    torch.save(fused, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DWFAST", "TRITON"))}
    res = subprocess.run([sys.executable, "-c", _LOAD, *(str(tmp_path / f) for f in ("model.pt", "x.pt", "out.pt"))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), fused(x), **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export(kernel_device, training):
    """torch.export.export of a fused model: the exported program's module gives eager's
    outputs and BatchNorm statistics over two calls."""
    eager, fused = pair(mlp().train(training), kernel_device)
    x = torch.randn(16, 7, device=kernel_device)
    exported = torch.export.export(fused, (x,)).module()
    for _ in range(2):
        x = torch.randn(16, 7, device=kernel_device)
        torch.testing.assert_close(exported(x), eager(x), **TOL)
    buffers = dict(exported.named_buffers())
    assert_same({k: buffers[k] for k in dict(eager.named_buffers())}, dict(eager.named_buffers()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export_dynamic_batch(kernel_device, training):
    """torch.export.export with a dynamic batch: the exported program takes every batch size in
    its range (fp32 at "highest" too, where a weight's TF32 split rides behind z when it fits:
    a fixed choice for the trace, no guard on the batch) and gives eager's results."""
    eager, fused = pair(mlp().train(training), kernel_device)
    x = torch.randn(16, 7, device=kernel_device)
    batch = torch.export.Dim("batch", min=2, max=1024)
    exported = torch.export.export(fused, (x,), dynamic_shapes=({0: batch},)).module()
    for rows in (2, 16, 45):
        x = torch.randn(rows, 7, device=kernel_device)
        torch.testing.assert_close(exported(x), eager(x), **TOL)
    buffers = dict(exported.named_buffers())
    assert_same({k: buffers[k] for k in dict(eager.named_buffers())}, dict(eager.named_buffers()))
