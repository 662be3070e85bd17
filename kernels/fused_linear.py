"""Fused Linear -> BatchNorm1d -> activation [-> Dropout]: one GEMM core, specialised by
constexpr flags.

A chain of blocks l = 1..L, input a_0 = x (B x K_1):

    z_l = a_{l-1} @ W_l^T + b_l                    stored (the only B x N tensor kept per block)
    y_l = (z_l - center_l) * scale_l + shift_l     BatchNorm (y_l = z_l without it)
    a_l = drop_l(act_l(y_l))                       never stored; rebuilt from z_l when needed

`center, scale, shift` are per-feature fp32 vectors: with batch statistics center = mean,
scale = gamma * rstd, shift = beta (kernels/batchnorm.py makes them); in eval the same from
the running statistics. The centred form (z - mean) * scale + beta instead of
z * scale + (beta - mean * scale) keeps the precision when |mean| >> std. `act` is ReLU,
LeakyReLU, GELU (exact or tanh), SiLU, Tanh or none. `drop` is inverted dropout whose keep
mask comes from Philox keyed on (seed, row, feature): the same element draws the same number
in every kernel that rebuilds a_l, so the mask is never stored.

Forward, one kernel per block (`_linear_fwd_kernel`):
    prologue  A tile = a_{l-1} rebuilt from z_{l-1} in registers (block 1 reads x as is)
    epilogue  + b_l; store z_l; per row tile write the column mean and M2 of z_l (fp32,
              relative to the tile's first row) to [row_tiles, N] partial buffers, merged
              by Chan's formula in kernels/batchnorm.py.
              In eval the block's BatchNorm and activation are folded here instead, a_l stored.

Backward, with g_l = dL/da_l:
    g_y    = drop_l(g_l) * act_l'(y_l)           (ReLU: g_l where y_l > 0, as torch does)
    xhat   = (z - mean) * rstd
    dgamma = sum_rows g_y * xhat,   dbeta = sum_rows g_y
    g_z    = scale * g_y + u * (z - mean) + v,  u = -scale * rstd * dgamma / B,  v = -scale * dbeta / B
             (u = v = 0 with running statistics; g_z = g_y without BatchNorm)
    dW_l   = g_z^T @ a_{l-1},   db_l = sum_rows g_z,   g_{l-1} = g_z @ W_l
`_linear_dx_kernel` builds g_z in its prologue and applies block l-1's activation backward in
its epilogue, storing g_y of block l-1 with its column partials (sum g_y, sum g_y * xhat).
`_linear_dw_kernel` builds g_z^T and a_{l-1} in its two prologues; the batch is its
reduction axis, split into chunks whose fp32 partials are summed in a fixed order, and it
also sums g_z over rows for db. Nothing is reduced with atomics: two identical backward
passes are bitwise identical.

`_act_fwd_kernel` / `_act_bwd_kernel` handle a chain that ends on BatchNorm/activation
(no next GEMM to ride on): one elementwise pass each way.

Every site that applies a block's activation takes the same argument group:
    center_ptr, scale_ptr, shift_ptr   BatchNorm vectors (with HAS_BN)
    seed_ptr, drop_p, drop_scale       dropout: int64 seed on the device, p, 1 / (1 - p)
    slope                              LeakyReLU's negative slope
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# Activation codes (the host side uses ACTIVATIONS).
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "tanh": 6}
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_GELU = tl.constexpr(3)
ACT_GELU_TANH = tl.constexpr(4)
ACT_SILU = tl.constexpr(5)
ACT_TANH = tl.constexpr(6)

# How the A operand is transformed on its way into the dot.
A_PLAIN = tl.constexpr(0)   # as stored
A_ACT_K = tl.constexpr(1)   # a = act(z): features along the reduction axis (forward)
A_GRAD_K = tl.constexpr(2)  # g_z from g_y and z: features along the reduction axis (dX)
A_GRAD_M = tl.constexpr(3)  # g_z^T from g_y and z: features along the rows (dW)

SQRT_1_2 = tl.constexpr(0.7071067811865476)
SQRT_2_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(y):
    # 2 sigmoid(2y) - 1: tl has no tanh, and libdevice's does not run in the interpreter
    return 2.0 * tl.sigmoid(2.0 * y) - 1.0


@triton.jit
def _act_fn(y, slope, ACT: tl.constexpr):
    """act(y) in fp32."""
    if ACT == ACT_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not max(y, 0): NaN stays NaN, as in torch.relu
    elif ACT == ACT_LEAKY_RELU:
        y = tl.where(y < 0.0, y * slope, y)
    elif ACT == ACT_GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * SQRT_1_2))
    elif ACT == ACT_GELU_TANH:
        y = 0.5 * y * (1.0 + _tanh((y + 0.044715 * y * y * y) * SQRT_2_PI))
    elif ACT == ACT_SILU:
        y = y * tl.sigmoid(y)
    elif ACT == ACT_TANH:
        y = _tanh(y)
    return y


@triton.jit
def _act_backward(g, y, slope, ACT: tl.constexpr):
    """g * act'(y); ReLU and LeakyReLU select instead of multiplying, as torch does."""
    if ACT == ACT_RELU:
        g = tl.where(y <= 0.0, 0.0, g)  # torch's threshold_backward: a NaN y passes g through
    elif ACT == ACT_LEAKY_RELU:
        g = tl.where(y > 0.0, g, g * slope)
    elif ACT == ACT_GELU:
        g *= 0.5 * (1.0 + tl.math.erf(y * SQRT_1_2)) + y * INV_SQRT_2PI * tl.exp(-0.5 * y * y)
    elif ACT == ACT_GELU_TANH:
        t = _tanh((y + 0.044715 * y * y * y) * SQRT_2_PI)
        g *= 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * SQRT_2_PI * (1.0 + 3.0 * 0.044715 * y * y)
    elif ACT == ACT_SILU:
        sig = tl.sigmoid(y)
        g *= sig * (1.0 + y * (1.0 - sig))
    elif ACT == ACT_TANH:
        t = _tanh(y)
        g *= 1.0 - t * t
    return g


