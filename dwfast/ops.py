"""The fused chain's forward and backward, as torch.library custom ops with autograd and as one
autograd.Function for eager calls; both run dwfast.kernels' plans.

    chain_body      the chain's first blocks, up to the last one whose BatchNorm updates its
                    running statistics: it updates them in place (no autograd)
    chain_forward   the rest of the chain, with the autograd of the whole chain
    chain_backward  that backward: one launch per block

A training step launches two kernels per block and no PyTorch op between them (no zero
gradients are materialised for the saved outputs). The running statistics are updated by the
kernel that finalises the batch statistics, which needs an op that mutates them; PyTorch
allows no autograd on such an op, hence the split: chain_body's outputs are inputs of
chain_forward, whose backward covers every block.

The ops are what torch.compile, torch.export, opcheck and dispatch modes see and trace. Eager
calls (`chain`, when none of those is at work) skip PyTorch's dispatcher: `_Chain` runs the
same plans as one autograd node, without the ops' per-tensor costs (the dispatcher converts
every tensor of their lists between Python and C++ on each of its hops, and the split saves
the body's outputs twice), which come to several microseconds per block of a training step.

Ops take flat tensor lists (an entry per block that has the tensor) and each block's options
packed in one int and one float list (`Spec`), so they pass through torch.compile and opcheck.
"""
import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor, nn

from . import distributed as D
from . import kernels as K
from . import library
from . import reference as R
from .chain import BATCH, FIXED, NO_BN, Block, Tensors, act_spec, autocast_dtype, records_graph
from .kernels import tiles

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


def _present(tensors) -> List[Tensor]:
    """The compact list of a per-block list."""
    return [t for t in tensors if t is not None]


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
# layout of their arguments and called with each launch's tensors. A chain's plans are kept
# keyed on what they read: the blocks' options; the dtype, shape, strides and 16-byte
# alignment (Triton specialises on it) of the input, the weights and the incoming gradient; of
# the activations the kernels pass each other also the room behind their rows (storage offset
# and size); the dtype of the user's per-feature vectors (biases, BatchNorm's parameters and
# statistics: kernels don't specialise on their alignment); torch's fp32 matmul precision, the
# tile table and the GPU (the active Triton driver). Every other tensor a chain's launches see
# is one the plans allocate, or a vector buffer or seed of dwfast's own (fp32, int64). The
# first call of a key plans block by block as it runs (a plan reads the layout of what the
# previous launch returned); later calls only launch.

_PLANS: dict = {}
_MAX_PLANS = 256  # chains x shapes kept; past that the oldest go (dicts keep insertion order)


def _state() -> tuple:
    """The global state plans read: fp32 matmul precision, tile table, GPU (Triton's driver)."""
    driver = None if K.launch.INTERPRET else triton.runtime.driver.active
    return torch.get_float32_matmul_precision(), tiles.generation(), driver


def _key(name, specs, extra, tensors, activations, vectors) -> tuple:
    """A chain plan's key (above): its op, the blocks' options and `extra`, the global state,
    the device of `tensors[0]`, then what plans read of `tensors`, `activations` and `vectors`."""
    return (name, specs, extra, _state(), tensors[0].device,  # (a compiled kernel's handle is per device)
            tuple([(t.dtype, t.shape, t.stride(), t.data_ptr() & 15) for t in tensors]), _layouts(activations),
            tuple([t.dtype for t in vectors]))


def _layouts(activations) -> tuple:
    """What plans read of activations the kernels pass each other: their layout, the room behind
    their rows (storage offset and size) and their 16-byte alignment."""
    return tuple([(t.shape, t.stride(), t.storage_offset(), t.untyped_storage().nbytes(), t.data_ptr() & 15)
                  for t in activations])


def _plans(key, make=list):
    """The plans kept for `key`, or a new entry (`make()`, empty: the caller plans into it and
    then `_keep`s it)."""
    found = _PLANS.get(key)
    return (found, False) if found is not None else (make(), True)


def _keep(key, plans) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        del _PLANS[next(iter(_PLANS))]
    _PLANS[key] = plans


def _norm(s: Spec, vec, gamma, beta, running_mean=None, running_var=None, num_batches=None, uv=None) -> K.Norm:
    """A block's BatchNorm for the kernels (planning, and the host side of synchronised blocks)."""
    if s.bn_mode == NO_BN:
        return K.NO_NORM
    return K.Norm(K.PARTIALS if s.sync else s.bn_mode, vec, gamma, beta, running_mean, running_var, num_batches,
                  s.eps, None if s.cumulative else s.momentum, uv)


