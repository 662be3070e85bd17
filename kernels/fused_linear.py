"""Fused Linear -> BatchNorm1d -> activation [-> Dropout]: one GEMM core, specialised by
constexpr flags, two launches per block per training step.

A chain of blocks l = 1..L, input a_0 = x (B x K_1):

    z_l = a_{l-1} @ W_l^T + b_l                    stored (the only B x N tensor kept per block)
    y_l = (z_l - center_l) * scale_l + shift_l     BatchNorm (y_l = z_l without it)
    a_l = drop_l(act_l(y_l))                       never stored; rebuilt from z_l when needed

`center, scale, shift` are per-feature fp32 rows of the block's vector buffer (kernels/
batchnorm.py): with batch statistics center = mean, scale = gamma * rstd, shift = beta; in eval
the same from the running statistics. The centred form (z - mean) * scale + beta instead of
z * scale + (beta - mean * scale) keeps the precision when |mean| >> std. `act` is ReLU,
LeakyReLU, GELU (exact or tanh), SiLU, Tanh or none. `drop` is inverted dropout whose keep
mask comes from Philox keyed on (seed, row, feature): the same element draws the same number
in every kernel that rebuilds a_l, so the mask is never stored.

Forward, one launch per block (`_linear_fwd_kernel`):
    prologue  A tile = a_{l-1} rebuilt from z_{l-1} in registers (block 1 reads x as is)
    epilogue  + b_l; store z_l; per row tile the column mean and M2 of z_l; the last program of
              each column tile merges them into the block's vectors and updates the running
              statistics (batchnorm.py). In eval the row-tile-0 programs write the vectors
              from the running statistics. The next block's prologue reads them.

Backward, with g_l = dL/da_l:
    g_y    = drop_l(g_l) * act_l'(y_l)           (ReLU: g_l where y_l > 0, as torch does)
    xhat   = (z - mean) * rstd
    dgamma = sum_rows g_y * xhat,   dbeta = sum_rows g_y
    g_z    = scale * g_y + u * (z - mean) + v,  u = -scale * rstd * dgamma / B,  v = -scale * dbeta / B
             (u = v = 0 with running statistics; g_z = g_y without BatchNorm)
    dW_l   = g_z^T @ a_{l-1},   db_l = sum_rows g_z,   g_{l-1} = g_z @ W_l
One launch per block (`_linear_bwd_kernel`) runs two independent grids side by side:
    dX programs  g_z @ W_l with g_z built on load from g_y_l and z_l; the epilogue applies block
                 l-1's activation backward, stores g_y_{l-1} and its column partials, and the last
                 program of each column tile finalises block l-1's dgamma, dbeta, u and v.
    dW programs  g_z^T @ a_{l-1} with both operands built on load; the batch is the reduction
                 axis, split into chunks whose fp32 partials the last program of each tile sums
                 in chunk order (db from the row sums of g_z). One chunk writes dW directly.
A chain that ends on BatchNorm/activation (no next GEMM to ride on) adds one elementwise kernel
each way (`_act_fwd_kernel`, `_act_bwd_kernel`).

"Last program" is decided by a ticket counter (batchnorm._ticket) in a persistent, self-
resetting int32 buffer, and the merges run in a fixed order: no atomics touch data, so two
identical backward passes are bitwise identical, and no PyTorch op runs between the kernels.

Every site that applies a block's activation takes the same argument group:
    vec_ptr                            BatchNorm vectors (with BN)
    seed_ptr, drop_p, drop_scale       dropout: int64 seed on the device, p, 1 / (1 - p)
    slope                              LeakyReLU's negative slope
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import launch
from .batchnorm import (VEC_CENTER, VEC_ROWS, VEC_RSTD, VEC_SCALE, VEC_SHIFT, _finalize_grad, _finalize_stats,
                        _fixed_vectors, _grad_partials, _stats_partials, _ticket)

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
def _times_cdf(y, cdf):
    """y * cdf, with cdf a distribution function of y (GELU, SiLU): its limit 0 where cdf is
    0 (y = -inf, or so negative that cdf underflows), not -inf * 0 = NaN."""
    return tl.where(cdf == 0.0, 0.0, y * cdf)


@triton.jit
def _act_fn(y, slope, ACT: tl.constexpr):
    """act(y) in fp32."""
    if ACT == ACT_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not max(y, 0): NaN stays NaN, as in torch.relu
    elif ACT == ACT_LEAKY_RELU:
        y = tl.where(y < 0.0, y * slope, y)
    elif ACT == ACT_GELU:
        y = _times_cdf(y, 0.5 * (1.0 + tl.math.erf(y * SQRT_1_2)))
    elif ACT == ACT_GELU_TANH:
        y = _times_cdf(y, 0.5 * (1.0 + _tanh((y + 0.044715 * y * y * y) * SQRT_2_PI)))
    elif ACT == ACT_SILU:
        y = _times_cdf(y, tl.sigmoid(y))
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
def _vec_row(vec_ptr, row, N, offs, mask, other, AXIS: tl.constexpr):
    """Row `row` of a BatchNorm block's `vec` at features `offs`, shaped to broadcast along
    the tile's axis AXIS (1: features run along the columns, 0: along the rows)."""
    v = tl.load(vec_ptr + row * N + offs, mask=mask, other=other)
    if AXIS == 1:
        v = v[None, :]
    else:
        v = v[:, None]
    return v


