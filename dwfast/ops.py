"""torch.library custom ops for a fused chain, with autograd; they call dwfast.kernels.

    chain_body      the chain's first blocks, up to the last one whose BatchNorm updates its
                    running statistics: it updates them in place (no autograd)
    chain_forward   the rest of the chain, with the autograd of the whole chain
    chain_backward  that backward: one launch per block

A training step launches two kernels per block and no PyTorch op between them (no zero
gradients are materialised for the saved outputs). The running statistics are updated by the
kernel that finalises the batch statistics, which needs an op that mutates them; PyTorch
allows no autograd on such an op, hence the split: chain_body's outputs are inputs of
chain_forward, whose backward covers every block. Ops take flat lists (one entry per block)
so they pass through torch.compile and opcheck. BatchNorm mode per block: NO_BN, BATCH (batch
statistics) or FIXED (running statistics).
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import distributed as D
from . import kernels as K
from . import reference as R
from .chain import BATCH, FIXED, NO_BN, Block, act_spec, autocast_dtype, updates_running_stats, uses_batch_stats

assert (NO_BN, BATCH, FIXED) == (K.NO_BN, K.BATCH, K.FIXED)
_PER_BLOCK = 2  # saved tensors per block: z, vec


def _expand(present: List[Tensor], flags: List[bool]) -> List[Optional[Tensor]]:
    """The per-block list from the compact list of the blocks whose flag is set."""
    it = iter(present)
    return [next(it) if f else None for f in flags]


def _sites(vecs, acts, slopes, drop_ps, seeds) -> List[K.Site]:
    """Each block's activation site; `seeds` holds one entry per block with dropout."""
    sites, k = [], 0
    for vec, act, slope, p in zip(vecs, acts, slopes, drop_ps):
        sites.append(K.Site(vec, act, slope, p, seeds[k:k + 1] if p > 0 else None))
        k += p > 0
    return sites


def _norms(x, weights, gammas, betas, running_means, running_vars, num_batches, bn_modes, eps, momentums,
           syncs, vecs=None) -> List[K.Norm]:
    """Each block's BatchNorm for the kernels (new vector buffers unless `vecs` are given);
    `momentums[i]` None is the cumulative average."""
    norms = []
    for i, mode in enumerate(bn_modes):
        vec = vecs[i] if vecs is not None else K.new_vec(weights[i].shape[0], x.device)
        norms.append(K.NO_NORM if mode == NO_BN else K.Norm(
            K.PARTIALS if syncs[i] else mode, vec, gammas[i], betas[i], running_means[i], running_vars[i],
            num_batches[i], eps[i], momentums[i]))
    return norms


def _run(x, h, site, weights, biases, norms, sites, syncs, start: int, zs=None) -> List[Tensor]:
    """Blocks start.. of the chain on h (their input, a_{start-1} = `site`(h)): per block [z, vec]
    (z written into `zs` when given). A synchronised block (mode PARTIALS) has its statistics
    merged across its group between its GEMM and the next."""
    saved = []
    for i in range(start, len(weights)):
        h, partials = K.linear_fwd(h, weights[i], biases[i], site, norms[i], out=zs[i] if zs else None)
        if partials is not None:
            _synced_stats(partials, x.shape[0], norms[i], syncs[i])
        site = sites[i]
        saved += [h, norms[i].vec if norms[i].vec is not None else x.new_empty(0)]
    return saved


def new_saved(x, weights, bn_modes) -> List[Tensor]:
    """Uninitialised per-block [z, vec] buffers for `weights`' blocks on x's batch."""
    saved = []
    for w, mode in zip(weights, bn_modes):
        saved += [x.new_empty(x.shape[0], w.shape[0]), K.new_vec(w.shape[0], x.device) if mode != NO_BN
                  else x.new_empty(0)]
    return saved


@torch.library.custom_op("dwfast::chain_body",
                         mutates_args=("zs", "vecs", "running_means", "running_vars", "num_batches"))