def _site(s: Spec, vec, seed) -> K.Site:
    """A block's activation site for the kernels (planning)."""
    return K.Site(vec, s.act, s.slope, s.drop_p, seed)


def _vecs(x, weights, specs, given=()) -> List[Optional[Tensor]]:
    """The blocks' BatchNorm vector buffers: `given` ones for the first blocks, new ones after
    (as kernels.new_vec makes them; new_empty of an fp32 tensor costs less host time)."""
    vecs = [v if s.bn_mode != NO_BN else None for v, s in zip(given, specs)]
    if len(vecs) == len(specs):
        return vecs
    fp32 = x.new_empty(0, dtype=torch.float32)
    return vecs + [fp32.new_empty(K.VEC_ROWS, w.shape[0]) if s.bn_mode != NO_BN else None
                   for w, s in zip(weights[len(vecs):len(specs)], specs[len(vecs):])]


def _run_forward(plans, fresh, x, h, start: int, specs, weights, biases, vecs, gammas, betas, means, variances, counts,
                 seeds, zs=None, output: bool = False) -> List[Tensor]:
    """Blocks start.. of the chain on h (their input: x, or the previous block's z) with `plans`
    (made into it when `fresh`): per block [z, vec] (z written into `zs` when given), from
    per-block lists (None where a block has no such tensor; `vecs` the blocks' BatchNorm vector
    buffers, filled here); with `output`, [out] first (the last block's activation applied). A
    synchronised block (mode PARTIALS) has its statistics merged across its group between its
    GEMM and the next."""
    scratch = tickets = None
    saved = []
    split = None  # the weight's TF32 split that the last launch wrote for this block (kernels.splits_apart)
    for i in range(start, len(specs)):
        s = specs[i]
        nw = weights[i + 1] if i + 1 < len(weights) else None  # (in chain_body too: its copy goes behind z's rows)
        in_vec, in_seed = (vecs[i - 1], seeds[i - 1]) if i > 0 else (None, None)  # the activation applied on load
        weight = weights[i] if split is None else split
        if fresh:
            site_in = _site(specs[i - 1], in_vec, in_seed) if i > 0 else K.NO_SITE
            norm = _norm(s, vecs[i], gammas[i], betas[i], means[i], variances[i], counts[i])
            # (not across an op: chain_body's last block writes none for chain_forward's first)
            apart = i + 1 < len(specs) and K.splits_apart(x.shape[0], x, nw)
            plans.append(K.LinearFwd(h, weight, biases[i], site_in, norm, zs[i] if zs else None, nw, i > 0, apart,
                                     split is not None))
        plan = plans[i - start]
        if scratch is None or plan.scratch > scratch.numel() or plan.tickets > tickets.numel():
            scratch, tickets = K.launch.scratch(x.device, plan.scratch), K.launch.tickets(x.device, plan.tickets)
        split_next = K.new_split(nw) if plan.copy_next == 3 else None
        h = plan(h, weight, biases[i], in_vec, in_seed, vecs[i], gammas[i], betas[i], means[i], variances[i],
                 counts[i], nw, scratch, tickets, zs[i] if zs else None, split_next)
        split = split_next
        if s.sync:
            _synced_stats(plan.partials(scratch), x.shape[0],
                          _norm(s, vecs[i], gammas[i], betas[i], means[i], variances[i], counts[i]), s.sync)
        saved += [h, vecs[i] if vecs[i] is not None else x.new_empty(0)]  # (outputs of an op may not alias)
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
    return saved


