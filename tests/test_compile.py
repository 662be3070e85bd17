"""torch.compile and torch.library checks: the fused ops trace with fullgraph=True and give
eager's results, and every custom op passes `torch.library.opcheck`.

Compiling dominates the run time (inductor builds C++ on the CPU), so few models are compiled:
each runs two training steps and an eval step against an unfused eager copy.
"""
import copy

import pytest
import torch
from torch import nn

import dwfast
from conftest import requires_cuda
from dwfast import ops
from dwfast.kernels import ACTIVATIONS
from dwfast.ops import BATCH, FIXED, NO_BN, chain_backward, chain_body, chain_forward


def small_model(width=10, bn=True, momentum=0.1):
    """6 -> width -> width + 2 -> 3: two Linear [BatchNorm1d] ReLU blocks (random affine
    parameters, the second Linear without bias) and a Linear. Hidden widths under 16 run the
    per-layer ops; 16 to 128 may take the whole-net kernel (dwfast.whole_net)."""
    layers = [nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width + 2, bias=False), nn.ReLU(),
              nn.Linear(width + 2, 3)]
    if bn:
        layers[3:3] = [nn.BatchNorm1d(width + 2, momentum=momentum)]
        layers[1:1] = [nn.BatchNorm1d(width, momentum=momentum)]
    for m in layers:
        if isinstance(m, nn.BatchNorm1d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
    return nn.Sequential(*layers)


def _state(model):
    return {**{f"{n}.grad": p.grad for n, p in model.named_parameters()}, **dict(model.named_buffers())}


def _check_compiled(compiler, device, width=10, momentum=0.1, bn=True, **tol):
    """Two training steps and an eval step of a compiled fused model against eager."""
    torch._dynamo.reset()
    eager = small_model(width, bn, momentum).to(device)
    fused = dwfast.fuse(copy.deepcopy(eager))
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    for _ in range(2):
        x, grad = torch.randn(20, 6, device=device), torch.randn(20, 3, device=device)
        out = compiled(x)
        want = eager(x)
        out.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(_state(fused), _state(eager), **tol)
    fused.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **tol)


@pytest.mark.parametrize("compiler,momentum", [
    ("aot_eager", 0.1),
    ("aot_eager", None),   # eager BatchNorm1d fails here under fullgraph (pytorch#194504)
    ("inductor", None),
])
def test_compiled_matches_eager(backend, compiler, momentum):
    _check_compiled(compiler, "cpu", momentum=momentum)


def test_compiled_whole_net(backend):
    """Widths the whole-net kernel takes in eval (with BatchNorm folded in)."""
    _check_compiled("aot_eager", "cpu", width=20)


def test_compiled_whole_net_training(backend):
    """The whole-net kernel in training (no BatchNorm) and in eval with grad mode on: the trace
    asks whether a graph is recorded without reading inference mode, which dynamo can't."""
    _check_compiled("aot_eager", "cpu", width=20, bn=False)
    torch._dynamo.reset()
    eager = small_model(20).eval()
    fused = dwfast.fuse(copy.deepcopy(eager))
    x = torch.randn(20, 6)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True, backend="aot_eager")(x), eager(x))


