"""Memory safety of the kernels under a checked interpreter (tests/checked_interpreter.py).

Triton's interpreter dereferences every address a kernel computes without a check, and runs a
launch's programs one after another, so on the CPU an out-of-bounds load reads a neighbour's
bytes, an out-of-bounds store corrupts one, and two programs storing to one address just run
in order; on a GPU those are faults, garbage and nondeterminism. The checker patches the
interpreter so that, per launch, every enabled load and store must lie inside the storage of
one of the launch's tensor arguments, and no two programs may store the same byte (or one read
what another stores) unless an acquire/release atomic orders them (batchnorm._ticket's "last
program" pattern). Each case runs a chain forward and backward under the checker and asserts
no finding. Shapes cross the interpreter's 32-wide tiles (and the dW batch split past 128
rows); one case runs the GPU tile heuristics (as on 8 SMs) instead, so those tile shapes and
batch splits are checked too.
"""
import pytest
import torch
from torch import nn

import dwfast
from conftest import GPU_MODE

if GPU_MODE:
    pytest.skip("the checked interpreter runs only under TRITON_INTERPRET=1", allow_module_level=True)

import checked_interpreter as ci  # noqa: E402  (beside this file)
from dwfast.kernels import fused_linear as fl  # noqa: E402
from dwfast.kernels import fused_mlp as fm  # noqa: E402


@pytest.fixture
def checker(monkeypatch):
    """The checked interpreter, with the whole-net kernels' layer tables declared (they reach
    the layers' tensors through the addresses a table holds)."""
    orig = fm.layer_table

    def layer_table(weights, biases, norms, device):
        table, sizes = orig(weights, biases, norms, device)
        tensors = [t for w, b, bn in zip(weights, biases, norms) for t in [w, b] + list(bn[:4] if bn else [])]
        ci.register_indirect(table, tensors)
        return table, sizes

    from dwfast import whole_net
    monkeypatch.setattr(fm, "layer_table", layer_table)
    monkeypatch.setattr(whole_net, "layer_table", layer_table)
    with ci.checked() as chk:
        yield chk


def gpu_tiles(monkeypatch, sms: int):
    """The GPU tile heuristics (no measured table) as on `sms` SMs, under the interpreter."""
    for mod in (fl, fm):
        monkeypatch.setattr(mod, "_interpreting", lambda: False)
        monkeypatch.setattr(mod, "num_sms", lambda: sms)
    monkeypatch.setattr(fl, "table_config", lambda *a, **k: None)


ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
        "none": None}


def chain(in_features, widths, bn="train", act="relu", dropout=0.0, bias=True, affine=True, track=True,
          momentum=0.1, last=False):
    layers, d = [], in_features
    for i, w in enumerate(widths):
        end = i == len(widths) - 1
        layers.append(nn.Linear(d, w, bias=bias))
        if bn != "none" and (not end or last):
            layers.append(nn.BatchNorm1d(w, affine=affine, track_running_stats=track, momentum=momentum))
        if ACTS[act] is not None and (not end or last):
            layers.append(ACTS[act]())
        if dropout and not end:
            layers.append(nn.Dropout(dropout))
        d = w
    model = nn.Sequential(*layers)
    if bn == "eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                if m.track_running_stats:
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                m.eval()
    return model


# (id, batch, in_features, widths, chain options, dtype, x layout, whole-net mode, fp32 precision)
CASES = [
    ("bn-relu-edges", 33, 17, [35, 9], dict(), torch.float32, "contiguous", "never", "high"),
    ("bn-last-gelu-deep", 45, 5, [20, 33, 3], dict(act="gelu", last=True, momentum=None), torch.float32,
     "transposed", "never", "highest"),
    ("no-affine-silu-dropout", 70, 40, [66, 31], dict(act="silu", affine=False, dropout=0.3, bias=False),
     torch.float16, "strided", "never", "high"),
    ("no-running-stats-tanh", 7, 3, [1, 70, 2], dict(act="tanh", track=False, last=True), torch.float32,
     "contiguous", "never", "high"),
    ("eval-bn-leaky", 65, 48, [34, 65], dict(bn="eval", act="leaky"), torch.float16, "contiguous", "never", "high"),
    ("batch-one", 1, 9, [16, 5], dict(bn="none", act="gelu"), torch.float32, "contiguous", "never", "highest"),
    ("dw-batch-split", 150, 6, [19, 4], dict(act="relu"), torch.float32, "contiguous", "never", "high"),
    ("whole-net-train", 70, 13, [16, 40, 3], dict(bn="none"), torch.float32, "transposed", "auto", "highest"),
    ("whole-net-eval-bn", 129, 7, [33, 18, 5], dict(bn="eval", last=True), torch.float16, "contiguous", "auto",
     "high"),
]


