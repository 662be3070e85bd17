"""torch.library custom ops for a fused chain, with autograd; they call dwfast.kernels.

    chain_body      the chain's first blocks, up to the last one whose BatchNorm updates its
                    running statistics: it updates them in place (no autograd)
    chain_forward   the rest of the chain, with the autograd of the whole chain
    chain_backward  that backward: one launch per block

A training step launches two kernels per block and no PyTorch op between them (no zero
gradients are materialised for the saved outputs). The running statistics are updated by the
kernel that finalises the batch statistics, which needs an op that mutates them; PyTorch
allows no autograd on such an op, hence the split: chain_body's outputs are inputs of
chain_forward, whose backward covers every block.

Ops take flat tensor lists (an entry per block that has the tensor) and each block's options
packed in one int and one float list (`Spec`), so they pass through torch.compile and opcheck,
and stay cheap to call: PyTorch's dispatch costs host time per argument, partly quadratic in
their number.
"""
import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import distributed as D
from . import kernels as K
from . import library
from . import reference as R
from .chain import BATCH, FIXED, NO_BN, Block, act_spec, autocast_dtype, state, updates_running_stats, uses_batch_stats

assert (NO_BN, BATCH, FIXED) == (K.NO_BN, K.BATCH, K.FIXED)
_PER_BLOCK = 2  # saved tensors per block: z, vec


class Spec(NamedTuple):
    """A block's options. The ops take them packed (`pack`): per block 8 ints, then 4 floats."""
    has_bias: bool
    has_gamma: bool
    has_beta: bool
    bn_mode: int      # NO_BN, BATCH (batch statistics) or FIXED (running statistics)
    tracked: bool     # a BATCH block that updates its running statistics
    cumulative: bool  # momentum None: the cumulative average
    act: int          # a code of kernels.ACTIVATIONS
    sync: int         # a process-group id of dwfast.distributed: statistics over the group; 0: none
    slope: float      # LeakyReLU's negative slope
    drop_p: float     # dropout after the activation
    eps: float
    momentum: float


_INTS, _FLOATS = 8, 4


def pack(specs: List[Spec]):
    """(ints, floats): the ops' encoding of the blocks' options."""
    return [int(v) for s in specs for v in s[:_INTS]], [float(v) for s in specs for v in s[_INTS:]]


def unpack(ints: List[int], floats: List[float]) -> Tuple[Spec, ...]:
    """The blocks' Specs from pack's encoding, made once per encoding (every op call unpacks)."""
    try:
        return _unpacked(tuple(ints), tuple(floats))
    except TypeError:  # symbolic ints (torch.compile tracing) are unhashable
        return _unpack(ints, floats)


