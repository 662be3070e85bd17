"""torch.library custom ops for a fused chain, with autograd; they call dwfast.kernels.

    chain_forward   the whole chain in training form (stores each block's z); autograd
    chain_backward  its backward, one fused dX and one dW GEMM per block
    chain_infer     no-grad chain with BatchNorm folded into each GEMM's epilogue
    update_running_stats   BatchNorm's running statistics, in place (no autograd)

Ops take flat lists (one entry per block) so they pass through torch.compile and opcheck.
BatchNorm mode per block: NO_BN, BATCH (batch statistics) or FIXED (running statistics).
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import distributed as D
from . import kernels as K
from . import reference as R
from .chain import BATCH, FIXED, NO_BN, Block, act_spec, autocast_dtype, uses_batch_stats

_PER_BLOCK = 6  # chain_forward outputs per block: z, mean, var, rstd, scale, shift


def _act(i: int, bn_mode: int, z, stats, acts, slopes, drop_ps, seeds) -> K.Act:
    """Block i's Act from its bn mode, (mean, var, rstd, scale, shift) and activation lists."""
    k = sum(p > 0 for p in drop_ps[:i])  # seeds holds one entry per block with dropout
    seed = seeds[k:k + 1] if drop_ps[i] > 0 else None
    spec = dict(act=acts[i], slope=slopes[i], drop_p=drop_ps[i], seed=seed)
    if bn_mode == NO_BN:
        return K.Act(z, None, None, None, None, False, **spec)
    mean, _, rstd, scale, shift = stats
    return K.Act(z, mean, scale, shift, rstd, True, **spec)


def _stats_vectors(bn_mode, parts, tile_rows, M, run_mean, run_var, gamma, beta, eps, sync):
    """(mean, var_unbiased, rstd, scale, shift) of a BatchNorm block."""
    if bn_mode != BATCH:
        return K.bn_stats(None, tile_rows, M, run_mean, run_var, gamma, beta, eps)
    if not sync:
        return K.bn_stats(parts, tile_rows, M, None, None, gamma, beta, eps)
    # this rank's statistics, merged with the group's; then scale and shift from those
    mean, var_unbiased, *_ = K.bn_stats(parts, tile_rows, M, None, None, None, None, eps)
    count = torch.full((), float(M), device=mean.device)
    count, mean, var = D.merge_stats(count, mean, var_unbiased * ((M - 1) / M), D.group_of(sync))
    stats = K.bn_stats(None, tile_rows, M, mean, var, gamma, beta, eps)
    return (stats[0], var * (count / (count - 1))) + stats[2:]


def _expand(present: List[Tensor], flags: List[bool]) -> List[Optional[Tensor]]:
    """The per-block list from the compact list of the blocks whose flag is set."""
    it = iter(present)
    return [next(it) if f else None for f in flags]


# Per-block tensors that take gradients are passed compact (only the blocks that have one)
# with a flag list: an op's Tensor?[] argument is a single autograd leaf.


@torch.library.custom_op("dwfast::chain_forward", mutates_args=())
def chain_forward(
    x: Tensor, weights: List[Tensor], biases: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor], seeds: Tensor,
    has_bias: List[bool], has_gamma: List[bool], has_beta: List[bool],
    bn_modes: List[int], acts: List[int], slopes: List[float], drop_ps: List[float], eps: List[float],
    syncs: List[int],
) -> List[Tensor]:
    """[out] + per block [z, mean, var, rstd, scale, shift] (empty where a block keeps none;
    var is the unbiased batch variance, for the running statistics).

    `biases` of the blocks with `has_bias`, `gammas`/`betas` of the BatchNorm blocks with
    `has_gamma`/`has_beta`, `running_means`/`running_vars` of the FIXED blocks. Block i's
    activation is `acts[i]` (a code of kernels.ACTIVATIONS, LeakyReLU's slope `slopes[i]`),
    then dropout with probability `drop_ps[i]` keyed on the next entry of `seeds` (int64, one
    per block with dropout). The last block's z is kept only when an activation follows it
    (otherwise it is `out`). A BATCH block with `syncs[i]` (a process-group id of
    dwfast.distributed) takes its statistics over the whole group.
    """
    biases, gammas, betas = _expand(biases, has_bias), _expand(gammas, has_gamma), _expand(betas, has_beta)
    fixed = [m == FIXED for m in bn_modes]
    running_means, running_vars = _expand(running_means, fixed), _expand(running_vars, fixed)
    M = x.shape[0]
    saved = []
    act_in = K.NO_ACT
    h = x
    for i, w in enumerate(weights):
        z, parts, tile_rows = K.linear_fwd(h, w, biases[i], act_in=act_in, stats=bn_modes[i] == BATCH)
        stats = tuple(x.new_empty(0) for _ in range(5))
        if bn_modes[i] != NO_BN:
            stats = _stats_vectors(bn_modes[i], parts, tile_rows, M, running_means[i], running_vars[i],
                                   gammas[i], betas[i], eps[i], syncs[i])
        act_in = _act(i, bn_modes[i], z, stats, acts, slopes, drop_ps, seeds)
        h = z
        saved += [z, *stats]
    if act_in.identity:
        saved[-_PER_BLOCK] = x.new_empty(0)  # out is z itself: an op's outputs may not alias
        return [h] + saved
    return [K.act_fwd(act_in)] + saved


