"""Models users build that the kernels must not get wrong: per-feature tensors that are strided
or of the wrong size, a Linear without input features, an output changed in place, NaN and
infinity through the chain, in-place modules eager's backward refuses, a BatchNorm shared by two
blocks; and what users' code does around a model: saved-tensor hooks, TorchScript, swapped
module classes, forwards set on instances, bad module arguments, in-place changes between
forward and backward, meta tensors, inference mode, inputs that are not tensors. Each runs
fused (the kernels through the interpreter, per-layer and whole-net paths) and eager on copies
of one model, and compares everything eager produces.
"""
import copy

import pytest
import torch
from conftest import _eager_dropout
from test_whole_net import spy  # noqa: F401 (a fixture)
from torch import nn

import dwfast


def _pair(model):
    return dwfast.fuse(copy.deepcopy(model)), model


def _step(model, x, grad=None, inplace=False):
    """(output, input gradient, parameter gradients, buffers) of one forward and backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    if inplace:
        out = out.add_(1.0)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return [out.detach(), x.grad, *[p.grad for p in model.parameters()], *[b.clone() for b in model.buffers()]]


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)


def _strided(models, name, value):
    """Set `name` ("bias": the first Linear's, "bn.*": the BatchNorm's) of each model to a strided
    view of a copy of `value` (a parameter where it was one)."""
    for model in models:
        owner, attr = (model[1], name[3:]) if name.startswith("bn.") else (model[0], name)
        view = torch.stack([value, torch.full_like(value, 7.0)], 1).flatten()[::2]
        setattr(owner, attr, nn.Parameter(view) if isinstance(getattr(owner, attr), nn.Parameter) else view)


# (not running statistics in eval: torch's CPU BatchNorm then reads a strided one as garbage)
@pytest.mark.parametrize("name, training", [(n, True) for n in ("bias", "bn.weight", "bn.bias", "bn.running_mean",
                                                                  "bn.running_var")]
                         + [(n, False) for n in ("bias", "bn.weight", "bn.bias")])
@pytest.mark.parametrize("width", [12, 16], ids=["per_layer", "whole_net_eval"])
def test_strided_per_feature_tensors(kernel_device, name, training, width):
    """A bias, BatchNorm affine parameter or running statistic that is a strided view: read and
    written as eager does (the kernels take contiguous vectors, so such a chain runs eagerly;
    torch's own CPU BatchNorm backward gets a strided weight wrong, and so then does dwfast)."""
    model = nn.Sequential(nn.Linear(5, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3)).train(training)
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    fused, eager = _pair(model)
    _strided((fused, eager), name, torch.linspace(-1, 1, width) + (1.0 if name.endswith(("weight", "var")) else 0.0))
    x = torch.randn(16, 5)
    _assert_same(_step(fused, x), _step(eager, x))


@pytest.mark.parametrize("bad", ["bn", "bias"])
def test_wrong_sizes_raise_as_eager(backend, bad):
    """A BatchNorm or bias of the wrong size: eager's error, with no state changed."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(7 if bad == "bn" else 6), nn.ReLU(), nn.Linear(6, 3))
    if bad == "bias":
        model[0].bias = nn.Parameter(torch.zeros(5))
    fused, eager = _pair(model)
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError) as want:
        eager(x)
    with pytest.raises(RuntimeError) as got:
        fused(x)
    assert str(got.value) == str(want.value)
    assert int(fused[1].num_batches_tracked) == int(eager[1].num_batches_tracked)


def test_linear_without_input_features(kernel_device):
    """Linear(0, n): zeros plus the bias, whose gradient is the batch's sum."""
    model = nn.Sequential(nn.Linear(0, 5), nn.ReLU(), nn.Linear(5, 2))
    fused, eager = _pair(model)
    x = torch.randn(4, 0)
    _assert_same(_step(fused, x), _step(eager, x))


def test_whole_net_output_changed_in_place(kernel_device, spy):  # noqa: F811
    """The whole-net path keeps its output only where a ReLU's backward reads it."""
    fused, eager = _pair(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)))
    x = torch.randn(8, 4)
    _assert_same(_step(fused, x, inplace=True), _step(eager, x, inplace=True))
    assert spy["train"] == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "per_layer"])
