"""count_params and mlp_by_budget: the width is the exact best fit, checked against its neighbours."""
import pytest
import torch
from torch import nn

from dwfast import MLP, count_params, mlp_by_budget


def test_count_params():
    linear = nn.Linear(3, 4)
    assert count_params(linear) == 3 * 4 + 4
    assert count_params(nn.Linear(3, 4, bias=False)) == 3 * 4
    # BatchNorm: affine weight and bias count, running stats (buffers) don't.
    assert count_params(nn.BatchNorm1d(5)) == 2 * 5
    assert count_params(nn.BatchNorm1d(5, affine=False)) == 0
    # Frozen parameters count; a shared parameter counts once.
    linear.requires_grad_(False)
    assert count_params(nn.Sequential(linear, nn.ReLU(), linear)) == 3 * 4 + 4


def width_of(model: MLP) -> int:
    widths = {m.out_features for m in list(model)[:-1] if isinstance(m, nn.Linear)}
    assert len(widths) <= 1
    return widths.pop() if widths else 0


def meta_count(n_features, width, depth, n_outputs, **kwargs):
    """count_params of an MLP of ``width``, built on the meta device so any size is cheap."""
    return count_params(MLP(n_features, [width] * depth, n_outputs, device="meta", **kwargs))


@pytest.mark.parametrize("n_features,n_params,depth,n_outputs,kwargs", [
    (10, 5_000, 3, 1, {}),
    (10, 5_000, 1, 1, {}),
    (7, 1_000, 2, 3, {"bias": False}),
    (7, 1_000, 2, 3, {"batchnorm": False}),
    (7, 1_000, 4, 3, {"batchnorm": False, "bias": False}),
    (128, 10**6, 5, 10, {}),
    (3, 10**14 + 7, 8, 2, {}),  # big enough for float square roots to be off
    (5, 61, 1, 1, {}),
    (5, 61, 3, 1, {"dropout": 0.5}),
])
def test_mlp_by_budget_is_closest(n_features, n_params, depth, n_outputs, kwargs):
    model = mlp_by_budget(n_features, n_params, depth, n_outputs, device="meta", **kwargs)
    assert isinstance(model, MLP)
    assert sum(isinstance(m, nn.Linear) for m in model) == depth + 1
    assert (model[0].in_features, model[-1].out_features) == (n_features, n_outputs)
    w = width_of(model)
    assert w >= 1
    got = count_params(model)
    assert got == meta_count(n_features, w, depth, n_outputs, **kwargs)
    # The count grows with the width, so beating both neighbours means beating every width.
    assert abs(meta_count(n_features, w + 1, depth, n_outputs, **kwargs) - n_params) >= abs(got - n_params)
    if w > 1:
        assert abs(meta_count(n_features, w - 1, depth, n_outputs, **kwargs) - n_params) > abs(got - n_params)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("width", [1, 2, 37])
def test_mlp_by_budget_hits_exact_counts(depth, width):
    n = meta_count(9, width, depth, 2)
    assert width_of(mlp_by_budget(9, n, depth, 2, device="meta")) == width
    assert width_of(mlp_by_budget(9, n + 1, depth, 2, device="meta")) == width


@pytest.mark.parametrize("depth", [1, 2])
def test_mlp_by_budget_ties_go_to_the_smaller_width(depth):
    # Find a budget exactly halfway between two neighbouring widths' counts.
    for w in range(1, 200):
        lo, hi = meta_count(4, w, depth, 1), meta_count(4, w + 1, depth, 1)
        if (lo + hi) % 2 == 0:
            break
    else:
        pytest.fail("no tie found")
    assert width_of(mlp_by_budget(4, (lo + hi) // 2, depth, 1, device="meta")) == w


def test_mlp_by_budget_depth_zero():
    model = mlp_by_budget(6, 10**6, 0, 3)
    assert [type(m) for m in model] == [nn.Linear]
    assert count_params(model) == 6 * 3 + 3
    with pytest.raises(ValueError, match=str(6 * 3 + 3)):
        mlp_by_budget(6, 6 * 3 + 2, 0, 3)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"batchnorm": False, "bias": False}])
def test_mlp_by_budget_too_small_says_the_minimum(kwargs):
    minimum = meta_count(6, 1, 3, 2, **kwargs)
    assert width_of(mlp_by_budget(6, minimum, 3, 2, **kwargs)) == 1
    with pytest.raises(ValueError, match=f"which has {minimum} parameters"):
        mlp_by_budget(6, minimum - 1, 3, 2, **kwargs)


@pytest.mark.parametrize("args,error", [
    ((6, 1000, -1), ValueError),
    ((0, 1000, 2), ValueError),
    ((6, 1000, 2, 0), ValueError),
    ((6, -5, 2), ValueError),
    ((6, 1000.0, 2), TypeError),
    ((6, 1000, 2.5), TypeError),
])
def test_mlp_by_budget_bad_arguments(args, error):
    with pytest.raises(error):
        mlp_by_budget(*args)


def test_mlp_by_budget_forwards_mlp_kwargs():
    model = mlp_by_budget(6, 2000, 2, 2, dropout=0.1, dtype=torch.float64)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model(torch.randn(8, 6, dtype=torch.float64))