@chain_forward.register_fake
def _(x, weights, biases, gammas, betas, running_means, running_vars, seeds, has_bias, has_gamma, has_beta,
      bn_modes, acts, slopes, drop_ps, eps, syncs):
    M = x.shape[0]
    saved = []
    for w, mode in zip(weights, bn_modes):
        N = w.shape[0]
        vec = (x.new_empty(N, dtype=torch.float32) if mode != NO_BN else x.new_empty(0) for _ in range(5))
        saved += [x.new_empty(M, N), *vec]
    if bn_modes[-1] == NO_BN and not acts[-1] and not drop_ps[-1]:
        saved[-_PER_BLOCK] = x.new_empty(0)
    return [x.new_empty(M, weights[-1].shape[0])] + saved


@torch.library.custom_op("dwfast::chain_backward", mutates_args=())
def chain_backward(
    grad_out: Tensor, x: Tensor, weights: List[Tensor], saved: List[Tensor], seeds: Tensor,
    bn_modes: List[int], acts: List[int], slopes: List[float], drop_ps: List[float], has_bias: List[bool],
    syncs: List[int], input_grad: bool,
) -> List[Tensor]:
    """[grad_x] + per block [dW, db, dgamma, dbeta] (empty where there is none)."""
    M = x.shape[0]
    L = len(weights)
    blocks = [saved[i * _PER_BLOCK:(i + 1) * _PER_BLOCK] for i in range(L)]
    sites = [_act(i, bn_modes[i], blocks[i][0], blocks[i][1:], acts, slopes, drop_ps, seeds) for i in range(L)]
    grads = [x.new_empty(0) for _ in range(1 + 4 * L)]

    g_y, parts = grad_out.contiguous(), None
    if not sites[-1].identity:
        g_y, parts, _ = K.act_bwd(g_y, sites[-1])
    for i in reversed(range(L)):
        act, bn = sites[i], None
        dgamma, dbeta = x.new_empty(0), x.new_empty(0)
        if act.bn:
            batch = bn_modes[i] == BATCH
            if batch and syncs[i]:
                dgamma, dbeta, u, v = _synced_bn_grad(parts, M, act, syncs[i])
            else:
                dgamma, dbeta, u, v = K.bn_grad(parts, M, act.scale, act.rstd, batch)
            bn = K.BNGrad(act.center, act.scale, u, v)
        act_in = sites[i - 1] if i > 0 else K.NO_ACT
        h = act_in.z if i > 0 else x
        dw, db = K.linear_dw(g_y, act.z, h, bn, act_in=act_in, has_bias=has_bias[i])
        grads[1 + 4 * i: 5 + 4 * i] = [dw, db if db is not None else x.new_empty(0), dgamma, dbeta]
        if i > 0 or input_grad:
            g_y, parts, _ = K.linear_dx(g_y, act.z, weights[i], bn, act_in=act_in)
    if input_grad:
        grads[0] = g_y
    return grads


def _synced_bn_grad(parts, M: int, act: K.Act, sync: int):
    """BatchNorm backward over a process group: dgamma, dbeta stay this rank's sums (DDP
    averages parameter gradients as it does eager's), u and v use the group's means."""
    local = torch.stack([parts[0].sum(0), parts[1].sum(0), torch.full_like(parts[0][0], float(M))])
    group = D.all_reduce_sum(local.clone(), D.group_of(sync))
    means = group[:2] / group[2]
    _, _, u, v = K.bn_grad((means[0:1], means[1:2]), 1, act.scale, act.rstd, True)
    return local[1].clone(), local[0].clone(), u, v  # clones: an op's outputs may not alias


