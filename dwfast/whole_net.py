"""The whole-net path: a narrow chain as one kernel launch forward (and one backward).

    mlp_infer     no-grad forward, eval BatchNorm folded from running statistics
    mlp_train     forward storing each hidden layer's z (no BatchNorm); autograd
    mlp_backward  its backward: one launch, input and every parameter gradient

The rule (:func:`qualifies`): the chain runs whole when
  - it has at least 2 blocks, on a 2-D fp16 / bf16 / fp32 input;
  - every hidden width (out_features of each block but the last) is 16..128; they are
    padded to one power of two H; input and output widths are free;
  - every activation is ReLU or none, the blocks but the last share one setting (the last has
    its own), and no Dropout is active;
  - and EITHER no block has BatchNorm (training or inference: gradients come from the
    fused backward), OR every BatchNorm uses running statistics (eval mode with
    track_running_stats) and no gradient is needed (grad mode off, or neither the input
    nor any parameter requires grad): BatchNorm is folded in.
Anything else, notably training with batch statistics (every row of a layer needs the
whole batch's statistics before the next layer can start), takes the per-layer chain
(``dwfast.ops.chain``). ``dwfast.set_whole_net("never")`` (or ``DWFAST_WHOLE_NET=never``)
forces the per-layer path; ``"auto"`` (default) takes this one when the rule holds.

Why BatchNorm training stays per-layer: a single launch would need a grid-wide barrier per
layer, which is deadlock-free only when every program is resident at once. Triton has no
cooperative launch to guarantee that, the interpreter runs programs one after another (a
barrier would hang it), and it cannot be verified here without a GPU.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import library
from . import reference as R
from .chain import Block, state, uses_batch_stats
from .kernels.fused_mlp import mlp_bwd, mlp_fwd

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
    # (a Linear's and a BatchNorm1d's parameters are their weight and bias)
    params = [state(m, name) for b in blocks for m in (b.linear, b.bn) if m is not None for name in ("weight", "bias")]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    if needs_grad:
        return None if bns else "train"
    return "infer"


@library.custom_op("mlp_infer")
def mlp_infer(
    x: Tensor, w_in: Tensor, w_hid: Tensor, w_out: Tensor, b_hid: Tensor, b_out: Tensor,
    bn_hid: Optional[Tensor], bn_out: Optional[Tensor], hid_relu: bool, out_relu: bool,
) -> Tensor:
    """The chain's output in one launch; packed operands as `kernels.fused_mlp.mlp_fwd`."""
    return mlp_fwd(x, w_in, w_hid, w_out, b_hid, b_out, bn_hid, bn_out, hid_relu=hid_relu, out_relu=out_relu)[0]


def _mlp_infer_fake(x, w_in, w_hid, w_out, b_hid, b_out, bn_hid, bn_out, hid_relu, out_relu):
    return x.new_empty(x.shape[0], w_out.shape[0])


library.register_fake(mlp_infer, _mlp_infer_fake)


@library.custom_op("mlp_train")
def mlp_train(
    x: Tensor, w_in: Tensor, w_hid: Tensor, w_out: Tensor, b_hid: Tensor, b_out: Tensor,
    hid_relu: bool, out_relu: bool,
) -> Tuple[Tensor, Tensor]:
    """(out, z): the chain without BatchNorm, keeping the hidden z [L-1, B, H] for backward."""
    return mlp_fwd(x, w_in, w_hid, w_out, b_hid, b_out, hid_relu=hid_relu, out_relu=out_relu, store_z=True)


def _mlp_train_fake(x, w_in, w_hid, w_out, b_hid, b_out, hid_relu, out_relu):
    return x.new_empty(x.shape[0], w_out.shape[0]), x.new_empty(w_hid.shape[0] + 1, x.shape[0], w_in.shape[0])


library.register_fake(mlp_train, _mlp_train_fake)


@library.custom_op("mlp_backward")
def mlp_backward(
    grad_out: Tensor, x: Tensor, z: Tensor, out: Tensor, w_in: Tensor, w_hid: Tensor, w_out: Tensor,
    hid_relu: bool, out_relu: bool, input_grad: bool,
) -> List[Tensor]:
    """[grad_x (empty unless `input_grad`), dw_in, dw_hid, dw_out, db_hid, db_out], packed."""
    grad_x, *grads = mlp_bwd(grad_out, x, z, out, w_in, w_hid, w_out, hid_relu=hid_relu, out_relu=out_relu,
                             input_grad=input_grad)
    return [grad_x if input_grad else x.new_empty(0)] + grads


def _mlp_backward_fake(grad_out, x, z, out, w_in, w_hid, w_out, hid_relu, out_relu, input_grad):
    grad_x = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    H = w_in.shape[0]
    return [grad_x, w_in.new_empty(w_in.shape), w_hid.new_empty(w_hid.shape), w_out.new_empty(w_out.shape),
            x.new_empty(z.shape[0], H), x.new_empty(w_out.shape[0])]


