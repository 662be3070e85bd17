"""Every activation and fused dropout, at the launcher level, against torch autograd.

Each activation site (the GEMM prologue of the forward and of dW, the dX epilogue, the
elementwise kernels at a chain's end) computes a = drop(act(bn(z))) or its backward; here
each is compared with the same function written in PyTorch, with the dropout factors read
back from `dropout_scale`.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dwfast import kernels as K
from test_kernels import cast, compare, make_chain

TORCH_ACTS = {
    "none": lambda y, slope: y,
    "relu": lambda y, slope: F.relu(y),
    "leaky_relu": lambda y, slope: F.leaky_relu(y, slope),
    "gelu": lambda y, slope: F.gelu(y),
    "gelu_tanh": lambda y, slope: F.gelu(y, approximate="tanh"),
    "silu": lambda y, slope: F.silu(y),
    "tanh": lambda y, slope: torch.tanh(y),
}
SLOPE = 0.2


def make_act(M, N, name, bn, p, device, seed=1234):
    """(z, site, norm): a random z [M, N] and an activation site over it, with random
    BatchNorm vectors (and parameters) when `bn`."""
    z = torch.randn(M, N, device=device) * 2
    vec, norm = None, K.NO_NORM
    if bn:
        vec = K.new_vec(N, device)
        vec[:4] = torch.stack([torch.randn(N), torch.rand(N) + 0.5, torch.randn(N), torch.rand(N) + 0.5]).to(device)
        norm = K.Norm(K.FIXED, vec, torch.rand(N, device=device) + 0.5, torch.randn(N, device=device),
                      uv=K.new_uv(N, device))
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    return z, K.Site(vec, K.ACTIVATIONS[name], SLOPE, p, seed_t), norm


def reference(z, site: K.Site, name: str):
    """a = drop(act(bn(z))) in PyTorch, as a function of z (differentiable)."""
    y = (z - site.vec[0]) * site.vec[1] + site.vec[2] if site.vec is not None else z
    a = TORCH_ACTS[name](y, SLOPE)
    if site.drop_p:
        a = a * K.dropout_scale(site.seed, *z.shape, site.drop_p)
    return a


CASES = [(name, bn, p) for name in TORCH_ACTS for bn in (False, True) for p in (0.0, 0.3)
         if not (name == "none" and not bn and p == 0.0)]


@pytest.mark.parametrize("name,bn,p", CASES, ids=[f"{n}-bn{b}-p{p}" for n, b, p in CASES])
def test_activation_sites(kernel_device, name, bn, p):
    M, N, K_out = 45, 37, 19
    z, site, norm = make_act(M, N, name, bn, p, kernel_device)
    w = torch.randn(K_out, N, device=kernel_device) / math.sqrt(N)
    g_out = torch.randn(M, K_out, device=kernel_device)
    g_a = torch.randn(M, N, device=kernel_device)
    tol = dict(atol=2e-5, rtol=2e-5)

    z_leaf = z.clone().requires_grad_()
    a = reference(z_leaf, site, name)
    torch.testing.assert_close(K.act_fwd(z, site), a, **tol)

    # forward prologue: z_next = act(z) @ W^T
    z_next, _ = K.linear_fwd(z, w, None, site)
    torch.testing.assert_close(z_next, a @ w.t(), **tol)

    # the backward's dW prologue (dW = g^T @ act(z)) and dX epilogue (the activation's
    # backward of g @ W), and the elementwise backward
    g_in, dw, _, dgamma_dx, dbeta_dx, _, _ = K.linear_bwd(g_out, g_out, w, K.NO_NORM, z, site, norm, has_bias=False)
    torch.testing.assert_close(dw, g_out.t() @ a, **tol)
    want_g_in, = torch.autograd.grad(a, z_leaf, g_out @ w, retain_graph=True)
    want_g_y, = torch.autograd.grad(a, z_leaf, g_a)
    g_y, dgamma, dbeta, _ = K.act_bwd(g_a, z, site, norm)
    if bn:  # kernels return dL/dy: the BN backward comes after
        want_g_in, want_g_y = want_g_in / site.vec[1], want_g_y / site.vec[1]
    torch.testing.assert_close(g_in, want_g_in, **tol)
    torch.testing.assert_close(g_y, want_g_y, **tol)
    if bn:  # the BatchNorm parameters' gradients: sum g_y * xhat, sum g_y
        xhat = (z - site.vec[0]) * site.vec[3]
        for got_gamma, got_beta, g in ((dgamma_dx, dbeta_dx, want_g_in), (dgamma, dbeta, want_g_y)):
            torch.testing.assert_close(got_gamma, (g * xhat).sum(0), **tol)
            torch.testing.assert_close(got_beta, g.sum(0), **tol)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(kernel_device, p):
    """Kept fraction 1 - p within 5 sigma, kept values scaled by 1 / (1 - p), rows and
    columns drawing independent numbers, and the mask a pure function of the seed."""
    M, N = 256, 192
    seed = torch.tensor([7], dtype=torch.int64, device=kernel_device)
    factors = K.dropout_scale(seed, M, N, p)
    kept = factors != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (M * N))
    torch.testing.assert_close(factors[kept], torch.full_like(factors[kept], 1 / (1 - p)))
    # no structure: neighbouring rows and columns agree about as often as chance says
    for a, b in ((kept[1:], kept[:-1]), (kept[:, 1:], kept[:, :-1])):
        agree = (a == b).double().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02
    assert torch.equal(factors, K.dropout_scale(seed, M, N, p))
    other = K.dropout_scale(seed + 1, M, N, p)
    assert (other != factors).double().mean().item() > 0.5 * 2 * p * (1 - p)


def test_dropout_p_one_and_nan(kernel_device):
    """p = 1 drops everything; NaN and Inf multiply through as torch's dropout does."""
    seed = torch.tensor([3], dtype=torch.int64, device=kernel_device)
    assert torch.count_nonzero(K.dropout_scale(seed, 40, 40, 1.0)) == 0
    z, site, _ = make_act(40, 33, "relu", False, 0.5, kernel_device)
    z[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    a = K.act_fwd(z, site)
    want = F.relu(z) * K.dropout_scale(site.seed, 40, 33, 0.5)
    assert torch.equal(torch.isnan(a), torch.isnan(want))
    torch.testing.assert_close(a.nan_to_num(), want.nan_to_num())


INF = float("inf")
# What each activation returns at +inf and -inf: the mathematical limits (README, Semantics).
# Not torch's CPU results, which depend on its vector path (AVX-512's GELU gives NaN at +inf,
# AVX2's inf) and are NaN for GELU and SiLU at -inf.
LIMITS = {"none": (INF, -INF), "relu": (INF, 0.0), "leaky_relu": (INF, -INF), "gelu": (INF, 0.0),
          "gelu_tanh": (INF, 0.0), "silu": (INF, 0.0), "tanh": (1.0, -1.0)}
# The same functions in scalar fp64 math, for finite inputs.
SCALAR_ACTS = {
    "none": lambda v: v,
    "relu": lambda v: max(v, 0.0),
    "leaky_relu": lambda v: v if v > 0 else SLOPE * v,
    "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
    "silu": lambda v: v / (1 + math.exp(-v)),
    "tanh": math.tanh,
}


@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_nan_inf_propagate(kernel_device, name):
    """NaN stays NaN (relu(NaN) is NaN, not 0), +-inf give the limits in LIMITS, and finite
    values scalar fp64 math's results."""
    z, site, _ = make_act(4, 8, name, False, 0.0, kernel_device)
    z[0, :3] = torch.tensor([float("nan"), INF, -INF])
    got = K.act_fwd(z, site).cpu().double()
    assert torch.isnan(got[0, 0])
    assert got[0, 1:3].tolist() == list(LIMITS[name])
    finite = torch.isfinite(z.cpu())
    want = torch.tensor([SCALAR_ACTS[name](v) for v in z.cpu().double()[finite].tolist()], dtype=torch.float64)
    torch.testing.assert_close(got[finite], want, atol=2e-5, rtol=2e-5)


CHAIN_ACTS = {"leaky_relu": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
              "silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CHAIN_ACTS))
def test_chain_with_activation_and_dropout(kernel_device, name, training):
    """Whole chains (BatchNorm, activation, Dropout per block, ending on one) against eager,
    whose Dropout draws the kernels' masks (conftest); eval: Dropout is the identity."""
    blocks = make_chain(12, [24, 17, 6], last_act=True, act=CHAIN_ACTS[name], dropout=0.25)
    compare(blocks, torch.randn(45, 12), torch.float32, kernel_device, training=training, steps=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chain_dropout_low_precision(kernel_device, dtype):
    blocks = make_chain(12, [24, 6], act=nn.GELU, dropout=0.5)
    compare(blocks, torch.randn(40, 12), dtype, kernel_device)


def test_dropout_is_reproducible_and_fresh(kernel_device):
    """Seeded runs repeat; consecutive steps draw new masks."""
    blocks = cast(make_chain(8, [32, 4], dropout=0.5), torch.float32, kernel_device)
    x = torch.randn(30, 8, device=kernel_device)
    from dwfast.functional import fused_chain
    torch.manual_seed(5)
    first = fused_chain(x, blocks)
    torch.manual_seed(5)
    assert torch.equal(fused_chain(x, blocks), first)
    assert not torch.equal(fused_chain(x, blocks), first)