@chain_backward.register_fake
def _(grad_out, x, weights, saved, seeds, bn_modes, acts, slopes, drop_ps, has_bias, syncs, input_grad):
    grads = [x.new_empty(x.shape) if input_grad else x.new_empty(0)]
    for w, mode, bias in zip(weights, bn_modes, has_bias):
        N = w.shape[0]
        vec = x.new_empty(N, dtype=torch.float32) if mode != NO_BN else x.new_empty(0)
        grads += [x.new_empty(w.shape), x.new_empty(N) if bias else x.new_empty(0), vec, vec.clone()]
    return grads


def _setup_context(ctx, inputs, output):
    x, weights, biases, gammas, betas, _, _, seeds, has_bias, has_gamma, has_beta, bn_modes, acts, slopes, drop_ps, \
        eps, syncs = inputs
    ctx.save_for_backward(x, seeds, *weights, *output[1:], *biases, *gammas, *betas)  # the last three: R.vjp's
    ctx.eps = eps
    ctx.acts, ctx.slopes, ctx.drop_ps, ctx.syncs = acts, slopes, drop_ps, syncs
    ctx.gamma_dtypes, ctx.beta_dtypes = [g.dtype for g in gammas], [b.dtype for b in betas]
    ctx.num_blocks = len(weights)
    ctx.has_bias, ctx.has_gamma, ctx.has_beta = has_bias, has_gamma, has_beta
    ctx.bn_modes = bn_modes
    ctx.num_fixed = sum(m == FIXED for m in bn_modes)


def _backward(ctx, grads):
    x, seeds, *rest = ctx.saved_tensors
    L = ctx.num_blocks
    weights, saved, params = rest[:L], rest[L:L + _PER_BLOCK * L], rest[L + _PER_BLOCK * L:]
    if R.differentiable(grads[0]):  # create_graph=True or batched: chain_backward has no autograd
        return _reference_backward(ctx, grads[0], x, seeds, list(weights), saved, params)
    out = chain_backward(grads[0], x, list(weights), list(saved), seeds, ctx.bn_modes, ctx.acts, ctx.slopes,
                         ctx.drop_ps, ctx.has_bias, ctx.syncs, ctx.needs_input_grad[0])
    per = [out[1 + 4 * i: 5 + 4 * i] for i in range(L)]
    d_w = [g[0] for g in per]
    d_b = [g[1] for i, g in enumerate(per) if ctx.has_bias[i]]
    # fp32 from the kernels; BatchNorm's parameters may be 16-bit, or fp32 beside 16-bit weights (autocast)
    d_gamma = [g.to(dt) for g, dt in zip([g[2] for i, g in enumerate(per) if ctx.has_gamma[i]], ctx.gamma_dtypes)]
    d_beta = [g.to(dt) for g, dt in zip([g[3] for i, g in enumerate(per) if ctx.has_beta[i]], ctx.beta_dtypes)]
    d_x = out[0] if ctx.needs_input_grad[0] else None
    no_stats = [None] * ctx.num_fixed
    return (d_x, d_w, d_b, d_gamma, d_beta, no_stats, no_stats, None) + (None,) * 9  # seeds, the flag lists


def _reference_backward(ctx, grad, x, seeds, weights, saved, params):
    """_backward's result from a differentiable recomputation (dwfast.reference). The saved
    mean and var of a FIXED block are its running statistics (detached: they are this op's
    outputs, and autograd would come back here through them)."""
    if any(ctx.syncs):  # as eager SyncBatchNorm, whose backward has no derivative either
        raise NotImplementedError("dwfast: no double backward or batched gradients through synchronised BatchNorm")
    nb, ng = sum(ctx.has_bias), sum(ctx.has_gamma)
    biases, gammas, betas = list(params[:nb]), list(params[nb:nb + ng]), list(params[nb + ng:])
    stats = [[t.detach() for t in saved[i * _PER_BLOCK + 1:i * _PER_BLOCK + 3]] if m == FIXED else (None, None)
             for i, m in enumerate(ctx.bn_modes)]
    run_means, run_vars = [s[0] for s in stats], [s[1] for s in stats]

    def forward(x, weights, biases, gammas, betas):
        return R.chain_reference(x, weights, _expand(biases, ctx.has_bias), _expand(gammas, ctx.has_gamma),
                                 _expand(betas, ctx.has_beta), run_means, run_vars, seeds, ctx.bn_modes, ctx.acts,
                                 ctx.slopes, ctx.drop_ps, ctx.eps)
    d_x, d_w, d_b, d_gamma, d_beta = R.vjp(forward, [x, weights, biases, gammas, betas], grad)
    no_stats = [None] * ctx.num_fixed
    return (d_x, d_w, d_b, d_gamma, d_beta, no_stats, no_stats, None) + (None,) * 9


