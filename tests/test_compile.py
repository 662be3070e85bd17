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
from dwfast.kernels import ACTIVATIONS
from dwfast import ops
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


def _check_compiled(compiler, device, width=10, momentum=0.1, **tol):
    """Two training steps and an eval step of a compiled fused model against eager."""
    torch._dynamo.reset()
    eager = small_model(width, momentum=momentum).to(device)
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


@requires_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_matches_eager_cuda(momentum):
    """The Triton kernels (TF32 GEMMs against eager's fp32: a TF32-sized tolerance)."""
    _check_compiled("inductor", "cuda", momentum=momentum, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- opcheck

def _spec(x, widths, modes, acts, bias=True, affine=True, slopes=None, drop_ps=None, tracked=None,
          cumulative=False):
    """A chain's per-block tensors and flags for blocks x.shape[1] -> widths[0] -> ..., random
    parameters; `acts` are names of kernels.ACTIVATIONS; `tracked` (default: every BATCH
    block) update their running statistics."""
    n = len(widths)
    tracked = tracked if tracked is not None else [m == BATCH for m in modes]
    spec = dict(x=x, weights=[], biases=[], gammas=[], betas=[], running_means=[], running_vars=[], num_batches=[])
    prev = x.shape[1]
    for width, mode, track in zip(widths, modes, tracked):
        spec["weights"].append(torch.randn(width, prev, requires_grad=True))
        if bias:
            spec["biases"].append(torch.randn(width, requires_grad=True))
        if mode != NO_BN and affine:
            spec["gammas"].append(torch.rand(width).add(0.5).requires_grad_())
            spec["betas"].append(torch.randn(width, requires_grad=True))
        if mode == FIXED or track:
            spec["running_means"].append(torch.randn(width))
            spec["running_vars"].append(torch.rand(width) + 0.5)
        if track:
            spec["num_batches"].append(torch.tensor(3))
        prev = width
    drop_ps = drop_ps or [0.0] * n
    has_bn = [mode != NO_BN and affine for mode in modes]
    spec.update(
        seeds=torch.randint(0, 2 ** 62, (sum(p > 0 for p in drop_ps),)),  # one per block with dropout
        has_bias=[bias] * n, has_gamma=has_bn, has_beta=has_bn, bn_modes=modes, tracked=tracked,
        acts=[ACTIVATIONS[a] for a in acts], slopes=slopes or [0.0] * n, drop_ps=drop_ps, eps=[1e-5] * n,
        momentums=[0.1] * n, cumulative=[cumulative] * n, syncs=[0] * n)
    return spec


def _forward_args(spec, body):
    """chain_forward's arguments: the FIXED blocks' running statistics only."""
    fixed, k = [], 0
    for mode, track in zip(spec["bn_modes"], spec["tracked"]):
        if mode == FIXED or track:
            fixed.append(mode == FIXED)
    pick = lambda ts: [t for t, f in zip(ts, fixed) if f]  # noqa: E731
    s = spec
    return (s["x"], body, s["weights"], s["biases"], s["gammas"], s["betas"], pick(s["running_means"]),
            pick(s["running_vars"]), s["seeds"], s["has_bias"], s["has_gamma"], s["has_beta"], s["bn_modes"],
            s["acts"], s["slopes"], s["drop_ps"], s["eps"], s["syncs"])


SAMPLES = {
    "transposed_x": lambda: _spec(torch.randn(8, 21).t(), [10, 5], [BATCH, NO_BN], ["relu", "none"]),
    "strided_x_last_act": lambda: _spec(torch.randn(21, 16)[:, ::2], [9, 4], [BATCH, BATCH], ["relu", "relu"],
                                        cumulative=True),
    "fixed_no_bias": lambda: _spec(torch.randn(19, 7), [10, 3], [FIXED, NO_BN], ["relu", "none"], bias=False),
    "no_affine": lambda: _spec(torch.randn(19, 7), [10, 3], [BATCH, FIXED], ["relu", "relu"], affine=False),
    "untracked": lambda: _spec(torch.randn(19, 7), [10, 3], [BATCH, NO_BN], ["relu", "none"], tracked=[False, False]),
    "gelu_leaky_dropout": lambda: _spec(torch.randn(19, 7), [10, 3], [BATCH, NO_BN], ["gelu", "leaky_relu"],
                                        slopes=[0.0, 0.1], drop_ps=[0.3, 0.2]),
}


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(kernel_device, sample):
    """chain_body on the blocks up to the last tracked one, chain_forward with its autograd on
    the rest, then chain_backward on the saved tensors."""
    with kernel_device:
        spec = SAMPLES[sample]()
        grad_out = torch.randn(spec["weights"][-1].shape[0], spec["x"].shape[0]).t()  # non-contiguous too
    spec["x"].requires_grad_()
    n = max((i + 1 for i, t in enumerate(spec["tracked"]) if t), default=0)
    body = []
    if n:
        body = ops.new_saved(spec["x"], spec["weights"][:n], spec["bn_modes"][:n])
        spec.update(zs=body[0::2], vecs=body[1::2])
        names = ["x", "zs", "vecs", "weights", "biases", "gammas", "betas", "running_means", "running_vars", "num_batches",
                 "seeds", "has_bias", "has_gamma", "has_beta", "bn_modes", "tracked", "acts", "slopes", "drop_ps",
                 "eps", "momentums", "cumulative", "syncs"]
        per_block = {"weights", "has_bias", "has_gamma", "has_beta", "bn_modes", "tracked", "acts", "slopes",
                     "drop_ps", "eps", "momentums", "cumulative", "syncs"}
        detach = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731 (it runs under no_grad)
        args = [spec[k][:n] if k in per_block else spec[k] for k in names]
        args = [[detach(a) for a in arg] if isinstance(arg, list) else detach(arg) for arg in args]
        torch.library.opcheck(chain_body, tuple(args))
        with torch.no_grad():
            chain_body(*args)
    args = _forward_args(spec, body)
    torch.library.opcheck(chain_forward, args)
    with torch.no_grad():
        res = chain_forward(*args)
    saved = body + res[1:]
    s = spec
    for input_grad in (True, False):
        torch.library.opcheck(chain_backward, (
            grad_out, s["x"].detach(), [w.detach() for w in s["weights"]], saved,
            [g.detach() for g in s["gammas"]], [b.detach() for b in s["betas"]], s["seeds"], s["has_gamma"],
            s["has_beta"], s["bn_modes"], s["acts"], s["slopes"], s["drop_ps"], s["has_bias"], s["syncs"],
            input_grad))
