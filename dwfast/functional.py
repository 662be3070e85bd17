"""The fused chain as a function: validation and dispatch, the top of dwfast's layers.

:func:`run_chain` is what the modules call (:func:`fused_chain`, the public one, checks its
blocks first); it takes the modules themselves so every BatchNorm attribute that
``_BatchNorm.forward`` reads (``training``, ``track_running_stats``, ``momentum``, ``eps``,
``running_mean``/``running_var``/``num_batches_tracked`` being None, ``weight``/``bias``) is
read at every call, exactly as eager reads it, then runs the chain through the whole-net op
(``dwfast.whole_net``), the per-layer ops (``dwfast.ops``) or the eager reference
(``dwfast.chain.eager_chain``).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, ops, reference, whole_net
from .backend import get_whole_net, is_reference, resolve_backend
from .chain import (ACTIVATION_TYPES, Block, Tensors, any_hooks, autocast_dtype, eager_chain, read, state,
                    uses_batch_stats)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes the kernels run


def _linear_dtype(t: torch.Tensor, low: Optional[torch.dtype]) -> torch.dtype:
    # Autocast casts F.linear's 16/32-bit float operands to its dtype and leaves others (fp64) be.
    return low if low is not None and t.dtype in _FLOATS else t.dtype


def _check_eps(bn: nn.Module) -> None:
    """F.batch_norm's eps check, whichever torch version runs: F.batch_norm itself on meta
    tensors (it checks before computing, and meta tensors compute nothing). For non-positive eps
    only: the rule has changed between torch versions, a positive one passes all of them."""
    x, stats = torch.empty(2, 1, device="meta"), torch.empty(1, device="meta")
    F.batch_norm(x, stats, stats, training=uses_batch_stats(bn), eps=bn.eps)


def _check_modules(blk: Block) -> None:
    """The arguments eager's GELU and Dropout check on every call (nn.GELU takes any
    ``approximate`` string at construction; ``p`` may be set at any time): F.gelu and F.dropout
    themselves on meta tensors raise what eager raises, for the values they refuse only."""
    act, drop = blk.act, blk.dropout
    if type(act) is nn.GELU and act.approximate not in ("none", "tanh"):
        F.gelu(torch.empty(1, device="meta"), approximate=act.approximate)
    if drop is not None and not 0.0 <= drop.p <= 1.0:  # (NaN too)
        F.dropout(torch.empty(1, device="meta"), drop.p, drop.training)


def _validate(x: torch.Tensor, blocks: List[Block]) -> None:
    """Raise what eager would raise, block by block in the order eager meets the modules,
    before any state changes (eager's BatchNorm bumps ``num_batches_tracked`` before its
    checks, and earlier blocks update their statistics)."""
    two_d = x.dim() == 2
    single_row = two_d and x.shape[0] == 1
    if two_d:
        rows, width = x.shape
    for i, blk in enumerate(blocks):
        if two_d:
            w = state(blk.linear, "weight")
            n_out, n_in = w.shape
            if n_in != width:
                raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{width} and {n_in}x{n_out})")
            width = n_out
            if i == 0:
                _check_first(x, w)
        bn = blk.bn
        if bn is not None:
            # (the size of the BatchNorm's input, as eager's says; a synchronised one counts the group's rows)
            if single_row and uses_batch_stats(bn) and not distributed.needs_sync(bn):
                raise ValueError("Expected more than 1 value per channel when training, got input size "
                                 f"{torch.Size([rows, width])}")
            if bn.eps <= 0:
                _check_eps(bn)
        if blk.act is not None or blk.dropout is not None:
            _check_modules(blk)


def _check_first(x: torch.Tensor, w: torch.Tensor) -> None:
    """The first Linear's dtype and device checks against the input."""
    if x.dtype != w.dtype:  # (equal dtypes are fine with or without autocast)
        low = autocast_dtype(x)
        if _linear_dtype(x, low) != _linear_dtype(w, low):
            # only float dtypes are worth suggesting for the model
            model_hint = f" or the model with model.to({x.dtype})" if x.dtype.is_floating_point else ""
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} and {w.dtype}: "
                               f"cast the input with x.to({w.dtype}){model_hint}")
    if x.device != w.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but got input on {x.device} "
                           f"and parameters on {w.device}: move one with .to(device)")