def _unpack(ints, floats) -> Tuple[Spec, ...]:
    specs = []
    for i in range(len(ints) // _INTS):
        has_bias, has_gamma, has_beta, mode, tracked, cumulative, act, sync = ints[i * _INTS:(i + 1) * _INTS]
        specs.append(Spec(bool(has_bias), bool(has_gamma), bool(has_beta), mode, bool(tracked), bool(cumulative), act,
                          sync, *floats[i * _FLOATS:(i + 1) * _FLOATS]))
    return tuple(specs)


_unpacked = functools.lru_cache(maxsize=256)(_unpack)


def _expand(present: List[Tensor], flags) -> List[Optional[Tensor]]:
    """The per-block list from the compact list of the blocks whose flag is set."""
    it = iter(present)
    return [next(it) if f else None for f in flags]


def _norms(x, specs, weights, gammas, betas, vecs=None, running=None, num_batches=None) -> List[K.Norm]:
    """Each block's BatchNorm for the kernels: new vector buffers unless `vecs` are given;
    `running` = (running_means, running_vars, flags): the running statistics of the flagged
    blocks; `num_batches`: the counters of the tracked blocks."""
    gammas, betas = _expand(gammas, [s.has_gamma for s in specs]), _expand(betas, [s.has_beta for s in specs])
    none = [None] * len(specs)
    means, variances = (_expand(running[0], running[2]), _expand(running[1], running[2])) if running else (none, none)
    counts = _expand(num_batches, [s.tracked for s in specs]) if num_batches is not None else none
    norms = []
    for i, s in enumerate(specs):
        vec = vecs[i] if vecs is not None else K.new_vec(weights[i].shape[0], x.device)
        norms.append(K.NO_NORM if s.bn_mode == NO_BN else K.Norm(
            K.PARTIALS if s.sync else s.bn_mode, vec, gammas[i], betas[i], means[i], variances[i], counts[i], s.eps,
            None if s.cumulative else s.momentum))
    return norms


def _sites(specs, norms, seeds) -> List[K.Site]:
    """Each block's activation site; `seeds` holds one entry per block with dropout."""
    sites, k = [], 0
    for s, n in zip(specs, norms):
        sites.append(K.Site(n.vec, s.act, s.slope, s.drop_p, seeds[k:k + 1] if s.drop_p > 0 else None))
        k += s.drop_p > 0
    return sites


def _run(x, h, site, weights, biases, norms, sites, specs, start: int, zs=None) -> List[Tensor]:
    """Blocks start.. of the chain on h (their input, a_{start-1} = `site`(h)): per block [z, vec]
    (z written into `zs` when given). A synchronised block (mode PARTIALS) has its statistics
    merged across its group between its GEMM and the next."""
    saved = []
    for i in range(start, len(specs)):
        # the next block's weight (in chain_body too: its aligned copy goes behind z's rows)
        h, partials = K.linear_fwd(h, weights[i], biases[i], site, norms[i], out=zs[i] if zs else None,
                                   next_weight=weights[i + 1] if i + 1 < len(weights) else None, chained=i > 0)
        if partials is not None:
            _synced_stats(partials, x.shape[0], norms[i], specs[i].sync)
        site = sites[i]
        saved += [h, norms[i].vec if norms[i].vec is not None else x.new_empty(0)]
    return saved


def new_saved(x, weights, specs) -> List[Tensor]:
    """Uninitialised per-block [z, vec] buffers for `specs`' blocks on x's batch, as linear_fwd
    allocates them: a z that a next block reads (`weights` has one more) is a
    kernels.new_activation."""
    saved = []
    for i, (w, s) in enumerate(zip(weights, specs)):
        nxt = weights[i + 1] if i + 1 < len(weights) else None
        z = K.new_activation(x.shape[0], w.shape[0], x, nxt) if nxt is not None else x.new_empty(x.shape[0], w.shape[0])
        saved += [z, K.new_vec(w.shape[0], x.device) if s.bn_mode != NO_BN else x.new_empty(0)]
    return saved


@library.custom_op("chain_body", mutates_args=("zs", "vecs", "running_means", "running_vars", "num_batches"))
def chain_body(
    x: Tensor, zs: List[Tensor], vecs: List[Tensor], weights: List[Tensor], biases: List[Tensor],
    gammas: List[Tensor], betas: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor],
    num_batches: List[Tensor], seeds: Tensor, ints: List[int], floats: List[float],
) -> None:
    """The given blocks (the chain's first ones): writes each block's z into `zs` [B, N] and
    its BatchNorm vectors into `vecs` ([VEC_ROWS, N] fp32; empty without BatchNorm), and updates
    the running statistics of the tracked blocks in place, as BatchNorm1d's training forward
    does. (Mutated outputs rather than returned ones: PyTorch cannot functionalise an op that
    both mutates and returns a list.)

    `ints`, `floats`: the blocks' `Spec`s, packed. `weights`: the blocks', then the next block's
    when there is one (whose aligned copy goes behind the last z, kernels.new_activation).
    `biases` of the blocks with `has_bias`, `gammas`/`betas` of those with `has_gamma`/`has_beta`;
    `running_means`/`running_vars` of the FIXED and the tracked blocks, `num_batches` of the
    tracked ones. Dropout masks are keyed on `seeds` (int64, one per block with dropout).
    """
    specs = unpack(ints, floats)
    running = (running_means, running_vars, [s.bn_mode == FIXED or s.tracked for s in specs])
    norms = _norms(x, specs, weights, gammas, betas, vecs, running, num_batches)
    sites = _sites(specs, norms, seeds)
    _run(x, x, K.NO_SITE, weights, _expand(biases, [s.has_bias for s in specs]), norms, sites, specs, 0, zs)


