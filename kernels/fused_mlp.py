"""A whole narrow MLP in one launch (tiny-cuda-nn's fully fused MLP, plus biases, folded
BatchNorm and a trainable backward).

A chain of L >= 2 blocks, input a_0 = x (B x K_in), hidden widths h_l <= H (one power of
two, 16..128), output width N_out:

    z_l = a_{l-1} @ W_l^T + b_l                       l = 0 .. L-1 (0-based)
    a_l = relu((z_l - center_l) * scale_l + shift_l)  eval BatchNorm folded (centred form, as
                                                      kernels/fused_linear.py); identity
                                                      vectors for blocks without one
    out = a_{L-1}

Why one kernel: at widths 16..128 a layer is a few FLOPs per byte, so the per-layer path
is bound by launches and by writing/reading every a_l through HBM. Here each program owns
BLOCK_M rows and keeps their activation tile [BLOCK_M, H] in registers from x to out:
x is read once, out written once, and the weights (a few KB to 32 KB per layer) are
streamed from L2 by every program.

Tiling: hidden layers are packed zero-padded into w_hid [L-2, H, H] and b_hid [L-1, H]
(padded features are exactly 0 after every layer: zero weight rows and zero bias give
z = 0, and the next layer's zero columns ignore them). The first layer (w_in [H, K_in],
K_in free) loops over BLOCK_K chunks of x; the last (w_out [N_out, H], N_out free) loops
over BLOCK_N chunks of the output. The hidden layers run in a runtime loop, so depth
costs no compile time. Rows past B are masked (no padding by the caller). Between
layers a_l is rounded to the input dtype, as the per-layer path rounds each GEMM output,
so both paths agree with eager's per-layer rounding; accumulation is fp32.

Training (no BatchNorm: batch statistics couple all rows, so training with BatchNorm
stays on the per-layer path), backward with g = dL/da_l, from the last layer down:

    g_z    = g where z_l > 0 (ReLU), else 0          rounded to the dtype, as stored per layer
    dW_l  += g_z^T @ a_{l-1}      db_l += sum_rows g_z
    g      = g_z @ W_l            (dL/dx for l = 0)

Stored vs recomputed: the forward stores each hidden layer's z_l once ([L-1, B, H] in the
input dtype, the per-layer path's memory); a_{l-1} = relu(z_{l-1}) is recomputed from it in
registers, and the last layer's ReLU mask is read from `out`. Recomputing the whole forward
instead would save that memory for twice the FLOPs; stored z keeps the backward one pass.

Weight gradients: the backward grid has G <= row_tiles programs (G about the SM count);
program p walks row tiles p, p + G, ... and accumulates dW and db into its own fp32 slot
[p] of one partial buffer (read-modify-write, no other program touches it), then one more
launch sums the G slots in order, into every layer's own gradients in the input dtype.

Packing costs no PyTorch op either: one launch (`_pack_kernel`) reads every layer's weight,
bias and eval BatchNorm through a table of their addresses (`layer_table`, copied to the
device once per set of tensors) and writes the packed operands, BatchNorm folded into
center, scale and shift; `_unpack_kernel` writes the gradients back per layer the same way.
A training step is four launches whatever the depth, an eval forward two. No atomics: two identical backward passes are bitwise equal. The
price is G x (H K_in + (L-2) H^2 + N_out H) fp32 of partials and a read-modify-write of
them per extra tile; if timings show it, the alternative is to store g_z per layer and run
dW as one split-batch GEMM over all layers (tiny-cuda-nn's split).

Tiles: a heuristic checked only by compiling for sm_90 on the CPU (`_tiles`; tests/
test_compiled.py); no GPU timings yet.
"""
import math
import struct

import torch
import triton
import triton.language as tl

from . import launch
from .fused_linear import _interpreting, _precision, num_sms


@triton.jit
def _relu(y, RELU: tl.constexpr):
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not max(y, 0): NaN stays NaN, as in torch.relu
    return y