def chain_body(
    x: Tensor, zs: List[Tensor], vecs: List[Tensor], weights: List[Tensor], biases: List[Tensor],
    gammas: List[Tensor], betas: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor],
    num_batches: List[Tensor], seeds: Tensor, has_bias: List[bool], has_gamma: List[bool], has_beta: List[bool],
    bn_modes: List[int], tracked: List[bool], acts: List[int], slopes: List[float], drop_ps: List[float],
    eps: List[float], momentums: List[float], cumulative: List[bool], syncs: List[int],
) -> None:
    """The given blocks (the chain's first ones): writes each block's z into `zs` [B, N] and
    its BatchNorm vectors into `vecs` ([VEC_ROWS, N] fp32; empty without BatchNorm), and updates
    the running statistics of the `tracked` BATCH blocks in place, as BatchNorm1d's training
    forward does. (Mutated outputs rather than returned ones: PyTorch cannot functionalise an op
    that both mutates and returns a list.)

    `biases` of the blocks with `has_bias`, `gammas`/`betas` of the BatchNorm blocks with
    `has_gamma`/`has_beta`; `running_means`/`running_vars` of the FIXED and the tracked BATCH
    blocks, `num_batches` of the tracked ones (`momentums[i]`, or the cumulative average with
    `cumulative[i]`). Block i's activation is `acts[i]` (a code of kernels.ACTIVATIONS,
    LeakyReLU's slope `slopes[i]`), then dropout with probability `drop_ps[i]` keyed on the next
    entry of `seeds` (int64, one per block with dropout). A BATCH block with `syncs[i]` (a
    process-group id of dwfast.distributed) takes its statistics over the whole group.
    """
    running = [m == FIXED or t for m, t in zip(bn_modes, tracked)]
    norms = _norms(x, weights, _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(running_means, running),
                   _expand(running_vars, running), _expand(num_batches, tracked), bn_modes, eps,
                   [None if c else m for m, c in zip(momentums, cumulative)], syncs, vecs)
    sites = _sites([n.vec for n in norms], acts, slopes, drop_ps, seeds)
    _run(x, x, K.NO_SITE, weights, _expand(biases, has_bias), norms, sites, syncs, 0, zs)


@chain_body.register_fake
def _(x, zs, vecs, weights, biases, gammas, betas, running_means, running_vars, num_batches, seeds, has_bias,
      has_gamma, has_beta, bn_modes, tracked, acts, slopes, drop_ps, eps, momentums, cumulative, syncs):
    return None


@torch.library.custom_op("dwfast::chain_forward", mutates_args=())
def chain_forward(
    x: Tensor, body: List[Tensor], weights: List[Tensor], biases: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor], seeds: Tensor,
    has_bias: List[bool], has_gamma: List[bool], has_beta: List[bool], bn_modes: List[int], acts: List[int],
    slopes: List[float], drop_ps: List[float], eps: List[float], syncs: List[int],
) -> List[Tensor]:
    """[out] + per block [z, vec] of the blocks after `body` (chain_body's outputs for the
    chain's first len(body) / 2 blocks; those blocks' running statistics are not touched here).

    Arguments as chain_body's, for the whole chain; `running_means`/`running_vars` of the FIXED
    blocks. The last block's z is kept only when an activation follows it (otherwise it is
    `out`).
    """
    start = len(body) // _PER_BLOCK
    fixed = [m == FIXED for m in bn_modes]
    vecs = body[1::_PER_BLOCK] + [K.new_vec(w.shape[0], x.device) if m != NO_BN else None
                                  for w, m in zip(weights[start:], bn_modes[start:])]
    norms = _norms(x, weights, _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(running_means, fixed),
                   _expand(running_vars, fixed), [None] * len(weights), bn_modes, eps, [0.0] * len(weights), syncs,
                   vecs)
    sites = _sites([n.vec for n in norms], acts, slopes, drop_ps, seeds)
    h, site = (body[-_PER_BLOCK], sites[start - 1]) if start else (x, K.NO_SITE)
    saved = _run(x, h, site, weights, _expand(biases, has_bias), norms, sites, syncs, start)
    z_last = saved[-_PER_BLOCK] if saved else body[-_PER_BLOCK]
    if sites[-1].identity:
        saved[-_PER_BLOCK] = x.new_empty(0)  # out is z itself: an op's outputs may not alias
        return [z_last] + saved
    return [K.act_fwd(z_last, sites[-1])] + saved