def _ops_follow(bn: nn.Module, running_mean, running_var, num_batches) -> bool:
    """Whether the ops read `bn`'s state (its buffers as given) as eager does. They update the
    running statistics and num_batches_tracked together; a missing buffer can split those in
    eager, and running_mean without running_var is an error there."""
    if (running_mean is None) != (running_var is None):
        return False
    return not (bn.training and bn.track_running_stats) or (running_mean is None) == (num_batches is None)


def _holds_inference(x: torch.Tensor, tensors: Tensors) -> bool:
    """Whether x or a tensor that eager saves for backward or updates in place (weights,
    BatchNorm weights, running statistics and counters; not biases) is an inference tensor
    (made under torch.inference_mode). Outside it eager refuses those and raises before any
    state changes, where the kernels would update running statistics first."""
    inference = torch.Tensor.is_inference
    if inference(x) or any(map(inference, tensors.weights)):
        return True
    for ts in (tensors.gammas, tensors.running_means, tensors.running_vars, tensors.num_batches):
        for t in ts:
            if t is not None and inference(t):
                return True
    return False


def _backward_refused(act: Optional[nn.Module], drop: Optional[nn.Module]) -> bool:
    """Whether eager's backward refuses a block's in-place modules: an in-place Dropout that
    drops overwrites the result that a ReLU, Tanh or in-place LeakyReLU saved for its backward,
    and an in-place LeakyReLU with a negative slope has no backward. Such chains run eagerly,
    so they raise where eager does."""
    leaky_inplace = type(act) is nn.LeakyReLU and act.inplace
    if leaky_inplace and act.negative_slope < 0:
        return True
    return (drop is not None and drop.inplace and drop.training and drop.p > 0
            and (leaky_inplace or type(act) in (nn.ReLU, nn.Tanh)))


def _fusable(x: torch.Tensor, blocks: List[Block], tensors: Tensors) -> bool:
    """Shapes, options and states the kernels handle (`tensors`: the blocks' parameters and
    buffers, chain.read); everything else runs the eager path unchanged.

    Outside autocast every tensor has ``x``'s dtype. Under autocast (fp16 or bf16) any of
    fp16 / bf16 / fp32 will do: the Linears are cast to autocast's dtype and BatchNorm's
    tensors are read as they are, in fp32, as eager does. Under a functorch transform
    (``torch.func.grad``, ``vmap``, ``jacrev``, ...) or forward-mode AD the chain runs
    eagerly: the ops have no batching rules or forward derivatives; and so do inference tensors
    outside inference mode (_holds_inference).
    """
    if not (x.is_cuda or x.is_cpu):  # meta (shape inference), XLA, MPS, ...: eager's ops know them
        return False
    low = autocast_dtype(x)
    if x.dim() != 2 or x.dtype not in _FLOATS or low not in (None, torch.float16, torch.bfloat16):
        return False
    # not while torch.compile traces: functorch's interpreter stack then reads as non-empty,
    # and dynamo handles torch.func itself
    if not torch.compiler.is_compiling() and reference.transformed():
        return False
    for blk, rm, rv, nb in zip(blocks, tensors.running_means, tensors.running_vars, tensors.num_batches):
        bn = blk.bn
        if bn is not None and (type(bn) not in (nn.BatchNorm1d, nn.SyncBatchNorm) or not _ops_follow(bn, rm, rv, nb)):
            return False
        act, drop = blk.act, blk.dropout
        if (drop is not None or type(act) is nn.LeakyReLU) and _backward_refused(act, drop):
            return False
    dtypes = _FLOATS if low is not None else (x.dtype,)
    device = x.device
    widths = []
    for w in tensors.weights:  # (any strides; no input features: eager's zeros and bias gradient)
        if w.dtype not in dtypes or w.device != device or w.dim() != 2 or not w.shape[1]:
            return False
        widths.append(w.shape[0])
    # Per-feature tensors the kernels index as contiguous vectors of the block's width: others
    # (strided, or the wrong size, which eager rejects) run eagerly. (Cheap checks: every call.)
    for ts in tensors[1:6]:
        for t, n in zip(ts, widths):
            if t is not None and (t.dtype not in dtypes or t.device != device or t.numel() != n
                                  or not t.is_contiguous()):
                return False
    # (not while torch.compile traces, which reads no inference mode: its graphs run in either)
    if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() and _holds_inference(x, tensors):
        return False
    if low is not None:  # eager's BatchNorm takes autocast's z with all-fp32 or all-z-dtype parameters
        for bn_tensors in zip(*tensors[2:6]):
            kinds = {t.dtype for t in bn_tensors if t is not None}
            if kinds and kinds != {torch.float32} and kinds != {low}:
                return False
    return True


