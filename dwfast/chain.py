"""A fused chain's description, at the bottom of dwfast's layers.

A *chain* is a list of :class:`Block`s, each ``Linear [-> BatchNorm1d] [-> activation] [-> Dropout]``,
run back to back on a 2-D input. :func:`plan` groups a Sequential's children into chains;
:func:`eager_chain` is the reference every fused path is checked against. The custom ops
(``dwfast.ops``, ``dwfast.whole_net``) sit above this module, the dispatch
(``dwfast.functional``) and the modules above them.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from . import distributed

# The activation modules a block can end on, exact types (a subclass may change forward).
ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh)

# A block's BatchNorm mode, as the custom ops take it: none, batch statistics, running statistics.
NO_BN, BATCH, FIXED = 0, 1, 2


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
    if kind not in _NAMES:
        raise TypeError(f"dwfast fuses {[t.__name__ for t in ACTIVATION_TYPES]}, not {kind.__name__}")
    return _NAMES[kind], 0.0


_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}


def eager_chain(x: torch.Tensor, blocks: List[Block], fused_peers: bool = False) -> torch.Tensor:
    """The reference: the same blocks run by eager PyTorch, module by module.

    Each module's ``forward`` is called as ``module(x)`` would call it: a block holds only
    modules without hooks (:func:`plan`), and then the rest of ``nn.Module.__call__`` is a
    microsecond or two of bookkeeping per module, which is what fusing must not cost where
    this path runs (the CPU). `fused_peers`: see dwfast.distributed.batch_norm."""
    for blk in blocks:
        x = blk.linear.forward(x)
        if blk.bn is not None:
            x = batch_norm(blk.bn, x, fused_peers)
        if blk.act is not None:
            x = blk.act.forward(x)
        if blk.dropout is not None:
            x = blk.dropout.forward(x)
    return x


def batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, fused_peers: bool = False) -> torch.Tensor:
    """``bn(x)``, except under torch.compile for a cumulative average (``momentum=None``) in
    training: eager's ``1.0 / float(num_batches_tracked)`` is data dependent and breaks
    ``fullgraph=True`` (pytorch#194504), so the factor stays a tensor here. Eager runs keep
    ``bn(x)`` itself, bit for bit. A SyncBatchNorm goes through dwfast.distributed, which
    also runs it on the CPU (eager SyncBatchNorm refuses CPU tensors)."""
    if distributed.synchronised(bn) and (isinstance(bn, nn.SyncBatchNorm) or distributed.needs_sync(bn)):
        return distributed.batch_norm(x, bn, fused_peers)
    if bn.momentum is not None or not (torch.compiler.is_compiling() and bn.training and bn.track_running_stats
                                       and bn.num_batches_tracked is not None and type(bn) is nn.BatchNorm1d):
        return bn.forward(x)
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


def state(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter or buffer (None where registered as None), read
    from the module's own dicts, which also hold what ``torch.func.functional_call`` swaps in:
    the attribute goes through ``nn.Module.__getattr__``, microseconds each on a slow CPU, and a
    chain reads several per block per call."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


class Tensors(NamedTuple):
    """A chain's parameters and buffers as one call reads them (:func:`read`): per block, None
    where a block has none (no bias, no BatchNorm, affine=False, no running statistics)."""
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    gammas: List[Optional[torch.Tensor]]
    betas: List[Optional[torch.Tensor]]
    running_means: List[Optional[torch.Tensor]]
    running_vars: List[Optional[torch.Tensor]]
    num_batches: List[Optional[torch.Tensor]]


def read(blocks: List[Block]) -> Tensors:
    """Every parameter and buffer the blocks' modules would read in this call, read once, as
    :func:`state` reads them (the modules' own dicts first: host time)."""
    out = Tensors([], [], [], [], [], [], [])
    weights, biases, gammas, betas, means, variances, counts = out
    for blk in blocks:
        lin, bn = blk.linear, blk.bn
        params = lin._parameters
        weights.append(params["weight"] if "weight" in params else state(lin, "weight"))
        biases.append(params["bias"] if "bias" in params else state(lin, "bias"))
        if bn is None:
            for entry in out[2:]:
                entry.append(None)
            continue
        params, buffers = bn._parameters, bn._buffers
        gammas.append(params["weight"] if "weight" in params else state(bn, "weight"))
        betas.append(params["bias"] if "bias" in params else state(bn, "bias"))
        means.append(buffers["running_mean"] if "running_mean" in buffers else state(bn, "running_mean"))
        variances.append(buffers["running_var"] if "running_var" in buffers else state(bn, "running_var"))
        counts.append(buffers["num_batches_tracked"] if "num_batches_tracked" in buffers
                      else state(bn, "num_batches_tracked"))
    return out


def uses_batch_stats(bn: nn.BatchNorm1d) -> bool:
    """Whether `bn` normalises with batch statistics in this call, read as ``_BatchNorm.forward``
    reads it: in training, or without running statistics."""
    return bn.training or (state(bn, "running_mean") is None and state(bn, "running_var") is None)


def updates_running_stats(bn: nn.BatchNorm1d) -> bool:
    """Whether this call of `bn` updates ``running_mean`` / ``running_var`` (eager passes them to
    F.batch_norm in training only with ``track_running_stats``)."""
    return bn.training and bn.track_running_stats and state(bn, "running_mean") is not None


def counts_batches(bn: nn.BatchNorm1d) -> bool:
    """Whether this call of `bn` bumps ``num_batches_tracked``."""
    return bn.training and bn.track_running_stats and state(bn, "num_batches_tracked") is not None


def records_graph() -> bool:
    """Whether eager's ops record autograd graphs now: grad mode on, outside inference mode
    (where ``torch.enable_grad()`` records nothing either). While torch.compile traces, grad
    mode alone: dynamo cannot read inference mode (its graphs run in either)."""
    return torch.is_grad_enabled() and (torch.compiler.is_compiling() or not torch.is_inference_mode_enabled())


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs Linears on ``x``'s device in, or None outside autocast."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` would run more than its class's forward (any_hooks), which a fused
    run would skip."""
    return any_hooks((m,))


def any_hooks(modules) -> bool:
    """Whether calling any of `modules` would run forward/backward hooks, or a ``forward`` set
    on the module itself (accelerate's hooks, users' wrappers) instead of its class's."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    for m in modules:
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__):
            return True
    return False


def _is(m, cls) -> bool:
    # Exact type: subclasses (SyncBatchNorm, LazyLinear, parametrized or user subclasses) may
    # change forward, so they run as ordinary modules. Hooked modules do too, so hooks still fire.
    return type(m) is cls and not has_hooks(m)


def plan(children: Sequence[nn.Module]) -> List[Union[nn.Module, List[Block]]]:
    """Group ``children`` into steps: a list of :class:`Block` (one fused run) or a lone module.

    A block is an exact ``nn.Linear``, optionally followed by an exact ``nn.BatchNorm1d`` or
    ``nn.SyncBatchNorm`` (its statistics reduced over its process group),
    optionally followed by an activation (exact ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.GELU``,
    ``nn.SiLU`` or ``nn.Tanh``; in-place or not: the fused output is a new tensor either way),
    optionally followed by an exact ``nn.Dropout``. Consecutive blocks form one run. Every
    other module is its own step, in order.
    """
    steps: List[Union[nn.Module, List[Block]]] = []
    i, n = 0, len(children)
    while i < n:
        if not _is(children[i], nn.Linear):
            steps.append(children[i])
            i += 1
            continue
        linear, bn, act, dropout = children[i], None, None, None
        i += 1
        if i < n and (_is(children[i], nn.BatchNorm1d) or _is(children[i], nn.SyncBatchNorm)):
            bn, i = children[i], i + 1
        if i < n and any(_is(children[i], t) for t in ACTIVATION_TYPES):
            act, i = children[i], i + 1
        if i < n and _is(children[i], nn.Dropout):
            dropout, i = children[i], i + 1
        if steps and isinstance(steps[-1], list):
            steps[-1].append(Block(linear, bn, act, dropout))
        else:
            steps.append([Block(linear, bn, act, dropout)])
    return steps