def _run_backward(plans, fresh, specs, g_y, x, weights, zs, vecs, gammas, betas, seeds, input_grad: bool):
    """The chain's backward with `plans` (made into it when `fresh`) from g_y = dL/d out
    (contiguous) and the forward's per-block zs and vecs: (grad_x or None, then per block
    lists of dW, db, dgamma, dbeta, None where there is none), in the parameters' dtypes."""
    M, L = x.shape[0], len(weights)
    if fresh:
        norms = [_norm(s, v, g, b) for s, v, g, b in zip(specs, vecs, gammas, betas)]
        sites = [_site(s, v, seed) for s, v, seed in zip(specs, vecs, seeds)]
    dws, dbs, dgammas, dbetas = [None] * L, [None] * L, [None] * L, [None] * L
    scratch = tickets = None
    work = K.launch.workspace(x.device)  # what one launch passes the next (block i's: parity i % 2)

    def buffers(plan):
        nonlocal scratch, tickets
        if scratch is None or plan.scratch > scratch.numel() or plan.tickets > tickets.numel():
            scratch, tickets = K.launch.scratch(x.device, plan.scratch), K.launch.tickets(x.device, plan.tickets)

    def bn_grads(i, dgamma, dbeta, uv, partials):
        if partials is not None:
            dgamma, dbeta = _synced_grads(partials, M, _norm(specs[i], vecs[i], gammas[i], betas[i], uv=uv),
                                          specs[i].sync)
        dgammas[i], dbetas[i] = dgamma, dbeta

    uv = None  # u, v of the block whose backward runs next
    last = specs[-1]
    if last.bn_mode != NO_BN or last.act or last.drop_p:  # the last activation's backward
        if fresh:
            plans.append(K.ActBwd(g_y, zs[-1], sites[-1], norms[-1]))
        plan = plans[0]
        buffers(plan)
        g_y, dgamma, dbeta, uv = plan(g_y, zs[-1], vecs[-1], seeds[-1], gammas[-1], betas[-1], scratch, tickets,
                                      None, work, L & 1)
        bn_grads(L - 1, dgamma, dbeta, uv, plan.partials(scratch))
    first = len(plans) if fresh else len(plans) - L  # where the blocks' plans start (after ActBwd's)
    later = None  # a block's dW that its launch left to the next one (kernels.LinearBwd)
    later_plan = None  # (planning) that block's DeferredDW
    given, split = None, None  # what the last launch wrote split for this one, and the split
    for i in reversed(range(L)):
        z = zs[i] if zs[i].numel() else g_y  # (empty: the chain's output was z itself)
        h, in_vec, in_seed, in_gamma, in_beta = ((zs[i - 1], vecs[i - 1], seeds[i - 1], gammas[i - 1], betas[i - 1])
                                                 if i > 0 else (x, None, None, None, None))
        if given == "x":
            h = split
        weight = split if given == "w" else weights[i]
        if fresh:
            site_in, norm_in = (sites[i - 1], norms[i - 1]) if i > 0 else (K.NO_SITE, K.NO_NORM)
            kind = K.next_split(zs[i - 2] if i > 1 else x, weights[i - 1], i > 1, i > 1 or input_grad) if i else None
            plans.append(K.LinearBwd(g_y, z, weight, norms[i], h, site_in, norm_in, i > 0 or input_grad,
                                     specs[i].has_bias, i > 0, later_plan, i > 0,
                                     (kind, x if kind == "x" else weights[i - 1]) if kind else None, given))
        plan = plans[first + L - 1 - i]
        buffers(plan)
        kind = plan.copy_kind
        src = x if kind == "x" else weights[i - 1] if kind == "w" else None
        copy = (src, K.new_split(src, work, i & 1)) if kind else (None, None)
        g_y, dws[i], dbs[i], dgamma, dbeta, uv_in, later = plan(g_y, z, weight, vecs[i], uv, h, in_vec, in_seed,
                                                                in_gamma, in_beta, seeds[i], later, scratch, tickets,
                                                                None, copy, work, i & 1)
        given, split = kind, copy[1]
        if fresh:
            later_plan = K.DeferredDW(*later, h, site_in, plan.split_gz) if later is not None else None
        if i > 0:
            bn_grads(i - 1, dgamma, dbeta, uv_in, plan.partials(scratch))
        uv = uv_in
    return (g_y if input_grad else None), dws, dbs, dgammas, dbetas