@pytest.mark.parametrize("bn", [False, True], ids=["", "bn_eval"])
def test_nan_and_inf(kernel_device, spy, value, whole, bn, monkeypatch):  # noqa: F811
    """A NaN or infinity in the input: ReLU passes the gradient where its input is NaN (torch's
    threshold_backward), and an infinity times a weight is an infinity (3xTF32's small terms
    would make it NaN where a part is 0), as in eager."""
    monkeypatch.setattr(dwfast.backend, "_whole_net", "auto" if whole else "never")
    layers = [nn.Linear(4, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                                                          nn.Linear(16, 3)]
    model = nn.Sequential(*layers).train(not bn)
    with torch.no_grad():  # an infinity stays one sign through the hidden layers (a NaN past them)
        for linear in [m for m in model if isinstance(m, nn.Linear)][:2]:
            linear.weight.abs_()
    fused, eager = _pair(model)
    x = torch.randn(8, 4)
    x[1, 2] = value
    _assert_same(_step(fused, x), _step(eager, x))
    if not bn:  # (with BatchNorm, a training step runs the per-layer path)
        assert spy["train"] == (1 if whole else 0)


# ---- what users' code does around a fused model (an acceptance-style hunt's findings)


def _grads(model, x):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("order", ["plain_first", "hooked_first"])
def test_saved_tensor_hooks(kernel_device, order):
    """Saved-tensor hooks (activation offloading: save_on_cpu copies on a GPU) hand the backward
    copies of the saved tensors, contiguous, without the room behind their rows that the plans
    of an unhooked step read: the backward plans for what it gets."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    fused, eager = _pair(model)
    x = torch.randn(12, 6)
    for hooked in ([False, True] if order == "plain_first" else [True, False]):
        for m in (fused, eager):
            m.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooked else \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                out = m(x)
            out.sum().backward()
        _assert_same(_grads(fused, x), _grads(eager, x))


def test_child_class_swapped(backend):
    """A child whose __class__ is swapped after a forward runs as its new class does."""
    class Halve(nn.Dropout):
        def forward(self, x):
            return x * 0.5

    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 3))
    fused, eager = _pair(model)
    x = torch.randn(10, 6)
    _assert_same(_step(fused, x), _step(eager, x))
    for m in (fused, eager):
        m[3].__class__ = Halve
        m[2].__class__ = type("MyReLU", (nn.ReLU,), {})
    _assert_same(_step(fused, x), _step(eager, x))


def test_torchscript(backend):
    """torch.jit.trace records eager's ops, and torch.jit.script compiles the children as an
    nn.Sequential: both compute what the unfused model computes."""
    fused, eager = _pair(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval())
    x = torch.randn(4, 6)
    want = eager(x)
    for compiled in (torch.jit.trace(fused, x), torch.jit.script(fused), torch.jit.script(dwfast.MLP(6, [8], 3))):
        assert isinstance(compiled, torch.jit.ScriptModule)
    torch.testing.assert_close(torch.jit.trace(fused, x)(x), want)
    torch.testing.assert_close(torch.jit.script(fused)(x), want)


@pytest.mark.parametrize("bad", ["gelu", "p_over_1", "p_negative", "p_nan"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_arguments_checked_as_eager(backend, bad, training):
    """nn.GELU takes any `approximate` string and Dropout's p can be set to anything: eager's
    F.gelu / F.dropout raise on every call, train or eval, and so does a fused chain."""
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 3)).train(training)
    fused, eager = _pair(model)
    for m in (fused, eager):
        if bad == "gelu":
            m[1].approximate = "Tanh"
        else:
            m[2].p = {"p_over_1": 1.5, "p_negative": -0.1, "p_nan": float("nan")}[bad]
    x = torch.randn(10, 6)
    with pytest.raises(Exception) as want:
        eager(x)
    with pytest.raises(type(want.value)) as got:
        fused(x)
    assert str(got.value) == str(want.value)


def test_errors_in_eager_order(backend):
    """A batch of one in training, and a width mismatch in a later block: eager meets the first
    BatchNorm's ValueError first."""
    fused, eager = _pair(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(9, 3)))
    for m in (eager, fused):
        with pytest.raises(ValueError):
            m(torch.randn(1, 6))


