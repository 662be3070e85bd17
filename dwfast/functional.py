"""The fused chain as a function: validation, backend dispatch and the eager reference.

A *chain* is a list of :class:`Block`s, each ``Linear [-> BatchNorm1d] [-> ReLU]``, run
back to back on a 2-D input. :func:`fused_chain` is what the modules call; it takes the
modules themselves so every BatchNorm option (``training``, ``momentum=None``,
``affine=False``, ``track_running_stats=False``, ``eps``) is read exactly as eager reads it.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backend import resolve_backend


class Block(NamedTuple):
    """One fusable block: ``linear`` then optional ``bn`` then ReLU if ``relu``."""
    linear: nn.Linear
    bn: Optional[nn.BatchNorm1d] = None
    relu: bool = False


def eager_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """The reference: the same blocks run by eager PyTorch, module by module."""
    for blk in blocks:
        x = blk.linear(x)
        if blk.bn is not None:
            x = blk.bn(x)
        if blk.relu:
            x = F.relu(x)
    return x


def _uses_batch_stats(bn: nn.BatchNorm1d) -> bool:
    return bn.training or bn.running_mean is None


def _validate(x: torch.Tensor, blocks: List[Block]) -> None:
    """Raise what eager would raise, before any state changes."""
    width = x.shape[-1]
    for blk in blocks:
        w = blk.linear.weight
        if w.shape[1] != width:
            raise RuntimeError(
                f"mat1 and mat2 shapes cannot be multiplied ({x.shape[0]}x{width} and {w.shape[1]}x{w.shape[0]})")
        width = w.shape[0]
    w = blocks[0].linear.weight
    if x.dtype != w.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} and {w.dtype}: "
                           f"cast the input with x.to({w.dtype}) or the model with model.to({x.dtype})")
    if x.device != w.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but got input on {x.device} "
                           f"and parameters on {w.device}: move one with .to(device)")
    if x.shape[0] == 1 and any(b.bn is not None and _uses_batch_stats(b.bn) for b in blocks):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def _fusable(x: torch.Tensor, blocks: List[Block]) -> bool:
    """Shapes and options the kernels handle; everything else runs the eager path unchanged."""
    if x.dim() != 2 or x.shape[0] == 0 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    for blk in blocks:
        tensors = [blk.linear.weight, blk.linear.bias]
        if blk.bn is not None:
            if type(blk.bn) is not nn.BatchNorm1d:
                return False
            tensors += [blk.bn.weight, blk.bn.bias, blk.bn.running_mean, blk.bn.running_var]
        if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in tensors):
            return False
    return True


def fused_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """Run ``blocks`` on ``x`` (batch x in_features) fused, with eager PyTorch's exact semantics.

    Returns the last block's output. Updates BatchNorm running statistics and
    ``num_batches_tracked`` as eager does. Raises ``RuntimeError`` for a wrong input width,
    dtype or device and ``ValueError`` for a batch of one with batch statistics, before
    touching any state. Inputs the kernels don't handle (not 2-D, empty, other dtypes)
    run through eager PyTorch.
    """
    if x.dim() == 2:
        _validate(x, blocks)
    if not _fusable(x, blocks):
        return eager_chain(x, blocks)
    backend = resolve_backend(x.device)
    if backend == "torch":
        return eager_chain(x, blocks)
    from .ops import chain
    return chain(x, blocks, upcast=(backend == "interpret"))
