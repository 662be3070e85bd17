"""Synchronised BatchNorm for fused chains: per-feature statistics reduced across ranks.

A fused chain whose BatchNorm children are ``nn.SyncBatchNorm`` computes each block's batch
statistics over the whole process group, as eager SyncBatchNorm does:

    forward   each rank's (count, mean, M2) per feature is all-gathered ([world, 3, N], one
              collective per layer) and merged in rank order about rank 0's mean (Chan's
              parallel formula: no cancellation when |mean| >> std):
                  n = sum n_r,  mean = c + sum n_r (mean_r - c) / n,
                  M2 = sum M2_r + sum n_r (mean_r - mean)^2
    backward  the column sums of g_y and g_y * xhat are all-reduced ([2, N], one collective
              per layer) and divided by the global count.

Synchronisation happens as eager SyncBatchNorm's does: in training, with torch.distributed
initialised and more than one rank in the module's process group; otherwise a
SyncBatchNorm is an ordinary BatchNorm1d. :func:`sync_batchnorm` asks the same of a model's
plain BatchNorm1d modules without changing their type: DDP refuses SyncBatchNorm in CPU
modules, and state_dicts stay those of the unsynchronised model.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


_SYNC_ATTR = "dwfast_process_group"  # set by sync_batchnorm on a plain BatchNorm1d


def sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every ``nn.BatchNorm1d`` in `module` synchronise its batch statistics over
    `process_group` (default: the whole world) when fused, as ``nn.SyncBatchNorm`` would.
    In place; returns `module`. Types, parameters and state_dict keys do not change."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            setattr(m, _SYNC_ATTR, process_group)
    return module


def synchronised(bn: Optional[nn.Module]) -> bool:
    """Whether `bn` is a SyncBatchNorm or marked by :func:`sync_batchnorm`."""
    # the marker is a plain attribute: look in __dict__ (hasattr on a module raises and
    # catches an AttributeError when it is missing, a cost on every forward)
    return isinstance(bn, nn.SyncBatchNorm) or _SYNC_ATTR in getattr(bn, "__dict__", ())


def _group(bn: nn.Module):
    return getattr(bn, "process_group", None) or getattr(bn, _SYNC_ATTR, None) or dist.group.WORLD


def needs_sync(bn: Optional[nn.Module]) -> bool:
    """Whether `bn` reduces its batch statistics across ranks in this call."""
    return (synchronised(bn) and bn.training and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(_group(bn)) > 1)


# Process groups by id, for the custom ops (which take ints): 0 none, 1 the default group (looked
# up when used), then the others as group_id meets them. (Under torch.compile the list grows only
# after the traced graph's first run, whose ops already read it: 1 needs no entry.)
_GROUPS = [None, None]
WORLD_ID = 1


def group_id(bn: nn.Module) -> int:
    """An int naming `bn`'s process group (WORLD when it has none), for the custom ops."""
    group = _group(bn)
    if group is dist.group.WORLD:
        return WORLD_ID
    for i, known in enumerate(_GROUPS[2:], 2):
        if known is group:
            return i
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def group_of(group_id: int):
    """The process group that :func:`group_id` named."""
    return dist.group.WORLD if group_id == WORLD_ID else _GROUPS[group_id]


# torch 2.13 renamed all_gather_into_tensor all_gather_single (the old name warns there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def merge_stats(count: Tensor, mean: Tensor, var: Tensor, group=None):
    """The group's (count, mean, biased var) from each rank's; fp32 [N] in, fp32 [N] out.

    `count` is this rank's number of rows (a 0-d tensor, so no host synchronisation).
    """
    group = group or dist.group.WORLD
    local = torch.stack([count.float().expand_as(mean), mean, var * count]).float()
    world = dist.get_world_size(group)
    gathered = local.new_empty((world * 3, local.shape[1]))
    _all_gather(gathered, local, group=group)
    counts, means, m2s = gathered.view(world, 3, -1).unbind(1)
    total = counts.sum(0)
    origin = means[0]
    merged = origin + (counts * (means - origin)).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - merged).square()).sum(0)
    return total[0], merged, m2 / total


