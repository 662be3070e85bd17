"""The fused ops' differentiable recomputation, in plain PyTorch, for when their own backward
must itself be differentiated or batched.

The fused backward ops (``dwfast::chain_backward``, ``dwfast::mlp_backward``) have no
autograd of their own and no batching rule. Their forward ops call :func:`differentiable`
on the incoming gradient in their backward: when it says so (``create_graph=True`` for
gradient penalties, meta-learning or Hessian-vector products; batched gradients from
``torch.autograd.functional.jacobian(vectorize=True)`` or ``is_grads_batched``), the
backward recomputes the forward with :func:`chain_reference` and differentiates that with
:func:`vjp` instead. The recomputation is eager PyTorch over the same tensors the fused op
saw, with its own dropout masks, so its gradients are the fused path's to rounding and
every derivative of them exists.

:func:`transformed` tells the dispatch (``dwfast.functional``) that a functorch transform
or forward-mode AD is running: the fused ops can't follow those, so the chain runs eagerly.
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from . import kernels as K
from .chain import BATCH, NO_BN

# Activation codes (kernels.ACTIVATIONS) -> eager functions of (y, LeakyReLU slope).
_ACTS = {
    K.ACTIVATIONS["none"]: lambda y, slope: y,
    K.ACTIVATIONS["relu"]: lambda y, slope: F.relu(y),
    K.ACTIVATIONS["leaky_relu"]: lambda y, slope: F.leaky_relu(y, slope),
    K.ACTIVATIONS["gelu"]: lambda y, slope: F.gelu(y),
    K.ACTIVATIONS["gelu_tanh"]: lambda y, slope: F.gelu(y, approximate="tanh"),
    K.ACTIVATIONS["silu"]: lambda y, slope: F.silu(y),
    K.ACTIVATIONS["tanh"]: lambda y, slope: torch.tanh(y),
}


def chain_reference(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], gammas: Sequence[Optional[Tensor]],
    betas: Sequence[Optional[Tensor]], running_means: Sequence[Optional[Tensor]],
    running_vars: Sequence[Optional[Tensor]], seeds: Sequence[Tensor], bn_modes: Sequence[int], acts: Sequence[int],
    slopes: Sequence[float], drop_ps: Sequence[float], eps: Sequence[float],
) -> Tensor:
    """The fused chain's output, recomputed differentiably: per block (lists hold one entry
    per block, None where absent)

        z = F.linear(h, weights[i], biases[i])                  in x's dtype
        y = BatchNorm of z in fp32: batch statistics (biased variance) for a BATCH block,
            running_means[i] / running_vars[i] for a FIXED one, none for NO_BN
        h = (act(y) * dropout factors).to(x.dtype)             act from acts[i], slopes[i]

    Dropout factors are the kernels' own (``kernels.dropout_scale``), keyed on the next entry
    of `seeds` (int64 [1] each) for each block with ``drop_ps[i] > 0``. Running statistics are
    read, never updated: the fused forward already did. Returns the last block's h ([batch, out]).
    """
    seed = iter(seeds)
    h = x
    for i, w in enumerate(weights):
        z = F.linear(h, w, biases[i])
        if bn_modes[i] == NO_BN and not acts[i] and not drop_ps[i]:
            h = z
            continue
        y = z.float()
        if bn_modes[i] != NO_BN:
            if bn_modes[i] == BATCH:
                var, mean = torch.var_mean(y, dim=0, correction=0)
            else:
                mean, var = running_means[i].float(), running_vars[i].float()
            y = (y - mean) * torch.rsqrt(var + eps[i])
            if gammas[i] is not None:
                y = y * gammas[i].float()
            if betas[i] is not None:
                y = y + betas[i].float()
        a = _ACTS[acts[i]](y, slopes[i])
        if drop_ps[i] > 0:
            a = a * K.dropout_scale(next(seed), *a.shape, drop_ps[i])
        h = a.to(z.dtype)
    return h


def differentiable(grad: Tensor) -> bool:
    """Whether a fused op's backward, given `grad`, must run differentiably: grad mode is on
    inside it (``create_graph=True``) or `grad` is batched (vmap over the backward)."""
    return (torch.is_grad_enabled() or torch._C._functorch.is_legacy_batchedtensor(grad)
            or torch._C._functorch.is_functorch_wrapped_tensor(grad))


def transformed() -> bool:
    """Whether a functorch transform (``torch.func.grad``, ``vmap``, ``jvp``, ``jacrev``,
    ...) or forward-mode AD (``torch.autograd.forward_ad``) is active: the fused ops have
    neither batching rules nor forward derivatives."""
    return torch._C._functorch.peek_interpreter_stack() is not None or fwAD._current_level >= 0


def vjp(fn: Callable[..., Tensor], inputs: Sequence, grad: Tensor) -> List:
    """``fn(*inputs)``'s vector-Jacobian product with `grad`, as a structure like `inputs`
    (each entry a tensor, a list of tensors, or anything else, passed through to `fn`): the
    gradient of each tensor that requires grad, None for everything else. A tensor listed
    twice (a weight shared by two Linears) gets its whole gradient at its first place only,
    since autograd sums the places.

    With grad mode on (``create_graph=True`` around the caller) the result has a graph, so
    it can be differentiated again; `grad` may be batched.
    """
    create_graph = torch.is_grad_enabled()
    flat = [t for entry in inputs for t in (entry if isinstance(entry, (list, tuple)) else [entry])]
    wrt = list({id(t): t for t in flat if isinstance(t, Tensor) and t.requires_grad}.values())
    # autocast off: the fused op got tensors already cast, and the reference keeps their dtypes
    with torch.enable_grad(), torch.autocast(grad.device.type, enabled=False):
        out = fn(*inputs)
    found = torch.autograd.grad(out, wrt, grad, create_graph=create_graph, allow_unused=True)
    grads = {id(t): g for t, g in zip(wrt, found)}

    def pick(t):
        return grads.pop(id(t), None) if isinstance(t, Tensor) else None
    return [[pick(t) for t in e] if isinstance(e, (list, tuple)) else pick(e) for e in inputs]
