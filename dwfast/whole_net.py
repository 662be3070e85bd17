"""The whole-net path: a narrow chain as one kernel launch forward (and one backward), plus
one launch each way that packs the layers' own tensors and unpacks their gradients
(kernels/fused_mlp.py), whatever the depth; no PyTorch op runs.

    mlp_infer     no-grad forward, eval BatchNorm folded from running statistics
    mlp_train     forward storing each hidden layer's z (no BatchNorm); autograd
    mlp_backward  its backward: input and every parameter gradient

The rule (:func:`qualifies`): the chain runs whole when
  - it has at least 2 blocks, on a 2-D fp16 / bf16 / fp32 input;
  - every hidden width (out_features of each block but the last) is 16..128; they are
    padded to one power of two H; input and output widths are free;
  - every activation is ReLU or none, the blocks but the last share one setting (the last has
    its own), and no Dropout is active;
  - and EITHER no block has BatchNorm (training or inference: gradients come from the
    fused backward), OR every BatchNorm uses running statistics (eval mode with
    track_running_stats), their tensors share one dtype, and no gradient is needed (grad
    mode off, or neither the input nor any parameter requires grad): BatchNorm is folded in.
Anything else, notably training with batch statistics (every row of a layer needs the
whole batch's statistics before the next layer can start), takes the per-layer chain
(``dwfast.ops.chain``). ``dwfast.set_whole_net("never")`` (or ``DWFAST_WHOLE_NET=never``)
forces the per-layer path; ``"auto"`` (default) takes this one when the rule holds.

Why BatchNorm training stays per-layer: a single launch would need a grid-wide barrier per
layer, which is deadlock-free only when every program is resident at once. Triton has no
cooperative launch to guarantee that, the interpreter runs programs one after another (a
barrier would hang it), and it cannot be verified here without a GPU.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import kernels as K
from . import library
from . import reference as R
from .chain import NO_BN, Block, records_graph, state, uses_batch_stats
from .kernels.fused_mlp import layer_table, mlp_bwd, mlp_fwd, mlp_pack, packed_shapes, views

MIN_WIDTH, MAX_WIDTH = 16, 128


def _relu(block: Block) -> bool:
    return block.act is not None


def qualifies(x: Tensor, blocks: List[Block]) -> Optional[str]:
    """"infer" or "train" when the whole-net path can run `blocks` on `x`, else None."""
    if len(blocks) < 2 or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    hidden = blocks[:-1]
    if any(not MIN_WIDTH <= b.linear.out_features <= MAX_WIDTH for b in hidden):
        return None
    if any(b.act is not None and type(b.act) is not nn.ReLU for b in blocks) or len({_relu(b) for b in hidden}) != 1:
        return None
    if any(b.dropout is not None and b.dropout.training and b.dropout.p > 0 for b in blocks):
        return None
    bns = [b.bn for b in blocks if b.bn is not None]
    if any(uses_batch_stats(bn) for bn in bns):
        return None
    # the pack kernel reads BatchNorm's tensors in one dtype
    if len({t.dtype for bn in bns for name in ("running_mean", "running_var", "weight", "bias")
            for t in (state(bn, name),) if t is not None}) > 1:
        return None
    # (a Linear's and a BatchNorm1d's parameters are their weight and bias)
    params = [state(m, name) for b in blocks for m in (b.linear, b.bn) if m is not None for name in ("weight", "bias")]
    needs_grad = records_graph() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    if needs_grad:
        return None if bns else "train"
    return "infer"


def _flags(ints: List[int]) -> Tuple[list, list, list, list]:
    """Per layer: has a bias, a BatchNorm, its gamma, its beta (the ops' `ints`, 4 per layer)."""
    return ints[0::4], ints[1::4], ints[2::4], ints[3::4]


def _expand(present: List[Tensor], flags) -> List[Optional[Tensor]]:
    it = iter(present)
    return [next(it) if f else None for f in flags]


def _hidden(weights: List[Tensor]) -> int:
    """H: the hidden widths' power of two (at least MIN_WIDTH)."""
    return max(MIN_WIDTH, 1 << (max(w.shape[0] for w in weights[:-1]) - 1).bit_length())


def _table(weights, biases, ints, norms=None):
    has_bias = _flags(ints)[0]
    return layer_table(weights, _expand(biases, has_bias), norms or [None] * len(weights), weights[0].device)


def _infer(
    x: Tensor, weights: List[Tensor], biases: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor],
    gammas: List[Tensor], betas: List[Tensor], ints: List[int], eps: List[float], hid_relu: bool, out_relu: bool,
) -> Tensor:
    """The chain's output in two launches (pack, forward), eval BatchNorm folded. `ints`: per
    layer whether it has a bias, BatchNorm, gamma, beta; the lists hold the layers' that do;
    `eps` per layer (BatchNorm's, 0.0 without)."""
    has_bias, has_bn, has_gamma, has_beta = _flags(ints)
    means, variances = _expand(running_means, has_bn), _expand(running_vars, has_bn)
    gammas, betas = _expand(gammas, has_gamma), _expand(betas, has_beta)
    norms = [(m, v, g, b, e) if m is not None else None for m, v, g, b, e in zip(means, variances, gammas, betas, eps)]
    table, _ = _table(weights, biases, ints, norms)
    L, H, N_out = len(weights), _hidden(weights), weights[-1].shape[0]
    bn_dtype = running_means[0].dtype if running_means else None
    _, (w_in, w_hid, w_out, b_hid, b_out), bn = mlp_pack(x, table, L, H, N_out, bn_dtype)
    return mlp_fwd(x, w_in, w_hid, w_out, b_hid, b_out, *(bn or (None, None)), hid_relu=hid_relu,
                   out_relu=out_relu)[0]