library.register_fake(mlp_backward, _mlp_backward_fake)


def _setup_context(ctx, inputs, output):
    x, w_in, w_hid, w_out, b_hid, b_out, hid_relu, out_relu = inputs
    out, z = output
    ctx.save_for_backward(x, z, out, w_in, w_hid, w_out, b_hid, b_out)  # the biases: for R.vjp
    ctx.hid_relu, ctx.out_relu = hid_relu, out_relu


def _backward(ctx, grad_out, _grad_z):
    x, z, out, w_in, w_hid, w_out, b_hid, b_out = ctx.saved_tensors
    if R.differentiable(grad_out):  # create_graph=True or batched: mlp_backward has no autograd
        grads = R.vjp(R.mlp_reference, [x, w_in, w_hid, w_out, b_hid, b_out, ctx.hid_relu, ctx.out_relu], grad_out)
        return (*grads[:6], None, None)
    input_grad = ctx.needs_input_grad[0]
    grad_x, *grads = mlp_backward(grad_out, x, z, out, w_in, w_hid, w_out, ctx.hid_relu, ctx.out_relu, input_grad)
    return (grad_x if input_grad else None, *grads, None, None)


library.register_autograd(mlp_train, _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- packing


def _pad(t: Tensor, rows: int, cols: int = 0) -> Tensor:
    """t zero-padded by `rows` at the end of dim 0 (and `cols` of dim 1); t itself if none.

    Differentiable (the gradient is sliced back), so packing needs no autograd of its own.
    A real deployment would cache the packed eval weights; here packing is a few copies
    per call, none at all for the weights of a chain whose widths are H already.
    """
    if not rows and not cols:
        return t
    return F.pad(t, (0, cols, 0, rows) if t.dim() == 2 else (0, rows))


def _bn_vectors(blocks: List[Block], width: int) -> Tensor:
    """[3, len(blocks), width] fp32 center, scale, shift from running statistics (identity
    for blocks without BatchNorm, zero past each block's width)."""
    planes = []
    for b in blocks:
        n = b.linear.out_features
        if b.bn is None:
            dev = b.linear.weight.device
            vecs = (torch.zeros(n, device=dev), torch.ones(n, device=dev), torch.zeros(n, device=dev))
        else:
            # plain torch ops rather than the bn_stats launcher, so torch.compile traces them
            bn = b.bn
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = bn.bias.float() if bn.bias is not None else torch.zeros_like(scale)
            vecs = (bn.running_mean.float(), scale, shift)
        planes.append(torch.stack([_pad(v, width - n) for v in vecs]))
    return torch.stack(planes, dim=1)


def whole_net_chain(x: Tensor, blocks: List[Block], upcast: bool = False) -> Optional[Tensor]:
    """Run `blocks` on `x` as one kernel (inputs already validated by `fused_chain`), or
    return None when the chain does not qualify (see the module docstring).

    `upcast` runs 16-bit inputs through fp32 kernels and casts back (Triton's interpreter
    mishandles bf16); gradients still land in the original dtype.
    """
    mode = qualifies(x, blocks)
    if mode is None:
        return None
    dtype = x.dtype
    cast = (lambda t: t if t is None else t.float()) if upcast and dtype != torch.float32 else (lambda t: t)
    hidden, last = blocks[:-1], blocks[-1]
    widths = [b.linear.out_features for b in hidden]
    H = max(MIN_WIDTH, 1 << (max(widths) - 1).bit_length())
    weights = [cast(state(b.linear, "weight")) for b in blocks]
    biases = [state(b.linear, "bias") for b in blocks]
    biases = [cast(b) if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]

    w_in = _pad(weights[0], H - widths[0])
    w_hid = [_pad(w, H - widths[i + 1], H - widths[i]) for i, w in enumerate(weights[1:-1])]
    w_hid = torch.stack(w_hid) if w_hid else w_in.new_empty(0, H, H)
    w_out = _pad(weights[-1], 0, H - widths[-1])
    b_hid = torch.stack([_pad(b, H - n) for b, n in zip(biases[:-1], widths)])
    b_out = biases[-1]
    x = cast(x)
    hid_relu, out_relu = _relu(hidden[0]), _relu(last)

    if mode == "train":
        out, _ = mlp_train(x, w_in, w_hid, w_out, b_hid, b_out, hid_relu, out_relu)
        return out.to(dtype)
    bn_hid = bn_out = None
    if any(b.bn is not None for b in blocks):
        with torch.no_grad():
            bn_hid = _bn_vectors(hidden, H)
            bn_out = _bn_vectors([last], last.linear.out_features)[:, 0]
    return mlp_infer(x, w_in, w_hid, w_out, b_hid, b_out, bn_hid, bn_out, hid_relu, out_relu).to(dtype)
