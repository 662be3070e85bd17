"""The fused chain as a function: validation, backend dispatch and the eager reference.

A *chain* is a list of :class:`Block`s, each ``Linear [-> BatchNorm1d] [-> ReLU]``, run
back to back on a 2-D input. :func:`fused_chain` is what the modules call; it takes the
modules themselves so every BatchNorm option (``training``, ``momentum=None``,
``affine=False``, ``track_running_stats=False``, ``eps``) is read exactly as eager reads it.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .backend import get_whole_net, resolve_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes the kernels run


# The activation modules a block can end on, exact types (a subclass may change forward).
ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh)


class Block(NamedTuple):
    """One fusable block: ``linear``, then optionally ``bn``, the activation module ``act``
    (one of ACTIVATION_TYPES) and ``dropout`` (an ``nn.Dropout``), in that order."""
    linear: nn.Linear
    bn: Optional[nn.BatchNorm1d] = None
    act: Optional[nn.Module] = None
    dropout: Optional[nn.Dropout] = None


def act_spec(act: Optional[nn.Module]) -> Tuple[str, float]:
    """(name in kernels.ACTIVATIONS, LeakyReLU's negative slope or 0) for an activation module."""
    kind = type(act)
    if act is None:
        return "none", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    if kind is nn.GELU:
        return ("gelu" if act.approximate == "none" else "gelu_tanh"), 0.0
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
    if kind not in names:
        raise TypeError(f"dwfast fuses {[t.__name__ for t in ACTIVATION_TYPES]}, not {kind.__name__}")
    return names[kind], 0.0


def eager_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """The reference: the same blocks run by eager PyTorch, module by module."""
    for blk in blocks:
        x = blk.linear(x)
        if blk.bn is not None:
            x = _batch_norm(blk.bn, x)
        if blk.act is not None:
            x = blk.act(x)
        if blk.dropout is not None:
            x = blk.dropout(x)
    return x


def _batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``, except under torch.compile for a cumulative average (``momentum=None``) in
    training: eager's ``1.0 / float(num_batches_tracked)`` is data dependent and breaks
    ``fullgraph=True`` (pytorch#194504), so the factor stays a tensor here. Eager runs keep
    ``bn(x)`` itself, bit for bit. A SyncBatchNorm goes through dwfast.distributed, which
    also runs it on the CPU (eager SyncBatchNorm refuses CPU tensors)."""
    if distributed.needs_sync(bn) or isinstance(bn, nn.SyncBatchNorm):
        return distributed.batch_norm(x, bn)
    if not (torch.compiler.is_compiling() and bn.momentum is None and bn.training and bn.track_running_stats
            and bn.num_batches_tracked is not None and type(bn) is nn.BatchNorm1d):
        return bn(x)
    bn._check_input_dim(x)
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / bn.num_batches_tracked
    # momentum 1 on zeroed buffers: F.batch_norm leaves the batch's mean and unbiased variance in them
    mean, var = torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)
    out = F.batch_norm(x, mean, var, bn.weight, bn.bias, True, 1.0, bn.eps)
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean * factor)
        bn.running_var.mul_(1 - factor).add_(var * factor)
    return out


def _uses_batch_stats(bn: nn.BatchNorm1d) -> bool:
    return bn.training or bn.running_mean is None


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs Linears on ``x``'s device in, or None outside autocast."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _linear_dtype(t: torch.Tensor, low: Optional[torch.dtype]) -> torch.dtype:
    # Autocast casts F.linear's 16/32-bit float operands to its dtype and leaves others (fp64) be.
    return low if low is not None and t.dtype in _FLOATS else t.dtype


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
    low = autocast_dtype(x)
    if _linear_dtype(x, low) != _linear_dtype(w, low):
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} and {w.dtype}: "
                           f"cast the input with x.to({w.dtype}) or the model with model.to({x.dtype})")
    if x.device != w.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but got input on {x.device} "
                           f"and parameters on {w.device}: move one with .to(device)")
    if x.shape[0] == 1 and any(b.bn is not None and _uses_batch_stats(b.bn) for b in blocks):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def _fusable(x: torch.Tensor, blocks: List[Block]) -> bool:
    """Shapes and options the kernels handle; everything else runs the eager path unchanged.

    Outside autocast every tensor has ``x``'s dtype. Under autocast (fp16 or bf16) any of
    fp16 / bf16 / fp32 will do: the Linears are cast to autocast's dtype and BatchNorm's
    tensors are read as they are, in fp32, as eager does.
    """
    low = autocast_dtype(x)
    if x.dim() != 2 or x.shape[0] == 0 or x.dtype not in _FLOATS or low not in (None, torch.float16, torch.bfloat16):
        return False
    dtypes = _FLOATS if low is not None else (x.dtype,)
    for blk in blocks:
        tensors = [blk.linear.weight, blk.linear.bias]
        if blk.bn is not None:
            if type(blk.bn) not in (nn.BatchNorm1d, nn.SyncBatchNorm):
                return False
            tensors += [blk.bn.weight, blk.bn.bias, blk.bn.running_mean, blk.bn.running_var]
        if any(t is not None and (t.dtype not in dtypes or t.device != x.device) for t in tensors):
            return False
    return True


def fused_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """Run ``blocks`` on ``x`` (batch x in_features) fused, with eager PyTorch's exact semantics.

    Returns the last block's output. Updates BatchNorm running statistics and
    ``num_batches_tracked`` as eager does. Raises ``RuntimeError`` for a wrong input width,
    dtype or device and ``ValueError`` for a batch of one with batch statistics, before
    touching any state. Inputs the kernels don't handle (not 2-D, empty, other dtypes)
    run through eager PyTorch. Under ``torch.autocast`` it follows eager's autocast (see
    :func:`dwfast.ops.chain`); it traces under ``torch.compile(fullgraph=True)``, also with
    ``BatchNorm1d(momentum=None)``.
    """
    if x.dim() == 2:
        _validate(x, blocks)
    if not _fusable(x, blocks):
        return eager_chain(x, blocks)
    backend = resolve_backend(x.device)
    if backend == "torch":
        return eager_chain(x, blocks)
    if autocast_dtype(x) is not None:
        # The whole-net kernels take one dtype; autocast mixes the Linears' and BatchNorm's.
        from .ops import chain
        return chain(x, blocks, upcast=(backend == "interpret"))
    if get_whole_net() == "auto":
        from .whole_net import whole_net_chain
        out = whole_net_chain(x, blocks, upcast=(backend == "interpret"))
        if out is not None:
            return out
    from .ops import chain
    return chain(x, blocks, upcast=(backend == "interpret"))
