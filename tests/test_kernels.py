"""The fused chain against eager PyTorch: outputs, every gradient, running statistics.

Three-way rule (flash-attention's tests): the fused result's error against an fp64 eager
reference must be at most twice eager PyTorch's own error in the same dtype, plus a small
atol scaled by the reference's magnitude. The rule is flip-aware: a ReLU decision at a
pre-activation within rounding of 0 may go either way (see `compare`). Runs the kernels through Triton's interpreter on
the CPU (or on a GPU with DWFAST_TEST_GPU=1).
"""
import collections
import contextlib
import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_cuda
from dwfast import ops
from dwfast.chain import Block, eager_chain
from dwfast.functional import fused_chain

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOW = [torch.float16, torch.bfloat16]


def make_chain(in_features, widths, *, bn=True, relu=True, last_act=False, bias=True, bn_bias=True, act=nn.ReLU,
               dropout=0.0, **bn_kwargs):
    """Blocks in_features -> widths[0] -> ...; each block but the last has BatchNorm, the
    activation `act()` and Dropout(`dropout`) (as `bn`/`relu`/`dropout` say), the last one
    too when `last_act`; `bias` is the Linear's, `bn_bias`
    BatchNorm's own (torch >= 2.13). BN parameters and running
    statistics are random, so nothing passes by being the identity."""
    blocks, prev = [], in_features
    for i, width in enumerate(widths):
        hidden = i < len(widths) - 1 or last_act
        if not bn_bias:
            bn_kwargs["bias"] = False
        norm = nn.BatchNorm1d(width, **bn_kwargs) if bn and hidden else None
        if norm is not None and norm.weight is not None:
            nn.init.uniform_(norm.weight, 0.5, 1.5)
        if norm is not None and norm.bias is not None:
            nn.init.normal_(norm.bias)
        if norm is not None and norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
        drop = nn.Dropout(dropout) if dropout and hidden else None
        blocks.append(Block(nn.Linear(prev, width, bias=bias), norm, act() if relu and hidden else None, drop))
        prev = width
    return blocks


def cast(blocks, dtype, device):
    """A deep copy of `blocks` in `dtype` on `device`."""
    out = []
    for b in copy.deepcopy(blocks):
        bn = b.bn.to(device, dtype) if b.bn is not None else None
        out.append(b._replace(linear=b.linear.to(device, dtype), bn=bn))
    return out


def set_training(blocks, mode):
    for b in blocks:
        if b.bn is not None:
            b.bn.train(mode)


def run(fn, blocks, x, grad_out, x_grad=True):
    """Output, input and parameter gradients, and BN buffers after one fn(x) and backward."""
    x = x.detach().clone().requires_grad_(x_grad)
    out = fn(x, blocks)
    res = {"out": out}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        if x_grad:
            res["x.grad"] = x.grad
    for i, b in enumerate(blocks):
        for mod_name, mod in (("linear", b.linear), ("bn", b.bn)):
            if mod is None:
                continue
            for name, p in mod.named_parameters():
                if grad_out is not None and p.requires_grad:
                    res[f"{i}.{mod_name}.{name}.grad"] = p.grad
            for name, buf in mod.named_buffers():
                res[f"{i}.{mod_name}.{name}"] = buf
    return res