def _chain_body_fake(x, zs, vecs, weights, biases, gammas, betas, running_means, running_vars, num_batches, seeds,
                     ints, floats):
    return None


library.register_fake(chain_body, _chain_body_fake)


@library.custom_op("chain_forward")
def chain_forward(
    x: Tensor, body: List[Tensor], weights: List[Tensor], biases: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor], seeds: Tensor, ints: List[int],
    floats: List[float],
) -> List[Tensor]:
    """[out] + per block [z, vec] of the blocks after `body` (chain_body's zs and vecs,
    interleaved, for the chain's first len(body) / 2 blocks, whose running statistics are not
    touched here).

    Arguments as chain_body's, for the whole chain; `running_means`/`running_vars` of the FIXED
    blocks. The last block's z is kept only when an activation follows it (otherwise it is
    `out`).
    """
    specs = unpack(ints, floats)
    start = len(body) // _PER_BLOCK
    vecs = body[1::_PER_BLOCK] + [K.new_vec(w.shape[0], x.device) if s.bn_mode != NO_BN else None
                                  for w, s in zip(weights[start:], specs[start:])]
    norms = _norms(x, specs, weights, gammas, betas, vecs, (running_means, running_vars,
                                                           [s.bn_mode == FIXED for s in specs]))
    sites = _sites(specs, norms, seeds)
    h, site = (body[-_PER_BLOCK], sites[start - 1]) if start else (x, K.NO_SITE)
    saved = _run(x, h, site, weights, _expand(biases, [s.has_bias for s in specs]), norms, sites, specs, start)
    z_last = saved[-_PER_BLOCK] if saved else body[-_PER_BLOCK]
    if sites[-1].identity:
        saved[-_PER_BLOCK] = x.new_empty(0)  # out is z itself: an op's outputs may not alias
        return [z_last] + saved
    return [K.act_fwd(z_last, sites[-1])] + saved


def _chain_forward_fake(x, body, weights, biases, gammas, betas, running_means, running_vars, seeds, ints, floats):
    specs = unpack(ints, floats)
    start = len(body) // _PER_BLOCK
    saved = new_saved(x, weights[start:], specs[start:])
    if specs[-1].bn_mode == NO_BN and not specs[-1].act and not specs[-1].drop_p:
        saved[-_PER_BLOCK] = x.new_empty(0)
    return [x.new_empty(x.shape[0], weights[-1].shape[0])] + saved


library.register_fake(chain_forward, _chain_forward_fake)


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


@library.custom_op("chain_backward")
def chain_backward(
    grad_out: Tensor, x: Tensor, weights: List[Tensor], saved: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], seeds: Tensor, ints: List[int], floats: List[float], input_grad: bool,
) -> List[Tensor]:
    """[grad_x] + per block [dW, db, dgamma, dbeta] (empty where there is none), from the saved
    per-block [z, vec] of chain_body and chain_forward; gradients come out in their parameters'
    dtypes."""
    specs = unpack(ints, floats)
    M, L = x.shape[0], len(weights)
    zs = saved[0::_PER_BLOCK]
    norms = _norms(x, specs, weights, gammas, betas, vecs=saved[1::_PER_BLOCK])
    norms = [n if n.mode == NO_BN else n._replace(uv=K.new_uv(n.vec.shape[1], x.device)) for n in norms]
    sites = _sites(specs, norms, seeds)
    grads = [None] * (1 + 4 * L)  # (empty tensors where None is left)

    def bn_grads(i, dgamma, dbeta, partials):
        if partials is not None:
            dgamma, dbeta = _synced_grads(partials, M, norms[i], specs[i].sync)
        grads[3 + 4 * i: 5 + 4 * i] = [dgamma, dbeta]

    g_y = grad_out.contiguous()
    if not sites[-1].identity:
        g_y, dgamma, dbeta, partials = K.act_bwd(g_y, zs[-1], sites[-1], norms[-1])
        bn_grads(L - 1, dgamma, dbeta, partials)
    later = None  # a block's dW that its launch left to the next one (kernels.linear_bwd)
    for i in reversed(range(L)):
        site_in, norm_in, h = (sites[i - 1], norms[i - 1], zs[i - 1]) if i > 0 else (K.NO_SITE, K.NO_NORM, x)
        g_y, dw, db, dgamma, dbeta, partials, later = K.linear_bwd(
            g_y, zs[i] if zs[i].numel() else g_y, weights[i], norms[i], h, site_in, norm_in,
            input_grad=i > 0 or input_grad, has_bias=specs[i].has_bias, chained=i > 0, deferred=later, defer=i > 0)
        grads[1 + 4 * i: 3 + 4 * i] = [dw, db]
        if i > 0:
            bn_grads(i - 1, dgamma, dbeta, partials)
    if input_grad:
        grads[0] = g_y
    return [g if g is not None else x.new_empty(0) for g in grads]