mlp_infer = library.custom_op("mlp_infer")(_infer)


def _mlp_infer_fake(x, weights, biases, running_means, running_vars, gammas, betas, ints, eps, hid_relu, out_relu):
    return x.new_empty(x.shape[0], weights[-1].shape[0])


library.register_fake(mlp_infer, _mlp_infer_fake)


def _train(
    x: Tensor, weights: List[Tensor], biases: List[Tensor], ints: List[int], hid_relu: bool, out_relu: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, z, packed): the chain without BatchNorm in two launches, keeping the hidden z
    [L-1, B, H] and the packed operands (kernels.fused_mlp.mlp_pack's flat buffer) for backward."""
    table, _ = _table(weights, biases, ints)
    L, H = len(weights), _hidden(weights)
    packed, (w_in, w_hid, w_out, b_hid, b_out), _ = mlp_pack(x, table, L, H, weights[-1].shape[0])
    out, z = mlp_fwd(x, w_in, w_hid, w_out, b_hid, b_out, hid_relu=hid_relu, out_relu=out_relu, store_z=True)
    return out, z, packed


mlp_train = library.custom_op("mlp_train")(_train)


def _packed_size(x, weights) -> int:
    L, H = len(weights), _hidden(weights)
    return sum(math.prod(shape) for shape in packed_shapes(L, H, x.shape[1], weights[-1].shape[0]))


def _mlp_train_fake(x, weights, biases, ints, hid_relu, out_relu):
    H = _hidden(weights)
    return (x.new_empty(x.shape[0], weights[-1].shape[0]), x.new_empty(len(weights) - 1, x.shape[0], H),
            x.new_empty(_packed_size(x, weights)))


library.register_fake(mlp_train, _mlp_train_fake)


def _grads(
    grad_out: Tensor, x: Tensor, z: Tensor, out: Tensor, packed: Tensor, weights: List[Tensor], biases: List[Tensor],
    ints: List[int], hid_relu: bool, out_relu: bool, input_grad: bool,
) -> List[Tensor]:
    """[grad_x (empty unless `input_grad`), grads]: grads flat, every layer's dW and then db
    (where it has a bias) in turn, in x's dtype; two launches (backward, gradient sums)."""
    table, sizes = _table(weights, biases, ints)
    L, H, N_out = len(weights), _hidden(weights), weights[-1].shape[0]
    w_in, w_hid, w_out, _, _ = views(packed, packed_shapes(L, H, x.shape[1], N_out))
    grad_x, grads = mlp_bwd(grad_out, x, z, out, w_in, w_hid, w_out, table, sum(sizes), hid_relu=hid_relu,
                            out_relu=out_relu, input_grad=input_grad)
    return [grad_x if input_grad else x.new_empty(0), grads]


mlp_backward = library.custom_op("mlp_backward")(_grads)


def _mlp_backward_fake(grad_out, x, z, out, packed, weights, biases, ints, hid_relu, out_relu, input_grad):
    size = sum(w.numel() for w in weights) + sum(b.numel() for b in biases)
    return [x.new_empty(x.shape) if input_grad else x.new_empty(0), x.new_empty(size)]


library.register_fake(mlp_backward, _mlp_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weights, biases, ints, hid_relu, out_relu = inputs
    out, z, packed = output
    # out only where its ReLU's backward reads it: the user may change it in place otherwise
    ctx.save_for_backward(x, z, out if out_relu else None, packed, *weights, *biases)
    ctx.L, ctx.ints, ctx.hid_relu, ctx.out_relu = len(weights), ints, hid_relu, out_relu
    ctx.set_materialize_grads(False)  # z and packed take no gradient: no zeros for them


def _backward(ctx, grad_out, _grad_z, _grad_packed):
    if grad_out is None:
        return None, [None] * ctx.L, None, None, None, None
    return (*_gradients(ctx, grad_out, ctx.needs_input_grad[0], mlp_backward), None, None, None)


def _gradients(ctx, grad_out, input_grad: bool, backward):
    """(d_x, d_weights, d_biases) from the saved tensors of `ctx` (_setup_context's), through
    `backward` (the mlp_backward op, or its function), or differentiably for a double backward."""
    L = ctx.L
    x, z, out, packed, *rest = ctx.saved_tensors
    weights, biases = list(rest[:L]), list(rest[L:])
    has_bias = _flags(ctx.ints)[0]
    if R.differentiable(grad_out):  # create_graph=True or batched: mlp_backward has no autograd
        acts = [K.ACTIVATIONS["relu" if ctx.hid_relu else "none"]] * (L - 1)
        acts.append(K.ACTIVATIONS["relu" if ctx.out_relu else "none"])

        def forward(x, weights, biases):
            none = [None] * L
            return R.chain_reference(x, weights, _expand(biases, has_bias), none, none, none, none, [], [NO_BN] * L,
                                     acts, [0.0] * L, [0.0] * L, [0.0] * L)
        d_x, d_w, d_b = R.vjp(forward, [x, weights, biases], grad_out)
        return (d_x if input_grad else None), d_w, d_b
    out = grad_out if out is None else out  # (a stand-in without an output ReLU: not read)
    grad_x, grads = backward(grad_out, x, z, out, packed, weights, biases, ctx.ints, ctx.hid_relu, ctx.out_relu,
                             input_grad)
    shapes = []
    for w, b in zip(weights, _expand(biases, has_bias)):
        shapes.append(w.shape)
        if b is not None:
            shapes.append(b.shape)
    per_layer = views(grads, shapes)  # (views of one buffer: AccumulateGrad takes them as they are)
    d_w, d_b, i = [], [], 0
    for b in _expand(biases, has_bias):
        d_w.append(per_layer[i])
        i += 1
        if b is not None:
            d_b.append(per_layer[i])
            i += 1
    return (grad_x if input_grad else None), d_w, d_b


library.register_autograd(mlp_train, _backward, setup_context=_setup_context)


class _WholeNet(torch.autograd.Function):
    """mlp_train with its autograd as one node for eager calls, skipping the dispatcher as
    dwfast.ops._Chain does (library.direct says when). Inputs: (ints, hid_relu, out_relu), x, the
    weights, the biases the layers have."""

    @staticmethod
    def forward(ctx, options, x, *params):
        ints, hid_relu, out_relu = options
        L = len(ints) // 4
        weights, biases = list(params[:L]), list(params[L:])
        out, z, packed = _train(x, weights, biases, ints, hid_relu, out_relu)
        _setup_context(ctx, (x, weights, biases, ints, hid_relu, out_relu), (out, z, packed))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        d_x, d_w, d_b = _gradients(ctx, grad_out, ctx.needs_input_grad[1], _grads)
        return (None, d_x, *d_w, *d_b)


_whole_net_apply = library.direct_apply(_WholeNet)


def whole_net_chain(x: Tensor, blocks: List[Block], upcast: bool = False) -> Optional[Tensor]:
    """Run `blocks` on `x` as one kernel (inputs already validated by `run_chain`), or
    return None when the chain does not qualify (see the module docstring).

    `upcast` runs 16-bit inputs through fp32 kernels and casts back (Triton's interpreter
    mishandles bf16); gradients still land in the original dtype.
    """
    mode = qualifies(x, blocks)
    if mode is None:
        return None
    dtype = x.dtype
    cast = (lambda t: t if t is None else t.float()) if upcast and dtype != torch.float32 else (lambda t: t)
    weights = [cast(state(b.linear, "weight")) for b in blocks]
    biases = [cast(state(b.linear, "bias")) for b in blocks]
    bns = [b.bn for b in blocks]
    has_bn = [bn is not None for bn in bns]
    bn_state = [[cast(state(bn, name)) if bn is not None else None for bn in bns]
                for name in ("running_mean", "running_var", "weight", "bias")]
    present = lambda ts: [t for t in ts if t is not None]  # noqa: E731
    ints = [int(v) for b, bn, g, beta in zip(biases, has_bn, bn_state[2], bn_state[3])
            for v in (b is not None, bn, g is not None, beta is not None)]
    x = cast(x)
    hid_relu, out_relu = _relu(blocks[0]), _relu(blocks[-1])
    direct = library.direct([x, *weights, *present(biases), *(t for ts in bn_state for t in ts if t is not None)])
    if mode == "train":
        if direct:
            return _whole_net_apply((ints, hid_relu, out_relu), library.unwrap_if_dead(x), *weights,
                                    *present(biases)).to(dtype)
        out, _, _ = mlp_train(x, weights, present(biases), ints, hid_relu, out_relu)
        return out.to(dtype)
    eps = [float(bn.eps) if bn is not None else 0.0 for bn in bns]
    infer = _infer if direct else mlp_infer
    return infer(x, weights, present(biases), *(present(ts) for ts in bn_state), ints, eps, hid_relu,
                 out_relu).to(dtype)