def _seeded(device, fn, *args):
    """fn(*args) from a fixed RNG state, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(1)
        return fn(*args)


def compare(blocks, x, dtype, device, *, training=True, grad=True, x_grad=True, steps=1, fused_fn=fused_chain):
    """Run `blocks` fused (`fused_fn`) in `dtype`, eager in `dtype` and eager in fp64; check the
    rule on the last step.

    Flip-aware: where a ReLU's pre-activation lies within rounding of 0, the fused path and
    fp64 may decide differently, and one flipped decision moves the gradients by O(1). When
    the rule fails, it is checked again against an fp64 run that takes the fused path's own
    decisions (:func:`fused_masks`), which may differ from fp64's only near 0 (:class:`Masked`).
    """
    fused, eager, ref = cast(blocks, dtype, device), cast(blocks, dtype, device), cast(blocks, torch.float64, device)
    for bs in (fused, eager, ref):
        set_training(bs, training)
        for b in bs:
            if b.dropout is not None:
                b.dropout.train(training)
    width = blocks[-1].linear.out_features
    for _ in range(steps):
        xs = x if steps == 1 else torch.randn_like(x)
        grad_out = torch.randn(x.shape[0], width) if grad else None
        before = copy.deepcopy((fused, ref))  # the runs update BatchNorm statistics and .grad
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            # the same seed before each: the same dropout masks (conftest's kernel_mask_dropout)
            got = _seeded(device, run, fused_fn, fused, xs.to(device, dtype), grad_out, x_grad)
            same = _seeded(device, run, eager_chain, eager, xs.to(device, dtype), grad_out, x_grad)
            want = _seeded(device, run, eager_chain, ref, xs.to(device, torch.float64), grad_out, x_grad)
    try:
        assert_three_way(got, same, want, dtype, _bias_scales(want, blocks, training))
    except AssertionError:
        masks = fused_masks(fused_fn, before[0], xs.to(device, dtype), grad, x_grad, device)
        if not any(m is not None for m in masks):
            raise
        masked = [b if m is None else b._replace(act=Masked(b.act, m, ATOL[dtype])) for b, m in zip(before[1], masks)]
        with ctx:
            want = _seeded(device, run, eager_chain, masked, xs.to(device, torch.float64), grad_out, x_grad)
        assert_three_way(got, same, want, dtype, _bias_scales(want, blocks, training))
    return got


def fused_masks(fused_fn, blocks, x, grad, x_grad, device):
    """Per block, where the fused path finds the pre-activation of its ReLU / LeakyReLU > 0
    (None for other blocks): the output of a fused run of the chain up to that block, without
    its activation and Dropout, on copies (their own statistics), from the same seed (the
    same dropout masks upstream) and in the same grad mode (the same kernels)."""
    masks = []
    for i, b in enumerate(blocks):
        if type(b.act) not in (nn.ReLU, nn.LeakyReLU):
            masks.append(None)
            continue
        prefix = copy.deepcopy(blocks[:i + 1])
        prefix[-1] = prefix[-1]._replace(act=None, dropout=None)
        with torch.enable_grad() if grad else torch.no_grad():
            y = _seeded(device, fused_fn, x.detach().clone().requires_grad_(x_grad), prefix)
        masks.append(y.detach() > 0)
    return masks


class Masked(nn.Module):
    """A ReLU / LeakyReLU that takes its decisions (y > 0) from `keep`, and checks that they
    differ from y's own only where |y| <= atol * (1 + max |y|): rounding's reach, not a bug's."""

    def __init__(self, act, keep, atol):
        super().__init__()
        self.slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
        self.keep, self.atol = keep, atol

    def forward(self, y):
        flipped = self.keep != (y > 0)
        reach = self.atol * (1 + y.abs().max().item())
        assert (y[flipped].abs() <= reach).all(), f"a ReLU decision differs at |y| = {y[flipped].abs().max():.3g}"
        return torch.where(self.keep, y, y * self.slope)


def assert_three_way(got, same, want, dtype, scales=None):
    """For each key: got's error against the fp64 `want` is at most twice `same`'s (eager in
    the same dtype) plus ATOL[dtype] * (1 + scale), scale = max |want| unless `scales` says.
    Buffers named num_batches_tracked must be equal."""
    assert got.keys() == want.keys()
    for key, r in want.items():
        g, e = got[key], same[key]
        assert g.dtype == e.dtype and g.shape == e.shape, key
        if key.endswith("num_batches_tracked"):
            assert torch.equal(g, e), key
            continue
        r, g, e = r.double().cpu(), g.double().cpu(), e.double().cpu()
        scale = (scales or {}).get(key, r.abs().max().item() if r.numel() else 0.0)
        tol = 2 * (e - r).abs().max().item() + ATOL[dtype] * (1 + scale) if r.numel() else 0.0
        err = (g - r).abs().max().item() if r.numel() else 0.0
        assert not torch.isnan(g).any(), key
        assert err <= tol, f"{key}: error {err:.3g} > tolerance {tol:.3g} (eager's error {(e - r).abs().max():.3g})"


def _bias_scales(want, blocks, training):
    """A Linear bias before BatchNorm with batch statistics (directly, or through Linears with
    nothing between them) has gradient ~0 in exact arithmetic, a sum of terms that cancel:
    judge it on its weight's scale instead."""
    scales, removed = {}, False  # removed: a constant shift of this block's output is normalised away
    for i in reversed(range(len(blocks))):
        b = blocks[i]
        batch_bn = b.bn is not None and (training or b.bn.running_mean is None)
        linear_only = b.bn is None and b.act is None and (b.dropout is None or not training)
        removed = batch_bn or (linear_only and removed)
        key = f"{i}.linear.bias.grad"
        if key in want and removed:
            scales[key] = max(want[key].abs().max().item(), want[f"{i}.linear.weight.grad"].abs().max().item())
    return scales