# ---- the custom ops


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
    plans, fresh = _plans(key)
    _run_forward(plans, fresh, x, x, 0, specs, weights, _expand(biases, has_bias), _vecs(x, weights, specs, vecs),
                 _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(running_means, running),
                 _expand(running_vars, running), _expand(num_batches, tracked), _expand(seeds, dropout), zs)
    if fresh:
        _keep(key, plans)


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
    plans, fresh = _plans(key)
    out = _run_forward(plans, fresh, x, body[-_PER_BLOCK] if start else x, start, specs, weights,
                       _expand(biases, has_bias), _vecs(x, weights, specs, body[1::_PER_BLOCK]),
                       _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(running_means, fixed),
                       _expand(running_vars, fixed), [None] * len(specs), _expand(seeds, dropout), output=True)
    if fresh:
        _keep(key, plans)
    return out


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
        D.update_running(norm.running_mean, norm.running_var, norm.num_batches, norm.momentum, count, mean, var)


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
    g_y = grad_out.contiguous()
    zs = saved[0::_PER_BLOCK]
    key = _key("backward", specs, input_grad, (g_y, x, *weights), zs, (*gammas, *betas))
    _, has_gamma, has_beta, _, _, _, dropout = _flags(specs)
    plans, fresh = _plans(key)
    grad_x, *per_block = _run_backward(plans, fresh, specs, g_y, x, weights, zs, _vecs(x, weights, specs, saved[1::2]),
                                       _expand(gammas, has_gamma), _expand(betas, has_beta), _expand(seeds, dropout),
                                       input_grad)
    if fresh:
        _keep(key, plans)
    grads = [grad_x] + [g for block in zip(*per_block) for g in block]
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
    specs = unpack(ctx.ints, ctx.floats)
    if R.differentiable(grad_out):  # create_graph=True or batched: chain_backward has no autograd
        d_x, d_w, d_b, d_gamma, d_beta = _reference_backward(specs, grad_out, x, seeds, weights, biases, gammas, betas,
                                                             running_means, running_vars)
    else:
        out = chain_backward(grad_out, x, weights, list(saved[1 + sum(sizes):]), gammas, betas, seeds, ctx.ints,
                             ctx.floats, ctx.needs_input_grad[0])
        per = [out[1 + 4 * i: 5 + 4 * i] for i in range(L)]
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


# ---- eager calls


class _Call(NamedTuple):
    """One eager call of a chain (`_Chain`): the blocks' options, per-block lists of their
    tensors (None where absent; running statistics and counters as the kernels take them in
    training: those of the FIXED and tracked blocks), the dropout seeds, and the plans kept
    for its key ("forward": the forward's; per backward key, a backward's)."""
    specs: Tuple[Spec, ...]
    weights: list
    biases: list
    gammas: list
    betas: list
    running_means: list
    running_vars: list
    num_batches: list
    seeds: list
    plans: dict
    saves_out: bool  # eager's last activation saves its output (_saves_output)


def _run_call(call: _Call, x) -> List[Tensor]:
    """The chain's forward for `call`: [out] + per block [z, vec]; the running statistics of the
    tracked blocks updated, with their versions bumped as in-place ops bump them."""
    plans = call.plans.get("forward")
    fresh = plans is None
    if fresh:
        plans = []
    out = _run_forward(plans, fresh, x, x, 0, call.specs, call.weights, call.biases, _vecs(x, call.weights, call.specs),
                       call.gammas, call.betas, call.running_means, call.running_vars, call.num_batches, call.seeds,
                       output=True)
    if fresh:
        call.plans["forward"] = plans
    bumped = [t for s, *ts in zip(call.specs, call.running_means, call.running_vars, call.num_batches) if s.tracked
              for t in ts]
    if bumped:
        torch.autograd.graph.increment_version(bumped)
    return out