@requires_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_matches_eager_cuda(momentum):
    """The Triton kernels (TF32 GEMMs against eager's fp32: a TF32-sized tolerance)."""
    _check_compiled("inductor", "cuda", momentum=momentum, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- opcheck

def _sample(x, widths, modes, acts, bias=True, affine=True, slopes=None, drop_ps=None, tracked=None,
            cumulative=False):
    """A chain's tensors and packed options for blocks x.shape[1] -> widths[0] -> ..., random
    parameters; `acts` are names of kernels.ACTIVATIONS; `tracked` (default: every BATCH block)
    update their running statistics."""
    n = len(widths)
    tracked = tracked if tracked is not None else [m == BATCH for m in modes]
    slopes, drop_ps = slopes or [0.0] * n, drop_ps or [0.0] * n
    s = dict(x=x, weights=[], biases=[], gammas=[], betas=[], running_means=[], running_vars=[], num_batches=[],
             fixed=[], specs=[])
    prev = x.shape[1]
    for i, (width, mode) in enumerate(zip(widths, modes)):
        s["weights"].append(torch.randn(width, prev, requires_grad=True))
        if bias:
            s["biases"].append(torch.randn(width, requires_grad=True))
        if mode != NO_BN and affine:
            s["gammas"].append(torch.rand(width).add(0.5).requires_grad_())
            s["betas"].append(torch.randn(width, requires_grad=True))
        if mode == FIXED or tracked[i]:
            s["running_means"].append(torch.randn(width))
            s["running_vars"].append(torch.rand(width) + 0.5)
            s["fixed"].append(mode == FIXED)
        if tracked[i]:
            s["num_batches"].append(torch.tensor(3))
        has_bn = mode != NO_BN and affine
        s["specs"].append(ops.Spec(bias, has_bn, has_bn, mode, tracked[i], cumulative, ACTIVATIONS[acts[i]], 0,
                                   slopes[i], drop_ps[i], 1e-5, 0.1))
        prev = width
    s["seeds"] = [torch.randint(0, 2 ** 62, (1,)) for p in drop_ps if p > 0]  # one per block with dropout
    return s


SAMPLES = {
    "transposed_x": lambda: _sample(torch.randn(8, 21).t(), [10, 5], [BATCH, NO_BN], ["relu", "none"]),
    "strided_x_last_act": lambda: _sample(torch.randn(21, 16)[:, ::2], [9, 4], [BATCH, BATCH], ["relu", "relu"],
                                          cumulative=True),
    "fixed_no_bias": lambda: _sample(torch.randn(19, 7), [10, 3], [FIXED, NO_BN], ["relu", "none"], bias=False),
    "no_affine": lambda: _sample(torch.randn(19, 7), [10, 3], [BATCH, FIXED], ["relu", "relu"], affine=False),
    "untracked": lambda: _sample(torch.randn(19, 7), [10, 3], [BATCH, NO_BN], ["relu", "none"],
                                 tracked=[False, False]),
    "gelu_leaky_dropout": lambda: _sample(torch.randn(19, 7), [10, 3], [BATCH, NO_BN], ["gelu", "leaky_relu"],
                                          slopes=[0.0, 0.1], drop_ps=[0.3, 0.2]),
}


def _detach(ts):
    return [t.detach() for t in ts]


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(kernel_device, sample):
    """chain_body on the blocks up to the last tracked one (as ops.chain calls it: no grad),
    chain_forward with its autograd on the rest, then chain_backward on the saved tensors."""
    with kernel_device:
        s = SAMPLES[sample]()
        grad_out = torch.randn(s["weights"][-1].shape[0], s["x"].shape[0]).t()  # non-contiguous too
    s["x"].requires_grad_()
    specs = s["specs"]
    ints, floats = ops.pack(specs)
    n = max([i + 1 for i, spec in enumerate(specs) if spec.tracked] or [0])
    body = ops.new_saved(s["x"], s["weights"][:n], specs[:n])
    if n:
        per_block = lambda key, flag: _detach(s[key][:sum(flag(sp) for sp in specs[:n])])  # noqa: E731
        args = (s["x"].detach(), body[0::2], body[1::2], _detach(s["weights"][:n]),
                per_block("biases", lambda sp: sp.has_bias), per_block("gammas", lambda sp: sp.has_gamma),
                per_block("betas", lambda sp: sp.has_beta), _detach(s["running_means"]), _detach(s["running_vars"]),
                s["num_batches"], s["seeds"], ints[:n * 8], floats[:n * 4])
        torch.library.opcheck(chain_body, args)
        with torch.no_grad():
            chain_body(*args)
    pick = lambda ts: [t for t, f in zip(ts, s["fixed"]) if f]  # noqa: E731
    args = (s["x"], body, s["weights"], s["biases"], s["gammas"], s["betas"], pick(s["running_means"]),
            pick(s["running_vars"]), s["seeds"], ints, floats)
    torch.library.opcheck(chain_forward, args)
    with torch.no_grad():
        res = chain_forward(*args)
    for input_grad in (True, False):
        torch.library.opcheck(chain_backward, (grad_out, s["x"].detach(), _detach(s["weights"]), body + res[1:],
                                               _detach(s["gammas"]), _detach(s["betas"]), s["seeds"], ints, floats,
                                               input_grad))