chain_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dwfast::chain_infer", mutates_args=())
def chain_infer(
    x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], gammas: List[Optional[Tensor]],
    betas: List[Optional[Tensor]], running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]],
    acts: List[int], slopes: List[float], eps: List[float],
) -> Tensor:
    """No-grad chain with running statistics and no dropout: each block is one GEMM writing
    a_l directly."""
    h = x
    for i, w in enumerate(weights):
        act = K.NO_ACT._replace(act=acts[i], slope=slopes[i])
        if running_means[i] is not None:
            mean, _, rstd, scale, shift = K.bn_stats(None, 1, x.shape[0], running_means[i], running_vars[i],
                                                     gammas[i], betas[i], eps[i])
            act = K.Act(None, mean, scale, shift, rstd, True, acts[i], slopes[i])
        h, _, _ = K.linear_fwd(h, w, biases[i], act_out=act)
    return h


@chain_infer.register_fake
def _(x, weights, biases, gammas, betas, running_means, running_vars, acts, slopes, eps):
    return x.new_empty(x.shape[0], weights[-1].shape[0])


@torch.library.custom_op("dwfast::update_running_stats", mutates_args=("running_means", "running_vars", "num_batches"))
def update_running_stats(
    running_means: List[Tensor], running_vars: List[Tensor], num_batches: List[Tensor],
    means: List[Tensor], variances: List[Tensor], momentums: List[float], cumulative: List[bool],
) -> None:
    """BatchNorm's training-mode update of running statistics, for each listed block
    (`variances` unbiased)."""
    for i in range(len(running_means)):
        K.update_running_stats(running_means[i], running_vars[i], num_batches[i], means[i], variances[i],
                               None if cumulative[i] else momentums[i])


@update_running_stats.register_fake
def _(running_means, running_vars, num_batches, means, variances, momentums, cumulative):
    return None


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
    op to one dtype, rounding BatchNorm's parameters to 16 bits and making
    `update_running_stats` update a temporary copy. Casts here are plain PyTorch, so they
    trace under torch.compile too.
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
    x = lin_cast(x)

    params = [t for t in weights + biases + gammas + betas if t is not None]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad and BATCH not in modes and not any(drop_ps):
        return chain_infer(x, weights, biases, gammas, betas, run_means, run_vars, acts, slopes, eps).to(dtype)
    seeds = torch.cat([draw_seed(x.device) for p in drop_ps if p > 0] or [x.new_empty(0, dtype=torch.int64)])

    fixed = [m == FIXED for m in modes]
    res = chain_forward(
        x, weights, _present(biases), _present(gammas), _present(betas),
        _present(run_means, fixed), _present(run_vars, fixed), seeds,
        [b is not None for b in biases], [g is not None for g in gammas], [b is not None for b in betas],
        modes, acts, slopes, drop_ps, eps, [D.group_id(bn) if D.needs_sync(bn) else 0 for bn in bns])
    tracked = [i for i, bn in enumerate(bns) if bn is not None and bn.training and bn.running_mean is not None]
    if tracked:
        rm = [run_means[i] for i in tracked]
        rv = [run_vars[i] for i in tracked]
        update_running_stats(
            rm, rv, [bns[i].num_batches_tracked for i in tracked],
            [res[1 + _PER_BLOCK * i + 1] for i in tracked], [res[1 + _PER_BLOCK * i + 2] for i in tracked],
            [float(bns[i].momentum or 0.0) for i in tracked], [bns[i].momentum is None for i in tracked])
        for i, r_mean, r_var in zip(tracked, rm, rv):
            if r_mean is not bns[i].running_mean:  # upcast copies: write back
                bns[i].running_mean.copy_(r_mean)
                bns[i].running_var.copy_(r_var)
    return res[0].to(dtype)