@pytest.mark.parametrize("batch,in_features,widths,options,dtype,layout,whole,precision",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_no_violations(kernel_device, checker, monkeypatch, batch, in_features, widths, options, dtype, layout,
                       whole, precision):
    monkeypatch.setattr(dwfast.backend, "_whole_net", None)
    dwfast.set_whole_net(whole)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        model = chain(in_features, widths, **options).to(dtype)
        dwfast.fuse(model)
        x = {"contiguous": lambda: torch.randn(batch, in_features),
             "transposed": lambda: torch.randn(in_features, batch).t(),
             "strided": lambda: torch.randn(batch, 2 * in_features)[:, ::2]}[layout]().to(dtype)
        if whole == "auto" and options.get("bn") == "eval":  # (the whole-net path: inference only)
            with torch.no_grad():
                assert torch.isfinite(model(x).float()).all()
        else:
            x.requires_grad_(True)
            y = model(x)
            y.backward(torch.randn_like(y))
            assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    finally:
        torch.set_float32_matmul_precision(prev)
    assert checker.launches > 0
    if whole == "auto":
        assert "_mlp_fwd_kernel" in checker.kernels, checker.kernels  # (the whole-net path ran)
    checker.assert_clean()


def test_steps_with_other_layouts(kernel_device, checker):
    """One model over steps whose inputs change batch, layout and saved-tensor hooks (the
    backward gets copies without the room behind rows that unhooked plans read: commit
    e3f6609's out-of-bounds read, which this checker reports on the code before it)."""
    model = chain(6, [8, 8, 3], momentum=None)
    dwfast.fuse(model)
    steps = [(12, "contiguous", False), (12, "contiguous", True), (33, "transposed", False), (12, "strided", True)]
    for batch, layout, hooked in steps:
        x = {"contiguous": lambda: torch.randn(batch, 6), "transposed": lambda: torch.randn(6, batch).t(),
             "strided": lambda: torch.randn(batch, 12)[:, ::2]}[layout]()
        model.zero_grad()
        hooks = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooked else
                 torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
        with hooks:
            y = model(x)
        y.sum().backward()
    checker.assert_clean()


def test_dropout_scale_kernel(kernel_device, checker):
    """kernels.dropout_scale (the masks eager references draw) on shapes off its tiles."""
    from dwfast import kernels as K
    from dwfast.ops import draw_seed
    for m, n in ((1, 1), (33, 17), (70, 65)):
        K.dropout_scale(draw_seed(kernel_device), m, n, 0.3)
    assert "_dropout_scale_kernel" in checker.kernels
    checker.assert_clean()


def test_gpu_tiles(kernel_device, checker, monkeypatch):
    """The GPU tile heuristics (64- and 128-row tiles, narrow 16-wide ones, batch splits for the
    dW of a device with 8 SMs): what a GPU launches, checked on the CPU."""
    gpu_tiles(monkeypatch, 8)
    monkeypatch.setattr(dwfast.backend, "_whole_net", None)
    dwfast.set_whole_net("never")
    model = chain(20, [37, 12], act="gelu", last=True)
    dwfast.fuse(model)
    x = torch.randn(140, 20, requires_grad=True)
    y = model(x)
    y.backward(torch.randn_like(y))
    assert checker.launches > 0
    checker.assert_clean()


def test_checker_catches_a_bad_launch(kernel_device, checker):
    """The checker itself: a kernel launch given a view too short for its grid is reported."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))

    src, dst = torch.arange(24.0), torch.zeros(24)
    _copy[(2,)](src[:10], dst[:10], BLOCK=16)  # 32 elements: past both 24-element storages
    kinds = sorted({(f.kind, f.access) for f in checker.violations})
    assert kinds == [("oob", "load"), ("oob", "store")], checker.report()
    assert torch.equal(dst, torch.arange(24.0))  # (sanitised: only the in-bounds part copied)
    checker.clear()