@triton.jit
def _dropout(a, rows, cols, seed_ptr, drop_p, drop_scale, DROPOUT: tl.constexpr):
    """a * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn by Philox at (seed, row, col).

    Multiplies rather than selects, so NaN and Inf propagate as in torch's dropout.
    """
    if DROPOUT:
        seed = tl.load(seed_ptr)
        row_ids = (rows[:, None] + 0 * cols[None, :]).to(tl.uint32)
        col_ids = (0 * rows[:, None] + cols[None, :]).to(tl.uint32)
        bits, _, _, _ = tl.philox(seed, row_ids, col_ids, 0, 0)
        keep = tl.random.uint_to_uniform_float(bits) >= drop_p
        a = a * tl.where(keep, drop_scale, 0.0)
    return a


@triton.jit
def _act_vectors(center_ptr, scale_ptr, shift_ptr, offs, mask, HAS_BN: tl.constexpr):
    """center, scale, shift at feature indices `offs`, as [1, BLOCK] rows (unused without BN)."""
    center = 0.0
    scale = 1.0
    shift = 0.0
    if HAS_BN:
        center = tl.load(center_ptr + offs, mask=mask, other=0.0)[None, :]
        scale = tl.load(scale_ptr + offs, mask=mask, other=1.0)[None, :]
        shift = tl.load(shift_ptr + offs, mask=mask, other=0.0)[None, :]
    return center, scale, shift


@triton.jit
def _bn(z, center, scale, shift, HAS_BN: tl.constexpr):
    """y = (z - center) * scale + shift in fp32 (z without BatchNorm)."""
    if HAS_BN:
        z = (z - center) * scale + shift
    return z