@pytest.mark.parametrize("x_grad", [False, True], ids=["input_no_grad", "input_grad"])
def test_weight_changed_in_place_before_backward(kernel_device, x_grad):
    """Changing the first weight in place between forward and backward: eager saved it (and so
    raises) only where the input takes a gradient; a fused chain then raises too, and otherwise
    gives eager's gradients."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fused, eager = _pair(model)
    x = torch.randn(12, 6).requires_grad_(x_grad)
    outs = [m(x) for m in (fused, eager)]
    for m in (fused, eager):
        with torch.no_grad():
            m[0].weight.mul_(0.5)
            m[0].bias.add_(1.0)  # (never saved)
    for out in outs:
        if x_grad:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        else:
            out.sum().backward()
    if not x_grad:
        _assert_same(_grads(fused, x), _grads(eager, x))


@pytest.mark.parametrize("last", ["relu", "tanh", "gelu"])
def test_output_changed_in_place(kernel_device, last):
    """A chain's output changed in place before the backward: an error where eager's last
    activation saved its result (ReLU, Tanh), eager's gradients where it did not (GELU)."""
    act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[last]
    fused, eager = _pair(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4), act))
    x = torch.randn(10, 6)
    if last == "gelu":
        _assert_same(_step(fused, x, inplace=True), _step(eager, x, inplace=True))
        return
    for m in (fused, eager):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _step(m, x, inplace=True)


def test_meta_device(kernel_device):
    """Meta tensors (shape inference) run eagerly, whatever the backend."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to("meta")
    out = dwfast.fuse(model)(torch.empty(4, 6, device="meta"))
    assert out.shape == (4, 3) and out.device.type == "meta"


def test_autocast_over_other_low_dtype(kernel_device):
    """bf16 autocast over an fp16 model: eager's BatchNorm refuses bf16 input with fp16
    parameters (fp32 or the input's dtype only), and so does a fused chain."""
    fused, eager = _pair(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).half())
    x = torch.randn(10, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as want:
            eager(x)
        with pytest.raises(RuntimeError) as got:
            fused(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_gradients_outlive_later_steps(kernel_device, precision):
    """What a backward hands out is the caller's: the input's and the parameters' gradients of
    one step, kept, are those of eager's step after more steps with other inputs and batch sizes
    (the backward's launches pass each other their g_y, u, v, g_z and TF32 splits through
    buffers kept between steps, launch.Workspace), and each step's gradients are eager's."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                              nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        fused, eager = _pair(model)
        kept = {}
        for i, rows in enumerate((10, 10, 7)):
            x = torch.randn(rows, 6)
            for m in (fused, eager):
                m.zero_grad(set_to_none=True)
                kept.setdefault(i, []).append(_step(m, x)[1:2 + len(list(m.parameters()))])
        for fused_grads, eager_grads in kept.values():
            _assert_same(fused_grads, eager_grads)
        storages = {g.untyped_storage().data_ptr() for fused_grads, _ in kept.values() for g in fused_grads}
        assert len(storages) == sum(len(f) for f, _ in kept.values())
    finally:
        torch.set_float32_matmul_precision(prev)


def test_batch_of_one_message(kernel_device):
    """A batch of one in training: eager's ValueError names the size of the BatchNorm's input
    (the block's width), and so does a fused chain's, for a BatchNorm after the first block too."""
    for model in (nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
                  nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())):
        fused, eager = _pair(model)
        messages = []
        for m in (fused, eager):
            with pytest.raises(ValueError) as err:
                m(torch.randn(1, 6))
            messages.append(str(err.value))
        assert messages[0] == messages[1]


def test_inference_tensors_outside_inference_mode(kernel_device):
    """A model made under torch.inference_mode, trained outside it: eager raises before any
    state changes, and so does a fused one (running statistics untouched); an inference-mode
    input likewise; in eval under no_grad both compute."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        fused, eager = dwfast.fuse(copy.deepcopy(model)), model
        x_inference = torch.randn(8, 6)
    for m in (fused, eager):
        with pytest.raises(RuntimeError, match="inference tensor"):
            m(torch.randn(8, 6))
        assert m[1].num_batches_tracked.item() == 1 and not m[1].running_mean.any()
    x = torch.randn(8, 6)
    for m in (fused, eager):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))
    fused, eager = _pair(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)))
    for m in (fused, eager):
        with pytest.raises(RuntimeError, match="[Ii]nference tensors cannot be saved"):
            m(x_inference)
    _assert_same(list(fused.buffers()), list(eager.buffers()))


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "whole_net"])
def test_enable_grad_inside_inference_mode(kernel_device, bn):
    """torch.enable_grad() inside torch.inference_mode(): eager records no graph there (inference
    mode outranks grad mode) and runs; so does a fused chain, per-layer and whole-net, with the
    same output and running statistics."""
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 3)]
    fused, eager = _pair(nn.Sequential(*layers))
    x = torch.randn(8, 6)
    outs = []
    for m in (fused, eager):
        with torch.inference_mode(), torch.enable_grad():
            outs.append(m(x))
        assert not outs[-1].requires_grad
    _assert_same([outs[0], *fused.buffers()], [outs[1], *eager.buffers()])