class _Chain(torch.autograd.Function):
    """A whole chain as one autograd node, for eager calls (module docstring). Its inputs: the
    `_Call`, x, the weights, then the biases, gammas and betas the blocks have. The forward runs
    every block as chain_body and chain_forward do; the backward as chain_backward does, or
    differentiably as the ops' autograd does for a double backward."""

    @staticmethod
    def forward(ctx, call: _Call, x, *params):
        out, *saved = _run_call(call, x)
        ctx.call, ctx.vecs = call, _vecs(x, call.weights, call.specs, saved[1::_PER_BLOCK])
        # Saved-tensor hooks (offloading, checkpointing) may give the backward copies of x and the
        # zs, laid out anew (no room behind their rows): its plans then key on their layout too
        ctx.hooked = torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
        ctx.set_materialize_grads(False)
        # Saved: the zs, then what eager's ops save, so that an in-place change between forward and
        # backward raises where eager's would (and only there): x where the first weight takes a
        # gradient, a weight where its block's input takes one (addmm), gammas and the FIXED blocks'
        # running statistics (batch_norm). The call holds the rest (ctx.x: x when not saved).
        x_saved = call.weights[0].requires_grad
        checked, needs = ([x] if x_saved else []), x.requires_grad
        for s, w, b, g, beta, m, v in zip(call.specs, call.weights, call.biases, call.gammas, call.betas,
                                          call.running_means, call.running_vars):
            if needs:
                checked.append(w)
            needs = needs or w.requires_grad or any(t is not None and t.requires_grad for t in (b, g, beta))
            if g is not None:
                checked.append(g)
            if s.bn_mode == FIXED:
                checked += [m, v]
        ctx.x = None if x_saved else x
        ctx.save_for_backward(*saved[0::_PER_BLOCK], *checked, *([out] if call.saves_out else []))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        call = ctx.call
        specs = call.specs
        L = len(specs)
        if grad_out is None:
            return (None,) * (2 + L + sum(map(len, (_present(call.biases), _present(call.gammas),
                                                   _present(call.betas)))))
        saved = ctx.saved_tensors  # (version checks)
        zs, x = list(saved[:L]), ctx.x if ctx.x is not None else saved[L]
        weights = call.weights
        input_grad = ctx.needs_input_grad[1]
        if R.differentiable(grad_out):  # create_graph=True or batched
            fixed = [s.bn_mode == FIXED for s in specs]
            d_x, d_w, d_b, d_gamma, d_beta = _reference_backward(
                specs, grad_out, x, _present(call.seeds), weights, _present(call.biases), _present(call.gammas),
                _present(call.betas), [m for m, f in zip(call.running_means, fixed) if f],
                [v for v, f in zip(call.running_vars, fixed) if f])
            return (None, d_x if input_grad else None, *d_w, *d_b, *d_gamma, *d_beta)
        g_y = grad_out.contiguous()
        key = (input_grad, g_y.dtype, g_y.shape, g_y.stride(), g_y.data_ptr() & 15, _state(),
               _layouts((x, *zs)) if ctx.hooked else None)
        plans = call.plans.get(key)
        fresh = plans is None
        if fresh:
            plans = []
        d_x, d_w, d_b, d_gamma, d_beta = _run_backward(plans, fresh, specs, g_y, x, weights, zs, ctx.vecs, call.gammas,
                                                       call.betas, call.seeds, input_grad)
        if fresh:
            call.plans[key] = plans
        return (None, d_x, *d_w, *_present(d_b), *[g for g, t in zip(d_gamma, call.gammas) if t is not None],
                *[g for g, t in zip(d_beta, call.betas) if t is not None])


_chain_apply = library.direct_apply(_Chain)


def _saves_output(last: Block, spec: Spec) -> bool:
    """Whether eager's backward reads the chain's output as its last module returned it, so that
    changing it in place before the backward raises: ReLU's and Tanh's results are saved (and an
    in-place LeakyReLU's), unless a Dropout that drops makes the output anew."""
    act = last.act
    return spec.drop_p == 0 and (type(act) in (nn.ReLU, nn.Tanh) or (type(act) is nn.LeakyReLU and act.inplace))