# (batch, in_features, widths, last_act): odd sizes that cross tile edges (tiles are 32
# under the interpreter), width 1, depth up to 6, chains ending on a Linear or on BN+ReLU.
SHAPES = [
    (2, 1, [1], False),
    (7, 5, [3, 2], False),
    (33, 17, [40, 9], True),
    (64, 32, [32, 32, 32, 32, 32, 1], False),
    (130, 129, [127, 7], False),
    (257, 33, [65, 31, 5], True),
    (300, 7, [130, 3], False),
]


@pytest.mark.parametrize("batch,in_features,widths,last_act", SHAPES)
def test_train_fp32(kernel_device, batch, in_features, widths, last_act):
    blocks = make_chain(in_features, widths, last_act=last_act)
    compare(blocks, torch.randn(batch, in_features) * 2 + 0.5, torch.float32, kernel_device)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("batch,in_features,widths,last_act", [SHAPES[1], SHAPES[2], SHAPES[5]])
def test_train_low_precision(kernel_device, dtype, batch, in_features, widths, last_act):
    blocks = make_chain(in_features, widths, last_act=last_act)
    compare(blocks, torch.randn(batch, in_features), dtype, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_eval(kernel_device, dtype, grad):
    blocks = make_chain(19, [45, 33, 4], last_act=False)
    compare(blocks, torch.randn(70, 19), dtype, kernel_device, training=False, grad=grad)


@pytest.mark.parametrize("last_act", [False, True])
def test_train_no_grad_updates_running_stats(kernel_device, last_act):
    compare(make_chain(10, [20, 6], last_act=last_act), torch.randn(40, 10), torch.float32, kernel_device, grad=False)


@pytest.mark.parametrize("options", [
    dict(momentum=None),
    dict(momentum=0.3),
    dict(affine=False),
    pytest.param(dict(bn_bias=False), marks=pytest.mark.skipif(
        "bias" not in inspect.signature(nn.BatchNorm1d).parameters, reason="BatchNorm1d(bias=) needs torch >= 2.13")),
    dict(track_running_stats=False),
    dict(eps=1e-2),
    dict(bias=False),
    dict(bn=False),
    dict(relu=False),
    dict(bn=False, relu=False),
], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_options(kernel_device, options, training):
    blocks = make_chain(12, [24, 17, 3], last_act=True, **options)
    compare(blocks, torch.randn(45, 12), torch.float32, kernel_device, training=training, steps=2)


def test_mixed_modes(kernel_device):
    """One BatchNorm in eval, the next in training: each block uses its own mode."""
    blocks = make_chain(9, [20, 20, 5])
    fused, eager = cast(blocks, torch.float32, kernel_device), cast(blocks, torch.float32, kernel_device)
    for bs in (fused, eager):
        bs[0].bn.eval()
    x = torch.randn(50, 9, device=kernel_device)
    torch.testing.assert_close(fused_chain(x, fused), eager_chain(x, eager), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1].bn.running_var, eager[1].bn.running_var)
    torch.testing.assert_close(fused[0].bn.running_var, eager[0].bn.running_var)
    assert fused[0].bn.num_batches_tracked.item() == 0 and fused[1].bn.num_batches_tracked.item() == 1


def test_input_without_grad(kernel_device):
    got = compare(make_chain(16, [32, 8]), torch.randn(40, 16), torch.float32, kernel_device, x_grad=False)
    assert "x.grad" not in got


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_noncontiguous_input(kernel_device, layout):
    blocks = make_chain(24, [40, 5])
    base = torch.randn(24, 50) if layout == "transposed" else torch.randn(50, 48)
    x = base.t() if layout == "transposed" else base[:, ::2]
    assert not x.is_contiguous()
    compare(blocks, x, torch.float32, kernel_device)


@pytest.mark.parametrize("source", ["bias", "input"])
def test_large_mean_small_std(kernel_device, source):
    """|mean| >> std: at mean 1e4, fp32's E[z^2] - E[z]^2 is off by ~6 against var ~0.3, and
    fp32 tile means merged naively lose ~1e-3 relative; the kernels' statistics must not."""
    blocks = make_chain(8, [16, 4], momentum=1.0)
    x = torch.randn(200, 8)
    with torch.no_grad():
        if source == "bias":
            blocks[0].linear.bias.fill_(1e4)
        else:
            blocks[0].linear.weight.abs_()
            x += 3e3
    compare(blocks, x, torch.float32, kernel_device)


@requires_cuda
def test_fp32_highest_precision(kernel_device, monkeypatch):
    """fp32 at torch's default matmul precision, "highest", runs 3xTF32 on tensor cores
    (kernels/fused_linear.py, _precision) and passes the rule against fp64 at K = 1024, where
    plain TF32 (checked too) is 100x off: its 2^-11 relative rounding, summed over 1024
    products, against fp32's 2^-24."""
    from dwfast.kernels import fused_linear
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        blocks = make_chain(1024, [1024, 1000, 7])
        x = torch.randn(512, 1024)
        compare(blocks, x, torch.float32, kernel_device)
        monkeypatch.setattr(fused_linear, "_precision", lambda dtype: "tf32")
        with pytest.raises(AssertionError):
            compare(blocks, x, torch.float32, kernel_device)
    finally:
        torch.set_float32_matmul_precision(prev)


def test_backward_is_deterministic(kernel_device):
    blocks = cast(make_chain(20, [64, 64, 3]), torch.float32, kernel_device)
    x = torch.randn(300, 20, device=kernel_device)
    grads = []
    for _ in range(2):
        for b in blocks:
            b.linear.zero_grad()
        fused_chain(x, blocks).square().sum().backward()
        grads.append([b.linear.weight.grad.clone() for b in blocks])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: with one active, chains go through the custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [dict(), dict(dropout=0.25, last_act=True), dict(bn=False)],
                         ids=["bn", "dropout_last_act", "no_bn"])