def _planned(blocks: List[Block]) -> bool:
    """Whether `blocks` hold what chain.plan() groups into blocks: modules of the exact types it
    takes (subclasses may change forward), without hooks."""
    for blk in blocks:
        linear, bn, act, drop = blk
        if (type(linear) is not nn.Linear or (bn is not None and type(bn) not in (nn.BatchNorm1d, nn.SyncBatchNorm))
                or (act is not None and type(act) not in ACTIVATION_TYPES)
                or (drop is not None and type(drop) is not nn.Dropout)):
            return False
    return not any_hooks([m for blk in blocks for m in blk if m is not None])


def fused_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """``blocks`` run on ``x`` as their modules run them, fused where they are what
    chain.plan() groups into blocks (exact ``nn.Linear``, ``nn.BatchNorm1d`` or
    ``nn.SyncBatchNorm``, one of ``chain.ACTIVATION_TYPES``, ``nn.Dropout``, no hooks):
    others are called one after another, as ``nn.Sequential`` calls them. See run_chain."""
    if not _planned(blocks):
        for blk in blocks:
            for m in blk:
                if m is not None:
                    x = m(x)
        return x
    return run_chain(x, blocks)


def run_chain(x: torch.Tensor, blocks: List[Block]) -> torch.Tensor:
    """Run ``blocks`` (as chain.plan() makes them) on ``x`` (batch x in_features) fused, with
    eager PyTorch's exact semantics.

    Returns the last block's output. Updates BatchNorm running statistics and
    ``num_batches_tracked`` as eager does. Raises ``RuntimeError`` for a wrong input width,
    dtype or device and ``ValueError`` for a batch of one with batch statistics or an eps
    that F.batch_norm refuses, before touching any state. Inputs the kernels don't handle
    (not 2-D, empty, other dtypes, not tensors, functorch transforms) run through eager PyTorch. Under
    ``torch.autocast`` it follows eager's autocast (see :func:`dwfast.ops.chain`); it traces
    under ``torch.compile(fullgraph=True)``, also with ``BatchNorm1d(momentum=None)``.
    """
    if torch.jit.is_tracing() or not isinstance(x, torch.Tensor):  # (a trace records ATen ops: eager's)
        return eager_chain(x, blocks)
    _validate(x, blocks)
    if is_reference(x):
        return eager_chain(x, blocks)
    tensors = read(blocks)
    if not _fusable(x, blocks, tensors):
        return eager_chain(x, blocks)
    # No rows: eager's ops (the kernels need rows), its synchronised BatchNorms making the collectives
    # that the other ranks' fused chains make
    if not x.shape[0]:
        return eager_chain(x, blocks, fused_peers=True)
    backend = resolve_backend(x.device)
    if autocast_dtype(x) is not None:
        # The whole-net kernels take one dtype; autocast mixes the Linears' and BatchNorm's.
        return ops.chain(x, blocks, tensors, upcast=(backend == "interpret"))
    if get_whole_net() == "auto":
        out = whole_net.whole_net_chain(x, blocks, upcast=(backend == "interpret"))
        if out is not None:
            return out
    return ops.chain(x, blocks, tensors, upcast=(backend == "interpret"))