@chain_forward.register_fake
def _(x, body, weights, biases, gammas, betas, running_means, running_vars, seeds, has_bias, has_gamma, has_beta,
      bn_modes, acts, slopes, drop_ps, eps, syncs):
    start = len(body) // _PER_BLOCK
    saved = new_saved(x, weights[start:], bn_modes[start:])
    if bn_modes[-1] == NO_BN and not acts[-1] and not drop_ps[-1]:
        saved[-_PER_BLOCK] = x.new_empty(0)
    return [x.new_empty(x.shape[0], weights[-1].shape[0])] + saved


def _merge_partials(partials, M: int):
    """(mean, M2) of z over this rank's batch from linear_fwd's per-row-tile (shift, mean, M2)
    partials [3, row_tiles, N] (tiles of `tile_rows` rows), merged about the first tile's shift:
    M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2, exact like the kernels' sequential merge."""
    part, tile_rows = partials
    shift, means, m2s = part.unbind(0)
    counts = (M - tile_rows * torch.arange(part.shape[1], device=part.device)).clamp(max=tile_rows)[:, None]
    means = means + (shift - shift[0])
    mean = (counts * means).sum(0) / M
    return shift[0] + mean, m2s.sum(0) + (counts * (means - mean).square()).sum(0)


def _synced_stats(partials, M: int, norm: K.Norm, sync: int) -> None:
    """A synchronised block's forward statistics: this rank's merged with its group's (one
    all-gather), then its vectors and running statistics, as the kernels would make them."""
    mean, m2 = _merge_partials(partials, M)
    count = torch.full((), float(M), device=mean.device)
    count, mean, var = D.merge_stats(count, mean, m2 / M, D.group_of(sync))
    rstd = torch.rsqrt(var + norm.eps)
    scale = rstd * norm.gamma.float() if norm.gamma is not None else rstd
    shift = norm.beta.float() if norm.beta is not None else torch.zeros_like(rstd)
    norm.vec[:4] = torch.stack([mean, scale, shift, rstd])
    if norm.num_batches is not None:
        norm.num_batches.add_(1)
        factor = 1.0 / norm.num_batches if norm.momentum is None else norm.momentum
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
        norm.running_var.lerp_((var * (count / (count - 1))).to(norm.running_var.dtype), factor)


def _synced_grads(partials, M: int, norm: K.Norm, sync: int):
    """A synchronised block's BatchNorm backward over its group: dgamma, dbeta stay this rank's
    sums (DDP averages parameter gradients as it does eager's); u and v use the group's means."""
    local = partials.sum(1)  # [g_sum, g_xhat]
    group = D.all_reduce_sum(torch.cat([local, local.new_full((1, local.shape[1]), float(M))]), D.group_of(sync))
    g_sum, g_xhat = group[:2] / group[2]
    scale, rstd = norm.vec[1], norm.vec[3]  # vec rows: center, scale, shift, rstd
    norm.uv.copy_(torch.stack([-scale * rstd * g_xhat, -scale * g_sum]))
    # copies: an op's outputs may not alias each other
    dgamma = local[1].to(norm.gamma.dtype, copy=True) if norm.gamma is not None else None
    dbeta = local[0].to(norm.beta.dtype, copy=True) if norm.beta is not None else None
    return dgamma, dbeta


