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
from dwfast.ops import BATCH, FIXED, NO_BN, chain_backward, chain_forward, chain_infer, update_running_stats


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

def _forward_args(x, widths, modes, acts, bias=True, affine=True, slopes=None, drop_ps=None):
    """chain_forward's arguments for blocks x.shape[1] -> widths[0] -> ..., random parameters;
    `acts` are names of kernels.ACTIVATIONS."""
    weights, biases, gammas, betas, run_means, run_vars = [], [], [], [], [], []
    prev = x.shape[1]
    for width, mode in zip(widths, modes):
        weights.append(torch.randn(width, prev, requires_grad=True))
        if bias:
            biases.append(torch.randn(width, requires_grad=True))
        if mode != NO_BN and affine:
            gammas.append(torch.rand(width).add(0.5).requires_grad_())
            betas.append(torch.randn(width, requires_grad=True))
        if mode == FIXED:
            run_means.append(torch.randn(width))
            run_vars.append(torch.rand(width) + 0.5)
        prev = width
    has_bias = [bias] * len(widths)
    has_bn = [mode != NO_BN and affine for mode in modes]
    drop_ps = drop_ps or [0.0] * len(widths)
    seeds = torch.randint(0, 2 ** 62, (sum(p > 0 for p in drop_ps),))  # one per block with dropout
    return (x, weights, biases, gammas, betas, run_means, run_vars, seeds, has_bias, has_bn, has_bn, modes,
            [ACTIVATIONS[a] for a in acts], slopes or [0.0] * len(widths), drop_ps, [1e-5] * len(widths),
            [0] * len(widths))


FORWARD_SAMPLES = {
    "transposed_x": lambda: _forward_args(torch.randn(8, 21).t(), [10, 5], [BATCH, NO_BN], ["relu", "none"]),
    "strided_x_last_act": lambda: _forward_args(torch.randn(21, 16)[:, ::2], [9, 4], [BATCH, BATCH],
                                                ["relu", "relu"]),
    "fixed_no_bias": lambda: _forward_args(torch.randn(19, 7), [10, 3], [FIXED, NO_BN], ["relu", "none"],
                                           bias=False),
    "no_affine": lambda: _forward_args(torch.randn(19, 7), [10, 3], [BATCH, FIXED], ["relu", "relu"], affine=False),
    "gelu_leaky_dropout": lambda: _forward_args(torch.randn(19, 7), [10, 3], [BATCH, NO_BN], ["gelu", "leaky_relu"],
                                                slopes=[0.0, 0.1], drop_ps=[0.3, 0.2]),
}


@pytest.mark.parametrize("sample", FORWARD_SAMPLES)
def test_opcheck_forward_backward(kernel_device, sample):
    """chain_forward with its autograd, then chain_backward on the saved tensors."""
    with kernel_device:
        args = FORWARD_SAMPLES[sample]()
        grad_out = torch.randn(args[1][-1].shape[0], args[0].shape[0]).t()  # non-contiguous too
    args[0].requires_grad_()
    torch.library.opcheck(chain_forward, args)
    x, weights, _, _, _, _, _, seeds, has_bias, _, _, modes, acts, slopes, drop_ps, _, syncs = args
    with torch.no_grad():
        res = chain_forward(*args)
    detached = [w.detach() for w in weights]
    for input_grad in (True, False):
        torch.library.opcheck(chain_backward, (grad_out, x.detach(), detached, res[1:], seeds, modes, acts, slopes,
                                               drop_ps, has_bias, syncs, input_grad))


def test_opcheck_infer(kernel_device):
    with kernel_device:
        args = (torch.randn(6, 17).t(), [torch.randn(10, 6), torch.randn(4, 10)], [torch.randn(10), None],
                [torch.rand(10) + 0.5, None], [None, None], [torch.randn(10), None], [torch.rand(10) + 0.5, None],
                [ACTIVATIONS["relu"], ACTIVATIONS["none"]], [0.0, 0.0], [1e-5, 0.0])
    torch.library.opcheck(chain_infer, args)


@pytest.mark.parametrize("cumulative", [False, True])
def test_opcheck_update_running_stats(kernel_device, cumulative):
    n = [5, 3]
    with kernel_device:
        args = ([torch.randn(k) for k in n], [torch.rand(k) + 0.5 for k in n],
                [torch.tensor(3), torch.tensor(0)], [torch.randn(k) for k in n], [torch.rand(k) for k in n],
                [0.1, 0.3], [cumulative, False])
    torch.library.opcheck(update_running_stats, args)
