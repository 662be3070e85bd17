"""Models users build that the kernels must not get wrong: per-feature tensors that are strided
or of the wrong size, a Linear without input features, an output changed in place, NaN and
infinity through the chain. Each runs fused (the kernels through the interpreter, per-layer and
whole-net paths) and eager on copies of one model, and compares everything eager produces.
"""
import copy

import pytest
import torch
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