def test_eager_calls_match_the_custom_ops(kernel_device, options, monkeypatch):
    """Eager calls run the plans themselves (ops._Chain); traced ones through the custom ops
    (chain_body, chain_forward, chain_backward): the same launches, so bitwise the same
    outputs, gradients and running statistics, over two steps (the second reuses the plans)."""
    paths = collections.Counter()
    for name in ("_run_call", "chain_forward"):
        def counted(*args, _fn=getattr(ops, name), _name=name):
            paths[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(ops, name, counted)
    blocks = cast(make_chain(20, [150, 33, 5], **options), torch.float32, kernel_device)  # (150: not whole-net)
    x = torch.randn(70, 20, device=kernel_device)
    grad_out = torch.randn(70, 5, device=kernel_device)
    assert_eager_matches_ops(kernel_device, blocks, x, grad_out, steps=2)
    assert paths == {"_run_call": 2, "chain_forward": 2}


def assert_eager_matches_ops(device, blocks, x, grad_out, steps=1, infer=False):
    """`run` `steps` times on a copy of `blocks` eagerly, then on another under _PassThrough
    (through the custom ops): bitwise the same outputs, gradients and running statistics, and
    with `infer` the same no-grad forward after them."""
    results = []
    for through_ops in (False, True):
        copies = copy.deepcopy(blocks)
        with _PassThrough() if through_ops else contextlib.nullcontext():
            for _ in range(steps):
                res = _seeded(device, run, fused_chain, copies, x, grad_out)
            if infer:
                with torch.no_grad():
                    res["infer"] = fused_chain(x, copies)
        results.append(res)
    assert results[0].keys() == results[1].keys()
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


@pytest.mark.parametrize("at,flip_allowed", [(2.0 ** -18, True), (0.5, False)])
def test_rule_is_flip_aware(at, flip_allowed):
    """A stand-in for the fused path that decides one ReLU the other way, at a pre-activation
    `at` from 0 (exact in every dtype and summation order: dyadic weights, x[0] = 1). The
    decision moves dW by O(1) either way; within rounding of 0 the rule accepts it, at 0.5 it
    is a bug."""
    blocks = make_chain(6, [8, 3], bn=False)
    x = torch.randn(20, 6)
    x[0] = 1.0
    with torch.no_grad():
        blocks[0].linear.weight[0] = torch.tensor([0.25, -0.5, 0.125, 0.75, -0.25, 0.5])
        blocks[0].linear.bias[0] = at - 0.875

    def flipped(x, blocks):  # z[0, 0] = at becomes -at, so its ReLU decides the other way
        first = blocks[0]
        shift = torch.zeros(x.shape[0], 8, dtype=x.dtype)
        shift[0, 0] = 2 * at
        shifted = SimpleNamespace(forward=lambda h: first.linear(h) - shift)  # eager_chain calls forward
        return eager_chain(x, [first._replace(linear=shifted), *blocks[1:]])

    if flip_allowed:
        compare(blocks, x, torch.float32, "cpu", fused_fn=flipped)
    else:
        with pytest.raises(AssertionError, match="decision differs"):
            compare(blocks, x, torch.float32, "cpu", fused_fn=flipped)