@pytest.mark.parametrize("other", ["sigmoid", "alpha_dropout", "linear_subclass", "layer_norm", "hooked"])
def test_fused_chain_runs_other_modules_as_they_are(kernel_device, other):
    """dwfast.fused_chain takes any blocks: modules chain.plan() would not group (other types,
    subclasses with their own forward, hooks) are called as nn.Sequential calls them, on every
    backend."""
    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    linear, bn, act, drop = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), None
    calls = []
    if other == "sigmoid":
        act = nn.Sigmoid()
    elif other == "alpha_dropout":
        drop = nn.AlphaDropout(0.5)
    elif other == "linear_subclass":
        linear = Shifted(6, 16)
    elif other == "layer_norm":
        bn = nn.LayerNorm(16)
    else:
        act.register_forward_hook(lambda *args: calls.append(1))
    blocks = [dwfast.Block(linear, bn, act, drop), dwfast.Block(nn.Linear(16, 3))]
    eager = copy.deepcopy(nn.Sequential(*[m for blk in blocks for m in blk if m is not None]))
    x = torch.randn(8, 6)
    torch.manual_seed(1)
    got = dwfast.fused_chain(x, blocks)
    torch.manual_seed(1)
    want = eager(x)
    torch.testing.assert_close(got, want)
    assert len(calls) == (2 if other == "hooked" else 0)


@pytest.mark.parametrize("case", ["relu_dropout_inplace", "tanh_dropout_inplace", "leaky_negative_inplace_eval",
                                  "leaky_negative_inplace_last"])
def test_in_place_modules_eager_backward_refuses(kernel_device, case, monkeypatch):
    """Chains whose in-place modules eager's backward refuses raise its RuntimeError there too:
    an in-place Dropout that drops overwrites a ReLU's or Tanh's saved result, and an in-place
    LeakyReLU with a negative slope has no backward (in training and eval)."""
    monkeypatch.setattr(nn.Dropout, "forward", _eager_dropout)  # eager's own, in place (conftest's is not)
    act = {"relu_dropout_inplace": nn.ReLU(), "tanh_dropout_inplace": nn.Tanh()}.get(case, nn.LeakyReLU(-0.5, True))
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), act]
    if "dropout" in case:
        layers.append(nn.Dropout(0.5, inplace=True))
    if not case.endswith("last"):
        layers.append(nn.Linear(16, 3))
    fused, eager = _pair(nn.Sequential(*layers).train(not case.endswith("eval")))
    x = torch.randn(8, 6)
    for m in (fused, eager):
        with pytest.raises(RuntimeError, match="inplace|[Ii]n-place"):
            m(x).sum().backward()
    _assert_same(list(fused.buffers()), list(eager.buffers()))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_forward_replaced_on_the_instance(kernel_device, which):
    """A child whose forward is set on the instance (accelerate's hooks, users' wrappers) runs
    that forward, set before or after the first call, as eager calls it."""
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    fused, eager = _pair(model)
    x = torch.randn(8, 6)
    fused(x)
    eager(x)
    for m in (fused, eager):
        child = m[which]
        child.forward = lambda h, forward=child.forward: 2.0 * forward(h)
    _assert_same(_step(fused, x), _step(eager, x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_batchnorm_shared_by_two_blocks(kernel_device, dtype):
    """One BatchNorm1d used by two blocks updates its running statistics twice, in order, in every
    dtype (16-bit ones go through fp32 copies in the interpreter: one copy for both blocks)."""
    bn = nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(6, 16), bn, nn.ReLU(), nn.Linear(16, 16), bn, nn.ReLU(), nn.Linear(16, 3))
    fused, eager = _pair(model.to(dtype))
    x = torch.randn(8, 6, dtype=dtype)
    with torch.no_grad():
        fused(x)
        eager(x)
    for f, e in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(f, e, rtol=2e-3, atol=2e-3)


def test_input_not_a_tensor(backend):
    """A list (or any non-tensor) as input raises eager's TypeError."""
    fused = dwfast.fuse(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()))
    with pytest.raises(TypeError):
        fused([[1.0, 2.0, 3.0]] * 4)