@triton.jit
def _activate(z, rows, cols, center, scale, shift, seed_ptr, drop_p, drop_scale, slope,
              HAS_BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr):
    """a = drop(act(bn(z))) for a [rows, cols] tile of z in fp32."""
    a = _act_fn(_bn(z, center, scale, shift, HAS_BN), slope, ACT)
    return _dropout(a, rows, cols, seed_ptr, drop_p, drop_scale, DROPOUT)


@triton.jit
def _bn_grad(g_y, z, center, scale, u, v, BATCH_STATS: tl.constexpr):
    """g_z = scale * g_y + u * (z - center) + v, in fp32 (u = v = 0 with running stats)."""
    g_z = g_y * scale
    if BATCH_STATS:
        g_z += u * (z - center) + v
    return g_z


@triton.jit
def _tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row-tile index and the row and column indices of its output tile."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, offs_m, offs_n


@triton.jit
def _gemm_core(
    # A operand [M, K] and, for the A_GRAD modes, the z of the same shape and strides
    a_ptr, za_ptr, stride_am, stride_ak,
    # B operand [K, N]
    b_ptr, stride_bk, stride_bn,
    # A's transform: activation site (A_ACT_K) or BN backward center/scale/u/v (A_GRAD_*)
    a_center_ptr, a_scale_ptr, a_shift_ptr, a_seed_ptr, a_drop_p, a_drop_scale, a_slope, a_u_ptr, a_v_ptr,
    # B's transform: activation site of the features along N
    b_center_ptr, b_scale_ptr, b_shift_ptr, b_seed_ptr, b_drop_p, b_drop_scale, b_slope,
    # tile coordinates and sizes
    offs_m, offs_n, M, N, k_start, k_end,
    # meta-parameters
    A_MODE: tl.constexpr, A_BN: tl.constexpr, A_ACT: tl.constexpr, A_DROPOUT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    B_MODE: tl.constexpr, B_BN: tl.constexpr, B_ACT: tl.constexpr, B_DROPOUT: tl.constexpr,
    ROW_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc = T_A(A)[offs_m, k_start:k_end] @ T_B(B)[k_start:k_end, offs_n] in fp32.

    B_MODE is A_PLAIN or A_ACT_K (B's activation, features along N). Also returns the row sums
    of T_A(A) over the same k range when ROW_SUM (db in dW). Masked-out elements are zeroed
    after the transform: act(0) is act(shift), not 0.
    """
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    # Vectors indexed by rows or columns of the tile are loaded once, outside the k loop.
    if A_MODE == A_GRAD_M:
        am_center = tl.load(a_center_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        am_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        am_u = 0.0
        am_v = 0.0
        if BATCH_STATS:
            am_u = tl.load(a_u_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
            am_v = tl.load(a_v_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if B_MODE == A_ACT_K:
        bn_center, bn_scale, bn_shift = _act_vectors(b_center_ptr, b_scale_ptr, b_shift_ptr, offs_n, mask_n, B_BN)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a_mask = mask_m[:, None] & mask_k[None, :]
        a_offs = rows[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        if A_MODE != A_PLAIN:
            a32 = a.to(tl.float32)
            if A_MODE == A_ACT_K:
                center, scale, shift = _act_vectors(a_center_ptr, a_scale_ptr, a_shift_ptr, offs_k, mask_k, A_BN)
                a32 = _activate(a32, offs_m, offs_k, center, scale, shift, a_seed_ptr, a_drop_p, a_drop_scale,
                                a_slope, A_BN, A_ACT, A_DROPOUT)
            else:
                z = tl.load(za_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
                if A_MODE == A_GRAD_K:
                    center = tl.load(a_center_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                    scale = tl.load(a_scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                    u = 0.0
                    v = 0.0
                    if BATCH_STATS:
                        u = tl.load(a_u_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                        v = tl.load(a_v_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                    a32 = _bn_grad(a32, z, center, scale, u, v, BATCH_STATS)
                else:
                    a32 = _bn_grad(a32, z, am_center, am_scale, am_u, am_v, BATCH_STATS)
            a32 = tl.where(a_mask, a32, 0.0)
            a = a32.to(a_ptr.dtype.element_ty)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b_mask = mask_k[:, None] & mask_n[None, :]
        b_offs = offs_k.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
        b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        if B_MODE == A_ACT_K:
            b32 = _activate(b.to(tl.float32), offs_k, offs_n, bn_center, bn_scale, bn_shift, b_seed_ptr, b_drop_p,
                            b_drop_scale, b_slope, B_BN, B_ACT, B_DROPOUT)
            b = tl.where(b_mask, b32, 0.0).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc, row_sum


@triton.jit
def _grad_epilogue(
    g, offs_m, offs_n, M, N, pid_m,
    z_ptr, stride_zm, stride_zn, center_ptr, scale_ptr, shift_ptr, seed_ptr, drop_p, drop_scale, slope, rstd_ptr,
    g_ptr, stride_gm, stride_gn, g_sum_part_ptr, g_xhat_part_ptr,
    HAS_BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
):
    """g_y = act'(y) * drop(g) for g = dL/da; store g_y and, with BatchNorm, its column
    partials sum(g_y) and sum(g_y * xhat) for this row tile (fp32, [row_tiles, N])."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    g = _dropout(g, offs_m, offs_n, seed_ptr, drop_p, drop_scale, DROPOUT)
    if HAS_BN or ACT != ACT_NONE:
        z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=mask, other=0.0).to(tl.float32)
        center, scale, shift = _act_vectors(center_ptr, scale_ptr, shift_ptr, offs_n, mask_n, HAS_BN)
        # the forward's expression, so y (and a ReLU mask) is the forward's exactly
        g = _act_backward(g, _bn(z, center, scale, shift, HAS_BN), slope, ACT)
    g_out = g.to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + rows * stride_gm + cols * stride_gn, g_out, mask=mask)
    if HAS_BN:
        # statistics of the rounded values actually stored, as eager computes them
        g_y = tl.where(mask, g_out.to(tl.float32), 0.0)
        rstd = tl.load(rstd_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        xhat = (z - center) * rstd
        tl.store(g_sum_part_ptr + pid_m * N + offs_n, tl.sum(g_y, axis=0), mask=mask_n)
        tl.store(g_xhat_part_ptr + pid_m * N + offs_n, tl.sum(g_y * xhat, axis=0), mask=mask_n)


@triton.jit
def _linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, z_ptr, bias_ptr,
    shift_part_ptr, mean_part_ptr, m2_part_ptr,    # [row_tiles, N] column partials of z
    # the previous block's activation, applied to x on load
    in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    # this block's BatchNorm and activation folded in the epilogue (eval)
    out_center_ptr, out_scale_ptr, out_shift_ptr, out_slope,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_zm, stride_zn,
    # meta-parameters
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_BN: tl.constexpr, OUT_ACT: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """z = act_in(x) @ W^T + b (or its eval-mode activation), plus column partials of z."""
    pid_m, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    acc, _ = _gemm_core(
        x_ptr, x_ptr, stride_xm, stride_xk,
        w_ptr, stride_wk, stride_wn,
        in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, None, None,
        None, None, None, None, 0.0, 0.0, 0.0,
        offs_m, offs_n, M, N, 0, K,
        IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, False,
        A_PLAIN, False, ACT_NONE, False, False,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if OUT_BN or OUT_ACT != ACT_NONE:
        center, scale, shift = _act_vectors(out_center_ptr, out_scale_ptr, out_shift_ptr, offs_n, mask_n, OUT_BN)
        acc = _act_fn(_bn(acc, center, scale, shift, OUT_BN), out_slope, OUT_ACT)
    z = acc.to(z_ptr.dtype.element_ty)
    z_offs = offs_m.to(tl.int64)[:, None] * stride_zm + offs_n.to(tl.int64)[None, :] * stride_zn
    tl.store(z_ptr + z_offs, z, mask=mask)
    if STATS:
        # Per-tile mean and M2 of the stored (rounded) z, merged across tiles by Chan's
        # formula: no E[z^2] - E[z]^2 cancellation. Both are taken relative to the tile's
        # first row, so a large common offset (|mean| >> std) costs no precision either.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        z32 = z.to(tl.float32)
        shift = tl.sum(tl.where((offs_m == pid_m * BLOCK_M)[:, None], z32, 0.0), axis=0)
        diff = tl.where(mask, z32 - shift[None, :], 0.0)
        mean = tl.sum(diff, axis=0) / count
        dev = tl.where(mask, diff - mean[None, :], 0.0)
        tl.store(shift_part_ptr + pid_m * N + offs_n, shift, mask=mask_n)
        tl.store(mean_part_ptr + pid_m * N + offs_n, mean, mask=mask_n)
        tl.store(m2_part_ptr + pid_m * N + offs_n, tl.sum(dev * dev, axis=0), mask=mask_n)


@triton.jit
def _linear_dx_kernel(
    # pointers
    g_y_ptr, z_ptr, w_ptr, g_in_ptr,              # g_in = g_z @ W, through the previous block's act'
    center_ptr, scale_ptr, u_ptr, v_ptr,          # this block's BN backward coefficients
    g_sum_part_ptr, g_xhat_part_ptr,              # [row_tiles, N] partials of the stored g_in
    # the previous block: its z and activation site, and rstd for xhat
    z_in_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    in_rstd_ptr,
    # sizes: M = batch, N = in_features, K = out_features
    M, N, K,
    # strides (g_y and z share theirs)
    stride_gm, stride_gk, stride_wk, stride_wn, stride_im, stride_in, stride_zim, stride_zin,
    # meta-parameters
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
    IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """g_y of the previous block = act_in'(g_z @ W), g_z built from g_y and z on load."""
    pid_m, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    acc, _ = _gemm_core(
        g_y_ptr, z_ptr, stride_gm, stride_gk,
        w_ptr, stride_wk, stride_wn,
        center_ptr, scale_ptr, None, None, 0.0, 0.0, 0.0, u_ptr, v_ptr,
        None, None, None, None, 0.0, 0.0, 0.0,
        offs_m, offs_n, M, N, 0, K,
        A_GRAD_K if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
        A_PLAIN, False, ACT_NONE, False, False,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    _grad_epilogue(
        acc, offs_m, offs_n, M, N, pid_m,
        z_in_ptr, stride_zim, stride_zin, in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p,
        in_drop_scale, in_slope, in_rstd_ptr,
        g_in_ptr, stride_im, stride_in, g_sum_part_ptr, g_xhat_part_ptr,
        IN_BN, IN_ACT, IN_DROPOUT,
    )


@triton.jit
def _linear_dw_kernel(
    # pointers
    g_y_ptr, z_ptr, x_ptr, dw_ptr, db_part_ptr,
    center_ptr, scale_ptr, u_ptr, v_ptr,          # this block's BN backward (features = rows of dW)
    # the previous block's activation site, applied to x (features = cols of dW)
    in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    # sizes: M = out_features, N = in_features, B = batch, split into chunks of ROWS_PER_SPLIT
    M, N, B, ROWS_PER_SPLIT,
    # strides (g_y and z share theirs)
    stride_gb, stride_gm, stride_xb, stride_xn, stride_ds, stride_dm, stride_dn,
    # meta-parameters
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[split] = g_z^T @ act_in(x) over one chunk of the batch; db[split] = its row sums."""
    _, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    pid_s = tl.program_id(2)
    k_start = pid_s * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, B)
    acc, row_sum = _gemm_core(
        g_y_ptr, z_ptr, stride_gm, stride_gb,
        x_ptr, stride_xb, stride_xn,
        center_ptr, scale_ptr, None, None, 0.0, 0.0, 0.0, u_ptr, v_ptr,
        in_center_ptr, in_scale_ptr, in_shift_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
        offs_m, offs_n, M, N, k_start, k_end,
        A_GRAD_M if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
        IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, HAS_BIAS,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    d_offs = pid_s * stride_ds + offs_m.to(tl.int64)[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(dw_ptr + d_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(db_part_ptr + pid_s * M + offs_m, row_sum, mask=mask_m)


@triton.jit
def _act_fwd_kernel(
    z_ptr, a_ptr, center_ptr, scale_ptr, shift_ptr, seed_ptr, drop_p, drop_scale, slope,
    M, N, stride_zm, stride_zn, stride_am, stride_an,
    BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """a = act(z) for the last block of a chain (nothing after it to fuse into)."""
    _, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    z = tl.load(z_ptr + rows * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
    center, scale, shift = _act_vectors(center_ptr, scale_ptr, shift_ptr, offs_n, mask_n, BN)
    a = _activate(z.to(tl.float32), offs_m, offs_n, center, scale, shift, seed_ptr, drop_p, drop_scale, slope,
                  BN, ACT, DROPOUT)
    tl.store(a_ptr + rows * stride_am + offs_n[None, :] * stride_an, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    g_ptr, z_ptr, g_y_ptr, center_ptr, scale_ptr, shift_ptr, seed_ptr, drop_p, drop_scale, slope, rstd_ptr,
    g_sum_part_ptr, g_xhat_part_ptr,
    M, N, stride_gm, stride_gn, stride_zm, stride_zn, stride_ym, stride_yn,
    BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g_y = act'(y) * drop(dL/da) and its column partials, for the last block of a chain."""
    pid_m, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    g_offs = offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    _grad_epilogue(
        g, offs_m, offs_n, M, N, pid_m,
        z_ptr, stride_zm, stride_zn, center_ptr, scale_ptr, shift_ptr, seed_ptr, drop_p, drop_scale, slope, rstd_ptr,
        g_y_ptr, stride_ym, stride_yn, g_sum_part_ptr, g_xhat_part_ptr,
        BN, ACT, DROPOUT,
    )


# ---------------------------------------------------------------- launchers


class Act(NamedTuple):
    """A block's activation a = drop(act((z - center) * scale + shift)), and what its
    backward needs.

    The vectors are fp32 of the block's width (None without BatchNorm); `rstd` turns z into
    xhat; `z` is the block's stored pre-BN output (None where not kept, e.g. in eval). `act`
    is a code from ACTIVATIONS (a bool works: True is ReLU); `seed` is an int64 device tensor
    keying the dropout mask, used when `drop_p` > 0.
    """
    z: Optional[torch.Tensor]
    center: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    rstd: Optional[torch.Tensor]
    bn: bool
    act: int
    slope: float = 0.0
    drop_p: float = 0.0
    seed: Optional[torch.Tensor] = None

    @property
    def identity(self) -> bool:
        return not (self.bn or self.act or self.drop_p)


class BNGrad(NamedTuple):
    """A block's BatchNorm backward: g_z = scale * g_y + u * (z - center) + v (u, v only
    with batch statistics)."""
    center: torch.Tensor
    scale: torch.Tensor
    u: Optional[torch.Tensor]
    v: Optional[torch.Tensor]

    @property
    def batch_stats(self) -> bool:
        return self.u is not None


NO_ACT = Act(None, None, None, None, None, False, 0)
NO_BN_GRAD = BNGrad(None, None, None, None)


def _drop_scale(p: float) -> float:
    """1 / (1 - p), the factor kept elements are scaled by (0 when everything is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _site(act: Act) -> tuple:
    """The runtime arguments of an activation site, in kernel order."""
    return act.center, act.scale, act.shift, act.seed, float(act.drop_p), _drop_scale(act.drop_p), float(act.slope)


def _site_flags(act: Act, prefix: str) -> dict:
    """The constexpr flags of an activation site."""
    return {f"{prefix}BN": act.bn, f"{prefix}ACT": int(act.act), f"{prefix}DROPOUT": act.drop_p > 0}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def num_sms() -> int:
    """The current device's SM count, asked of Triton's active driver (a stand-in driver
    answers for a GPU that isn't there: bench/standin.py)."""
    driver = triton.runtime.driver.active
    return driver.utils.get_device_properties(driver.get_current_device())["multiprocessor_count"]


def _precision(dtype: torch.dtype) -> str:
    # fp32 honours torch's matmul precision: "highest" means exact fp32 products.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _tiles(M: int, N: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M x N output."""
    if _interpreting():
        return 32, 32, 32, 4, 1  # small tiles, so small test shapes still cross tile edges
    block_m = 128 if M >= 2048 else 64
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    block_k = 32 if dtype == torch.float32 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps, 3


def _partials(row_tiles: int, N: int, device, count: int):
    return tuple(torch.empty((row_tiles, N), device=device, dtype=torch.float32) for _ in range(count))


def linear_fwd(x, weight, bias, act_in: Act = NO_ACT, act_out: Act = NO_ACT, stats: bool = False):
    """z = act_in(x) @ weight^T + bias, or act_out(z) (eval: BatchNorm and activation folded
    in; act_out's dropout is not applied).

    Returns (z, partials, tile_rows): with `stats`, partials are the per-row-tile column
    shift (first row's z), mean and M2 of z - shift (fp32 [row_tiles, N]) that
    `batchnorm.bn_stats` merges.
    """
    M, K = x.shape
    N = weight.shape[0]
    z = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, N, x.dtype)
    row_tiles = triton.cdiv(M, block_m)
    parts = _partials(row_tiles, N, x.device, 3) if stats else (None, None, None)
    _linear_fwd_kernel[(row_tiles, triton.cdiv(N, block_n))](
        x, weight, z, bias, *parts,
        *_site(act_in),
        act_out.center, act_out.scale, act_out.shift, float(act_out.slope),
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
        IN_MODE=A_PLAIN if act_in.identity else A_ACT_K, **_site_flags(act_in, "IN_"),
        HAS_BIAS=bias is not None, OUT_BN=act_out.bn, OUT_ACT=int(act_out.act), STATS=stats,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return z, (parts if stats else None), block_m


def linear_dx(g_y, z, weight, bn: Optional[BNGrad], act_in: Act = NO_ACT):
    """The previous block's g_y = act_in's backward applied to g_z @ weight.

    g_z is built on load from this block's g_y and z (`bn`, or g_z = g_y without BatchNorm).
    Returns (g_y_in, partials, tile_rows): with BatchNorm in `act_in`, partials are the
    per-row-tile column sums of g_y_in and g_y_in * xhat_in for `batchnorm.bn_grad`.
    """
    M, K = g_y.shape
    N = weight.shape[1]
    g_in = torch.empty((M, N), device=g_y.device, dtype=g_y.dtype)
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, N, g_y.dtype)
    row_tiles = triton.cdiv(M, block_m)
    parts = _partials(row_tiles, N, g_y.device, 2) if act_in.bn else (None, None)
    z_in = act_in.z if act_in.z is not None else g_in  # unused without act_in
    bn = bn if bn is not None else NO_BN_GRAD
    _linear_dx_kernel[(row_tiles, triton.cdiv(N, block_n))](
        g_y, z, weight, g_in,
        bn.center, bn.scale, bn.u, bn.v,
        *parts,
        act_in.z, *_site(act_in), act_in.rstd,
        M, N, K,
        g_y.stride(0), g_y.stride(1), weight.stride(0), weight.stride(1),
        g_in.stride(0), g_in.stride(1), z_in.stride(0), z_in.stride(1),
        HAS_BN=bn.center is not None, BATCH_STATS=bn.batch_stats, **_site_flags(act_in, "IN_"),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(g_y.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return g_in, (parts if act_in.bn else None), block_m


def _batch_splits(B: int, tiles: int, block_k: int) -> int:
    """How many chunks the dW reduction over the batch is split into: enough programs to
    fill the device, each chunk still a long run of BLOCK_K steps."""
    if _interpreting():
        return triton.cdiv(B, 4 * block_k)  # several chunks at test sizes, to test the split
    target = 2 * num_sms()
    return max(1, min(triton.cdiv(target, tiles), triton.cdiv(B, 8 * block_k)))


def linear_dw(g_y, z, x, bn: Optional[BNGrad], act_in: Act = NO_ACT, has_bias: bool = True):
    """dW = g_z^T @ act_in(x) and db = sum_rows g_z (None without `has_bias`).

    The batch is split into chunks with fp32 partials summed in chunk order (deterministic).
    """
    B, M = g_y.shape
    N = x.shape[1]
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, N, g_y.dtype)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = _batch_splits(B, tiles, block_k)
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), block_k) * block_k
    splits = triton.cdiv(B, rows_per_split)
    dw_dtype = g_y.dtype if splits == 1 else torch.float32
    dw = torch.empty((splits, M, N), device=g_y.device, dtype=dw_dtype)
    db = torch.empty((splits, M), device=g_y.device, dtype=torch.float32) if has_bias else None
    bn = bn if bn is not None else NO_BN_GRAD
    _linear_dw_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)](
        g_y, z, x, dw, db,
        bn.center, bn.scale, bn.u, bn.v,
        *_site(act_in),
        M, N, B, rows_per_split,
        g_y.stride(0), g_y.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        HAS_BN=bn.center is not None, BATCH_STATS=bn.batch_stats,
        IN_MODE=A_PLAIN if act_in.identity else A_ACT_K, **_site_flags(act_in, "IN_"), HAS_BIAS=has_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(g_y.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    dw = dw[0] if splits == 1 else dw.sum(0).to(g_y.dtype)
    if db is not None:
        db = db.sum(0).to(g_y.dtype)
    return dw, db


def _elementwise_tiles(M: int, N: int):
    block_n = min(128, triton.next_power_of_2(N))
    return (32 if _interpreting() else max(16, 4096 // block_n)), block_n


def act_fwd(act: Act):
    """a = act(act.z) for a chain's last block."""
    z = act.z
    M, N = z.shape
    a = torch.empty_like(z)
    block_m, block_n = _elementwise_tiles(M, N)
    _act_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        z, a, *_site(act),
        M, N, z.stride(0), z.stride(1), a.stride(0), a.stride(1),
        **_site_flags(act, ""), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return a


def act_bwd(grad, act: Act):
    """g_y = the backward of `act` applied to grad = dL/da, for a chain's last block.

    Returns (g_y, partials, tile_rows) as `linear_dx` does.
    """
    M, N = grad.shape
    g_y = torch.empty((M, N), device=grad.device, dtype=grad.dtype)
    block_m, block_n = _elementwise_tiles(M, N)
    row_tiles = triton.cdiv(M, block_m)
    parts = _partials(row_tiles, N, grad.device, 2) if act.bn else (None, None)
    _act_bwd_kernel[(row_tiles, triton.cdiv(N, block_n))](
        grad, act.z, g_y, *_site(act), act.rstd,
        *parts,
        M, N, grad.stride(0), grad.stride(1), act.z.stride(0), act.z.stride(1), g_y.stride(0), g_y.stride(1),
        **_site_flags(act, ""), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return g_y, (parts if act.bn else None), block_m


@triton.jit
def _dropout_scale_kernel(seed_ptr, out_ptr, M, N, drop_p, drop_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _, offs_m, offs_n = _tile(BLOCK_M, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ones = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    keep = _dropout(ones, offs_m, offs_n, seed_ptr, drop_p, drop_scale, True)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], keep, mask=mask)


def dropout_scale(seed, M: int, N: int, p: float):
    """The [M, N] fp32 factors (0 or 1 / (1 - p)) that the kernels' dropout with `seed`
    multiplies an [M, N] activation by: for tests and for inspecting a fused forward."""
    out = torch.empty((M, N), device=seed.device, dtype=torch.float32)
    block_m, block_n = _elementwise_tiles(M, N)
    _dropout_scale_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        seed, out, M, N, float(p), _drop_scale(p), BLOCK_M=block_m, BLOCK_N=block_n)
    return out
