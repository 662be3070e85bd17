"""The whole-net path (dwfast/whole_net.py, kernels/fused_mlp.py) against eager PyTorch.

Same three-way rule as test_kernels.py (its `make_chain` / `compare`), and every case also
checks that the whole-net kernel really ran (a spy on its ops), so a silent fall back to the
per-layer chain cannot pass for it. Tiles are 32 rows under the interpreter and the
backward runs 4 programs, so batches of 100 and 257 cross tiles and accumulate partials.
"""

import inspect

import pytest
import torch
from test_kernels import assert_eager_matches_ops, cast, compare, make_chain
from torch import nn

import dwfast
from dwfast import whole_net
from dwfast.functional import fused_chain

LOW = [torch.float16, torch.bfloat16]

# (batch, in_features, widths, last_act): hidden widths 16, 33 (padded to 64), 64, 128 and
# mixed; input widths 1, 5, 200 (first layer in several K chunks); output widths 1, 3, 130.
SHAPES = [
    (1, 1, [16, 1], False),
    (7, 5, [33, 3], True),
    (100, 200, [64, 64, 130], False),
    (257, 5, [128, 128, 3], False),
    (33, 17, [16, 40, 128, 20, 5], True),
]
DEEP = (70, 7, [32] * 15 + [3], False)  # depth 16


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the whole-net ops made through `whole_net_chain`."""
    calls = {"infer": 0, "train": 0}

    def wrap(name, op):
        def counted(*args):
            calls[name] += 1
            return op(*args)
        return counted

    # the ops, and the functions eager calls run without them (library.direct)
    for kind, names in (("infer", ("mlp_infer", "_infer")), ("train", ("mlp_train", "_train"))):
        for name in names:
            monkeypatch.setattr(whole_net, name, wrap(kind, getattr(whole_net, name)))
    return calls


@pytest.mark.parametrize("batch,in_features,widths,last_act", SHAPES + [DEEP])
def test_infer_eval_bn(kernel_device, spy, batch, in_features, widths, last_act):
    blocks = make_chain(in_features, widths, last_act=last_act)
    compare(blocks, torch.randn(batch, in_features), torch.float32, kernel_device, training=False, grad=False)
    assert spy["infer"] == 1


@pytest.mark.parametrize("batch,in_features,widths,last_act", SHAPES + [DEEP])
def test_train_no_bn(kernel_device, spy, batch, in_features, widths, last_act):
    """Output, input gradient and every parameter gradient through the fused backward."""
    blocks = make_chain(in_features, widths, bn=False, last_act=last_act)
    compare(blocks, torch.randn(batch, in_features), torch.float32, kernel_device)
    assert spy["train"] == 1


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("batch,in_features,widths,last_act", [SHAPES[1], SHAPES[3], DEEP])
def test_low_precision(kernel_device, spy, dtype, batch, in_features, widths, last_act):
    x = torch.randn(batch, in_features)
    compare(make_chain(in_features, widths, last_act=last_act), x, dtype, kernel_device, training=False, grad=False)
    compare(make_chain(in_features, widths, bn=False, last_act=last_act), x, dtype, kernel_device)
    assert spy == {"infer": 1, "train": 1}


@pytest.mark.parametrize("options", [
    dict(bn=False),                 # inference without BatchNorm
    dict(relu=False),
    dict(bias=False),
    dict(affine=False),
    pytest.param(dict(bn_bias=False), marks=pytest.mark.skipif(
        "bias" not in inspect.signature(nn.BatchNorm1d).parameters, reason="BatchNorm1d(bias=) needs torch >= 2.13")),
    dict(eps=1e-1),
], ids=str)
def test_infer_options(kernel_device, spy, options):
    blocks = make_chain(12, [24, 17, 3], last_act=True, **options)
    compare(blocks, torch.randn(45, 12), torch.float32, kernel_device, training=False, grad=False)
    assert spy["infer"] == 1


@pytest.mark.parametrize("options", [dict(relu=False), dict(bias=False)], ids=str)
def test_train_options(kernel_device, spy, options):
    blocks = make_chain(12, [24, 17, 3], bn=False, last_act=True, **options)
    compare(blocks, torch.randn(45, 12), torch.float32, kernel_device)
    assert spy["train"] == 1


def test_train_input_without_grad(kernel_device, spy):
    got = compare(make_chain(16, [32, 8], bn=False), torch.randn(40, 16), torch.float32, kernel_device, x_grad=False)
    assert "x.grad" not in got and spy["train"] == 1


def test_noncontiguous_input(kernel_device, spy):
    x = torch.randn(20, 70).t()
    compare(make_chain(20, [32, 5], bn=False), x, torch.float32, kernel_device)
    assert spy["train"] == 1


def test_backward_is_deterministic(kernel_device, spy):
    blocks = cast(make_chain(20, [64, 64, 3], bn=False), torch.float32, kernel_device)
    x = torch.randn(300, 20, device=kernel_device, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        for b in blocks:
            b.linear.zero_grad()
        fused_chain(x, blocks).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for b in blocks for p in b.linear.parameters()])
    assert spy["train"] == 2
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _taken(blocks, x, spy):
    before = dict(spy)
    fused_chain(x, blocks)
    return spy != before


@pytest.mark.parametrize("case,expected", [
    ("qualifies_eval", True),
    ("qualifies_no_bn_train", True),
    ("one_block", False),
    ("hidden_too_narrow", False),
    ("hidden_too_wide", False),
    ("bn_training", False),
    ("eval_bn_with_grad", False),
    ("mixed_relu", False),
])
def test_dispatch_rule(kernel_device, spy, case, expected):
    widths = {"one_block": [20], "hidden_too_narrow": [8, 3], "hidden_too_wide": [129, 3]}.get(case, [32, 32, 3])
    blocks = cast(make_chain(6, widths, bn=case not in ("qualifies_no_bn_train", "mixed_relu")),
                  torch.float32, kernel_device)
    for b in blocks:
        if b.bn is not None:
            b.bn.train(case == "bn_training")
    if case == "mixed_relu":
        blocks[1] = blocks[1]._replace(act=None)
    grad = case in ("qualifies_no_bn_train", "eval_bn_with_grad", "bn_training")
    with torch.set_grad_enabled(grad):
        assert _taken(blocks, torch.randn(10, 6, device=kernel_device), spy) == expected


def test_never_switch(kernel_device, spy, monkeypatch):
    blocks = cast(make_chain(6, [32, 32, 3]), torch.float32, kernel_device)
    for b in blocks:
        if b.bn is not None:
            b.bn.eval()
    x = torch.randn(10, 6, device=kernel_device)
    assert dwfast.get_whole_net() == "auto"
    with torch.no_grad():
        dwfast.set_whole_net("never")
        try:
            assert not _taken(blocks, x, spy)
        finally:
            dwfast.set_whole_net("auto")
        assert _taken(blocks, x, spy)
        with pytest.raises(ValueError, match="never"):
            dwfast.set_whole_net("always")
        monkeypatch.setattr(dwfast.backend, "_whole_net", None)
        monkeypatch.setenv("DWFAST_WHOLE_NET", "never")
        assert dwfast.get_whole_net() == "never" and not _taken(blocks, x, spy)


def test_opcheck(kernel_device):
    """The ops pass torch.library's checks (fake kernels, autograd registration): three layers,
    the last without a bias; in inference BatchNorm on the first two, one without affine."""
    dev = kernel_device
    x = torch.randn(20, 6, device=dev, requires_grad=True)
    weights = [torch.randn(*s, device=dev, requires_grad=True) for s in ((12, 6), (16, 12), (3, 16))]
    biases = [torch.randn(n, device=dev, requires_grad=True) for n in (12, 16)]
    ints = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # per layer: bias, BatchNorm, gamma, beta
    torch.library.opcheck(whole_net.mlp_train, (x, weights, biases, ints, True, False))
    bn = ([torch.randn(n, device=dev) for n in (12, 16)], [torch.rand(n, device=dev) + 0.5 for n in (12, 16)],
          [torch.randn(12, device=dev)], [torch.randn(12, device=dev)])
    ints = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with torch.no_grad():
        torch.library.opcheck(whole_net.mlp_infer, (x, weights, biases, *bn, ints, [1e-5, 1e-3, 0.0], True, True))


def test_eager_calls_match_the_custom_ops(kernel_device, spy):
    """Eager calls run the whole-net code around its ops (library.direct); under a dispatch
    mode the ops run: bitwise the same outputs and gradients, training and eval."""
    blocks = cast(make_chain(12, [24, 17, 3], bn=False), torch.float32, kernel_device)
    x = torch.randn(45, 12, device=kernel_device)
    grad_out = torch.randn(45, 3, device=kernel_device)
    assert_eager_matches_ops(kernel_device, blocks, x, grad_out, infer=True)
    assert spy == {"train": 2, "infer": 2}