@torch.library.custom_op("dwfast::chain_backward", mutates_args=())
def chain_backward(
    grad_out: Tensor, x: Tensor, weights: List[Tensor], saved: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], seeds: Tensor, has_gamma: List[bool], has_beta: List[bool], bn_modes: List[int],
    acts: List[int], slopes: List[float], drop_ps: List[float], has_bias: List[bool], syncs: List[int],
    input_grad: bool,
) -> List[Tensor]:
    """[grad_x] + per block [dW, db, dgamma, dbeta] (empty where there is none), from
    chain_forward's saved outputs; gradients come out in their parameters' dtypes."""
    M = x.shape[0]
    L = len(weights)
    gammas, betas = _expand(gammas, has_gamma), _expand(betas, has_beta)
    zs, vecs = saved[0::_PER_BLOCK], saved[1::_PER_BLOCK]
    norms = [K.NO_NORM if mode == NO_BN else K.Norm(K.PARTIALS if syncs[i] else mode, vecs[i], gammas[i], betas[i],
                                                    uv=K.new_uv(vecs[i].shape[1], x.device))
             for i, mode in enumerate(bn_modes)]
    sites = _sites([n.vec for n in norms], acts, slopes, drop_ps, seeds)
    grads = [x.new_empty(0) for _ in range(1 + 4 * L)]

    def bn_grads(i, dgamma, dbeta, partials):
        if partials is not None:
            dgamma, dbeta = _synced_grads(partials, M, norms[i], syncs[i])
        grads[3 + 4 * i: 5 + 4 * i] = [t if t is not None else x.new_empty(0) for t in (dgamma, dbeta)]

    g_y = grad_out.contiguous()
    if not sites[-1].identity:
        g_y, dgamma, dbeta, partials = K.act_bwd(g_y, zs[-1], sites[-1], norms[-1])
        bn_grads(L - 1, dgamma, dbeta, partials)
    for i in reversed(range(L)):
        site_in, norm_in, h = (sites[i - 1], norms[i - 1], zs[i - 1]) if i > 0 else (K.NO_SITE, K.NO_NORM, x)
        g_y, dw, db, dgamma, dbeta, partials = K.linear_bwd(
            g_y, zs[i] if zs[i].numel() else g_y, weights[i], norms[i], h, site_in, norm_in,
            input_grad=i > 0 or input_grad, has_bias=has_bias[i])
        grads[1 + 4 * i: 3 + 4 * i] = [dw, db if db is not None else x.new_empty(0)]
        if i > 0:
            bn_grads(i - 1, dgamma, dbeta, partials)
    if input_grad:
        grads[0] = g_y
    return grads


@chain_backward.register_fake
def _(grad_out, x, weights, saved, gammas, betas, seeds, has_gamma, has_beta, bn_modes, acts, slopes, drop_ps,
      has_bias, syncs, input_grad):
    grads = [x.new_empty(x.shape) if input_grad else x.new_empty(0)]
    gammas, betas = _expand(gammas, has_gamma), _expand(betas, has_beta)
    for w, gamma, beta, bias in zip(weights, gammas, betas, has_bias):
        grads += [x.new_empty(w.shape), x.new_empty(w.shape[0]) if bias else x.new_empty(0)]
        grads += [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (gamma, beta)]
    return grads


def _setup_context(ctx, inputs, output):
    (x, body, weights, biases, gammas, betas, running_means, running_vars, seeds, has_bias, has_gamma, has_beta,
     bn_modes, acts, slopes, drop_ps, eps, syncs) = inputs
    # biases and the FIXED blocks' running statistics: for the differentiable recomputation only
    ctx.save_for_backward(x, seeds, *weights, *gammas, *betas, *biases, *running_means, *running_vars, *body,
                          *output[1:])
    ctx.set_materialize_grads(False)  # the saved outputs take no gradient: no zeros for them
    ctx.acts, ctx.slopes, ctx.drop_ps, ctx.eps, ctx.syncs = acts, slopes, drop_ps, eps, syncs
    ctx.has_bias, ctx.has_gamma, ctx.has_beta, ctx.bn_modes = has_bias, has_gamma, has_beta, bn_modes
    ctx.sizes = len(body), len(weights), len(biases), len(gammas), len(betas), len(running_means)