def update_running(running_mean: Tensor, running_var: Tensor, num_batches: Tensor, momentum, count: Tensor,
                   mean: Tensor, var: Tensor) -> None:
    """Running statistics from the group's (count, mean, biased var), as eager SyncBatchNorm
    updates them on every rank: num_batches_tracked bumped, momentum None the cumulative
    average, the variance unbiased over the group's rows."""
    num_batches.add_(1)
    factor = 1.0 / num_batches if momentum is None else momentum
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """`t` summed over the group, in place."""
    dist.all_reduce(t, group=group or dist.group.WORLD)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; its gradient is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_reduce_sum(t.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.clone(), ctx.group), None


def sync_batch_norm(x: Tensor, bn: nn.SyncBatchNorm) -> Tensor:
    """Eager SyncBatchNorm's training forward in pure PyTorch (any device), differentiable
    through the collectives; updates the running statistics with the group's."""
    group = _group(bn)
    count = torch.tensor(float(x.shape[0]), device=x.device)
    x32 = x.float()
    # sums about rank 0's first row (the same shift on every rank): no E[x^2] - E[x]^2 cancellation
    shift = x32[0].detach().clone() if x.shape[0] else x32.new_zeros(x.shape[1])  # (a rank may have no rows)
    dist.broadcast(shift, group_src=0, group=group)
    sums = torch.cat([count.view(1), (x32 - shift).sum(0), (x32 - shift).square().sum(0)])
    sums = _AllReduceSum.apply(sums, group)
    total, s1, s2 = sums[0], sums[1:1 + x.shape[1]], sums[1 + x.shape[1]:]
    mean_c = s1 / total
    var = (s2 / total - mean_c.square()).clamp_min(0)
    mean = shift + mean_c
    if bn.track_running_stats and bn.running_mean is not None:
        factor = _momentum(bn)  # bumps num_batches_tracked
        with torch.no_grad():
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            unbiased = var.detach() * total / (total - 1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    y = (x32 - mean) * torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.float()
    if bn.bias is not None:
        y = y + bn.bias.float()
    return y.to(x.dtype)


class _NoRows(torch.autograd.Function):
    """A synchronised BatchNorm on a rank without rows (no_rows), differentiable: its backward
    makes the all-reduce of the fused backward (dwfast.ops._synced_grads: [g_sum, g_xhat,
    count] [3, N] fp32) with this rank adding zeros, and gives zero gradients."""

    @staticmethod
    def forward(ctx, x, group, weight, bias):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        all_reduce_sum(grad.new_zeros((3, grad.shape[1]), dtype=torch.float32), ctx.group)
        _, _, weight, bias = ctx.needs_input_grad
        zeros = grad.new_zeros(grad.shape[1])
        return torch.zeros_like(grad), None, zeros if weight else None, zeros.clone() if bias else None


def no_rows(x: Tensor, bn: nn.Module) -> Tensor:
    """`bn` on a rank without rows (x [0, N]) whose group's other ranks run the chain fused:
    the fused forward's all-gather (dwfast.ops._synced_stats; this rank adds nothing), its
    running statistics updated with the group's, and the backward's all-reduce (_NoRows)."""
    group = _group(bn)
    zeros = x.new_zeros(x.shape[1], dtype=torch.float32)
    count, mean, var = merge_stats(zeros.new_zeros(()), zeros, zeros, group)
    if bn.track_running_stats and bn.running_mean is not None and bn.num_batches_tracked is not None:
        with torch.no_grad():
            update_running(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, count, mean, var)
    return _NoRows.apply(x, group, bn.weight, bn.bias)


def batch_norm(x: Tensor, bn: nn.Module, fused_peers: bool = False) -> Tensor:
    """`bn(x)` for a synchronised BatchNorm: eager SyncBatchNorm where it runs (CUDA),
    else :func:`sync_batch_norm` when it must synchronise, else BatchNorm1d's computation
    (eager SyncBatchNorm refuses CPU tensors even then). With `fused_peers` (x has no rows,
    the group's other ranks run the chain fused), :func:`no_rows` when it must synchronise."""
    if fused_peers and needs_sync(bn):
        return no_rows(x, bn)
    if needs_sync(bn) and not (isinstance(bn, nn.SyncBatchNorm) and x.device.type == "cuda"):
        return sync_batch_norm(x, bn)
    if not isinstance(bn, nn.SyncBatchNorm) or x.device.type == "cuda":
        return bn(x)
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
        bn.training or bn.running_mean is None, _momentum(bn), bn.eps)


def _momentum(bn: nn.Module) -> float:
    # F.batch_norm wants a float: mirror _BatchNorm.forward's cumulative average
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return 0.0 if bn.momentum is None else bn.momentum
