"""fuse()/unfuse() on existing models: in place, same objects, same results as before."""
import copy
import io

import pytest
import torch
from torch import nn

from dwfast import MLP, FusedSequential, fuse, unfuse
from test_modules import TOL, assert_same_state, check_same


class BlockNet(nn.Module):
    """A typical existing model: a ModuleList of Sequential blocks, a ModuleDict of heads."""

    def __init__(self, n_in=10, width=16, depth=3, n_out=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()) for _ in range(depth)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Linear(width, n_out)), "b": nn.Linear(width, 1)})

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.heads["a"](x) + self.heads["b"](x)


class PlainSubclass(nn.Sequential):
    """Keeps nn.Sequential.forward: fuse can take it over."""


class OwnForward(nn.Sequential):
    """Overrides forward: fuse must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def sequentials(model):
    return [m for m in model.modules() if isinstance(m, nn.Sequential)]


def test_fuse_existing_model_with_optimizer_built_before(backend):
    model = BlockNet()
    eager = copy.deepcopy(model)
    params_before = list(model.parameters())
    children_before = list(model.modules())
    keys_before = list(model.state_dict())
    repr_before = repr(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)

    assert fuse(model) is model
    assert all(isinstance(m, FusedSequential) for m in sequentials(model))
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert all(a is b for a, b in zip(model.modules(), children_before))
    assert list(model.state_dict()) == keys_before
    assert repr(model) == repr_before.replace("Sequential", "FusedSequential")

    x, target = torch.randn(32, 10), torch.randn(32, 3)
    for step in range(3):
        losses = []
        for m, o in ((model, opt), (eager, opt_eager)):
            torch.manual_seed(step)  # same dropout masks
            loss = (m(x) - target).square().mean()
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], **TOL[torch.float32])
        assert_same_state(model, eager, **TOL[torch.float32])
    model.eval()
    eager.eval()
    torch.testing.assert_close(model(x), eager(x), **TOL[torch.float32])


def test_fuse_root_and_nested(backend):
    inner = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), inner, nn.Sequential(nn.Tanh()), nn.Linear(8, 2))
    eager = copy.deepcopy(model)
    assert fuse(model) is model
    assert type(model) is FusedSequential and type(inner) is FusedSequential
    assert type(model[3]) is nn.Sequential  # nothing to fuse in it
    check_same(model, eager, torch.randn(16, 6), steps=2, **TOL[torch.float32])


def test_subclasses(backend):
    model = nn.Sequential(PlainSubclass(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
                          OwnForward(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    eager = copy.deepcopy(model)
    fuse(model)
    assert isinstance(model[0], PlainSubclass) and isinstance(model[0], FusedSequential)
    assert type(model[0]).__name__ == "FusedPlainSubclass"
    assert type(model[1]) is OwnForward
    check_same(model, eager, torch.randn(16, 6), steps=2, **TOL[torch.float32])
    unfuse(model)
    assert [type(m) for m in model.children()] == [PlainSubclass, OwnForward, nn.Linear]
    assert type(model) is nn.Sequential


def test_fused_class_is_cached():
    a, b = fuse(PlainSubclass(nn.Linear(2, 2))), fuse(PlainSubclass(nn.Linear(3, 3)))
    assert type(a) is type(b)


def test_fuse_is_idempotent_and_unfuse_reverts(backend):
    model = BlockNet()
    eager = copy.deepcopy(model)
    fuse(fuse(model))
    assert [type(m) for m in sequentials(model)] == [FusedSequential] * 5
    check_same(model, eager, torch.randn(16, 10), **TOL[torch.float32])
    assert unfuse(model) is model
    assert [type(m) for m in sequentials(model)] == [nn.Sequential] * 5
    check_same(model, eager, torch.randn(16, 10), **TOL[torch.float32])


def test_unfuse_mlp():
    model = unfuse(MLP(4, [6], 2))
    assert type(model) is nn.Sequential
    assert list(model.state_dict()) == list(MLP(4, [6], 2).state_dict())


def test_hooks_survive_fuse(backend):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append("seq"))
    model[0].register_forward_pre_hook(lambda m, i: seen.append("linear"))
    fuse(model)
    model(torch.randn(4, 6))
    assert seen == ["linear", "seq"]


def test_fuse_leaves_non_fusable_models_alone():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.ModuleList([nn.Sequential(nn.Dropout())]))
    fuse(model)
    assert all(type(m) is nn.Sequential for m in sequentials(model))
    linear = nn.Linear(3, 3)
    assert fuse(linear) is linear and type(linear) is nn.Linear


@pytest.mark.parametrize("make", [BlockNet, lambda: nn.Sequential(PlainSubclass(nn.Linear(10, 3)))])
def test_fused_model_pickles_and_deepcopies(make):
    model = fuse(make()).eval()
    x = torch.randn(4, 10)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
        assert_same_state(clone, model, atol=0, rtol=0)
        torch.testing.assert_close(clone(x), model(x))