def _chain_backward_fake(grad_out, x, weights, saved, gammas, betas, seeds, ints, floats, input_grad):
    specs = unpack(ints, floats)
    grads = [x.new_empty(x.shape) if input_grad else x.new_empty(0)]
    gammas, betas = _expand(gammas, [s.has_gamma for s in specs]), _expand(betas, [s.has_beta for s in specs])
    for w, gamma, beta, s in zip(weights, gammas, betas, specs):
        grads += [x.new_empty(w.shape), x.new_empty(w.shape[0]) if s.has_bias else x.new_empty(0)]
        grads += [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (gamma, beta)]
    return grads


library.register_fake(chain_backward, _chain_backward_fake)


def _setup_context(ctx, inputs, output):
    x, body, weights, biases, gammas, betas, running_means, running_vars, seeds, ints, floats = inputs
    # biases and the FIXED blocks' running statistics: for the differentiable recomputation only
    ctx.save_for_backward(x, seeds, *weights, *gammas, *betas, *biases, *running_means, *running_vars, *body,
                          *output[1:])
    ctx.set_materialize_grads(False)  # the saved outputs take no gradient: no zeros for them
    ctx.ints, ctx.floats = ints, floats
    ctx.sizes = len(body), len(weights), len(biases), len(gammas), len(betas), len(running_means)