def draw_seed(device) -> Tensor:
    """One int64 dropout seed [1] from torch's generator on `device`, drawn per block with
    dropout in block order: seeded runs repeat, an eager model can draw the same stream, and
    drawing on the device needs no host synchronisation (CUDA-graph safe)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def _specs(blocks: List[Block], tensors: Tensors, biases) -> Tuple[Spec, ...]:
    """Each block's options, read as eager's modules read them in this call."""
    specs = []
    for blk, bias, gamma, beta, rm, rv in zip(blocks, biases, tensors.gammas, tensors.betas, tensors.running_means,
                                             tensors.running_vars):
        bn, drop, (act, slope) = blk.bn, blk.dropout, act_spec(blk.act)
        drop_p = float(drop.p) if drop is not None and drop.training else 0.0
        if bn is None:
            specs.append(Spec(bias is not None, False, False, NO_BN, False, False, K.ACTIVATIONS[act], 0, slope,
                              drop_p, 0.0, 0.0))
            continue
        batch = bn.training or (rm is None and rv is None)  # (chain.uses_batch_stats, updates_running_stats)
        tracked = bn.training and bn.track_running_stats and rm is not None
        specs.append(Spec(bias is not None, gamma is not None, beta is not None, BATCH if batch else FIXED, tracked,
                          bn.momentum is None, K.ACTIVATIONS[act], D.group_id(bn) if D.needs_sync(bn) else 0, slope,
                          drop_p, float(bn.eps), float(bn.momentum or 0.0)))
    return tuple(specs)


def chain(x: Tensor, blocks: List[Block], tensors: Tensors, upcast: bool = False) -> Tensor:
    """Run `blocks` on `x` fused (inputs already validated; `tensors` the blocks' parameters and
    buffers, chain.read): eager calls through `_Chain`, others through the custom ops.

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
    low = autocast_dtype(x)
    dtype = low if low is not None else x.dtype
    weights, biases, gammas, betas, run_means, run_vars, counts = tensors
    if low is not None or (upcast and dtype != torch.float32):
        casts = {}  # one cast per tensor: a BatchNorm (or weight) used by two blocks stays one tensor
        to_fp32 = upcast and dtype != torch.float32

        def cast(t, linear=False):
            if t is None:
                return t
            key = (id(t), linear)
            if key not in casts:
                c = t.to(low) if linear and low is not None else t
                casts[key] = c.float() if to_fp32 else c
            return casts[key]
        weights, biases = [cast(w, True) for w in weights], [cast(b, True) for b in biases]
        x = cast(x, True)
        gammas, betas, run_means, run_vars = ([cast(t) for t in ts] for ts in (gammas, betas, run_means, run_vars))
    specs = _specs(blocks, tensors, biases)
    seeds = [draw_seed(x.device) if s.drop_p > 0 else None for s in specs]
    # in training the running statistics of the tracked blocks are updated, those of the FIXED read
    running = [s.bn_mode == FIXED or s.tracked for s in specs]
    run_means = [t if r else None for t, r in zip(run_means, running)]
    run_vars = [t if r else None for t, r in zip(run_vars, running)]
    counts = [t if s.tracked else None for t, s in zip(counts, specs)]
    params = [*weights, *_present(biases), *_present(gammas), *_present(betas)]
    if library.direct([x, *params, *_present(run_means), *_present(run_vars)]):
        key = _key("chain", specs, None, (x, *weights), (), (*params[len(weights):], *_present(run_means),
                                                             *_present(run_vars)))
        plans, fresh = _plans(key, dict)
        if fresh:
            _keep(key, plans)
        call = _Call(specs, weights, biases, gammas, betas, run_means, run_vars, counts, seeds, plans,
                     _saves_output(blocks[-1], specs[-1]))
        if records_graph() and any(t.requires_grad for t in (x, *params)):
            out = _chain_apply(call, library.unwrap_if_dead(x), *params)
        else:
            out = _run_call(call, x)[0]
    else:
        out = _through_ops(x, specs, weights, biases, gammas, betas, run_means, run_vars, counts, seeds)
    for i, s in enumerate(specs):
        bn = blocks[i].bn
        # upcast copies: write back (a BatchNorm shared by blocks has one copy, holding every update)
        if s.tracked and run_means[i] is not tensors.running_means[i]:
            bn.running_mean.copy_(run_means[i])
            bn.running_var.copy_(run_vars[i])
    return out.to(dtype)


def _through_ops(x, specs, weights, biases, gammas, betas, run_means, run_vars, counts, seeds) -> Tensor:
    """`chain` through the custom ops: the blocks up to the last one that updates running
    statistics in chain_body, the rest with the whole chain's autograd in chain_forward."""
    ints, floats = pack(specs)
    seeds = _present(seeds)
    n = max([i + 1 for i, s in enumerate(specs) if s.tracked] or [0])
    body = new_saved(x, weights[:n + 1], specs[:n])
    if n:
        with torch.no_grad():
            chain_body(x, body[0::_PER_BLOCK], body[1::_PER_BLOCK], weights[:n + 1], _present(biases[:n]),
                       _present(gammas[:n]), _present(betas[:n]), _present(run_means[:n]), _present(run_vars[:n]),
                       _present(counts[:n]), seeds, ints[:n * _INTS], floats[:n * _FLOATS])
    fixed = [s.bn_mode == FIXED for s in specs]
    res = chain_forward(x, body, weights, _present(biases), _present(gammas), _present(betas),
                        _present([t if f else None for t, f in zip(run_means, fixed)]),
                        _present([t if f else None for t, f in zip(run_vars, fixed)]), seeds, ints, floats)
    return res[0]