@triton.jit
def _site_vectors(vec_ptr, N, offs, mask, HAS_BN: tl.constexpr, AXIS: tl.constexpr):
    """center, scale, shift of a BatchNorm block's `vec` at features `offs` (unused without BN)."""
    center = 0.0
    scale = 1.0
    shift = 0.0
    if HAS_BN:
        center = _vec_row(vec_ptr, VEC_CENTER, N, offs, mask, 0.0, AXIS)
        scale = _vec_row(vec_ptr, VEC_SCALE, N, offs, mask, 1.0, AXIS)
        shift = _vec_row(vec_ptr, VEC_SHIFT, N, offs, mask, 0.0, AXIS)
    return center, scale, shift


@triton.jit
def _grad_vectors(vec_ptr, uv_ptr, N, offs, mask, BATCH_STATS: tl.constexpr, AXIS: tl.constexpr):
    """center, scale of a BatchNorm block's `vec` and u, v of its `uv` at features `offs`
    (u = v = 0 without batch statistics)."""
    center = _vec_row(vec_ptr, VEC_CENTER, N, offs, mask, 0.0, AXIS)
    scale = _vec_row(vec_ptr, VEC_SCALE, N, offs, mask, 0.0, AXIS)
    u = 0.0
    v = 0.0
    if BATCH_STATS:
        u = _vec_row(uv_ptr, 0, N, offs, mask, 0.0, AXIS)
        v = _vec_row(uv_ptr, 1, N, offs, mask, 0.0, AXIS)
    return center, scale, u, v


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



# A BatchNorm block's statistics, as the epilogue of the GEMM producing its z handles them.
BN_NONE = tl.constexpr(0)      # no BatchNorm
BN_BATCH = tl.constexpr(1)     # batch statistics, finalised in the kernel (and running stats updated)
BN_FIXED = tl.constexpr(2)     # running statistics (eval): vectors written by row-tile-0 programs
BN_PARTIALS = tl.constexpr(3)  # batch statistics left as partials: merged across ranks on the host


@triton.jit
def _wide(n):
    """n as an int64 scalar: an integer argument may arrive as a constexpr (Triton specialises
    the value 1), which has no .to()."""
    return n + tl.zeros((), dtype=tl.int64)


