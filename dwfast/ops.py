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
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from . import distributed as D
from . import kernels as K
from . import library
from . import reference as R
from .kernels import tiles
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


@functools.lru_cache(maxsize=256)
def _flags(specs: Tuple[Spec, ...]) -> Tuple[tuple, ...]:
    """Per block, whether the ops' compact lists hold its bias, gamma, beta, running statistics
    in chain_body (FIXED or tracked) and in chain_forward (FIXED), num_batches_tracked, seed."""
    return (tuple(s.has_bias for s in specs), tuple(s.has_gamma for s in specs), tuple(s.has_beta for s in specs),
            tuple(s.bn_mode == FIXED or s.tracked for s in specs), tuple(s.bn_mode == FIXED for s in specs),
            tuple(s.tracked for s in specs), tuple(s.drop_p > 0 for s in specs))


# ---- plans
#
# The kernels' launchers are plans (kernels/fused_linear.py: "plans"), made once from the
# layout of their arguments and called with each launch's tensors. The ops keep the plans of
# every chain they run, keyed on what the plans read: the blocks' options; the dtype, shape,
# strides and 16-byte alignment (Triton specialises on it) of the input, the weights and the
# incoming gradient; of the activations the kernels pass each other also the room behind
# their rows (storage offset and size); the dtype of the user's per-feature vectors (biases,
# BatchNorm's parameters and statistics: kernels don't specialise on their alignment); torch's
# fp32 matmul precision, the tile table and the GPU (the active Triton driver). Every other
# tensor a chain's launches see is one the plans allocate, or a vector buffer or seed of
# dwfast's own (fp32, int64). The first call of a key plans block by block as it runs (a plan
# reads the layout of what the previous launch returned); later calls only launch.

_PLANS: "OrderedDict[tuple, list]" = OrderedDict()
_MAX_PLANS = 64  # chains x shapes kept (least recently used dropped): a few host microseconds each


def _key(name, specs, extra, tensors, activations, vectors) -> tuple:
    """A chain plan's key (above): its op, the blocks' options and `extra`, then what plans read
    of `tensors`, `activations` and `vectors`, and the global state."""
    driver = None if K.launch.INTERPRET else triton.runtime.driver.active
    return (name, specs, extra, torch.get_float32_matmul_precision(), tiles.generation(), driver,
            tuple([(t.dtype, t.shape, t.stride(), t.data_ptr() & 15) for t in tensors]),
            tuple([(t.shape, t.stride(), t.storage_offset(), t.untyped_storage().nbytes(), t.data_ptr() & 15)
                   for t in activations]),
            tuple([t.dtype for t in vectors]))


def _plans(key) -> Optional[list]:
    plans = _PLANS.get(key)
    if plans is not None:
        _PLANS.move_to_end(key)
    return plans


def _keep(key, plans: list) -> None:
    _PLANS[key] = plans
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)


def _norm(s: Spec, vec, gamma, beta, running_mean=None, running_var=None, num_batches=None, uv=None) -> K.Norm:
    """A block's BatchNorm for the kernels (planning, and the host side of synchronised blocks)."""
    if s.bn_mode == NO_BN:
        return K.NO_NORM
    return K.Norm(K.PARTIALS if s.sync else s.bn_mode, vec, gamma, beta, running_mean, running_var, num_batches,
                  s.eps, None if s.cumulative else s.momentum, uv)


def _site(s: Spec, vec, seed) -> K.Site:
    """A block's activation site for the kernels (planning)."""
    return K.Site(vec, s.act, s.slope, s.drop_p, seed)


