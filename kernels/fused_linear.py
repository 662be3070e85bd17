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
              from the running statistics. The next block's prologue reads them. All programs
              also copy W_{l+1}, aligned, behind z_l when its rows are not (see "padded rows").

Backward, with g_l = dL/da_l:
    g_y    = drop_l(g_l) * act_l'(y_l)           (ReLU: g_l where y_l > 0, as torch does)
    xhat   = (z - mean) * rstd
    dgamma = sum_rows g_y * xhat,   dbeta = sum_rows g_y
    g_z    = scale * g_y + u * (z - mean) + v,  u = -scale * rstd * dgamma / B,  v = -scale * dbeta / B
             (u = v = 0 with running statistics; g_z = g_y without BatchNorm)
    dW_l   = g_z^T @ a_{l-1},   db_l = sum_rows g_z,   g_{l-1} = g_z @ W_l
One launch per block (`_linear_bwd_kernel`) runs independent grids side by side:
    dX programs  g_z @ W_l with g_z built on load from g_y_l and z_l; the epilogue applies block
                 l-1's activation backward, stores g_y_{l-1} and its column partials, and the last
                 program of each column tile finalises block l-1's dgamma, dbeta, u and v.
    dW programs  the batch is the reduction axis, split into chunks whose fp32 partials the last
                 program of each tile sums in chunk order; one chunk writes dW directly. Its
                 operands must not both be built on load: a wgmma reads B from shared memory,
                 and a B built in registers is stored there inside the loop, in a buffer Triton
                 does not multi-buffer, so it waits for every MMA (`wgmma.wait_group 0`).
                 DW_GRAD_ROWS  g_z^T @ a_{l-1}, g_z built on load, a_{l-1} = x as stored (block
                               1; or any block's backward with `defer=False`)
                 DW_ACT_ROWS   (a_{l-1}^T @ g_y)^T without BatchNorm: g_z = g_y as stored
                 DW_DEFERRED   with BatchNorm and an activation in front: the dX programs (the
                               first column tile's) store the g_z they build, and the next
                               launch, block l-1's, computes (a_{l-1}^T @ g_z)^T, a_{l-1} built
                               on load from its own z (its NEXT programs). The g_z write costs
                               what reading g_y and z again would have. In fp32 at "highest"
                               g_z is stored as its TF32 split, which that dW reads as it reads
                               a weight's (_gemm_core's SPLIT_B), so its main loop overlaps too;
                               there blocks without BatchNorm defer theirs as well (ACT_ROWS
                               would read g_y as stored: not split, so not overlapped).
A chain that ends on BatchNorm/activation (no next GEMM to ride on) adds one elementwise kernel
each way (`_act_fwd_kernel`, `_act_bwd_kernel`).

Padded rows and aligned weights: Triton loads 16 bytes at a time only from rows whose stride it
knows is divisible by 16 elements, under masks constant over 16-element runs; most widths
`mlp_by_budget` gives are not (252, 811, 1820). So the activations the kernels pass each other
(z, g_y, g_z) have rows padded to 16 elements, written as zeros, and are read whole; a weight
whose rows are not aligned is read through an aligned copy that the previous launch wrote, and
in fp32 at "highest" every weight but the first is read through its TF32 split, written the
same way where it fits, else into a buffer of its own by the launch before each GEMM that reads
it (launchers: "padded rows and aligned weights"; _gemm_core's SPLIT_B).

Tiles: the first of TILES, largest first, that gives every SM a CTA (narrow layers take narrow
tiles); dW also splits the batch until it does. A table measured on a GPU comes first
(kernels/tiles.py). The forward's and dX's output tiles run in grouped order (_grouped_tile).
Main loops always run at least once (see _gemm_core): a loop that might not run makes ptxas
serialise every wgmma of the kernel.

"Last program" is decided by a ticket counter (batchnorm._ticket) in a persistent, self-
resetting int32 buffer, and the merges run in a fixed order: no atomics touch data, so two
identical backward passes are bitwise identical, and no PyTorch op runs between the kernels.

Every site that applies a block's activation takes the same argument group:
    vec_ptr                            BatchNorm vectors (with BN)
    seed_ptr, drop_p, drop_scale       dropout: int64 seed on the device, p, 1 / (1 - p)
    slope                              LeakyReLU's negative slope
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import launch
from .batchnorm import (VEC_CENTER, VEC_ROWS, VEC_RSTD, VEC_SCALE, VEC_SHIFT, _finalize_grad, _finalize_stats,
                        _fixed_vectors, _grad_partials, _stats_partials, _ticket)
from .tiles import lookup as table_config

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
A_ACT_M = tl.constexpr(4)   # a^T = act(z)^T: features along the rows (dW)

# How a block's backward launch computes its dW (module docstring).
DW_DEFERRED = tl.constexpr(0)   # in the next launch, from the g_z this one stores
DW_GRAD_ROWS = tl.constexpr(1)  # g_z^T @ a_{l-1}: g_z built on load, a_{l-1} as stored (or built)
DW_ACT_ROWS = tl.constexpr(2)   # (a_{l-1}^T @ g_y)^T: no BatchNorm, so g_z = g_y as stored

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
    """a * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn by Philox at (seed, row, col); `rows`
    and `cols` index a's elements by broadcasting ([R, 1] and [1, C], or transposed).

    Multiplies rather than selects, so NaN and Inf propagate as in torch's dropout.
    """
    if DROPOUT:
        seed = tl.load(seed_ptr)
        row_ids = (rows + 0 * cols).to(tl.uint32)
        col_ids = (0 * rows + cols).to(tl.uint32)
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
    """a = drop(act(bn(z))) for a tile of z in fp32, indexed as `_dropout` says."""
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
def _tf32_split(v):
    """(high, low) with v = high + low: high is fp32 v with its 13 low mantissa bits cleared,
    exact in TF32, and low = v - high exact in fp32 (3xTF32: _gemm_core's SPLIT_B). An infinity
    is all high (inf - inf would be NaN, and eager's inf * w is inf); NaN stays NaN."""
    high = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    high = tl.where(v == v, high, v)  # (a NaN whose payload is in the low bits would turn inf)
    return high, tl.where(high == v, 0.0, v - high)


# Row tiles per group of the grouped tile order (_grouped_tile).
GROUP_M = tl.constexpr(8)


@triton.jit
def _grouped_tile(pid, row_tiles, col_tiles):
    """(pid_m, pid_n) of output tile `pid` in grouped order: GROUP_M row tiles take every column
    tile together, column by column, so the CTAs running at once read a few row panels of A and
    a few column panels of W, which stay in L2, rather than all of one operand (the Triton matmul
    tutorial's order). With fewer row tiles than GROUP_M it is column-major order."""
    in_group = GROUP_M * col_tiles
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_rows, (pid % in_group) // group_rows


@triton.jit
def _gemm_core(
    # A [M, K] (and, in the A_GRAD modes, the z of the same shape) and its transform: an
    # activation site (A_ACT_*) or a BatchNorm backward (A_GRAD_*: u, v from a_uv)
    a_ptr, za_ptr, stride_am, stride_ak, stride_zam, stride_zak,
    a_vec_ptr, a_uv_ptr, a_seed_ptr, a_drop_p, a_drop_scale, a_slope,
    # B [K, N] and its activation site (features along N); with SPLIT_B, B's TF32 high part,
    # and at b_lo_ptr (same strides) its low part
    b_ptr, stride_bk, stride_bn, b_vec_ptr, b_seed_ptr, b_drop_p, b_drop_scale, b_slope, b_lo_ptr,
    # where T_A(A) is stored (STORE_A: rows up to sa_rows, padded rows whole; STORE_A == 2:
    # its TF32 split, the low part at sa_lo_ptr with the same strides)
    sa_ptr, stride_sam, sa_rows, sa_lo_ptr,
    # tile coordinates, sizes, and the bounds loads are masked by (module docstring: padded rows)
    offs_m, offs_n, M, N, k_start, k_end, a_m_ld, a_k_ld, b_k_ld, b_n_ld,
    # meta-parameters
    A_MODE: tl.constexpr, A_BN: tl.constexpr, A_ACT: tl.constexpr, A_DROPOUT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    B_MODE: tl.constexpr, B_BN: tl.constexpr, B_ACT: tl.constexpr, B_DROPOUT: tl.constexpr,
    ROW_SUM: tl.constexpr, COL_SUM: tl.constexpr, STORE_A: tl.constexpr, SPLIT_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc = T_A(A)[offs_m, k_start:k_end] @ T_B(B)[k_start:k_end, offs_n] in fp32.

    SPLIT_B (fp32, 3xTF32): B comes split in memory, its TF32 part and the remainder, and A
    is split here, so acc += a_hi b_lo + a_lo b_hi + a_hi b_hi in plain TF32 dots (small terms
    first). Both of B's parts are then loaded operands that the loop pipelines, where Triton's
    own "tf32x3" splits B in registers and stores it to shared memory inside the loop, which
    makes every iteration wait for its MMAs. STORE_A == 2 stores T_A(A) split that way, for a
    later launch to read as its split B.

    In the A_*_K modes the features run along K and number k_end (k_start = 0); in the A_*_M
    modes (dW) they run along M and K is the batch. B_MODE is A_PLAIN or A_ACT_K (B's
    activation, N features). Also returns the row sums of T_A(A) (ROW_SUM) and the column sums
    of B (COL_SUM) over the k range: db in dW. Loads are masked by the `*_ld` bounds (>= the
    sizes: padded rows are read whole, so the mask is constant over 16-element runs and loads
    stay 16 bytes wide); transformed elements past the sizes are zeroed after the transform
    (act(0) is act(shift), not 0).
    """
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    # Vectors indexed by rows or columns of the tile are loaded once, outside the k loop.
    if A_MODE == A_GRAD_M:
        m_center, m_scale, m_u, m_v = _grad_vectors(a_vec_ptr, a_uv_ptr, M, offs_m, mask_m, BATCH_STATS, 0)
    if A_MODE == A_ACT_M:
        m_center, m_scale, m_shift = _site_vectors(a_vec_ptr, M, offs_m, mask_m, A_BN, 0)
    if B_MODE == A_ACT_K:
        n_center, n_scale, n_shift = _site_vectors(b_vec_ptr, N, offs_n, mask_n, B_BN, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # SPLIT_B's small terms, each in an accumulator of its own: dots chained on one accumulator
    # make Triton wait for each (wgmma.wait_group 0), independent ones it keeps in flight
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_mid = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # At least one step, and the compiler told so: with a loop that may not run, ptxas finds the
    # accumulator set by moves on the skip path and serialises every wgmma of the kernel. (An
    # empty range runs one step of masked loads: acc stays 0.)
    k_stop = tl.maximum(k_end, k_start + 1)
    tl.assume(k_stop > k_start)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a_mask = (offs_m < a_m_ld)[:, None] & (offs_k < a_k_ld)[None, :]
        ks = offs_k.to(tl.int64)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks * stride_ak, mask=a_mask, other=0.0)
        if A_MODE != A_PLAIN:
            a32 = a.to(tl.float32)
            if A_MODE == A_ACT_K:
                center, scale, shift = _site_vectors(a_vec_ptr, k_end, offs_k, mask_k, A_BN, 1)
                a32 = _activate(a32, offs_m[:, None], offs_k[None, :], center, scale, shift, a_seed_ptr, a_drop_p,
                                a_drop_scale, a_slope, A_BN, A_ACT, A_DROPOUT)
            elif A_MODE == A_ACT_M:  # a^T: batch rows along K, for dropout's keys too
                a32 = _activate(a32, offs_k[None, :], offs_m[:, None], m_center, m_scale, m_shift, a_seed_ptr,
                                a_drop_p, a_drop_scale, a_slope, A_BN, A_ACT, A_DROPOUT)
            else:
                z = tl.load(za_ptr + rows[:, None] * stride_zam + ks * stride_zak, mask=a_mask, other=0.0)
                z = z.to(tl.float32)
                if A_MODE == A_GRAD_K:
                    center, scale, u, v = _grad_vectors(a_vec_ptr, a_uv_ptr, k_end, offs_k, mask_k, BATCH_STATS, 1)
                    a32 = _bn_grad(a32, z, center, scale, u, v, BATCH_STATS)
                else:
                    a32 = _bn_grad(a32, z, m_center, m_scale, m_u, m_v, BATCH_STATS)
            a32 = tl.where(mask_m[:, None] & mask_k[None, :], a32, 0.0)
            a = a32.to(a_ptr.dtype.element_ty)
        if STORE_A:
            # whole padded rows (zeros past the width, also where A's own rows are not padded)
            sa_mask = (offs_m < sa_rows)[:, None] & (offs_k < stride_sam)[None, :]
            sa_offs = rows[:, None] * stride_sam + ks
            if STORE_A == 2:
                a_hi, a_lo = _tf32_split(a)
                tl.store(sa_ptr + sa_offs, a_hi, mask=sa_mask)
                tl.store(sa_lo_ptr + sa_offs, a_lo, mask=sa_mask)
            else:
                tl.store(sa_ptr + sa_offs, a, mask=sa_mask)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b_mask = (offs_k < b_k_ld)[:, None] & (offs_n < b_n_ld)[None, :]
        b_offs = offs_k.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
        b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        if B_MODE == A_ACT_K:
            b32 = _activate(b.to(tl.float32), offs_k[:, None], offs_n[None, :], n_center, n_scale, n_shift,
                            b_seed_ptr, b_drop_p, b_drop_scale, b_slope, B_BN, B_ACT, B_DROPOUT)
            b = tl.where(mask_k[:, None] & mask_n[None, :], b32, 0.0).to(b_ptr.dtype.element_ty)
        if SPLIT_B:
            b_lo = tl.load(b_lo_ptr + b_offs, mask=b_mask, other=0.0)
        if COL_SUM:
            if SPLIT_B:
                col_sum += tl.sum(b + b_lo, axis=0)  # (exactly B: the parts add up without rounding)
            else:
                col_sum += tl.sum(b.to(tl.float32), axis=0)
        if SPLIT_B:
            a_hi, a_lo = _tf32_split(a)
            acc_lo = tl.dot(a_hi, b_lo, acc_lo, input_precision="tf32")
            acc_mid = tl.dot(a_lo, b, acc_mid, input_precision="tf32")
            acc = tl.dot(a_hi, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SPLIT_B:
        # A NaN small term with a number for the big one comes from an infinity times a part
        # that is 0 (inf's low part is 0 too): eager's inf * b is the big term's inf
        small = acc_lo + acc_mid
        acc = tl.where(small == small, acc + small, acc)
    return acc, row_sum, col_sum


@triton.jit
def _grad_epilogue(
    g, offs_m, offs_n, M, N, pid_m, pid_n, row_tiles,
    # the block whose g_y this is: z, activation site, BatchNorm gradients (dgamma, dbeta, uv)
    z_ptr, stride_zm, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr, dbeta_ptr, uv_ptr,
    # outputs: g_y [M, N] (its padding too: columns up to ld_n), column partials, tickets
    g_ptr, stride_gm, ld_n, part_ptr, ticket_ptr,
    BN_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """g_y = act'(y) * drop(g) for g = dL/da: store it and, with BatchNorm, its column partials
    sum(g_y) and sum(g_y * xhat); the last row tile of each column tile finalises dgamma,
    dbeta, u and v (not for BN_PARTIALS: the host merges those across ranks)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    g = _dropout(g, offs_m[:, None], offs_n[None, :], seed_ptr, drop_p, drop_scale, DROPOUT)
    HAS_BN: tl.constexpr = BN_MODE != BN_NONE
    if HAS_BN or ACT != ACT_NONE:
        z = tl.load(z_ptr + rows * stride_zm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        center, scale, shift = _site_vectors(vec_ptr, N, offs_n, mask_n, HAS_BN, 1)
        # the forward's expression, so y (and a ReLU mask) is the forward's exactly
        g = _act_backward(g, _bn(z, center, scale, shift, HAS_BN), slope, ACT)
    g_out = g.to(g_ptr.dtype.element_ty)  # 0 past N: zeros written into the padding
    tl.store(g_ptr + rows * stride_gm + offs_n[None, :], g_out, mask=mask_m[:, None] & (offs_n < ld_n)[None, :])
    if HAS_BN:
        # statistics of the rounded values actually stored, as eager computes them
        xhat = (z - center) * _vec_row(vec_ptr, VEC_RSTD, N, offs_n, mask_n, 0.0, 1)
        _grad_partials(g_out.to(tl.float32), xhat, mask, offs_n, mask_n, pid_m, part_ptr, N, row_tiles)
        if BN_MODE != BN_PARTIALS:
            if _ticket(ticket_ptr + pid_n, row_tiles):
                _finalize_grad(part_ptr, vec_ptr, uv_ptr, dgamma_ptr, dbeta_ptr, offs_n, mask_n, M, N, row_tiles,
                               HAS_GAMMA, HAS_BETA, BN_MODE == BN_BATCH)


@triton.jit
def _copy_padded(src_ptr, stride_r, stride_c, rows, cols, dst_ptr, ld, program, programs, BLOCK: tl.constexpr,
                 SPLIT: tl.constexpr):
    """This program's share of dst[r, c] = src[r, c] (c < cols), 0 (cols <= c < ld), for
    rows x ld elements of dst, ld apart; with SPLIT, src's TF32 part there and the remainder
    in a second such block right behind it."""
    total = _wide(rows) * ld
    share = tl.cdiv(tl.cdiv(total, programs), BLOCK) * BLOCK
    start = program * share
    for i0 in range(start, tl.minimum(start + share, total), BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        r = idx // ld
        c = idx % ld
        v = tl.load(src_ptr + r * stride_r + c * stride_c, mask=(idx < total) & (c < cols), other=0.0)
        if SPLIT:
            v, low = _tf32_split(v)
            tl.store(dst_ptr + total + idx, low, mask=idx < total)
        tl.store(dst_ptr + idx, v, mask=idx < total)


# Per-feature vectors (biases, BatchNorm's parameters, statistics and vector buffers, dropout
# seeds) are read once per tile: their pointers' 16-byte alignment is not specialised on, so a
# launch plan need not be keyed on it (dwfast.ops: plans).
_VECTORS = ("bias_ptr", "in_vec_ptr", "in_seed_ptr", "vec_ptr", "gamma_ptr", "beta_ptr", "run_mean_ptr",
            "run_var_ptr", "nbt_ptr", "uv_ptr", "in_dgamma_ptr", "in_dbeta_ptr", "in_uv_ptr", "db_ptr", "seed_ptr",
            "nx_db_ptr", "dgamma_ptr", "dbeta_ptr")


def _vectors_of(fn):
    """`fn`'s vector pointer parameters (_VECTORS), for triton.jit's do_not_specialize_on_alignment."""
    return [name for name in fn.__code__.co_varnames[:fn.__code__.co_argcount] if name in _VECTORS]


def _kernel(fn):
    return triton.jit(fn, do_not_specialize_on_alignment=_vectors_of(fn))


@_kernel
def _linear_fwd_kernel(
    # pointers: z = act_in(x) @ W^T + b
    x_ptr, w_ptr, bias_ptr, z_ptr,
    # the previous block's activation site, applied to x on load
    in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
    # this block's BatchNorm: partials [3, row_tiles, N], vectors [6, N], parameters, running stats
    part_ptr, vec_ptr, gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, ticket_ptr, eps, momentum,
    # the next block's weight [nw_rows, N], copied behind z's rows with z's row stride (COPY_NEXT
    # copies: 2 for its TF32 split), or its TF32 split into nw_split [2 nw_rows, N] (COPY_NEXT 3)
    nw_ptr, nw_split_ptr, stride_nwn, stride_nwk, nw_rows,
    # sizes, and the bounds of x's and W's loads along K and of z's stores (padded rows)
    M, N, K, ld_xk, ld_wk, ld_zn,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_zm,
    # meta-parameters
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BN_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, COPY_NEXT: tl.constexpr, W_COPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """z = act_in(x) @ W^T + b, and this block's BatchNorm vectors (see the module docstring).
    W_COPY: W is read through its aligned copy behind x's rows (1; the strides are the copy's) or
    its TF32 split there, the low part right behind it (2: _gemm_core's SPLIT_B), or w_ptr is
    such a split itself (3: a copy the launch before wrote elsewhere)."""
    if W_COPY == 1 or W_COPY == 2:
        w_ptr = x_ptr + _wide(M) * stride_xm
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), row_tiles, col_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _, _ = _gemm_core(
        x_ptr, x_ptr, stride_xm, stride_xk, stride_xm, stride_xk,
        in_vec_ptr, None, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
        w_ptr, stride_wk, stride_wn, None, None, 0.0, 0.0, 0.0, w_ptr + _wide(N) * stride_wn,
        None, 0, 0, None,
        offs_m, offs_n, M, N, 0, K, M, ld_xk, ld_wk, N,
        IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, False,
        A_PLAIN, False, ACT_NONE, False, False, False, False, W_COPY >= 2,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    z = acc.to(z_ptr.dtype.element_ty)  # 0 past N (W's rows there load as 0): zeros into the padding
    tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :], z,
             mask=mask_m[:, None] & (offs_n < ld_zn)[None, :])
    if COPY_NEXT:
        _copy_padded(nw_ptr, stride_nwn, stride_nwk, nw_rows, N,
                     z_ptr + _wide(M) * stride_zm if COPY_NEXT < 3 else nw_split_ptr, stride_zm,
                     tl.program_id(0), row_tiles * col_tiles, 1024, COPY_NEXT >= 2)
    if BN_MODE == BN_FIXED:
        if pid_m == 0:
            _fixed_vectors(vec_ptr, run_mean_ptr, run_var_ptr, gamma_ptr, beta_ptr, eps, N, offs_n, mask_n,
                           HAS_GAMMA, HAS_BETA)
    elif BN_MODE != BN_NONE:
        # statistics of the stored (rounded) z, as eager computes them
        _stats_partials(z.to(tl.float32), mask, offs_m, offs_n, mask_n, pid_m, part_ptr, M, N, row_tiles, BLOCK_M)
        if BN_MODE == BN_BATCH:
            if _ticket(ticket_ptr + pid_n, row_tiles):
                _finalize_stats(part_ptr, vec_ptr, gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr,
                                ticket_ptr + col_tiles, eps, momentum, offs_n, mask_n, M, N, row_tiles, col_tiles,
                                BLOCK_M, HAS_GAMMA, HAS_BETA, RUNNING, CUMULATIVE)


@triton.jit
def _dx_program(
    pid, g_y_ptr, stride_gm, stride_gn, z_ptr, stride_zm, vec_ptr, uv_ptr, w_ptr, stride_wn, stride_wk,
    x_ptr, stride_xm, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr,
    in_uv_ptr, g_in_ptr, stride_gim, gz_ptr, stride_gzm, g_part_ptr, ticket_ptr, M, N, K, ld_n, ld_wk, ld_gk,
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    IN_BN_MODE: tl.constexpr, IN_HAS_GAMMA: tl.constexpr, IN_HAS_BETA: tl.constexpr, STORE_GZ: tl.constexpr,
    W_COPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dX tile `pid` (grouped order over [M, K]): g_y_{l-1} = act_in'(g_z @ W), its partials and
    the previous block's BatchNorm gradients (module docstring); with STORE_GZ the first
    column tile's programs also store the g_z they build, for the next launch's dW (2: its
    TF32 split, the low part M rows behind). W_COPY as the forward's."""
    if W_COPY == 1 or W_COPY == 2:
        w_ptr = x_ptr + _wide(M) * stride_xm
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gz_lo_ptr = gz_ptr + _wide(M) * stride_gzm if STORE_GZ == 2 else None
    acc, _, _ = _gemm_core(
        g_y_ptr, z_ptr, stride_gm, stride_gn, stride_zm, 1, vec_ptr, uv_ptr, None, 0.0, 0.0, 0.0,
        w_ptr, stride_wn, stride_wk, None, None, 0.0, 0.0, 0.0, w_ptr + _wide(N) * stride_wn,
        gz_ptr, stride_gzm, tl.where(pid_n == 0, M, 0), gz_lo_ptr,
        offs_m, offs_n, M, K, 0, N, M, ld_n, N, ld_wk,
        A_GRAD_K if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
        A_PLAIN, False, ACT_NONE, False, False, False, STORE_GZ, W_COPY >= 2,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    _grad_epilogue(
        acc, offs_m, offs_n, M, K, pid_m, pid_n, tl.cdiv(M, BLOCK_M),
        x_ptr, stride_xm, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr,
        in_uv_ptr, g_in_ptr, stride_gim, ld_gk, g_part_ptr, ticket_ptr,
        IN_BN_MODE, IN_HAS_GAMMA, IN_HAS_BETA, IN_ACT, IN_DROPOUT,
    )


@triton.jit
def _dw_program(
    pid,
    # A^T [batch, DM] (features contiguous; the z of the same shape in A_GRAD_M) and its transform
    a_ptr, za_ptr, stride_ak, stride_zak, a_vec_ptr, a_uv_ptr, a_seed_ptr, a_drop_p, a_drop_scale, a_slope,
    # B [batch, DN] and its transform; with SPLIT_B, B's TF32 high part, the low part at b_lo_ptr
    b_ptr, stride_bk, stride_bn, b_vec_ptr, b_seed_ptr, b_drop_p, b_drop_scale, b_slope, b_lo_ptr,
    # outputs: dW [DM, DN] ([DN, DM] when TRANSPOSED), db, fp32 partials, ticket counters
    dw_ptr, db_ptr, part_ptr, ticket_ptr,
    # sizes: M = batch; load bounds of A's and B's features (padded rows)
    M, DM, DN, a_m_ld, b_n_ld, ROWS_PER_SPLIT,
    A_MODE: tl.constexpr, A_BN: tl.constexpr, A_ACT: tl.constexpr, A_DROPOUT: tl.constexpr,
    BATCH_STATS: tl.constexpr, B_MODE: tl.constexpr, B_BN: tl.constexpr, B_ACT: tl.constexpr,
    B_DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile `pid % tiles` of A^T B over batch chunk `pid // tiles`, and db: the row sums of
    T_A(A) or, TRANSPOSED (the product is dW^T), the column sums of B. With SPLIT, fp32
    partials [splits, DM * DN] then [splits, len(db)] that the chunk finishing last sums in
    chunk order."""
    col_tiles = tl.cdiv(DN, BLOCK_N)
    tiles = tl.cdiv(DM, BLOCK_M) * col_tiles
    tile = pid % tiles
    split = pid // tiles
    offs_m = (tile // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, M)
    acc, row_sum, col_sum = _gemm_core(
        a_ptr, za_ptr, 1, stride_ak, 1, stride_zak, a_vec_ptr, a_uv_ptr, a_seed_ptr, a_drop_p, a_drop_scale, a_slope,
        b_ptr, stride_bk, stride_bn, b_vec_ptr, b_seed_ptr, b_drop_p, b_drop_scale, b_slope, b_lo_ptr,
        None, 0, 0, None,
        offs_m, offs_n, DM, DN, k_start, k_end, a_m_ld, k_end, k_end, b_n_ld,
        A_MODE, A_BN, A_ACT, A_DROPOUT, BATCH_STATS,
        B_MODE, B_BN, B_ACT, B_DROPOUT, HAS_BIAS and not TRANSPOSED, HAS_BIAS and TRANSPOSED, False, SPLIT_B,
        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
    )
    mask = (offs_m < DM)[:, None] & (offs_n < DN)[None, :]
    # (int32 offsets: a weight has fewer than 2^31 elements, and 64-bit ones for a whole tile
    # cost registers enough to spill)
    if TRANSPOSED:
        d_offs = offs_n[None, :] * DM + offs_m[:, None]
        db_len = DN
        sums = col_sum
        offs_db = offs_n
        mask_db = offs_n < tl.where(tile // col_tiles == 0, DN, 0)  # the first row tile sums db
    else:
        d_offs = offs_m[:, None] * DN + offs_n[None, :]
        db_len = DM
        sums = row_sum
        offs_db = offs_m
        mask_db = offs_m < tl.where(tile % col_tiles == 0, DM, 0)  # the first column tile sums db
    if SPLIT:
        plane = _wide(DM) * DN
        splits = tl.cdiv(M, ROWS_PER_SPLIT)
        db_part_ptr = part_ptr + splits * plane
        tl.store(part_ptr + split * plane + d_offs, acc, mask=mask)
        if HAS_BIAS:
            tl.store(db_part_ptr + split * db_len + offs_db, sums, mask=mask_db)
        if _ticket(ticket_ptr + tile, splits):
            acc = tl.zeros_like(acc)
            sums = tl.zeros_like(sums)
            for s in range(0, splits):
                acc += tl.load(part_ptr + s * plane + d_offs, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    sums += tl.load(db_part_ptr + s * db_len + offs_db, mask=mask_db, other=0.0, cache_modifier=".cg")
            tl.store(dw_ptr + d_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                tl.store(db_ptr + offs_db, sums.to(db_ptr.dtype.element_ty), mask=mask_db)
    else:
        tl.store(dw_ptr + d_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            tl.store(db_ptr + offs_db, sums.to(db_ptr.dtype.element_ty), mask=mask_db)


@triton.jit
def _dw_scratch(M, DM, DN, ROWS_PER_SPLIT, SPLIT: tl.constexpr):
    """fp32 scratch elements of a dW role's partials (0 without SPLIT), as `dw_scratch` counts."""
    n = _wide(0)
    if SPLIT:
        n += tl.cdiv(M, ROWS_PER_SPLIT) * (_wide(DM) * DN + tl.maximum(DM, DN))
    return n


@triton.jit
def _dw_tiles(N, K, DW_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output tiles (ticket counters) of this block's dW role."""
    tiles = 0
    if DW_MODE == DW_GRAD_ROWS:
        tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    elif DW_MODE == DW_ACT_ROWS:
        tiles = tl.cdiv(K, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    return tiles


@_kernel
def _linear_bwd_kernel(
    # this block: g_y and z [M, N], its vectors and u, v, its weight W [N, K] (or W's aligned copy)
    g_y_ptr, z_ptr, vec_ptr, uv_ptr, w_ptr,
    # the previous block: a_{l-1} = act_in(x), x = z_{l-1} (or the chain's input); its site and
    # BatchNorm gradients
    x_ptr, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr, in_dbeta_ptr, in_uv_ptr,
    # outputs: g_y_{l-1} [M, K], dW [N, K], db [N]; this block's g_z [M, N] for the next launch
    # (DW_DEFERRED: its dW is deferred to that launch; SPLIT_GZ: g_z's TF32 split, [2M, N])
    g_in_ptr, dw_ptr, db_ptr, gz_ptr,
    # the next block's dW, deferred to this launch (NEXT): its g_z [M, NN] (the last launch's
    # gz, split with NX_SPLIT_GZ), this block's activation (with vec_ptr), dW [NN, N], db [NN]
    nx_gz_ptr, seed_ptr, drop_p, drop_scale, slope, nx_dw_ptr, nx_db_ptr,
    # fp32 scratch: the dW roles' partials (with SPLIT, NX_SPLIT), then the dX programs' [2,
    # row_tiles, K]; ticket counters: the dX column tiles', then each dW role's tiles'
    scratch_ptr, ticket_ptr,
    # COPY: an operand of the next launch [CP_ROWS, CP_COLS] (any strides: the chain's input or
    # a weight), whose TF32 split this launch writes into cp_dst [CP_ROWS, ld_cp], the low part
    # CP_ROWS rows behind (the next launch's X_SPLIT, or its W_COPY == 3)
    cp_src_ptr, cp_dst_ptr,
    # sizes: M = batch, N = out_features, K = in_features, NN = the next block's out_features;
    # load bounds of g_y and z along N, of W along K, of x along K, of g_y_{l-1}'s stores, of
    # the next block's g_z along NN (padded rows: module docstring)
    M, N, K, NN, ld_n, ld_wk, ld_xk, ld_gk, ld_nn, CP_ROWS, CP_COLS, ld_cp,
    # row strides (columns are contiguous, but x's and W's: the chain's input and the weight
    # may have any strides; and g_y's when it is a single column: see linear_bwd)
    stride_gm, stride_gn, stride_zm, stride_wn, stride_wk, stride_xm, stride_xk, stride_gim, stride_gzm, stride_nxm,
    stride_cpr, stride_cpc,
    # programs: the first DX_PROGRAMS do dX, the next DW_PROGRAMS this block's dW, the rest the
    # next block's; each dW role's batch chunks
    DX_PROGRAMS, DW_PROGRAMS, ROWS_PER_SPLIT, NX_ROWS_PER_SPLIT,
    # meta-parameters
    HAS_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
    IN_MODE: tl.constexpr, IN_BN: tl.constexpr, IN_ACT: tl.constexpr, IN_DROPOUT: tl.constexpr,
    HAS_DX: tl.constexpr, IN_BN_MODE: tl.constexpr, IN_HAS_GAMMA: tl.constexpr, IN_HAS_BETA: tl.constexpr,
    W_COPY: tl.constexpr, DW_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    NEXT: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, NX_HAS_BIAS: tl.constexpr, NX_SPLIT: tl.constexpr,
    SPLIT_GZ: tl.constexpr, NX_SPLIT_GZ: tl.constexpr, COPY: tl.constexpr, X_SPLIT: tl.constexpr,
    DX_BLOCK_M: tl.constexpr, DX_BLOCK_N: tl.constexpr, DX_BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr,
    NX_BLOCK_M: tl.constexpr, NX_BLOCK_N: tl.constexpr, NX_BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block's backward: the dX programs, this block's dW programs and the next block's
    (module docstring). W_COPY as the forward's (the dX programs read W). X_SPLIT: x is the
    chain's input as the previous launch split it (COPY), the low part M rows behind."""
    pid = tl.program_id(0)
    if COPY:  # a share in every program
        _copy_padded(cp_src_ptr, stride_cpr, stride_cpc, CP_ROWS, CP_COLS, cp_dst_ptr, ld_cp, pid,
                     tl.num_programs(0), 1024, True)
    if pid < DX_PROGRAMS:
        if HAS_DX:  # (not compiled when the launch has no dX programs: fewer registers)
            dw_part = _dw_scratch(M, N, K, ROWS_PER_SPLIT, SPLIT) if DW_MODE != DW_DEFERRED else 0
            nx_part = _dw_scratch(M, N, NN, NX_ROWS_PER_SPLIT, NX_SPLIT) if NEXT else 0
            _dx_program(
                pid, g_y_ptr, stride_gm, stride_gn, z_ptr, stride_zm, vec_ptr, uv_ptr, w_ptr, stride_wn, stride_wk,
                x_ptr, stride_xm, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope, in_dgamma_ptr,
                in_dbeta_ptr, in_uv_ptr, g_in_ptr, stride_gim, gz_ptr, stride_gzm, scratch_ptr + dw_part + nx_part,
                ticket_ptr, M, N, K, ld_n, ld_wk, ld_gk,
                HAS_BN, BATCH_STATS, IN_ACT, IN_DROPOUT, IN_BN_MODE, IN_HAS_GAMMA, IN_HAS_BETA,
                (2 if SPLIT_GZ else 1) if DW_MODE == DW_DEFERRED else 0, W_COPY, DX_BLOCK_M, DX_BLOCK_N, DX_BLOCK_K,
                PRECISION,
            )
    elif pid < DX_PROGRAMS + DW_PROGRAMS:
        tickets = ticket_ptr + tl.cdiv(K, DX_BLOCK_N)
        if DW_MODE == DW_GRAD_ROWS:  # g_z^T @ a_{l-1}
            _dw_program(
                pid - DX_PROGRAMS, g_y_ptr, z_ptr, stride_gm, stride_zm, vec_ptr, uv_ptr, None, 0.0, 0.0, 0.0,
                x_ptr, stride_xm, stride_xk, in_vec_ptr, in_seed_ptr, in_drop_p, in_drop_scale, in_slope,
                x_ptr + _wide(M) * stride_xm if X_SPLIT else None,
                dw_ptr, db_ptr, scratch_ptr, tickets, M, N, K, ld_n, ld_xk, ROWS_PER_SPLIT,
                A_GRAD_M if HAS_BN else A_PLAIN, False, ACT_NONE, False, BATCH_STATS,
                IN_MODE, IN_BN, IN_ACT, IN_DROPOUT, False, HAS_BIAS, SPLIT, X_SPLIT,
                DW_BLOCK_M, DW_BLOCK_N, DW_BLOCK_K, PRECISION,
            )
        elif DW_MODE == DW_ACT_ROWS:  # (a_{l-1}^T @ g_y)^T, g_z = g_y without BatchNorm
            _dw_program(
                pid - DX_PROGRAMS, x_ptr, x_ptr, stride_xm, stride_xm, in_vec_ptr, None, in_seed_ptr, in_drop_p,
                in_drop_scale, in_slope,
                g_y_ptr, stride_gm, stride_gn, None, None, 0.0, 0.0, 0.0, None,
                dw_ptr, db_ptr, scratch_ptr, tickets, M, K, N, ld_xk, ld_n, ROWS_PER_SPLIT,
                A_ACT_M, IN_BN, IN_ACT, IN_DROPOUT, False, A_PLAIN, False, ACT_NONE, False, True, HAS_BIAS, SPLIT,
                False, DW_BLOCK_M, DW_BLOCK_N, DW_BLOCK_K, PRECISION,
            )
    elif NEXT:  # the next block's (a_l^T @ g_z_{l+1})^T
        dw_part = _dw_scratch(M, N, K, ROWS_PER_SPLIT, SPLIT) if DW_MODE != DW_DEFERRED else 0
        tickets = ticket_ptr + tl.cdiv(K, DX_BLOCK_N) + _dw_tiles(N, K, DW_MODE, DW_BLOCK_M, DW_BLOCK_N)
        _dw_program(
            pid - DX_PROGRAMS - DW_PROGRAMS, z_ptr, z_ptr, stride_zm, stride_zm, vec_ptr, None, seed_ptr, drop_p,
            drop_scale, slope,
            nx_gz_ptr, stride_nxm, 1, None, None, 0.0, 0.0, 0.0,
            nx_gz_ptr + _wide(M) * stride_nxm if NX_SPLIT_GZ else None,
            nx_dw_ptr, nx_db_ptr, scratch_ptr + dw_part, tickets, M, N, NN, ld_n, ld_nn, NX_ROWS_PER_SPLIT,
            A_ACT_M, HAS_BN, ACT, DROPOUT, False, A_PLAIN, False, ACT_NONE, False, True, NX_HAS_BIAS, NX_SPLIT,
            NX_SPLIT_GZ, NX_BLOCK_M, NX_BLOCK_N, NX_BLOCK_K, PRECISION,
        )


@_kernel
def _act_fwd_kernel(
    z_ptr, a_ptr, vec_ptr, seed_ptr, drop_p, drop_scale, slope, M, N, stride_zm,
    BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """a = act(z) for the last block of a chain (nothing after it to fuse into); a contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    z = tl.load(z_ptr + rows * stride_zm + offs_n[None, :], mask=mask, other=0.0)
    center, scale, shift = _site_vectors(vec_ptr, N, offs_n, mask_n, BN, 1)
    a = _activate(z.to(tl.float32), offs_m[:, None], offs_n[None, :], center, scale, shift, seed_ptr, drop_p,
                  drop_scale, slope, BN, ACT, DROPOUT)
    tl.store(a_ptr + rows * N + offs_n[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@_kernel
def _act_bwd_kernel(
    g_ptr, stride_gm, stride_gn, z_ptr, stride_zm, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr,
    dbeta_ptr, uv_ptr, g_y_ptr, stride_ym, ld_n, part_ptr, ticket_ptr, M, N,
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
        z_ptr, stride_zm, vec_ptr, seed_ptr, drop_p, drop_scale, slope, dgamma_ptr, dbeta_ptr, uv_ptr,
        g_y_ptr, stride_ym, ld_n, part_ptr, ticket_ptr,
        BN_MODE, HAS_GAMMA, HAS_BETA, ACT, DROPOUT,
    )


@triton.jit
def _dropout_scale_kernel(seed_ptr, out_ptr, M, N, drop_p, drop_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ones = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    keep = _dropout(ones, offs_m[:, None], offs_n[None, :], seed_ptr, drop_p, drop_scale, True)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], keep, mask=mask)


# ---------------------------------------------------------------- launchers

NO_BN, BATCH, FIXED, PARTIALS = 0, 1, 2, 3  # the BN_* modes, for the host
DEFERRED, GRAD_ROWS, ACT_ROWS = 0, 1, 2     # the DW_* modes


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


def _interpreting() -> bool:
    return launch.INTERPRET


def num_sms() -> int:
    """The current device's SM count, asked of Triton's active driver (a stand-in driver
    answers for a GPU that isn't there: bench/standin.py)."""
    driver = triton.runtime.driver.active
    return driver.utils.get_device_properties(driver.get_current_device())["multiprocessor_count"]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for `dtype`. fp32 honours torch's matmul precision: "high" and
    "medium" allow TF32, and "highest" asks for fp32 accuracy, which 3xTF32 gives on tensor
    cores: each operand splits into a TF32 part and a TF32 remainder (a = a_hi + a_lo exactly
    up to 2^-22 |a|), and a_hi b_hi + a_hi b_lo + a_lo b_hi leaves out only a_lo b_lo, about
    2^-22 of each product. Products accumulate in fp32 as an fp32 GEMM's do, so the error is
    that of fp32 FMAs to within a small factor, inside the tests' rule (twice eager's own fp32
    error plus 1e-5 of the scale; tests/test_kernels.py checks it on a GPU at K = 1024). "ieee"
    would run on CUDA cores, 30x slower, and spill."""
    if dtype == torch.float32:
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"  # (ignored for 16-bit inputs)


# Output tiles, largest first: the first that gives every SM a CTA is taken (at B >= 4096 one
# always does; a narrow layer's GEMM has few rows of tiles, so it takes narrow ones), else the
# smallest. BLOCK_M >= 64: a warpgroup's wgmma covers 64 rows.
TILES = ((128, 128), (128, 64), (64, 128), (64, 64), (64, 32), (64, 16))
# Below those, for forward and dX outputs at most 32 wide (a head of a few outputs, a narrow
# input's gradient), whose 64-row tiles leave SMs idle up to a batch of 64 x 132: fewer rows,
# on mma.sync. Such a GEMM is a few FLOPs per byte, so idle SMs cost more than wgmma would win.
NARROW_TILES = ((32, 16), (16, 16))


def _largest(dtype: torch.dtype, accumulators: int = 1) -> int:
    # fp32 holds twice the bytes per element, and 3xTF32 splits each operand in two: 128 x 128
    # tiles spill; three accumulators (a split B operand, _gemm_core's SPLIT_B) in 128 x 64
    # tiles spill the dX programs
    if accumulators > 1:
        return 64 * 64
    return 128 * 64 if dtype == torch.float32 else 128 * 128


def _tiles(gemm: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
           accumulators: Optional[int] = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the `gemm` ("fwd", "dx": see
    tiles.py) of an M x N output over K: the tile table's, else the heuristic's (`accumulators`
    where it is known: _accumulators)."""
    if _interpreting():
        return 32, 32, 32, 4, 1  # small tiles, so small test shapes still cross tile edges
    config = table_config(gemm, M, N, K, dtype, device)
    if config is not None:
        return tuple(config)
    accumulators = accumulators or _accumulators(gemm, M, N, K, dtype)
    fits = _fitting(M, N, _largest(dtype, accumulators))
    fits += NARROW_TILES if N <= 32 else ()
    sms = num_sms()
    block_m, block_n = next((t for t in fits if launch.cdiv(M, t[0]) * launch.cdiv(N, t[1]) >= sms), fits[-1])
    block_k = 32 if dtype == torch.float32 else 64
    return block_m, block_n, block_k, _warps(block_m * block_n * accumulators), 3


def _fitting(M: int, N: int, area: int) -> list:
    """TILES no larger than `area` elements nor than M x N's powers of two (but 64 x 16)."""
    rows, cols = max(64, launch.next_power_of_2(M)), max(16, launch.next_power_of_2(N))
    return [(bm, bn) for bm, bn in TILES if bm <= rows and bn <= cols and bm * bn <= area] or [TILES[-1]]


def _accumulators(gemm: str, M: int, N: int, K: int, dtype: torch.dtype) -> int:
    """Accumulator tiles of a forward or dX program (sizes as _tiles takes them): three where
    it reads its weight's TF32 split (_gemm_core's SPLIT_B; _copies says where)."""
    return 3 if _precision(dtype) == "tf32x3" and _split_fits(M, N if gemm == "fwd" else K) else 1


def _split_fits(rows: int, weight_rows: int) -> bool:
    """Whether a weight's two TF32 copies take no more memory than the z of `rows` rows that
    carries them (_copies). For a symbolic batch (torch.export or torch.compile with dynamic
    shapes trace the allocations): only where that holds at every batch the trace admits, so
    that it adds no guard (which would narrow an export's batch range); a z without the room
    has its readers read the weight as it is (_weight_copies), so either answer is correct."""
    return statically_known_true(2 * weight_rows <= rows)


def _warps(area: int) -> int:
    # two warpgroups from 128 x 64 up: a thread's share of the accumulator and operands stays
    # small enough not to spill; below 64 x 16 (NARROW_TILES, mma.sync) a warp or two
    return 8 if area >= 128 * 64 else 4 if area >= 64 * 16 else 2 if area > 16 * 16 else 1


# ---- padded rows and aligned weights
#
# Triton loads 16 bytes at a time only where it can prove the alignment: a row stride divisible
# by 16 elements, and a mask constant over 16-element runs (a bound divisible by 16). Most of
# `mlp_by_budget`'s widths are not (252, 811, 1820), and then every load of a GEMM's main loop
# is a scalar LDG and the loop serialises. So activations the kernels pass to each other (z, and
# g_y in the backward) are stored with rows padded to 16 elements (`new_activation`), the kernels
# write the padding as zeros and their readers load padded rows whole (the `_ld` bounds; past
# the width the values are zero or masked off after the transform). Users never see such a
# tensor: a chain's output and input gradient stay contiguous.
#
# A weight [N, K] with K not a multiple of 16 has unaligned rows too, and is a parameter whose
# layout is the user's. It is read through an aligned copy [N, pad(K)] (zero padding), and a
# copy costs no launch of its own: the launch before the block's forward, the previous block's
# forward, writes it behind the rows of the z it produces, which is the block's input x
# (`new_activation(..., next_weight)`, `linear_fwd(..., next_weight=...)`); the block's forward
# and its backward's dX read it there, at x's row M (`chained=True`; the kernels' W_COPY).
# Chains' first blocks read their weight as it is (their input is the user's, unpadded,
# anyway). A z without the room (a copy of one that torch.compile made, say) just reads the
# weight as it is.
#
# fp32 at "highest" (3xTF32) takes two copies of every such weight, aligned or not, where they
# take no more memory than the z (_copies): its TF32 part and the remainder, which _gemm_core's
# SPLIT_B loads as two operands that the main loop pipelines (Triton's own "tf32x3" splits B
# inside the loop and waits for every MMA). The copies a z carries are what its room says
# (_weight_copies), so the backward reads what the forward wrote even if the matmul precision
# changed in between. Where they do not fit, z carries none, and the launch before each GEMM
# that reads the weight writes its split into a buffer that lives until that GEMM has run:
# the previous forward (splits_apart, LinearFwd's split_next) and the next block's backward
# (LinearBwd's next_split), at the cost of reading the weight once more and writing it twice.

ALIGN = 16


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _aligned(weight) -> bool:
    """Whether Triton sees `weight`'s rows as aligned (by its strides: fake tensors have no data)."""
    return weight.stride(1) == 1 and weight.stride(0) % ALIGN == 0


@torch.compiler.assume_constant_result
def _fp32_split() -> bool:
    """Whether fp32 GEMMs run 3xTF32 (matmul precision "highest"): a constant to torch.compile,
    which cannot trace the query. (Harmless if it changes later: the kernels read the copies a z
    has room for, _weight_copies, and the forward writes them.)"""
    return torch.get_float32_matmul_precision() == "highest"


def _copies(rows: int, like: torch.Tensor, weight: torch.Tensor) -> int:
    """How many aligned copies of `weight` a z of `rows` rows in `like`'s dtype carries for the
    block that reads it: where fp32 runs 3xTF32 (_gemm_core's SPLIT_B), two, the weight's TF32
    split, if they take no more memory than z itself (a z is kept for the backward: wide layers
    at small batches would otherwise hold several times their activations), else none (the
    launch before each GEMM that reads the weight splits it apart: splits_apart, LinearBwd's
    next_split); else one where the weight's rows are not aligned; else none."""
    if _runs_3xtf32(like):
        return 2 if _split_fits(rows, weight.shape[0]) else 0
    return 0 if _aligned(weight) else 1


def _runs_3xtf32(like: torch.Tensor) -> bool:
    return like.dtype == torch.float32 and _fp32_split()


def splits_apart(rows: int, like: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the forward launch before the block whose weight is `weight` writes the weight's
    TF32 split into a buffer of its own (new_split; LinearFwd's `split_next`) for that block's
    forward, as the z of `rows` rows it writes has no room for it (_copies)."""
    return _runs_3xtf32(like) and not _split_fits(rows, weight.shape[0])


def _weight_read(x: torch.Tensor, weight: torch.Tensor, behind: bool, given: bool) -> Tuple[int, int, int]:
    """(W_COPY, row stride, column stride) of how a GEMM reads `weight`: as the split the last
    launch wrote, when `given` (3, the split's strides); through the copies behind x's rows, where
    it may (`behind`) and x has them (_weight_copies); else as it is."""
    if given:
        return (3, *weight.stride())
    w_copy = _weight_copies(x, weight) if behind else 0
    return (w_copy, x.stride(0), 1) if w_copy else (0, *weight.stride())


def _rows(like: torch.Tensor, M: int, N: int, ld: int, size: int) -> torch.Tensor:
    """An uninitialised [M, N] tensor (like's dtype and device) whose rows lie `ld` apart at
    the start of a buffer of `size` elements: one allocation (host time)."""
    if size == M * N:
        return like.new_empty(M, N)
    return like.new_empty(size).as_strided((M, N), (ld, 1))


def _passed(work, kind: str, parity: int, like: torch.Tensor, M: int, N: int, ld: int, size: int) -> torch.Tensor:
    """_rows' tensor, for one that a launch writes and the next one reads: from `work` (a
    launch.Workspace, which keeps small ones) where given, else new."""
    view = work.view(kind, parity, like.dtype, M, N, ld, size) if work is not None else None
    return view if view is not None else _rows(like, M, N, ld, size)


def _activation(M: int, N: int, like: torch.Tensor, next_weight: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(copies, size) of a new z [M, N]: how many copies of `next_weight` it carries (_copies),
    and its buffer's elements (M rows padded to 16 elements, then the copies)."""
    copies = _copies(M, like, next_weight) if next_weight is not None else 0
    return copies, (M + copies * (next_weight.shape[0] if copies else 0)) * _pad(N)


def new_activation(M: int, N: int, like: torch.Tensor, next_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An uninitialised z [M, N] (like's dtype and device) for a block whose output another
    block reads: rows padded to 16 elements, and behind them room for the copies of
    `next_weight` (that block's weight) that _copies asks for."""
    return _rows(like, M, N, _pad(N), _activation(M, N, like, next_weight)[1])


def _weight_copies(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many copies of `weight` the room behind the rows of x (a z from new_activation)
    holds, as its size says (so what a forward wrote is what its backward reads, whatever the
    matmul precision is by then): 2 for its TF32 split (the low part right behind the high
    part), 1 for its aligned copy, 0 where x has no room. Kernels find them at x's row M."""
    ld = _pad(weight.shape[1])
    if x.stride() != (ld, 1):
        return 0
    room = x.untyped_storage().nbytes() // x.element_size() - (x.storage_offset() + x.shape[0] * ld)
    return max(0, min(2, room // (weight.shape[0] * ld)))


def _ld(t: torch.Tensor, n: int) -> int:
    """How far loads along t's n columns may run: its padded row length when its rows are padded
    as new_activation pads them (inside its storage), else n."""
    ld = t.stride(0)
    if ld == n or t.stride(1) != 1 or ld != _pad(n):
        return n
    return ld if (t.storage_offset() + t.shape[0] * ld) * t.element_size() <= t.untyped_storage().nbytes() else n


# ---- plans
#
# Each launcher is a plan, made once from its arguments' layout (shapes, strides, dtypes, the
# room behind padded rows, the options), and called with the tensors of each launch: what a
# launch computes from shapes (tiles, grid, bounds, constexprs, what it allocates) costs host
# time of the order of the launch itself. A plan holds for any tensors laid out like those it
# was made from: dwfast.ops keeps its chains' plans keyed on every tensor's layout and 16-byte
# alignment. `linear_fwd`, `linear_bwd`, `act_fwd` and `act_bwd` plan and launch in one call.
# A call takes the scratch and ticket buffers (launch.scratch, launch.tickets) of at least the
# plan's `scratch` and `tickets` elements: one fetch per chain serves all its launches.


def _buffers(device, plan):
    return launch.scratch(device, plan.scratch), launch.tickets(device, plan.tickets)


class LinearFwd:
    """linear_fwd's plan; called with (x, weight, bias, in_vec, in_seed, vec, gamma, beta,
    running_mean, running_var, num_batches, next_weight, scratch, tickets[, out, next_split]),
    site_in's and norm's tensors among them, it returns z.

    `split_next` (splits_apart): the launch writes next_weight's TF32 split into `next_split`
    (new_split), which the next block's plan, made with `given`, takes as its weight."""

    def __init__(self, x, weight, bias, site_in: Site, norm: Norm, out, next_weight, chained: bool,
                 split_next: bool = False, given: bool = False):
        M, K = x.shape
        N = weight.shape[0]
        if out is not None:  # z written into out, as laid out
            self.size, ld_z, stride_zm = None, _ld(out, N), out.stride(0)
            copy_next = _weight_copies(out, next_weight) if next_weight is not None else 0
        elif next_weight is not None:  # a z the next block reads: padded rows, its weight's copies
            (copy_next, self.size), ld_z = _activation(M, N, x, next_weight), _pad(N)
            stride_zm = ld_z
        else:
            copy_next, self.size, ld_z, stride_zm = 0, M * N, N, N
        self.M, self.N, self.ld_z = M, N, ld_z
        if split_next:  # (no room behind z: splits_apart)
            copy_next = 3
        w_copy, stride_wn, stride_wk = _weight_read(x, weight, chained, given)  # (given: the last split_next)
        block_m, block_n, block_k, num_warps, num_stages = _tiles("fwd", M, N, K, x.dtype, x.device,
                                                                  3 if given else None)
        row_tiles, col_tiles = launch.cdiv(M, block_m), launch.cdiv(N, block_n)
        mode = norm.mode
        self.mode, self.row_tiles, self.block_m = mode, row_tiles, block_m
        self.scratch = 3 * row_tiles * N if mode in (BATCH, PARTIALS) else 0
        self.tickets = col_tiles + 1 if mode == BATCH else 0
        self.running = mode == BATCH and norm.running_mean is not None
        self.copy_next = copy_next
        nw = next_weight if copy_next else None
        self.scalars_in = (float(site_in.drop_p), _drop_scale(site_in.drop_p), float(site_in.slope))
        self.scalars_bn = (float(norm.eps), float(norm.momentum or 0.0))
        self.sizes = (nw.stride(0) if copy_next else 0, nw.stride(1) if copy_next else 0,
                      nw.shape[0] if copy_next else 0,
                      M, N, K, _ld(x, K) if chained else K, stride_wn if w_copy else K, ld_z,
                      x.stride(0), x.stride(1), stride_wn, stride_wk, stride_zm)
        self.launch = launch.Launch(
            _linear_fwd_kernel, (row_tiles * col_tiles, 1, 1),  # in grouped tile order (_grouped_tile)
            (A_PLAIN if site_in.identity else A_ACT_K, site_in.vec is not None, int(site_in.act), site_in.drop_p > 0,
             bias is not None, mode, norm.gamma is not None, norm.beta is not None, self.running,
             norm.momentum is None, copy_next, w_copy, block_m, block_n, block_k, _precision(x.dtype)),
            num_warps, num_stages)

    def __call__(self, x, weight, bias, in_vec, in_seed, vec, gamma, beta, running_mean, running_var, num_batches,
                 next_weight, scratch, tickets, out=None, next_split=None):
        z = out if out is not None else _rows(x, self.M, self.N, self.ld_z, self.size)
        self.launch((x, weight, bias, z, in_vec, in_seed, *self.scalars_in,
                     scratch if self.scratch else None, vec, gamma, beta, running_mean, running_var,
                     num_batches if self.running else None, tickets if self.tickets else None, *self.scalars_bn,
                     next_weight if self.copy_next else None, next_split, *self.sizes))
        return z

    def partials(self, scratch):
        """In norm mode PARTIALS the per-row-tile (shift, mean, M2) of z that a call left in
        `scratch`, fp32 [3, row_tiles, N], and the rows per tile; else None."""
        if self.mode != PARTIALS:
            return None
        return scratch[:3 * self.row_tiles * self.N].view(3, self.row_tiles, self.N), self.block_m


def linear_fwd(x, weight, bias=None, site_in: Site = NO_SITE, norm: Norm = NO_NORM, out=None, next_weight=None,
               chained: bool = False):
    """z = act_in(x) @ weight^T + bias (written into `out` when given; else new, rows padded when
    a next block reads it, contiguous otherwise), and `norm.vec` filled (BATCH, FIXED).

    `next_weight`: the next block's weight, whose aligned copy this launch writes behind z's rows
    when z has room for it (new_activation). `chained`: x is the previous block's z from such a
    call (padded rows, and maybe this block's weight copy behind them).

    Returns (z, partials): with `norm.mode` PARTIALS, the per-row-tile (shift, mean, M2) of z,
    fp32 [3, row_tiles, N], and the rows per tile, for the host to merge; else None.
    """
    plan = LinearFwd(x, weight, bias, site_in, norm, out, next_weight, chained)
    scratch, tickets = _buffers(x.device, plan)
    z = plan(x, weight, bias, site_in.vec, site_in.seed, norm.vec, norm.gamma, norm.beta, norm.running_mean,
             norm.running_var, norm.num_batches, next_weight, scratch, tickets, out)
    return z, plan.partials(scratch)


class _DW(NamedTuple):
    """A dW role's plan: tile shape, warps and stages, output tiles, programs, batch rows per
    chunk, scratch elements."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tiles: int
    programs: int
    rows_per_split: int
    split: bool
    scratch: int


NO_DW = _DW(16, 16, 16, 4, 3, 0, 0, 1, False, 0)  # a role without programs


def _dw_plan(B: int, DM: int, DN: int, dtype, device, area: int = 128 * 128, narrowest: int = 16,
             accumulators: int = 1) -> _DW:
    """How a dW [DM, DN] = A^T B over a batch of B rows is tiled and split into batch chunks
    (_dw_program): the tile table's config, else the largest tile (TILES, at most `area`
    elements and at least `narrowest` wide) for which chunks of at least 4 BLOCK_K steps give
    every SM a program, else the smallest with one-step chunks (of 32 or 16 rows where needed).
    `accumulators`: 3 where B is read as its TF32 split (SPLIT_B), in tiles of 64 x 64 at most."""
    block_k = 32 if dtype == torch.float32 else 64
    num_stages = 3
    config = None if _interpreting() else table_config("dw", DM, DN, B, dtype, device)
    if _interpreting():
        block_m, block_n, block_k = 32, 32, 32
        splits = launch.cdiv(B, 4 * block_k)  # several chunks at test sizes, to test the split
    elif config is not None:
        block_m, block_n, block_k, _, num_stages, splits = config
    else:
        sms = num_sms()
        fits = [t for t in _fitting(DM, DN, min(area, _largest(dtype, accumulators))) if t[1] >= min(narrowest, DN)]
        fits = fits or [TILES[-1]]
        wanted = [launch.cdiv(sms, launch.cdiv(DM, bm) * launch.cdiv(DN, bn)) for bm, bn in fits]
        i = next((i for i, n in enumerate(wanted) if n <= max(B // (4 * block_k), 1)), len(fits) - 1)
        (block_m, block_n), splits = fits[i], wanted[i]
        while B // splits < block_k and block_k > 16:  # one-step chunks: shorter steps make more of them
            block_k //= 2
    num_warps = config[3] if config is not None else _warps(block_m * block_n * accumulators)
    n_tiles = launch.cdiv(DM, block_m) * launch.cdiv(DN, block_n)
    rows_per_split = max(1, B // splits // block_k) * block_k
    splits = launch.cdiv(B, rows_per_split)
    scratch = splits * (DM * DN + max(DM, DN)) if splits > 1 else 0  # as _dw_scratch counts
    return _DW(block_m, block_n, block_k, num_warps, num_stages, n_tiles, n_tiles * splits, rows_per_split,
               splits > 1, scratch)


def next_split(x: torch.Tensor, weight: torch.Tensor, chained: bool, input_grad: bool) -> Optional[str]:
    """Which operand of a block's backward launch (its LinearBwd's arguments) the launch before
    writes as its TF32 split: "x" (the chain's input, which the first block's dW reads), "w"
    (the weight, for dX, where x carries no split of it), or None."""
    if _precision(x.dtype) != "tf32x3":
        return None
    if not chained:
        return "x"
    return "w" if input_grad and _weight_copies(x, weight) < 2 else None


def new_split(t: torch.Tensor, work=None, parity: int = 0) -> torch.Tensor:
    """An uninitialised buffer for t's TF32 split [R, C] (rows padded to 16 elements, the low
    part R rows behind), as a view of its high part; from `work` as _passed's."""
    R, C = t.shape
    return _passed(work, "split", parity, t, R, C, _pad(C), 2 * R * _pad(C))


class DeferredDW(NamedTuple):
    """A block's dW (and db) left by its backward launch to the next one (the previous block's),
    from the g_z [B, N] it stored: `linear_bwd(..., defer=True)` returns it, `linear_bwd(...,
    deferred=...)` of the previous block computes it, reading a = `site`(that block's z)."""
    g_z: torch.Tensor
    dw: torch.Tensor
    db: Optional[torch.Tensor]
    x: torch.Tensor
    site: Site
    split: bool = False  # g_z is stored as its TF32 split, the low part B rows behind (fp32 at "highest")


class LinearBwd:
    """linear_bwd's plan; called with (g_y, z, weight, vec, uv, x, in_vec, in_seed, in_gamma,
    in_beta, seed, later, scratch, tickets[, uv_in, copy, work, parity]): norm's vec and uv,
    site_in's tensors, norm_in's gamma and beta (their gradients are made like them), the
    dropout seed of this block's activation (which a deferred dW reads it with) and, when this
    launch computes the next block's deferred dW, that block's call's `later`. Returns (g_in, dw, db, dgamma, dbeta,
    uv_in, later): as linear_bwd's, but for uv_in, norm_in's u, v buffer [2, K] (new unless
    given; None without BatchNorm there), and `later`, the (g_z, dw, db) of this block's
    deferred dW. With `work` (a launch.Workspace) what only the next launch reads (g_in but the
    chain's input gradient, uv_in, g_z) comes from its buffers of `parity` (_passed).

    In fp32 at "highest" a GEMM whose B operand is not split in memory splits it inside its loop
    (_gemm_core's SPLIT_B): the first block's dW reads the chain's input as stored, and a dX
    whose x carries no split of its weight (_copies) the weight. There the launch before writes
    that operand's split (`next_split` says which): it is planned with `copy` = (the kind,
    the operand) and called with copy=(the operand, new_split(it)); the next is planned with
    `given` = the kind and called with the split as its x ("x") or its weight ("w")."""

    def __init__(self, g_y, z, weight, norm: Norm, x, site_in: Site, norm_in: Norm, input_grad: bool,
                 has_bias: bool, chained: bool, deferred: Optional[DeferredDW], defer: bool,
                 copy: Optional[Tuple[str, torch.Tensor]] = None, given: Optional[str] = None):
        B, N = g_y.shape
        K = weight.shape[1]
        dev = g_y.device
        x_split = given == "x"
        w_copy, stride_wn, stride_wk = _weight_read(x, weight, chained and input_grad, given == "w")
        if deferred is not None:
            assert deferred.x is z and deferred.site.vec is norm.vec, "a DeferredDW goes to the block whose output it reads"
        # Without BatchNorm g_z = g_y is stored already and dW reads it in this launch (ACT_ROWS),
        # but in fp32 at "highest" only a stored split lets that dW's loop overlap: deferred too
        split = _precision(g_y.dtype) == "tf32x3"
        if defer and input_grad and (norm.mode != NO_BN or split) and not site_in.identity:
            dw_mode = DEFERRED
        else:
            # (a_{l-1} is read along its features: contiguous ones)
            dw_mode = ACT_ROWS if norm.mode == NO_BN and not site_in.identity and x.stride(1) == 1 else GRAD_ROWS

        dx_m, dx_n, dx_k, num_warps, num_stages = _tiles("dx", B, K, N, g_y.dtype, dev, 3 if w_copy == 3 else None)
        dx_row_tiles, dx_col_tiles = launch.cdiv(B, dx_m), launch.cdiv(K, dx_n)
        dx_programs = dx_row_tiles * dx_col_tiles if input_grad else 0
        # dW tiles up to 128 x 64: a launch's roles share its registers (the union of a dX role's and
        # two dW roles' spills with 128 x 128 ones), and chunks of the batch fill the SMs anyway. Two
        # dW roles may take 8 warps (below), and then 32 columns: 16 would leave 8-byte loads.
        area, narrowest = 128 * 64, 32 if deferred is not None and dw_mode != DEFERRED else 16
        own = NO_DW if dw_mode == DEFERRED else _dw_plan(B, *((K, N) if dw_mode == ACT_ROWS else (N, K)), g_y.dtype,
                                                         dev, area, narrowest, 3 if x_split else 1)
        nn = deferred.dw.shape[0] if deferred is not None else 0
        nxt = (_dw_plan(B, N, nn, g_y.dtype, dev, area, narrowest, 3 if deferred.split else 1)
               if deferred is not None else NO_DW)
        # The roles share the launch's warps and stages: the most warps any asks for (8 for two dW
        # roles, whose registers add up), the fewest stages.
        roles = [r for r in (own, nxt) if r.programs]
        if not _interpreting():
            largest = max([r.block_m * r.block_n for r in roles], default=0)
            num_warps = max([num_warps if input_grad else 4] + [r.num_warps for r in roles])
            if len(roles) == 2 and largest >= 64 * 64:
                num_warps = 8
            num_stages = min([num_stages if input_grad else 4] + [r.num_stages for r in roles])

        # what a call allocates: g_in (padded rows, unless it is the chain's input gradient), dW, db,
        # norm_in's dgamma, dbeta and u, v; g_z when dW is deferred, in fp32 at "highest" as its TF32
        # split, which the next launch's dW reads as it reads a weight's (_gemm_core's SPLIT_B): its
        # main loop then overlaps
        in_bn = norm_in.mode if input_grad else NO_BN
        self.B, self.N, self.K = B, N, K
        self.input_grad, self.has_bias, self.chained = input_grad, has_bias, chained
        self.ld_in = K if site_in.identity else _pad(K)
        self.dgamma = in_bn != NO_BN and norm_in.gamma is not None
        self.dbeta = in_bn != NO_BN and norm_in.beta is not None
        self.uv_in = in_bn != NO_BN
        self.dw_shape = tuple(weight.shape)
        self.own_dw = dw_mode != DEFERRED
        split_gz = self.split_gz = dw_mode == DEFERRED and split
        self.g_z = (1 + split_gz) * B * _pad(N) if dw_mode == DEFERRED else 0
        self.nx = deferred is not None
        self.copy_kind = copy[0] if copy is not None else None
        copy_src = copy[1] if copy is not None else None
        dx_part = own.scratch + nxt.scratch
        dx_scratch = 2 * dx_row_tiles * K if in_bn != NO_BN else 0
        self.scratch, self.tickets = dx_part + dx_scratch, dx_col_tiles + own.tiles + nxt.tiles
        self.part_in = (dx_part, dx_row_tiles) if in_bn == PARTIALS else None
        site = deferred.site if deferred is not None else NO_SITE
        nx = deferred.g_z if deferred is not None else None
        self.scalars_in = (float(site_in.drop_p), _drop_scale(site_in.drop_p), float(site_in.slope))
        self.scalars_nx = (float(site.drop_p), _drop_scale(site.drop_p), float(site.slope))
        # g_y's column stride is 1, but a single column's may be anything, as no other is read: 16
        # makes Triton see its elements as contiguous rows and load 8 at a time (a one-output head)
        self.sizes = (B, N, K, nn, min(_ld(g_y, N), _ld(z, N)), stride_wn if w_copy else K, _ld(x, K),
                      self.ld_in if input_grad else K, _ld(nx, nn) if nx is not None else 0,
                      *((*copy_src.shape, _pad(copy_src.shape[1])) if copy is not None else (0, 0, 0)),
                      g_y.stride(0), ALIGN if N == 1 else 1, z.stride(0), stride_wn, stride_wk, x.stride(0),
                      x.stride(1), self.ld_in if input_grad else 0, _pad(N) if self.g_z else 0,
                      nx.stride(0) if nx is not None else 0, *(copy_src.stride() if copy is not None else (0, 0)),
                      dx_programs, own.programs, own.rows_per_split, nxt.rows_per_split)
        self.launch = launch.Launch(
            _linear_bwd_kernel, (dx_programs + own.programs + nxt.programs, 1, 1),
            (norm.mode != NO_BN, norm.mode in (BATCH, PARTIALS),
             A_PLAIN if site_in.identity else A_ACT_K, site_in.vec is not None, int(site_in.act), site_in.drop_p > 0,
             input_grad, in_bn, self.dgamma, self.dbeta, w_copy,
             dw_mode, has_bias, own.split,
             self.nx, int(site.act), site.drop_p > 0, deferred is not None and deferred.db is not None,
             nxt.split, split_gz, deferred is not None and deferred.split, copy is not None, x_split,
             dx_m, dx_n, dx_k, own.block_m, own.block_n, own.block_k, nxt.block_m, nxt.block_n, nxt.block_k,
             _precision(g_y.dtype)),
            num_warps, num_stages)

    def __call__(self, g_y, z, weight, vec, uv, x, in_vec, in_seed, in_gamma, in_beta, seed, later, scratch,
                 tickets, uv_in=None, copy=(None, None), work=None, parity=0):
        B, N, K = self.B, self.N, self.K
        if self.input_grad:  # (the chain's input gradient is the caller's: new)
            g_in = _passed(work if self.chained else None, "g", parity, g_y, B, K, self.ld_in, B * self.ld_in)
        else:
            g_in = None
        dgamma = torch.empty_like(in_gamma) if self.dgamma else None
        dbeta = torch.empty_like(in_beta) if self.dbeta else None
        if uv_in is None and self.uv_in:
            uv_in = _passed(work, "uv", parity, in_vec, 2, K, K, 2 * K)
        dw = weight.new_empty(self.dw_shape)  # contiguous, as the kernel writes it
        db = weight.new_empty(N) if self.has_bias else None
        g_z = _passed(work, "g_z", parity, g_y, B, N, _pad(N), self.g_z) if self.g_z else None
        nx_gz, nx_dw, nx_db = later if self.nx else (None, None, None)
        self.launch((g_y, z, vec, uv, weight, x, in_vec, in_seed, *self.scalars_in, dgamma, dbeta, uv_in,
                     g_in if g_in is not None else g_y,  # (g_y: a stand-in, never written without dX programs)
                     dw if self.own_dw else None, db if self.own_dw else None, g_z,
                     nx_gz, seed if self.nx else None, *self.scalars_nx, nx_dw, nx_db, scratch, tickets, *copy,
                     *self.sizes))
        return g_in, dw, db, dgamma, dbeta, uv_in, ((g_z, dw, db) if g_z is not None else None)

    def partials(self, scratch):
        """In norm_in's mode PARTIALS the per-row-tile sums of g_y and g_y * xhat of the previous
        block that a call left in `scratch`, [2, row_tiles, K]; else None."""
        if self.part_in is None:
            return None
        start, row_tiles = self.part_in
        return scratch[start:start + 2 * row_tiles * self.K].view(2, row_tiles, self.K)


def linear_bwd(g_y, z, weight, norm: Norm, x, site_in: Site = NO_SITE, norm_in: Norm = NO_NORM,
               input_grad: bool = True, has_bias: bool = True, chained: bool = False,
               deferred: Optional[DeferredDW] = None, defer: bool = False):
    """One block's backward in one launch (module docstring): from its g_y and z [B, N] (`norm`
    its BatchNorm, with u and v in `norm.uv` for batch statistics), its weight [N, K] and its
    input a = act_in(x) (`site_in`, `norm_in` of the previous block). `chained` as linear_fwd's
    (x is the previous block's z, with this block's weight copy).

    `defer`: with BatchNorm and an activation on both sides of the GEMM, leave dW to the next
    launch (`deferred` of the previous block's linear_bwd, which must come next), where g_z is
    stored and the MMAs need not wait (module docstring). `deferred`: the next block's
    DeferredDW, whose dW this launch computes.

    Returns (g_y_in, dw, db, dgamma_in, dbeta_in, partials_in, later): g_y_in is the previous
    block's g_y (None without `input_grad`; the chain's input gradient when `site_in` is the
    identity, then contiguous); db None without `has_bias`; the previous block's dgamma and dbeta
    (None where it has none) in its parameters' dtype, with its u and v in `norm_in.uv`; with
    `norm_in.mode` PARTIALS its per-row-tile sums of g_y and g_y * xhat [2, row_tiles, K] for the
    host, and dgamma, dbeta, u, v left to it; `later` the DeferredDW when dW (and db) are left to
    the next launch, else None.
    """
    plan = LinearBwd(g_y, z, weight, norm, x, site_in, norm_in, input_grad, has_bias, chained, deferred, defer)
    scratch, tickets = _buffers(g_y.device, plan)
    g_in, dw, db, dgamma, dbeta, uv_in, later = plan(
        g_y, z, weight, norm.vec, norm.uv, x, site_in.vec, site_in.seed, norm_in.gamma, norm_in.beta,
        deferred.site.seed if deferred is not None else None,
        deferred[:3] if deferred is not None else None, scratch, tickets, norm_in.uv)
    if later is not None:
        later = DeferredDW(*later, x, site_in, plan.split_gz)
    return g_in, dw, db, dgamma, dbeta, plan.partials(scratch), later


def _elementwise_tiles(M: int, N: int):
    block_n = min(128, max(ALIGN, launch.next_power_of_2(N)))  # a padded row's end is in some tile
    return (32 if _interpreting() else max(16, 4096 // block_n)), block_n


class ActFwd:
    """act_fwd's plan; called with (z, vec, seed), the site's tensors, it returns a."""

    def __init__(self, z, site: Site):
        M, N = z.shape
        block_m, block_n = _elementwise_tiles(M, N)
        self.shape = (M, N)
        self.scalars = (float(site.drop_p), _drop_scale(site.drop_p), float(site.slope), M, N, z.stride(0))
        self.launch = launch.Launch(_act_fwd_kernel, (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1),
                                    (site.vec is not None, int(site.act), site.drop_p > 0, block_m, block_n), 4, 1)

    def __call__(self, z, vec, seed):
        a = z.new_empty(self.shape)
        self.launch((z, a, vec, seed, *self.scalars))
        return a


def act_fwd(z, site: Site):
    """a = act(z) for a chain's last block, contiguous (z's rows contiguous)."""
    return ActFwd(z, site)(z, site.vec, site.seed)


class ActBwd:
    """act_bwd's plan; called with (grad, z, vec, seed, gamma, beta, scratch, tickets[, uv, work,
    parity]), the site's and norm's tensors, it returns (g_y, dgamma, dbeta, uv): uv the block's
    u, v buffer [2, N] (new unless given; None without BatchNorm); g_y and uv from `work` as
    LinearBwd's."""

    def __init__(self, grad, z, site: Site, norm: Norm):
        M, N = grad.shape
        block_m, block_n = _elementwise_tiles(M, N)
        grid = (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1)
        bn = norm.mode
        self.M, self.N, self.ld, self.bn, self.row_tiles = M, N, _pad(N), bn, grid[0]
        self.dgamma, self.dbeta = bn != NO_BN and norm.gamma is not None, bn != NO_BN and norm.beta is not None
        self.scratch, self.tickets = 2 * grid[0] * N if bn != NO_BN else 0, grid[1]
        self.grad_strides, self.z_stride = grad.stride(), z.stride(0)
        self.scalars = (float(site.drop_p), _drop_scale(site.drop_p), float(site.slope))
        self.launch = launch.Launch(_act_bwd_kernel, grid, (bn, self.dgamma, self.dbeta, int(site.act),
                                                            site.drop_p > 0, block_m, block_n), 4, 1)

    def __call__(self, grad, z, vec, seed, gamma, beta, scratch, tickets, uv=None, work=None, parity=0):
        M, N, ld = self.M, self.N, self.ld
        g_y = _passed(work, "g", parity, grad, M, N, ld, M * ld)  # padded rows, written whole
        dgamma = torch.empty_like(gamma) if self.dgamma else None
        dbeta = torch.empty_like(beta) if self.dbeta else None
        if self.bn == NO_BN:
            uv = None
        elif uv is None:
            uv = _passed(work, "uv", parity, vec, 2, N, N, 2 * N)
        self.launch((grad, *self.grad_strides, z, self.z_stride, vec, seed, *self.scalars, dgamma, dbeta, uv,
                     g_y, ld, ld, scratch if self.scratch else None, tickets, M, N))
        return g_y, dgamma, dbeta, uv

    def partials(self, scratch):
        """In norm mode PARTIALS the per-row-tile sums a call left in `scratch`, [2, row_tiles, N]."""
        if self.bn != PARTIALS:
            return None
        return scratch[:2 * self.row_tiles * self.N].view(2, self.row_tiles, self.N)


def act_bwd(grad, z, site: Site, norm: Norm):
    """g_y = the backward of `site`'s activation applied to grad = dL/da, for a chain's last
    block (g_y with padded rows). Returns (g_y, dgamma, dbeta, partials) as `linear_bwd` does for
    the previous block."""
    plan = ActBwd(grad, z, site, norm)
    scratch, tickets = _buffers(grad.device, plan)
    g_y, dgamma, dbeta, _ = plan(grad, z, site.vec, site.seed, norm.gamma, norm.beta, scratch, tickets, norm.uv)
    return g_y, dgamma, dbeta, plan.partials(scratch)


def dropout_scale(seed, M: int, N: int, p: float):
    """The [M, N] fp32 factors (0 or 1 / (1 - p)) that the kernels' dropout with `seed`
    multiplies an [M, N] activation by: for tests and for inspecting a fused forward."""
    out = torch.empty((M, N), device=seed.device, dtype=torch.float32)
    block_m, block_n = _elementwise_tiles(M, N)
    launch.run(_dropout_scale_kernel, (launch.cdiv(M, block_m), launch.cdiv(N, block_n), 1),
               (seed, out, M, N, float(p), _drop_scale(p)), (block_m, block_n), 4, 1)
    return out