@triton.jit
def _gemm_core(
    # A [M, K] (and, in the A_GRAD modes, the z of the same shape and strides) and its transform:
    # an activation site (A_ACT_K) or a BatchNorm backward (A_GRAD_*: u, v from a_uv)
    a_ptr, za_ptr, stride_am, stride_ak, a_vec_ptr, a_uv_ptr, a_seed_ptr, a_drop_p, a_drop_scale, a_slope,
    # B [K, N] and its activation site (features along N)
    b_ptr, stride_bk, stride_bn, b_vec_ptr, b_seed_ptr, b_drop_p, b_drop_scale, b_slope,
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

    In the A_*_K modes the features run along K and number k_end (k_start = 0); in A_GRAD_M
    they run along M. B_MODE is A_PLAIN or A_ACT_K (B's activation, N features). Also returns
    the row sums of T_A(A) over the k range when ROW_SUM (db in dW). Masked-out elements are
    zeroed after the transform: act(0) is act(shift), not 0.
    """
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    # Vectors indexed by rows or columns of the tile are loaded once, outside the k loop.
    if A_MODE == A_GRAD_M:
        m_center, m_scale, m_u, m_v = _grad_vectors(a_vec_ptr, a_uv_ptr, M, offs_m, mask_m, BATCH_STATS, 0)
    if B_MODE == A_ACT_K:
        n_center, n_scale, n_shift = _site_vectors(b_vec_ptr, N, offs_n, mask_n, B_BN, 1)

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
                center, scale, shift = _site_vectors(a_vec_ptr, k_end, offs_k, mask_k, A_BN, 1)
                a32 = _activate(a32, offs_m, offs_k, center, scale, shift, a_seed_ptr, a_drop_p, a_drop_scale,
                                a_slope, A_BN, A_ACT, A_DROPOUT)
            else:
                z = tl.load(za_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
                if A_MODE == A_GRAD_K:
                    center, scale, u, v = _grad_vectors(a_vec_ptr, a_uv_ptr, k_end, offs_k, mask_k, BATCH_STATS, 1)
                    a32 = _bn_grad(a32, z, center, scale, u, v, BATCH_STATS)
                else:
                    a32 = _bn_grad(a32, z, m_center, m_scale, m_u, m_v, BATCH_STATS)
            a32 = tl.where(a_mask, a32, 0.0)
            a = a32.to(a_ptr.dtype.element_ty)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b_mask = mask_k[:, None] & mask_n[None, :]
        b_offs = offs_k.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
        b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        if B_MODE == A_ACT_K:
            b32 = _activate(b.to(tl.float32), offs_k, offs_n, n_center, n_scale, n_shift, b_seed_ptr, b_drop_p,
                            b_drop_scale, b_slope, B_BN, B_ACT, B_DROPOUT)
            b = tl.where(b_mask, b32, 0.0).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc, row_sum


@triton.jit
def _grad_epilogue(
    g, offs_m, offs_n, M, N, pid_m, pid_n, row_tiles,
    # the block whose g_y this is: z, activation site, BatchNorm gradients (dgamma, dbeta, uv)
    z_ptr, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr, dbeta_ptr, uv_ptr,
    # outputs: g_y [M, N] (contiguous), column partials, tickets
    g_ptr, part_ptr, ticket_ptr,
    BN_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """g_y = act'(y) * drop(g) for g = dL/da: store it and, with BatchNorm, its column partials
    sum(g_y) and sum(g_y * xhat); the last row tile of each column tile finalises dgamma,
    dbeta, u and v (not for BN_PARTIALS: the host merges those across ranks)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    g_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    g = _dropout(g, offs_m, offs_n, seed_ptr, drop_p, drop_scale, DROPOUT)
    HAS_BN: tl.constexpr = BN_MODE != BN_NONE
    if HAS_BN or ACT != ACT_NONE:
        z = tl.load(z_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        center, scale, shift = _site_vectors(vec_ptr, N, offs_n, mask_n, HAS_BN, 1)
        # the forward's expression, so y (and a ReLU mask) is the forward's exactly
        g = _act_backward(g, _bn(z, center, scale, shift, HAS_BN), slope, ACT)
    g_out = g.to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + g_offs, g_out, mask=mask)
    if HAS_BN:
        # statistics of the rounded values actually stored, as eager computes them
        xhat = (z - center) * _vec_row(vec_ptr, VEC_RSTD, N, offs_n, mask_n, 0.0, 1)
        _grad_partials(g_out.to(tl.float32), xhat, mask, offs_n, mask_n, pid_m, part_ptr, N, row_tiles)
        if BN_MODE != BN_PARTIALS:
            if _ticket(ticket_ptr + pid_n, row_tiles):
                _finalize_grad(part_ptr, vec_ptr, uv_ptr, dgamma_ptr, dbeta_ptr, offs_n, mask_n, M, N, row_tiles,
                               HAS_GAMMA, HAS_BETA, BN_MODE == BN_BATCH)


@triton.jit
def _linear_fwd_kernel(
    # pointers: z = act_in(x) @ W^T + b
    x_ptr, w_ptr, bias_ptr, z_ptr,
    # the previous block's activation site, applied to x on load
    in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    # this block's BatchNorm: partials [3, row_tiles, N], vectors [6, N], parameters, running stats
    part_ptr, vec_ptr, gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, ticket_ptr, eps, momentum,
    # sizes
    M, N, K,
    # strides (z is contiguous)
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BN_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """z = act_in(x) @ W^T + b, and this block's BatchNorm vectors (see the module docstring)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _ = _gemm_core(
        x_ptr, x_ptr, stride_xm, stride_xk, in_vec_ptr, None, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
        w_ptr, stride_wk, stride_wn, None, None, 0.0, 0.0, 0.0,
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
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], z, mask=mask)
    if BN_MODE == BN_FIXED:
        if pid_m == 0:
            _fixed_vectors(vec_ptr, run_mean_ptr, run_var_ptr, gamma_ptr, beta_ptr, eps, N, offs_n, mask_n,
                           HAS_GAMMA, HAS_BETA)
    elif BN_MODE != BN_NONE:
        # statistics of the stored (rounded) z, as eager computes them
        row_tiles = tl.num_programs(0)
        _stats_partials(z.to(tl.float32), mask, offs_m, offs_n, mask_n, pid_m, part_ptr, M, N, row_tiles, BLOCK_M)
        if BN_MODE == BN_BATCH:
            col_tiles = tl.num_programs(1)
            if _ticket(ticket_ptr + tl.program_id(1), row_tiles):
                _finalize_stats(part_ptr, vec_ptr, gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr,
                                ticket_ptr + col_tiles, eps, momentum, offs_n, mask_n, M, N, row_tiles, col_tiles,
                                BLOCK_M, HAS_GAMMA, HAS_BETA, RUNNING, CUMULATIVE)


@triton.jit
def _dx_program(
    pid, g_y_ptr, z_ptr, vec_ptr, uv_ptr, w_ptr, stride_wn, stride_wk,
    x_ptr, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr, in_uv_ptr,
    g_in_ptr, g_part_ptr, ticket_ptr, M, N, K,
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    IN_BN_MODE: tl.constexpr, IN_HAS_GAMMA: tl.constexpr, IN_HAS_BETA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dX tile `pid` (row-major over [M, K]): g_y_{l-1} = act_in'(g_z @ W), its partials and
    the previous block's BatchNorm gradients (module docstring)."""
    col_tiles = tl.cdiv(K, BLOCK_N)
    pid_m = pid // col_tiles
    pid_n = pid % col_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _ = _gemm_core(
        g_y_ptr, z_ptr, N, 1, vec_ptr, uv_ptr, None, 0.0, 0.0, 0.0,
        w_ptr, stride_wn, stride_wk, None, None, 0.0, 0.0, 0.0,
        offs_m, offs_n, M, K, 0, N,
        A_GRAD_K if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
        A_PLAIN, False, ACT_NONE, False, False,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    _grad_epilogue(
        acc, offs_m, offs_n, M, K, pid_m, pid_n, tl.cdiv(M, BLOCK_M),
        x_ptr, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr,
        in_uv_ptr, g_in_ptr, g_part_ptr, ticket_ptr,
        IN_BN_MODE, IN_HAS_GAMMA, IN_HAS_BETA, IN_ACT, IN_DROPOUT,
    )


@triton.jit
def _dw_program(
    pid, g_y_ptr, z_ptr, vec_ptr, uv_ptr,
    x_ptr, stride_xm, stride_xk, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    dw_ptr, db_ptr, dw_part_ptr, db_part_ptr, ticket_ptr, M, N, K, ROWS_PER_SPLIT,
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW tile `pid % tiles` over batch chunk `pid // tiles`: g_z^T @ a_{l-1}, and db; with
    SPLIT, fp32 partials that the chunk finishing last sums in chunk order."""
    col_tiles = tl.cdiv(K, BLOCK_N)
    tiles = tl.cdiv(N, BLOCK_M) * col_tiles
    tile = pid % tiles
    split = pid // tiles
    offs_m = (tile // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * ROWS_PER_SPLIT
    acc, row_sum = _gemm_core(
        g_y_ptr, z_ptr, 1, N, vec_ptr, uv_ptr, None, 0.0, 0.0, 0.0,
        x_ptr, stride_xm, stride_xk, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
        offs_m, offs_n, N, K, k_start, tl.minimum(k_start + ROWS_PER_SPLIT, M),
        A_GRAD_M if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
        IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, HAS_BIAS,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    mask_m = offs_m < N
    mask = mask_m[:, None] & (offs_n < K)[None, :]
    d_offs = offs_m.to(tl.int64)[:, None] * K + offs_n[None, :]
    mask_db = offs_m < tl.where(tile % col_tiles == 0, N, 0)  # the first column tile sums db
    if SPLIT:
        plane = _wide(N) * K
        tl.store(dw_part_ptr + split * plane + d_offs, acc, mask=mask)
        if HAS_BIAS:
            tl.store(db_part_ptr + split * N + offs_m, row_sum, mask=mask_db)
        splits = tl.cdiv(M, ROWS_PER_SPLIT)
        if _ticket(ticket_ptr + tile, splits):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s in range(0, splits):
                acc += tl.load(dw_part_ptr + s * plane + d_offs, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    row_sum += tl.load(db_part_ptr + s * N + offs_m, mask=mask_db, other=0.0, cache_modifier=".cg")
            tl.store(dw_ptr + d_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                tl.store(db_ptr + offs_m, row_sum.to(db_ptr.dtype.element_ty), mask=mask_db)
    else:
        tl.store(dw_ptr + d_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            tl.store(db_ptr + offs_m, row_sum.to(db_ptr.dtype.element_ty), mask=mask_db)


@triton.jit
def _linear_bwd_kernel(
    # this block: g_y and z [M, N] (contiguous), its vectors and u, v, its weight W [N, K]
    g_y_ptr, z_ptr, vec_ptr, uv_ptr, w_ptr, stride_wn, stride_wk,
    # the previous block: a_{l-1} = act_in(x), x = z_{l-1} (or the chain's input); its site and
    # BatchNorm gradients
    x_ptr, stride_xm, stride_xk, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    in_dgamma_ptr, in_dbeta_ptr, in_uv_ptr,
    # outputs: g_y_{l-1} [M, K] (contiguous), dW [N, K], db [N]
    g_in_ptr, dw_ptr, db_ptr,
    # fp32 scratch: dW's split partials [splits, N, K] and db's [splits, N] (with SPLIT), then the
    # dX programs' partials [2, row_tiles, K]; ticket counters: the dX column tiles', then dW's
    scratch_ptr, ticket_ptr,
    # sizes: M = batch, N = out_features, K = in_features; the first DX_PROGRAMS programs do dX
    M, N, K, ROWS_PER_SPLIT, DX_PROGRAMS,
    # meta-parameters
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    IN_BN_MODE: tl.constexpr, IN_HAS_GAMMA: tl.constexpr, IN_HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DX_BLOCK_M: tl.constexpr, DX_BLOCK_N: tl.constexpr, DX_BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block's backward: the dX programs, then the dW programs (module docstring)."""
    pid = tl.program_id(0)
    dw_part_ptr = scratch_ptr
    db_part_ptr = scratch_ptr + tl.cdiv(M, ROWS_PER_SPLIT) * _wide(N) * K
    g_part_ptr = scratch_ptr
    if SPLIT:
        g_part_ptr = db_part_ptr + tl.cdiv(M, ROWS_PER_SPLIT) * N
    if pid < DX_PROGRAMS:
        _dx_program(
            pid, g_y_ptr, z_ptr, vec_ptr, uv_ptr, w_ptr, stride_wn, stride_wk,
            x_ptr, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr,
            in_uv_ptr, g_in_ptr, g_part_ptr, ticket_ptr, M, N, K,
            HAS_BN, BATCH_STATS, IN_ACT, IN_DROPOUT, IN_BN_MODE, IN_HAS_GAMMA, IN_HAS_BETA,
            DX_BLOCK_M, DX_BLOCK_N, DX_BLOCK_K, PRECISION,
        )
    else:
        _dw_program(
            pid - DX_PROGRAMS, g_y_ptr, z_ptr, vec_ptr, uv_ptr,
            x_ptr, stride_xm, stride_xk, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
            dw_ptr, db_ptr, dw_part_ptr, db_part_ptr, ticket_ptr + tl.cdiv(K, DX_BLOCK_N), M, N, K, ROWS_PER_SPLIT,
            HAS_BN, BATCH_STATS, IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, HAS_BIAS, SPLIT,
            DW_BLOCK_M, DW_BLOCK_N, DW_BLOCK_K, PRECISION,
        )


@triton.jit
def _act_fwd_kernel(
    z_ptr, a_ptr, vec_ptr, seed_ptr, drop_p, drop_scale, slope, M, N,
    BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """a = act(z) for the last block of a chain (nothing after it to fuse into); contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    center, scale, shift = _site_vectors(vec_ptr, N, offs_n, mask_n, BN, 1)
    a = _activate(z.to(tl.float32), offs_m, offs_n, center, scale, shift, seed_ptr, drop_p, drop_scale, slope,
                  BN, ACT, DROPOUT)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    g_ptr, stride_gm, stride_gn, z_ptr, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr, dbeta_ptr, uv_ptr,
    g_y_ptr, part_ptr, ticket_ptr, M, N,
    BN_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g_y = act'(y) * drop(dL/da), its partials and BatchNorm gradients, for a chain's last block."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    _grad_epilogue(
        g.to(tl.float32), offs_m, offs_n, M, N, pid_m, tl.program_id(1), tl.num_programs(0),
        z_ptr, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr, dbeta_ptr, uv_ptr,
        g_y_ptr, part_ptr, ticket_ptr,
        BN_MODE, HAS_GAMMA, HAS_BETA, ACT, DROPOUT,
    )


@triton.jit
def _dropout_scale_kernel(seed_ptr, out_ptr, M, N, drop_p, drop_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ones = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    keep = _dropout(ones, offs_m, offs_n, seed_ptr, drop_p, drop_scale, True)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], keep, mask=mask)


# ---------------------------------------------------------------- launchers

NO_BN, BATCH, FIXED, PARTIALS = 0, 1, 2, 3  # the BN_* modes, for the host


class Site(NamedTuple):
    """A block's activation a = drop(act((z - center) * scale + shift)), as the next kernel
    applies it on load: the block's BatchNorm vectors `vec` (None without BatchNorm), an
    ACTIVATIONS code, LeakyReLU's slope, and dropout with probability `drop_p` keyed on
    `seed` (an int64 [1] tensor on the device)."""
    vec: Optional[torch.Tensor] = None
    act: int = 0
    slope: float = 0.0
    drop_p: float = 0.0
    seed: Optional[torch.Tensor] = None

    @property
    def identity(self) -> bool:
        return self.vec is None and not self.act and not self.drop_p


class Norm(NamedTuple):
    """A block's BatchNorm as its kernels see it. `mode` is NO_BN, BATCH (batch statistics),
    FIXED (running statistics) or PARTIALS (batch statistics merged on the host, across ranks);
    `vec` [VEC_ROWS, N] fp32 receives the vectors. The running statistics are read in FIXED
    mode and updated in BATCH mode when given; `momentum` None is the cumulative average. In the
    backward `uv` [2, N] fp32 receives u and v (new_uv)."""
    mode: int
    vec: Optional[torch.Tensor] = None
    gamma: Optional[torch.Tensor] = None
    beta: Optional[torch.Tensor] = None
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    num_batches: Optional[torch.Tensor] = None
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    uv: Optional[torch.Tensor] = None


NO_SITE = Site()
NO_NORM = Norm(NO_BN)


def new_vec(N: int, device) -> torch.Tensor:
    """An uninitialised vector buffer for a BatchNorm block of width N (the kernels fill it)."""
    return torch.empty((VEC_ROWS, N), device=device, dtype=torch.float32)


def new_uv(N: int, device) -> torch.Tensor:
    """An uninitialised u, v buffer for a BatchNorm block's backward (the kernels fill it)."""
    return torch.empty((2, N), device=device, dtype=torch.float32)


def _drop_scale(p: float) -> float:
    """1 / (1 - p), the factor kept elements are scaled by (0 when everything is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _site(site: Site) -> tuple:
    """The runtime arguments of an activation site, in kernel order."""
    return site.vec, site.seed, float(site.drop_p), _drop_scale(site.drop_p), float(site.slope)


def _interpreting() -> bool:
    return launch.INTERPRET


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
    block_n = min(128, max(16, launch.next_power_of_2(N)))
    block_k = 32 if dtype == torch.float32 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps, 3


def linear_fwd(x, weight, bias=None, site_in: Site = NO_SITE, norm: Norm = NO_NORM, out=None):
    """z = act_in(x) @ weight^T + bias, contiguous (written into `out` when given), and
    `norm.vec` filled (BATCH, FIXED).

    Returns (z, partials): with `norm.mode` PARTIALS, the per-row-tile (shift, mean, M2) of z,
    fp32 [3, row_tiles, N], and the rows per tile, for the host to merge; else None.
    """
    M, K = x.shape
    N = weight.shape[0]
    z = out if out is not None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, N, x.dtype)
    grid = (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1)
    mode = norm.mode
    part = launch.scratch(x.device, 3 * grid[0] * N) if mode in (BATCH, PARTIALS) else None
    ticket = launch.tickets(x.device, grid[1] + 1) if mode == BATCH else None
    running = mode == BATCH and norm.running_mean is not None
    launch.run(
        _linear_fwd_kernel, grid,
        (x, weight, bias, z, *_site(site_in),
         part, norm.vec, norm.gamma, norm.beta, norm.running_mean, norm.running_var,
         norm.num_batches if running else None, ticket, float(norm.eps), float(norm.momentum or 0.0),
         M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1)),
        (A_PLAIN if site_in.identity else A_ACT_K, site_in.vec is not None, int(site_in.act), site_in.drop_p > 0,
         bias is not None, mode, norm.gamma is not None, norm.beta is not None, running, norm.momentum is None,
         block_m, block_n, block_k, _precision(x.dtype)),
        num_warps, num_stages,
    )
    return z, ((part[:3 * grid[0] * N].view(3, grid[0], N), block_m) if mode == PARTIALS else None)


def _batch_splits(B: int, tiles: int, block_k: int) -> int:
    """How many chunks the dW reduction over the batch is split into: enough programs to
    fill the device, each chunk still a long run of BLOCK_K steps, and few enough that the
    last program's sum of the chunks stays short."""
    if _interpreting():
        return launch.cdiv(B, 4 * block_k)  # several chunks at test sizes, to test the split
    return max(1, min(launch.cdiv(2 * num_sms(), tiles), launch.cdiv(B, 8 * block_k), 32))


def linear_bwd(g_y, z, weight, norm: Norm, x, site_in: Site = NO_SITE, norm_in: Norm = NO_NORM,
               input_grad: bool = True, has_bias: bool = True):
    """One block's backward in one launch (module docstring): from its g_y and z [B, N] (`norm`
    its BatchNorm, with u and v in `norm.uv` for batch statistics), its weight [N, K] and its
    input a = act_in(x) (`site_in`, `norm_in` of the previous block).

    Returns (g_y_in, dw, db, dgamma_in, dbeta_in, partials_in): g_y_in is the previous block's
    g_y (None without `input_grad`; the chain's input gradient when `site_in` is the identity);
    db None without `has_bias`; the previous block's dgamma and dbeta (None where it has none)
    in its parameters' dtype, with its u and v in `norm_in.uv`; with `norm_in.mode` PARTIALS
    its per-row-tile sums of g_y and g_y * xhat [2, row_tiles, K] for the host, and dgamma,
    dbeta, u, v left to it.
    """
    B, N = g_y.shape
    K = weight.shape[1]
    dev = g_y.device
    dx_m, dx_n, dx_k, num_warps, num_stages = _tiles(B, K, g_y.dtype)
    dw_m, dw_n, dw_k, _, _ = _tiles(N, K, g_y.dtype)
    dx_row_tiles, dx_col_tiles = launch.cdiv(B, dx_m), launch.cdiv(K, dx_n)
    dw_tiles = launch.cdiv(N, dw_m) * launch.cdiv(K, dw_n)
    splits = _batch_splits(B, dw_tiles, dw_k)
    rows_per_split = launch.cdiv(launch.cdiv(B, splits), dw_k) * dw_k
    splits = launch.cdiv(B, rows_per_split)

    g_in = torch.empty((B, K), device=dev, dtype=g_y.dtype) if input_grad else None
    in_bn = norm_in.mode if input_grad else NO_BN
    dgamma = torch.empty_like(norm_in.gamma) if in_bn != NO_BN and norm_in.gamma is not None else None
    dbeta = torch.empty_like(norm_in.beta) if in_bn != NO_BN and norm_in.beta is not None else None
    dw = torch.empty(weight.shape, device=dev, dtype=weight.dtype)  # contiguous, as the kernel writes it
    db = torch.empty(N, device=dev, dtype=weight.dtype) if has_bias else None
    dw_scratch = splits * N * (K + 1) if splits > 1 else 0
    scratch = launch.scratch(dev, dw_scratch + (2 * dx_row_tiles * K if in_bn != NO_BN else 0))
    dx_programs = dx_row_tiles * dx_col_tiles if input_grad else 0
    launch.run(
        _linear_bwd_kernel, (dx_programs + dw_tiles * splits, 1, 1),
        (g_y, z, norm.vec, norm.uv, weight, weight.stride(0), weight.stride(1),
         x, x.stride(0), x.stride(1), *_site(site_in), dgamma, dbeta, norm_in.uv if in_bn != NO_BN else None,
         g_in if input_grad else g_y,  # (g_y: a stand-in, never written without dX programs)
         dw, db, scratch, launch.tickets(dev, dx_col_tiles + dw_tiles),
         B, N, K, rows_per_split, dx_programs),
        (norm.mode != NO_BN, norm.mode in (BATCH, PARTIALS),
         A_PLAIN if site_in.identity else A_ACT_K, site_in.vec is not None, int(site_in.act), site_in.drop_p > 0,
         in_bn, dgamma is not None, dbeta is not None, has_bias, splits > 1,
         dx_m, dx_n, dx_k, dw_m, dw_n, dw_k, _precision(g_y.dtype)),
        num_warps, num_stages,
    )
    part_in = scratch[dw_scratch:dw_scratch + 2 * dx_row_tiles * K].view(2, dx_row_tiles, K) if in_bn == PARTIALS \
        else None
    return g_in, dw, db, dgamma, dbeta, part_in


def _elementwise_tiles(M: int, N: int):
    block_n = min(128, launch.next_power_of_2(N))
    return (32 if _interpreting() else max(16, 4096 // block_n)), block_n


def act_fwd(z, site: Site):
    """a = act(z) for a chain's last block (z contiguous)."""
    M, N = z.shape
    a = torch.empty_like(z)
    block_m, block_n = _elementwise_tiles(M, N)
    launch.run(
        _act_fwd_kernel, (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1),
        (z, a, *_site(site), M, N),
        (site.vec is not None, int(site.act), site.drop_p > 0, block_m, block_n), 4, 1,
    )
    return a


def act_bwd(grad, z, site: Site, norm: Norm):
    """g_y = the backward of `site`'s activation applied to grad = dL/da, for a chain's last
    block. Returns (g_y, dgamma, dbeta, partials) as `linear_bwd` does for the previous block."""
    M, N = grad.shape
    g_y = torch.empty((M, N), device=grad.device, dtype=grad.dtype)
    block_m, block_n = _elementwise_tiles(M, N)
    grid = (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1)
    bn = norm.mode
    part = launch.scratch(grad.device, 2 * grid[0] * N) if bn != NO_BN else None
    dgamma = torch.empty_like(norm.gamma) if bn != NO_BN and norm.gamma is not None else None
    dbeta = torch.empty_like(norm.beta) if bn != NO_BN and norm.beta is not None else None
    launch.run(
        _act_bwd_kernel, grid,
        (grad, grad.stride(0), grad.stride(1), z, *_site(site), dgamma, dbeta, norm.uv if bn != NO_BN else None,
         g_y, part,
         launch.tickets(grad.device, grid[1]), M, N),
        (bn, dgamma is not None, dbeta is not None, int(site.act), site.drop_p > 0, block_m, block_n), 4, 1,
    )
    return g_y, dgamma, dbeta, (part[:2 * grid[0] * N].view(2, grid[0], N) if bn == PARTIALS else None)


def dropout_scale(seed, M: int, N: int, p: float):
    """The [M, N] fp32 factors (0 or 1 / (1 - p)) that the kernels' dropout with `seed`
    multiplies an [M, N] activation by: for tests and for inspecting a fused forward."""
    out = torch.empty((M, N), device=seed.device, dtype=torch.float32)
    block_m, block_n = _elementwise_tiles(M, N)
    launch.run(_dropout_scale_kernel, (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1),
               (seed, out, M, N, float(p), _drop_scale(p)), (block_m, block_n), 4, 1)
    return out