def _forward(key, x, h, start: int, specs, weights, biases, vecs, gammas, betas, means, variances, counts, seeds,
             zs=None, output: bool = False) -> List[Tensor]:
    """Blocks start.. of the chain on h (their input: x, or the previous block's z): per block
    [z, vec] (z written into `zs` when given), from per-block lists (None where a block has no
    such tensor; `vecs` the blocks' BatchNorm vector buffers, filled here); with `output`,
    [out] first (the last block's activation applied). A synchronised block (mode PARTIALS)
    has its statistics merged across its group between its GEMM and the next."""
    plans = _plans(key)
    fresh = plans is None
    if fresh:
        plans = []
    scratch = tickets = None
    saved = []
    for i in range(start, len(specs)):
        s = specs[i]
        nw = weights[i + 1] if i + 1 < len(weights) else None  # (in chain_body too: its copy goes behind z's rows)
        prev = i - 1 if i > 0 else None  # the block whose activation this one applies on load
        in_vec, in_seed = (vecs[prev], seeds[prev]) if prev is not None else (None, None)
        if fresh:
            site_in = _site(specs[prev], in_vec, in_seed) if prev is not None else K.NO_SITE
            norm = _norm(s, vecs[i], gammas[i], betas[i], means[i], variances[i], counts[i])
            plans.append(K.LinearFwd(h, weights[i], biases[i], site_in, norm, zs[i] if zs else None, nw, i > 0))
        plan = plans[i - start]
        if scratch is None or plan.scratch > scratch.numel() or plan.tickets > tickets.numel():
            scratch, tickets = K.launch.scratch(x.device, plan.scratch), K.launch.tickets(x.device, plan.tickets)
        h = plan(h, weights[i], biases[i], in_vec, in_seed, vecs[i], gammas[i], betas[i], means[i], variances[i],
                 counts[i], nw, scratch, tickets, zs[i] if zs else None)
        if s.sync:
            _synced_stats(plan.partials(scratch), x.shape[0],
                          _norm(s, vecs[i], gammas[i], betas[i], means[i], variances[i], counts[i]), s.sync)
        saved += [h, vecs[i] if vecs[i] is not None else x.new_empty(0)]
    if output:
        last = specs[-1]
        if last.bn_mode == NO_BN and not last.act and not last.drop_p:
            saved[-_PER_BLOCK] = x.new_empty(0)  # out is z itself: an op's outputs may not alias
            out = h
        else:
            if fresh:
                plans.append(K.ActFwd(h, _site(last, vecs[-1], seeds[-1])))
            out = plans[-1](h, vecs[-1], seeds[-1])
        saved.insert(0, out)
    if fresh:
        _keep(key, plans)
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
    num_batches: List[Tensor], seeds: List[Tensor], ints: List[int], floats: List[float],
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
    tracked ones. Dropout masks are keyed on `seeds` (int64 [1] each, one per block with dropout).
    """
    specs = unpack(ints, floats)
    key = _key("body", specs, None, (x, *weights), zs, (*biases, *gammas, *betas, *running_means, *running_vars))
    has_bias, has_gamma, has_beta, running, _, tracked, dropout = _flags(specs)
    vecs = [v if s.bn_mode != NO_BN else None for v, s in zip(vecs, specs)]
    _forward(key, x, x, 0, specs, weights, _expand(biases, has_bias), vecs, _expand(gammas, has_gamma),
             _expand(betas, has_beta), _expand(running_means, running), _expand(running_vars, running),
             _expand(num_batches, tracked), _expand(seeds, dropout), zs)


def _chain_body_fake(x, zs, vecs, weights, biases, gammas, betas, running_means, running_vars, num_batches, seeds,
                     ints, floats):
    return None


library.register_fake(chain_body, _chain_body_fake)


@library.custom_op("chain_forward")
def chain_forward(
    x: Tensor, body: List[Tensor], weights: List[Tensor], biases: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor], seeds: List[Tensor],
    ints: List[int], floats: List[float],
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
    key = _key("forward", specs, start, (x, *weights), body[0::_PER_BLOCK],
               (*biases, *gammas, *betas, *running_means, *running_vars))
    has_bias, has_gamma, has_beta, _, fixed, _, dropout = _flags(specs)
    vecs = [v if s.bn_mode != NO_BN else None for v, s in zip(body[1::_PER_BLOCK], specs)]
    vecs += [K.new_vec(w.shape[0], x.device) if s.bn_mode != NO_BN else None
             for w, s in zip(weights[start:], specs[start:])]
    return _forward(key, x, body[-_PER_BLOCK] if start else x, start, specs, weights, _expand(biases, has_bias),
                    vecs, _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(running_means, fixed),
                    _expand(running_vars, fixed), [None] * len(specs), _expand(seeds, dropout), output=True)


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
    betas: List[Tensor], seeds: List[Tensor], ints: List[int], floats: List[float], input_grad: bool,
) -> List[Tensor]:
    """[grad_x] + per block [dW, db, dgamma, dbeta] (empty where there is none), from the saved
    per-block [z, vec] of chain_body and chain_forward; gradients come out in their parameters'
    dtypes."""
    specs = unpack(ints, floats)
    M, L = x.shape[0], len(weights)
    g_y = grad_out.contiguous()
    zs, vecs = saved[0::_PER_BLOCK], saved[1::_PER_BLOCK]
    key = _key("backward", specs, input_grad, (g_y, x, *weights), zs, (*gammas, *betas))
    _, has_gamma, has_beta, _, _, _, dropout = _flags(specs)
    vecs = [v if s.bn_mode != NO_BN else None for v, s in zip(vecs, specs)]
    gammas, betas, seeds = _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(seeds, dropout)
    plans = _plans(key)
    fresh = plans is None
    if fresh:
        plans = []
        norms = [_norm(s, v, g, b) for s, v, g, b in zip(specs, vecs, gammas, betas)]
        sites = [_site(s, v, seed) for s, v, seed in zip(specs, vecs, seeds)]
    grads = [None] * (1 + 4 * L)  # (empty tensors where None is left)
    scratch = tickets = None

    def buffers(plan):
        nonlocal scratch, tickets
        if scratch is None or plan.scratch > scratch.numel() or plan.tickets > tickets.numel():
            scratch, tickets = K.launch.scratch(x.device, plan.scratch), K.launch.tickets(x.device, plan.tickets)

    def bn_grads(i, dgamma, dbeta, uv, partials):
        if partials is not None:
            dgamma, dbeta = _synced_grads(partials, M, _norm(specs[i], vecs[i], gammas[i], betas[i], uv=uv),
                                          specs[i].sync)
        grads[3 + 4 * i: 5 + 4 * i] = [dgamma, dbeta]

    uv = None  # u, v of the block whose backward runs next
    last = specs[-1]
    if last.bn_mode != NO_BN or last.act or last.drop_p:  # the last activation's backward
        if fresh:
            plans.append(K.ActBwd(g_y, zs[-1], sites[-1], norms[-1]))
        plan = plans[0]
        buffers(plan)
        g_y, dgamma, dbeta, uv = plan(g_y, zs[-1], vecs[-1], seeds[-1], gammas[-1], betas[-1], scratch, tickets)
        bn_grads(L - 1, dgamma, dbeta, uv, plan.partials(scratch))
    first = len(plans) if fresh else (len(plans) - L)  # where the blocks' plans start (after ActBwd's)
    later = None  # a block's dW that its launch left to the next one (kernels.linear_bwd)
    later_plan = None  # (planning) that block's DeferredDW
    for i in reversed(range(L)):
        z = zs[i] if zs[i].numel() else g_y  # (empty: the chain's output was z itself)
        h, in_vec, in_seed, in_gamma, in_beta = ((zs[i - 1], vecs[i - 1], seeds[i - 1], gammas[i - 1], betas[i - 1])
                                                 if i > 0 else (x, None, None, None, None))
        if fresh:
            site_in, norm_in = (sites[i - 1], norms[i - 1]) if i > 0 else (K.NO_SITE, K.NO_NORM)
            plans.append(K.LinearBwd(g_y, z, weights[i], norms[i], h, site_in, norm_in, i > 0 or input_grad,
                                     specs[i].has_bias, i > 0, later_plan, i > 0))
        plan = plans[first + L - 1 - i]
        buffers(plan)
        g_y, dw, db, dgamma, dbeta, uv_in, later = plan(g_y, z, weights[i], vecs[i], uv, h, in_vec, in_seed, in_gamma,
                                                        in_beta, seeds[i], later, scratch, tickets)
        if fresh:
            later_plan = K.DeferredDW(*later, h, site_in, plan.split_gz) if later is not None else None
        grads[1 + 4 * i: 3 + 4 * i] = [dw, db]
        if i > 0:
            bn_grads(i - 1, dgamma, dbeta, uv_in, plan.partials(scratch))
        uv = uv_in
    if fresh:
        _keep(key, plans)
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
    ctx.save_for_backward(x, *seeds, *weights, *gammas, *betas, *biases, *running_means, *running_vars, *body,
                          *output[1:])
    ctx.set_materialize_grads(False)  # the saved outputs take no gradient: no zeros for them
    ctx.ints, ctx.floats = ints, floats
    ctx.sizes = len(seeds), len(body), len(weights), len(biases), len(gammas), len(betas), len(running_means)


def _backward(ctx, grads):
    n_seeds, n_body, L, n_bias, n_gamma, n_beta, n_fixed = ctx.sizes
    grad_out = grads[0]
    no_grads = [None] * n_body, [None] * n_fixed, [None] * n_fixed
    if grad_out is None:
        return (None, no_grads[0], None, None, None, None, *no_grads[1:], None, None, None)
    saved = ctx.saved_tensors
    x = saved[0]
    sizes = [n_seeds, L, n_gamma, n_beta, n_bias, n_fixed, n_fixed]
    seeds, weights, gammas, betas, biases, running_means, running_vars = (
        list(saved[1 + sum(sizes[:i]):1 + sum(sizes[:i + 1])]) for i in range(len(sizes)))
    rest = saved[1 + sum(sizes):]
    if R.differentiable(grad_out):  # create_graph=True or batched: chain_backward has no autograd
        d_x, d_w, d_b, d_gamma, d_beta = _reference_backward(unpack(ctx.ints, ctx.floats), grad_out, x, seeds, weights,
                                                             biases, gammas, betas, running_means, running_vars)
    else:
        out = chain_backward(grad_out, x, weights, list(rest), gammas, betas, seeds, ctx.ints,
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