def _backward(ctx, grads):
    n_body, L, n_bias, n_gamma, n_beta, n_fixed = ctx.sizes
    grad_out = grads[0]
    if grad_out is None:
        return (None,) * 18
    x, seeds, *rest = ctx.saved_tensors
    sizes = [L, n_gamma, n_beta, n_bias, n_fixed, n_fixed]
    weights, gammas, betas, biases, running_means, running_vars = (
        list(rest[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(len(sizes)))
    saved = rest[sum(sizes):]
    if R.differentiable(grad_out):  # create_graph=True or batched: chain_backward has no autograd
        d_x, d_w, d_b, d_gamma, d_beta = _reference_backward(ctx, grad_out, x, seeds, weights, biases, gammas, betas,
                                                             running_means, running_vars)
        return (d_x, [None] * n_body, d_w, d_b, d_gamma, d_beta, [None] * n_fixed, [None] * n_fixed) + (None,) * 10
    out = chain_backward(grad_out, x, list(weights), list(saved), list(gammas), list(betas), seeds, ctx.has_gamma,
                         ctx.has_beta, ctx.bn_modes, ctx.acts, ctx.slopes, ctx.drop_ps, ctx.has_bias, ctx.syncs,
                         ctx.needs_input_grad[0])
    per = [out[1 + 4 * i: 5 + 4 * i] for i in range(L)]
    d_w = [g[0] for g in per]
    d_b = [g[1] for i, g in enumerate(per) if ctx.has_bias[i]]
    d_gamma = [g[2] for i, g in enumerate(per) if ctx.has_gamma[i]]
    d_beta = [g[3] for i, g in enumerate(per) if ctx.has_beta[i]]
    d_x = out[0] if ctx.needs_input_grad[0] else None
    # x, body, weights, biases, gammas, betas, running_means, running_vars, then seeds and the flag lists
    return (d_x, [None] * n_body, d_w, d_b, d_gamma, d_beta, [None] * n_fixed, [None] * n_fixed) + (None,) * 10


def _reference_backward(ctx, grad, x, seeds, weights, biases, gammas, betas, running_means, running_vars):
    """(d_x, d_w, d_b, d_gamma, d_beta) from a differentiable recomputation (dwfast.reference)."""
    if any(ctx.syncs):  # as eager SyncBatchNorm, whose backward has no derivative either
        raise NotImplementedError("dwfast: no double backward or batched gradients through synchronised BatchNorm")
    fixed = [m == FIXED for m in ctx.bn_modes]
    run_means, run_vars = _expand(running_means, fixed), _expand(running_vars, fixed)

    def forward(x, weights, biases, gammas, betas):
        return R.chain_reference(x, weights, _expand(biases, ctx.has_bias), _expand(gammas, ctx.has_gamma),
                                 _expand(betas, ctx.has_beta), run_means, run_vars, seeds, ctx.bn_modes, ctx.acts,
                                 ctx.slopes, ctx.drop_ps, ctx.eps)
    return R.vjp(forward, [x, weights, biases, gammas, betas], grad)


chain_forward.register_autograd(_backward, setup_context=_setup_context)


def draw_seed(device) -> Tensor:
    """One int64 dropout seed [1] from torch's generator on `device`, drawn per block with
    dropout in block order: seeded runs repeat, an eager model can draw the same stream, and
    drawing on the device needs no host synchronisation (CUDA-graph safe)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def _present(tensors, keep=None):
    return [t for i, t in enumerate(tensors) if t is not None and (keep is None or keep[i])]


def chain(x: Tensor, blocks: List[Block], upcast: bool = False) -> Tensor:
    """Run `blocks` on `x` through the custom ops (inputs already validated).

    `upcast` runs 16-bit inputs through fp32 kernels and casts back (Triton's interpreter
    mishandles bf16); gradients and running statistics still land in the original dtype.

    Under autocast the input, weights and biases are cast to autocast's dtype here, and
    BatchNorm's parameters and running statistics are passed as they are (fp32 in the
    usual case), as eager's autocast treats F.linear and F.batch_norm; the output is in
    autocast's dtype and gradients reach the parameters in their own dtype through the
    casts. Not `torch.library.register_autocast`: it would cast every floating input of an
    op to one dtype, rounding BatchNorm's parameters to 16 bits and updating a temporary
    copy of the running statistics. Casts here are plain PyTorch, so they trace under
    torch.compile too.
    """
    lin = [b.linear for b in blocks]
    bns = [b.bn for b in blocks]
    low = autocast_dtype(x)
    dtype = low if low is not None else x.dtype
    cast = (lambda t: t if t is None else t.float()) if upcast and dtype != torch.float32 else (lambda t: t)
    lin_cast = (lambda t: cast(t if t is None else t.to(low))) if low is not None else cast
    weights = [lin_cast(m.weight) for m in lin]
    biases = [lin_cast(m.bias) for m in lin]
    gammas = [cast(bn.weight) if bn is not None else None for bn in bns]
    betas = [cast(bn.bias) if bn is not None else None for bn in bns]
    run_means = [cast(bn.running_mean) if bn is not None else None for bn in bns]
    run_vars = [cast(bn.running_var) if bn is not None else None for bn in bns]
    modes = [NO_BN if bn is None else BATCH if uses_batch_stats(bn) else FIXED for bn in bns]
    acts, slopes = zip(*(act_spec(b.act) for b in blocks))
    acts, slopes = [K.ACTIVATIONS[a] for a in acts], list(slopes)
    drop_ps = [float(b.dropout.p) if b.dropout is not None and b.dropout.training else 0.0 for b in blocks]
    eps = [float(bn.eps) if bn is not None else 0.0 for bn in bns]
    syncs = [D.group_id(bn) if D.needs_sync(bn) else 0 for bn in bns]
    x = lin_cast(x)
    seeds = [draw_seed(x.device) for p in drop_ps if p > 0]
    seeds = torch.cat(seeds) if seeds else x.new_empty(0, dtype=torch.int64)  # (cat: one launch, with dropout)
    flags = ([b is not None for b in biases], [g is not None for g in gammas], [b is not None for b in betas])

    # the blocks up to the last one that updates running statistics run in chain_body
    tracked = [bn is not None and updates_running_stats(bn) for bn in bns]
    n = max([i + 1 for i, t in enumerate(tracked) if t] or [0])
    body = new_saved(x, weights[:n], modes[:n])
    if n:
        running = [m == FIXED or t for m, t in zip(modes, tracked)][:n]
        with torch.no_grad():
            chain_body(
                x, body[0::_PER_BLOCK], body[1::_PER_BLOCK], weights[:n], _present(biases[:n]), _present(gammas[:n]), _present(betas[:n]),
                _present(run_means[:n], running), _present(run_vars[:n], running),
                [bn.num_batches_tracked for bn, t in zip(bns, tracked) if t], seeds, *(f[:n] for f in flags),
                modes[:n], tracked[:n], acts[:n], slopes[:n], drop_ps[:n], eps[:n],
                [float(bn.momentum or 0.0) if bn is not None else 0.0 for bn in bns[:n]],
                [bn is not None and bn.momentum is None for bn in bns[:n]], syncs[:n])
        for i in range(n):
            if tracked[i] and run_means[i] is not bns[i].running_mean:  # upcast copies: write back
                bns[i].running_mean.copy_(run_means[i])
                bns[i].running_var.copy_(run_vars[i])
    fixed = [m == FIXED for m in modes]
    res = chain_forward(x, body, weights, _present(biases), _present(gammas), _present(betas),
                        _present(run_means, fixed), _present(run_vars, fixed), seeds, *flags, modes, acts, slopes,
                        drop_ps, eps, syncs)
    return res[0].to(dtype)