@triton.jit
def _layer_out(acc, offs, mask, bias_ptr, bn_ptr, plane, z_ptr, z_offs, z_mask,
               HAS_BN: tl.constexpr, STORE_Z: tl.constexpr, RELU: tl.constexpr):
    """a = relu(bn(acc + b)) in fp32, the layer's vectors at `offs` (center, scale, shift are
    `plane` apart in bn); with STORE_Z the rounded z is stored first (training)."""
    z = acc + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        z_low = z.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + z_offs, z_low, mask=z_mask)
        z = z_low.to(tl.float32)  # the backward's mask and a_l come from the stored z
    if HAS_BN:
        center = tl.load(bn_ptr + offs, mask=mask, other=0.0)[None, :]
        scale = tl.load(bn_ptr + plane + offs, mask=mask, other=0.0)[None, :]
        shift = tl.load(bn_ptr + 2 * plane + offs, mask=mask, other=0.0)[None, :]
        z = (z - center) * scale + shift
    return _relu(z, RELU)


@triton.jit
def _rows(BLOCK_M: tl.constexpr, tile, M):
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m.to(tl.int64), offs_m < M


@triton.jit
def _mlp_fwd_kernel(
    # pointers
    x_ptr, w_in_ptr, w_hid_ptr, w_out_ptr, b_hid_ptr, b_out_ptr,
    bn_hid_ptr, bn_out_ptr,                  # [3, L-1, H] and [3, N_out]: center, scale, shift
    z_ptr, out_ptr,                          # z: [L-1, M, H] (with STORE_Z)
    # sizes
    M, K_in, N_out, L,
    # strides (stride_zl = M * H, between the layers of z)
    stride_xm, stride_xk, stride_om, stride_on, stride_zl,
    # meta-parameters
    H: tl.constexpr, HAS_BN: tl.constexpr, STORE_Z: tl.constexpr,
    HID_RELU: tl.constexpr, OUT_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = the whole chain on BLOCK_M rows of x; z_l of the hidden layers with STORE_Z."""
    rows, mask_m = _rows(BLOCK_M, tl.program_id(0), M)
    offs_h = tl.arange(0, H)
    mask_h = offs_h < H
    dtype = x_ptr.dtype.element_ty
    z_offs = rows[:, None] * H + offs_h[None, :]
    z_mask = mask_m[:, None]
    plane = (L - 1) * H  # between the center, scale and shift planes of bn_hid

    acc = tl.zeros((BLOCK_M, H), dtype=tl.float32)
    for k0 in range(0, K_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K_in
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_k = tl.load(w_in_ptr + offs_h[None, :] * K_in + offs_k[:, None], mask=mask_k[:, None], other=0.0)
        acc = tl.dot(x, w_k, acc, input_precision=PRECISION)
    a = _layer_out(acc, offs_h, mask_h, b_hid_ptr, bn_hid_ptr, plane, z_ptr, z_offs, z_mask,
                   HAS_BN, STORE_Z, HID_RELU).to(dtype)

    for l in range(1, L - 1):
        # W_l^T as [H_in, H_out]
        w_l = tl.load(w_hid_ptr + (l - 1) * H * H + offs_h[None, :] * H + offs_h[:, None])
        acc = tl.dot(a, w_l, input_precision=PRECISION)
        a = _layer_out(acc, l * H + offs_h, mask_h, b_hid_ptr, bn_hid_ptr, plane, z_ptr,
                       l * stride_zl.to(tl.int64) + z_offs, z_mask, HAS_BN, STORE_Z, HID_RELU).to(dtype)

    # (fresh names in each loop: compiled Triton types a name reassigned in a loop once)
    for n0 in range(0, N_out, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_out
        w_n = tl.load(w_out_ptr + offs_n[None, :] * H + offs_h[:, None], mask=mask_n[None, :], other=0.0)
        acc_n = tl.dot(a, w_n, input_precision=PRECISION)
        y = _layer_out(acc_n, offs_n, mask_n, b_out_ptr, bn_out_ptr, N_out, out_ptr, 0, False,
                       HAS_BN, False, OUT_RELU)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, y.to(dtype),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _accumulate(ptr, offs, mask, value, again):
    """ptr[offs] (+)= value: this program's own partial slot; `again` once it holds a sum
    (before that it holds garbage, selected away: no memset; full-shaped masks)."""
    prev = tl.load(ptr + offs, mask=mask, other=0.0)
    tl.store(ptr + offs, value + tl.where(again, prev, 0.0), mask=mask)


@triton.jit
def _accumulate_dot(ptr, offs, mask, a, b, again, PRECISION: tl.constexpr):
    """ptr[offs] (+)= a @ b, as _accumulate: the slot's sum is the MMA's accumulator, so one
    [H, H] fp32 tile is live, not two (they spill)."""
    prev = tl.where(again, tl.load(ptr + offs, mask=mask, other=0.0), 0.0)
    tl.store(ptr + offs, tl.dot(a, b, prev, input_precision=PRECISION), mask=mask)


@triton.jit
def _relu_grad(g, z, RELU: tl.constexpr):
    """g_z = g but where z <= 0 (as the per-layer kernels do: torch's threshold_backward passes g
    where z is NaN), in fp32."""
    if RELU:
        g = tl.where(z <= 0.0, 0.0, g)
    return g


@triton.jit
def _mlp_bwd_kernel(
    # pointers
    grad_ptr, out_ptr, x_ptr, z_ptr, w_in_ptr, w_hid_ptr, w_out_ptr,
    grad_x_ptr,                              # dL/dx (with INPUT_GRAD)
    part_ptr,                                # fp32 partials [G, slot_size]: one slot per program
    # sizes
    M, K_in, N_out, L, row_tiles, slot_size,
    # strides (stride_zl = M * H, between the layers of z)
    stride_gm, stride_gn, stride_om, stride_on, stride_xm, stride_xk, stride_dxm, stride_dxk, stride_zl,
    # meta-parameters
    H: tl.constexpr, HID_RELU: tl.constexpr, OUT_RELU: tl.constexpr, INPUT_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """The chain's backward for row tiles pid, pid + G, ...; dW and db summed into slot pid,
    which holds dw_in [H, K_in], dw_hid [L-2, H, H], dw_out [N_out, H], db_hid [L-1, H] and
    db_out [N_out] one after another (mlp_bwd's `shapes`)."""
    pid = tl.program_id(0)
    slot = pid.to(tl.int64)
    offs_h = tl.arange(0, H)
    all_h = offs_h < H  # all true: widens masks to the full tile shape
    dtype = x_ptr.dtype.element_ty
    dw_in_ptr = part_ptr + slot * slot_size
    dw_hid_ptr = dw_in_ptr + H * K_in
    dw_out_ptr = dw_hid_ptr + (L - 2) * H * H
    db_hid_ptr = dw_out_ptr + N_out * H
    db_out_ptr = db_hid_ptr + (L - 1) * H
    hh = offs_h[:, None] * H + offs_h[None, :]
    mask_hh = all_h[:, None] & all_h[None, :]
    layer = stride_zl.to(tl.int64)

    for tile in range(pid, row_tiles, tl.num_programs(0)):
        again = tile != pid
        rows, mask_m = _rows(BLOCK_M, tile, M)
        z_offs = rows[:, None] * H + offs_h[None, :]
        z = tl.load(z_ptr + (L - 2) * layer + z_offs, mask=mask_m[:, None], other=0.0)
        a = _relu(z.to(tl.float32), HID_RELU).to(dtype)

        # last layer: g_z from dL/dout, its dW and db, and g = dL/da_{L-2}
        g = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        for n0 in range(0, N_out, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N_out
            mask = mask_m[:, None] & mask_n[None, :]
            g_z = tl.load(grad_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
            if OUT_RELU:  # relu(z) > 0 exactly where z > 0
                out = tl.load(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, mask=mask, other=0.0)
                g_z = _relu_grad(g_z.to(tl.float32), out.to(tl.float32), True).to(dtype)
            nh = offs_n[:, None] * H + offs_h[None, :]
            mask_nh = mask_n[:, None] & all_h[None, :]
            _accumulate_dot(dw_out_ptr, nh, mask_nh, tl.trans(g_z), a, again, PRECISION)
            _accumulate(db_out_ptr, offs_n, mask_n, tl.sum(g_z.to(tl.float32), axis=0), again)
            w_n = tl.load(w_out_ptr + nh, mask=mask_nh, other=0.0)
            g = tl.dot(g_z, w_n, g, input_precision=PRECISION)

        # hidden layers, last to first: z holds z_l
        for i in range(0, L - 2):
            l = L - 2 - i
            z_prev = tl.load(z_ptr + (l - 1) * layer + z_offs, mask=mask_m[:, None], other=0.0)
            a = _relu(z_prev.to(tl.float32), HID_RELU).to(dtype)
            g_z = _relu_grad(g, z.to(tl.float32), HID_RELU).to(dtype)
            _accumulate_dot(dw_hid_ptr + (l - 1) * H * H, hh, mask_hh, tl.trans(g_z), a, again, PRECISION)
            _accumulate(db_hid_ptr + l * H, offs_h, all_h, tl.sum(g_z.to(tl.float32), axis=0), again)
            g = tl.dot(g_z, tl.load(w_hid_ptr + (l - 1) * H * H + hh), input_precision=PRECISION)
            z = z_prev

        # first layer: dW against x, and dL/dx
        g_z = _relu_grad(g, z.to(tl.float32), HID_RELU).to(dtype)
        _accumulate(db_hid_ptr, offs_h, all_h, tl.sum(g_z.to(tl.float32), axis=0), again)
        for k0 in range(0, K_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_in
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            hk = offs_h[:, None] * K_in + offs_k[None, :]
            mask_hk = all_h[:, None] & mask_k[None, :]
            _accumulate_dot(dw_in_ptr, hk, mask_hk, tl.trans(g_z), x, again, PRECISION)
            if INPUT_GRAD:
                w_k = tl.load(w_in_ptr + hk, mask=mask_hk, other=0.0)
                grad_x = tl.dot(g_z, w_k, input_precision=PRECISION)
                tl.store(grad_x_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, grad_x.to(dtype),
                         mask=mask_m[:, None] & mask_k[None, :])


# The per-layer tensors, as one launch each way reads and writes them: a table row per layer
# (int64 [L, _FIELDS], dwfast's `layer_table`): its weight's address, strides and sizes, its
# bias's address (0: none), eval BatchNorm's running statistics' and affine parameters'
# addresses (0: none) and eps (float64 bits), where its gradients go in a flat buffer.
_FIELDS = tl.constexpr(12)
F_W, F_S0, F_S1, F_N, F_K, F_B, F_MEAN, F_VAR, F_GAMMA, F_BETA, F_EPS, F_GRAD = (tl.constexpr(i) for i in range(12))


@triton.jit
def _field(row_ptr, field):
    return tl.load(row_ptr + field)


@triton.jit
def _pointer(row_ptr, field, DTYPE: tl.constexpr):
    return tl.load(row_ptr + field).to(tl.pointer_type(DTYPE))


@triton.jit
def _region(l, L, H, K_in, N_out):
    """(offset, rows, cols) of layer l's weight in the packed layout, then the offset of its
    bias: w_in [H, K_in], w_hid [L-2, H, H], w_out [N_out, H], b_hid [L-1, H], b_out [N_out]."""
    hid = H * K_in + (L - 2) * H * H
    biases = hid + N_out * H
    if l == 0:
        offset = 0
    elif l == L - 1:
        offset = hid
    else:
        offset = H * K_in + (l - 1) * H * H
    rows = tl.where(l == L - 1, N_out, H)
    cols = tl.where(l == 0, K_in, H)
    return offset, rows, cols, biases + l * H


@triton.jit
def _pack_kernel(table_ptr, packed_ptr, bn_ptr, L, H, K_in, N_out,
                 HAS_BN: tl.constexpr, BN_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The packed operands of mlp_fwd from the layers' own tensors (table): weights and biases
    zero-padded; with HAS_BN, eval BatchNorm's center, scale = gamma * rsqrt(var + eps) and
    shift = beta per layer, fp32 [3, L-1, H] then [3, N_out] (identity where a layer has
    none, zero past its width). Program (l, c) packs chunk c of layer l's weight; chunk 0 also
    its vectors."""
    l = tl.program_id(0)
    row = table_ptr + l * _FIELDS
    dtype = packed_ptr.dtype.element_ty
    w = _pointer(row, F_W, dtype)
    s0, s1, n, k = _field(row, F_S0), _field(row, F_S1), _field(row, F_N), _field(row, F_K)
    offset, rows, cols, b_offset = _region(l, L, H, K_in, N_out)
    size = rows * cols
    for e0 in range(tl.program_id(1) * BLOCK, size, tl.num_programs(1) * BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        r, c = e // cols, e % cols
        v = tl.load(w + r * s0 + c * s1, mask=(e < size) & (r < n) & (c < k), other=0.0)  # zeros padded
        tl.store(packed_ptr + offset + e, v, mask=e < size)
    if tl.program_id(1) == 0:
        bias = _pointer(row, F_B, dtype)
        # (masks as bounds: a feature is read where it is below them; 0 where the tensor is absent)
        n_bias = tl.where(_field(row, F_B) != 0, n, 0)
        n_bn = tl.where(_field(row, F_MEAN) != 0, n, 0)
        n_gamma = tl.where(_field(row, F_GAMMA) != 0, n_bn, 0)
        n_beta = tl.where(_field(row, F_BETA) != 0, n_bn, 0)
        eps = _field(row, F_EPS).to(tl.float64, bitcast=True).to(tl.float32)
        plane = tl.where(l == L - 1, N_out, (L - 1) * H)  # between center, scale and shift
        bn_offset = tl.where(l == L - 1, 3 * (L - 1) * H, l * H)
        for f0 in range(0, rows, BLOCK):
            f = f0 + tl.arange(0, BLOCK)
            tl.store(packed_ptr + b_offset + f, tl.load(bias + f, mask=f < n_bias, other=0.0), mask=f < rows)
            if HAS_BN:
                center = tl.load(_pointer(row, F_MEAN, BN_DTYPE) + f, mask=f < n_bn, other=0.0).to(tl.float32)
                var = tl.load(_pointer(row, F_VAR, BN_DTYPE) + f, mask=f < n_bn, other=0.0).to(tl.float32)
                gamma = tl.load(_pointer(row, F_GAMMA, BN_DTYPE) + f, mask=f < n_gamma, other=1.0).to(tl.float32)
                beta = tl.load(_pointer(row, F_BETA, BN_DTYPE) + f, mask=f < n_beta, other=0.0).to(tl.float32)
                scale = tl.where(f < n_bn, tl.math.rsqrt(var + eps) * gamma, tl.where(f < n, 1.0, 0.0))
                at = bn_ptr + bn_offset + f
                tl.store(at, center, mask=f < rows)
                tl.store(at + plane, scale, mask=f < rows)
                tl.store(at + 2 * plane, beta, mask=f < rows)


@triton.jit
def _unpack_kernel(table_ptr, part_ptr, grad_ptr, G, slot_size, L, H, K_in, N_out, BLOCK: tl.constexpr):
    """Every layer's dW [n, k] and then, where it has a bias, db [n], at its offset of the flat
    grad (table): the sums of the G slots of the packed partials part [G, slot_size] in slot
    order (deterministic), in grad's dtype. Programs as _pack_kernel's."""
    l = tl.program_id(0)
    row = table_ptr + l * _FIELDS
    n, k, out = _field(row, F_N), _field(row, F_K), grad_ptr + _field(row, F_GRAD)
    offset, rows, cols, b_offset = _region(l, L, H, K_in, N_out)
    size = rows * cols
    for e0 in range(tl.program_id(1) * BLOCK, size, tl.num_programs(1) * BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in range(0, G):
            acc += tl.load(part_ptr + g * slot_size + offset + e, mask=e < size, other=0.0)
        r, c = e // cols, e % cols
        tl.store(out + r * k + c, acc.to(grad_ptr.dtype.element_ty), mask=(e < size) & (r < n) & (c < k))
    n_bias = tl.where((tl.program_id(1) == 0) & (_field(row, F_B) != 0), n, 0)  # (chunk 0 sums db)
    for f0 in range(0, n_bias, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in range(0, G):
            acc += tl.load(part_ptr + g * slot_size + b_offset + f, mask=f < n_bias, other=0.0)
        tl.store(out + n * k + f, acc.to(grad_ptr.dtype.element_ty), mask=f < n_bias)


# ---------------------------------------------------------------- launchers


def _tiles(M: int, H: int, K_in: int, N_out: int, dtype: torch.dtype, backward: bool = False):
    """(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages) for a batch of M rows and hidden width H.

    A heuristic, not autotuning, and untimed: chosen from the compiled form for sm_90 (python
    -m bench.kernels --modes whole, on the CPU) as the tiles that do not spill and fit shared
    memory, with wgmma where that holds. The backward holds more [BLOCK_M, H] tiles and an
    [H, H] fp32 dW tile, so it takes fewer rows: 64 (a warpgroup's wgmma) up to H = 64 in
    16-bit dtypes, 32 beyond (its [BLOCK_M, H] products then run on mma.sync), 16 in fp32, whose
    3xTF32 products split every operand in two (and, at H = 128, 16-wide first and last layers
    too). The forward takes 64 rows and prefetches two layers' weights where shared memory
    allows (a layer's MMA waits for the previous layer's output; the weights are what can
    arrive early); in fp32 at H = 128 one layer's [H, H] weights leave room for 32 rows, on
    mma.sync. Either way, fewer rows where that is what gives every SM a program (a batch of
    4096 in 64-row tiles leaves half of an H100's 132 SMs idle): a narrow net is latency-bound,
    so idle SMs cost more than mma.sync's lower peak.
    """
    if _interpreting():
        return 32, 32, 32, 4, 1  # small tiles, so small test shapes cross tile edges
    block_k = min(64 if dtype != torch.float32 else 32, max(16, launch.next_power_of_2(K_in)))
    block_n = min(64, max(16, launch.next_power_of_2(N_out)))
    fp32 = dtype == torch.float32
    if backward:
        if fp32:
            block_m, block_k, block_n, num_warps = (16, block_k, block_n, 4) if H <= 64 else (16, 16, 16, 8)
        else:
            block_m, num_warps = (64 if H <= 64 else 32), 8
        num_stages = 1
    else:
        block_m, num_warps, num_stages = (32, 8, 1) if fp32 and H > 64 else (64, 4 if H <= 64 else 8, 3)
    sms = num_sms()
    while block_m > 16 and launch.cdiv(M, block_m) < sms:
        block_m //= 2
    return block_m, block_k, block_n, num_warps, num_stages


def _placeholder(t, other):
    # a pointer argument must not be an empty tensor (no hidden H x H layer when L == 2)
    return t if t.numel() else other


def packed_shapes(L: int, H: int, K_in: int, N_out: int) -> tuple:
    """Shapes of the packed operands w_in, w_hid, w_out, b_hid, b_out (one flat buffer, in order)."""
    return (H, K_in), (L - 2, H, H), (N_out, H), (L - 1, H), (N_out,)


def views(flat: torch.Tensor, shapes) -> list:
    """Views of consecutive parts of `flat` with these shapes, contiguous (one as_strided each:
    a slice and a view cost twice the host time)."""
    out, start = [], 0
    for shape in shapes:
        strides, n = [], 1
        for size in reversed(shape):
            strides.insert(0, n)
            n *= size
        out.append(flat.as_strided(shape, strides, flat.storage_offset() + start))
        start += n
    return out


_TABLES: dict = {}  # layer tables by their tensors' addresses and layouts (a few dozen kept)


def layer_table(weights, biases, norms, device) -> tuple:
    """(table, grad sizes): the layer table of _pack_kernel / _unpack_kernel (int64 [L, _FIELDS]
    on `device`) for the layers' weights [n, k] and biases (None: none), and per layer its eval
    BatchNorm (running_mean, running_var, gamma, beta, eps) or None; and the elements of each
    layer's gradients in the flat buffer _unpack_kernel fills (dW, then db where it has a bias).
    Made once per set of tensors: a table is a copy to the device."""
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    key = (device, tuple((ptr(w), tuple(w.shape), w.stride(), ptr(b)) for w, b in zip(weights, biases)),
           tuple(tuple(ptr(t) for t in bn[:4]) + (bn[4],) if bn is not None else None for bn in norms))
    found = _TABLES.get(key)
    if found is not None:
        return found
    rows, sizes, offset = [], [], 0
    for w, b, bn in zip(weights, biases, norms):
        n, k = w.shape
        mean, var, gamma, beta, eps = bn if bn is not None else (None, None, None, None, 0.0)
        eps_bits = struct.unpack("<q", struct.pack("<d", float(eps)))[0]
        rows.append([w.data_ptr(), w.stride(0), w.stride(1), n, k, ptr(b), ptr(mean), ptr(var), ptr(gamma), ptr(beta),
                     eps_bits, offset])
        sizes.append(n * k + (n if b is not None else 0))
        offset += sizes[-1]
    if len(_TABLES) >= 64:
        del _TABLES[next(iter(_TABLES))]
    found = _TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device), sizes
    return found


def _grid(L: int, H: int, K_in: int, N_out: int, block: int) -> tuple:
    """Programs of _pack_kernel / _unpack_kernel: per layer, chunks of its largest weight."""
    return L, min(64, launch.cdiv(max(H * K_in, H * H, N_out * H), block)), 1


_BN_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def mlp_pack(x, table, L: int, H: int, N_out: int, bn_dtype=None):
    """(flat, packed, bn): mlp_fwd's packed operands in one buffer of x's dtype (flat) and as
    its views (w_in, w_hid, w_out, b_hid, b_out), and with `bn_dtype` (the BatchNorm tensors'
    dtype) its fp32 eval BatchNorm vectors (bn_hid, bn_out), else None; from the layers' own
    tensors through `table` (layer_table), in one launch."""
    K_in = x.shape[1]
    shapes = packed_shapes(L, H, K_in, N_out)
    flat = x.new_empty(sum(math.prod(shape) for shape in shapes))
    bn = x.new_empty(3 * ((L - 1) * H + N_out), dtype=torch.float32) if bn_dtype is not None else None
    block = 1024 if not _interpreting() else 256
    launch.run(_pack_kernel, _grid(L, H, K_in, N_out, block), (table, flat, bn, L, H, K_in, N_out),
               (bn is not None, _BN_DTYPES[bn_dtype] if bn is not None else tl.float32, block), 4, 1)
    bn_views = (bn[:3 * (L - 1) * H].view(3, L - 1, H), bn[3 * (L - 1) * H:].view(3, N_out)) if bn is not None else None
    return flat, views(flat, shapes), bn_views


def mlp_fwd(x, w_in, w_hid, w_out, b_hid, b_out, bn_hid=None, bn_out=None, *, hid_relu=True, out_relu=False,
            store_z=False):
    """The whole chain in one launch. Returns (out [B, N_out], z [L-1, B, H] or None).

    Packed operands (the input dtype unless said): w_in [H, K_in], w_hid [L-2, H, H],
    w_out [N_out, H], b_hid [L-1, H], b_out [N_out]; hidden features past a layer's width
    zero. bn_hid [3, L-1, H] / bn_out [3, N_out] (fp32 center, scale, shift) fold eval
    BatchNorm in (both or neither). `store_z` keeps the hidden z_l for `mlp_bwd`.
    """
    M, K_in = x.shape
    H = w_in.shape[0]
    N_out = w_out.shape[0]
    L = w_hid.shape[0] + 2
    out = torch.empty((M, N_out), device=x.device, dtype=x.dtype)
    z = torch.empty((L - 1, M, H), device=x.device, dtype=x.dtype) if store_z else None
    block_m, block_k, block_n, num_warps, num_stages = _tiles(M, H, K_in, N_out, x.dtype)
    launch.run(
        _mlp_fwd_kernel, (launch.cdiv(M, block_m), 1, 1),
        (x, w_in, _placeholder(w_hid, w_in), w_out, b_hid, b_out, bn_hid, bn_out, z, out,
         M, K_in, N_out, L, x.stride(0), x.stride(1), out.stride(0), out.stride(1), M * H),
        (H, bn_hid is not None, store_z, hid_relu, out_relu, block_m, block_k, block_n, _precision(x.dtype)),
        num_warps, num_stages,
    )
    return out, z


def _programs(row_tiles: int) -> int:
    """Backward programs: each owns an fp32 slot of every weight gradient, so no more than
    the device runs at once (more would add slots, not speed)."""
    if _interpreting():
        return min(row_tiles, 4)  # fewer than the tiles at test sizes, to test the accumulation
    return min(row_tiles, num_sms())


def mlp_bwd(grad_out, x, z, out, w_in, w_hid, w_out, table, grad_size: int, *, hid_relu=True, out_relu=False,
            input_grad=True):
    """The backward of `mlp_fwd(..., store_z=True)` without BatchNorm, from the packed operands.

    Returns (grad_x or None, grads): grads flat [grad_size] in the input dtype, every layer's
    dW and db (where it has a bias) one after another, unpadded, as `table` (layer_table) says.
    Two launches: the backward into fp32 partials, one slot per program, then their sums.
    """
    M, K_in = x.shape
    H = w_in.shape[0]
    N_out = w_out.shape[0]
    L = w_hid.shape[0] + 2
    block_m, block_k, block_n, num_warps, num_stages = _tiles(M, H, K_in, N_out, x.dtype, backward=True)
    row_tiles = launch.cdiv(M, block_m)
    G = _programs(row_tiles)
    # slots start 16-element aligned, so the read-modify-writes of the partials load 16 bytes
    # at a time (every region in a slot starts at a multiple of H >= 16 elements)
    size = launch.cdiv(sum(math.prod(shape) for shape in packed_shapes(L, H, K_in, N_out)), 16) * 16
    part = torch.empty((G, size), device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if input_grad else None
    launch.run(
        _mlp_bwd_kernel, (G, 1, 1),
        (grad_out, out, x, z, w_in, _placeholder(w_hid, w_in), w_out, grad_x, part,
         M, K_in, N_out, L, row_tiles, size,
         grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1), x.stride(0), x.stride(1),
         *(grad_x.stride() if input_grad else (0, 0)), M * H),
        (H, hid_relu, out_relu, input_grad, block_m, block_k, block_n, _precision(x.dtype)),
        num_warps, num_stages,
    )
    grads = x.new_empty(grad_size)
    block = 1024 if not _interpreting() else 256
    launch.run(_unpack_kernel, _grid(L, H, K_in, N_out, block), (table, part, grads, G, size, L, H, K_in, N_out),
               (block,), 4, 1)
    return grad_x, grads