def _backward(ctx, grads):
    n_body, L, n_bias, n_gamma, n_beta, n_fixed = ctx.sizes
    grad_out = grads[0]
    no_grads = [None] * n_body, [None] * n_fixed, [None] * n_fixed
    if grad_out is None:
        return (None, no_grads[0], None, None, None, None, *no_grads[1:], None, None, None)
    x, seeds, *rest = ctx.saved_tensors
    sizes = [L, n_gamma, n_beta, n_bias, n_fixed, n_fixed]
    weights, gammas, betas, biases, running_means, running_vars = (
        list(rest[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(len(sizes)))
    if R.differentiable(grad_out):  # create_graph=True or batched: chain_backward has no autograd
        d_x, d_w, d_b, d_gamma, d_beta = _reference_backward(unpack(ctx.ints, ctx.floats), grad_out, x, seeds, weights,
                                                             biases, gammas, betas, running_means, running_vars)
    else:
        out = chain_backward(grad_out, x, weights, list(rest[sum(sizes):]), gammas, betas, seeds, ctx.ints,
                             ctx.floats, ctx.needs_input_grad[0])
        per = [out[1 + 4 * i: 5 + 4 * i] for i in range(L)]
        specs = unpack(ctx.ints, ctx.floats)
        d_w = [g[0] for g in per]
        d_b = [g[1] for g, s in zip(per, specs) if s.has_bias]
        d_gamma = [g[2] for g, s in zip(per, specs) if s.has_gamma]
        d_beta = [g[3] for g, s in zip(per, specs) if s.has_beta]
        d_x = out[0] if ctx.needs_input_grad[0] else None
    # x, body, weights, biases, gammas, betas, running_means, running_vars, seeds, ints, floats
    return d_x, no_grads[0], d_w, d_b, d_gamma, d_beta, *no_grads[1:], None, None, None


def _reference_backward(specs, grad, x, seeds, weights, biases, gammas, betas, running_means, running_vars):
    """(d_x, d_w, d_b, d_gamma, d_beta) from a differentiable recomputation (dwfast.reference)."""
    if any(s.sync for s in specs):  # as eager SyncBatchNorm, whose backward has no derivative either
        raise NotImplementedError("dwfast: no double backward or batched gradients through synchronised BatchNorm")
    fixed = [s.bn_mode == FIXED for s in specs]
    run_means, run_vars = _expand(running_means, fixed), _expand(running_vars, fixed)

    def forward(x, weights, biases, gammas, betas):
        return R.chain_reference(
            x, weights, _expand(biases, [s.has_bias for s in specs]), _expand(gammas, [s.has_gamma for s in specs]),
            _expand(betas, [s.has_beta for s in specs]), run_means, run_vars, seeds, [s.bn_mode for s in specs],
            [s.act for s in specs], [s.slope for s in specs], [s.drop_p for s in specs], [s.eps for s in specs])
    return R.vjp(forward, [x, weights, biases, gammas, betas], grad)


library.register_autograd(chain_forward, _backward, setup_context=_setup_context)


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
    weights = [lin_cast(state(m, "weight")) for m in lin]
    biases = [lin_cast(state(m, "bias")) for m in lin]
    gammas = [cast(state(bn, "weight")) if bn is not None else None for bn in bns]
    betas = [cast(state(bn, "bias")) if bn is not None else None for bn in bns]
    run_means = [cast(state(bn, "running_mean")) if bn is not None else None for bn in bns]
    run_vars = [cast(state(bn, "running_var")) if bn is not None else None for bn in bns]
    specs = []
    for blk, bias, gamma, beta in zip(blocks, biases, gammas, betas):
        bn, (act, slope) = blk.bn, act_spec(blk.act)
        drop_p = float(blk.dropout.p) if blk.dropout is not None and blk.dropout.training else 0.0
        mode = NO_BN if bn is None else BATCH if uses_batch_stats(bn) else FIXED
        specs.append(Spec(
            bias is not None, gamma is not None, beta is not None, mode, bn is not None and updates_running_stats(bn),
            bn is not None and bn.momentum is None, K.ACTIVATIONS[act], D.group_id(bn) if D.needs_sync(bn) else 0,
            slope, drop_p, float(bn.eps) if bn is not None else 0.0, float(bn.momentum or 0.0) if bn else 0.0))
    x = lin_cast(x)
    seeds = [draw_seed(x.device) for s in specs if s.drop_p > 0]
    seeds = torch.cat(seeds) if seeds else x.new_empty(0, dtype=torch.int64)  # (cat: one launch, with dropout)
    ints, floats = pack(specs)

    # the blocks up to the last one that updates running statistics run in chain_body
    n = max([i + 1 for i, s in enumerate(specs) if s.tracked] or [0])
    body = new_saved(x, weights[:n + 1], specs[:n])
    if n:
        running = [s.bn_mode == FIXED or s.tracked for s in specs[:n]]
        num_batches = [state(bn, "num_batches_tracked") for bn, s in zip(bns, specs[:n]) if s.tracked]
        with torch.no_grad():
            chain_body(x, body[0::_PER_BLOCK], body[1::_PER_BLOCK], weights[:n + 1], _present(biases[:n]),
                       _present(gammas[:n]), _present(betas[:n]), _present(run_means[:n], running),
                       _present(run_vars[:n], running), num_batches, seeds, ints[:n * _INTS], floats[:n * _FLOATS])
        for i in range(n):
            if specs[i].tracked and run_means[i] is not state(bns[i], "running_mean"):  # upcast copies: write back
                bns[i].running_mean.copy_(run_means[i])
                bns[i].running_var.copy_(run_vars[i])
    fixed = [s.bn_mode == FIXED for s in specs]
    res = chain_forward(x, body, weights, _present(biases), _present(gammas), _present(betas),
                        _present(run_means, fixed), _present(run_vars, fixed), seeds, ints, floats)
    return res[0].to(dtype)
