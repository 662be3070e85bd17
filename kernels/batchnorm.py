"""BatchNorm1d's per-feature steps between the fused GEMMs (tiny: O(row_tiles x N) work).

Forward finalize, from the GEMM epilogue's per-row-tile (shift_t, mean_t, M2_t) of z, with
mean_t and M2_t taken about shift_t (the tile's first z), merged in tile order about the
first tile's shift c = shift_0 (Chan et al.'s parallel update: free of cancellation, and
precise even when |mean| >> std, since every mean it adds is small next to c):

    mean_t' = mean_t + (shift_t - c)
    n = n_a + n_t;  delta = mean_t' - mean_a
    M2_a += M2_t + delta^2 * n_a * n_t / n;  mean_a = (n_a mean_a + n_t mean_t') / n
    mean = c + mean_a;  var = M2 / B (biased, to normalise);  rstd = rsqrt(var + eps)
    var_unbiased = M2 / (B - 1)   (output, for the running variance)
    center = mean;  scale = gamma * rstd;  shift = beta

With running statistics (eval) the same outputs come from running_mean / running_var.

Backward finalize, from per-row-tile sums of g_y and g_y * xhat (summed in tile order):

    dgamma = sum g_y * xhat;  dbeta = sum g_y
    u = -scale * rstd * dgamma / B;  v = -scale * dbeta / B   (0 with running statistics)

Running statistics (one program, so reading and bumping num_batches_tracked cannot race):

    f = momentum, or 1 / num_batches_tracked when momentum is None (cumulative average)
    running_mean = (1 - f) running_mean + f mean;  running_var = (1 - f) running_var + f var_unbiased
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _bn_stats_kernel(
    # pointers
    shift_part_ptr, mean_part_ptr, m2_part_ptr, run_mean_ptr, run_var_ptr, gamma_ptr, beta_ptr,
    mean_ptr, var_ptr, rstd_ptr, scale_ptr, shift_ptr,
    # sizes
    M, N, row_tiles, eps,
    # meta-parameters
    BATCH_STATS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    if BATCH_STATS:
        count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        origin = tl.load(shift_part_ptr + offs_n, mask=mask, other=0.0)
        for t in range(0, row_tiles):
            n_t = tl.minimum(M - t * TILE_ROWS, TILE_ROWS).to(tl.float32)
            shift_t = tl.load(shift_part_ptr + t * N + offs_n, mask=mask, other=0.0)
            mean_t = tl.load(mean_part_ptr + t * N + offs_n, mask=mask, other=0.0) + (shift_t - origin)
            m2_t = tl.load(m2_part_ptr + t * N + offs_n, mask=mask, other=0.0)
            total = count + n_t
            delta = mean_t - mean
            m2 += m2_t + delta * delta * (count * n_t / total)
            mean = (count * mean + n_t * mean_t) / total  # not mean += delta * ...: inf must stay inf
            count = total
        var = m2 / count
        mean += origin
        var_out = m2 / (count - 1.0)
    else:
        mean = tl.load(run_mean_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        var = tl.load(run_var_ptr + offs_n, mask=mask, other=1.0).to(tl.float32)
        var_out = var
    rstd = tl.math.rsqrt(var + eps)
    scale = rstd
    shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_GAMMA:
        scale *= tl.load(gamma_ptr + offs_n, mask=mask, other=1.0).to(tl.float32)
    if HAS_BETA:
        shift += tl.load(beta_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + offs_n, mean, mask=mask)
    tl.store(var_ptr + offs_n, var_out, mask=mask)
    tl.store(rstd_ptr + offs_n, rstd, mask=mask)
    tl.store(scale_ptr + offs_n, scale, mask=mask)
    tl.store(shift_ptr + offs_n, shift, mask=mask)


@triton.jit
def _bn_grad_kernel(
    # pointers
    g_sum_part_ptr, g_xhat_part_ptr, scale_ptr, rstd_ptr,
    dgamma_ptr, dbeta_ptr, u_ptr, v_ptr,
    # sizes
    M, N, row_tiles,
    # meta-parameters
    BATCH_STATS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    g_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_xhat = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, row_tiles):
        g_sum += tl.load(g_sum_part_ptr + t * N + offs_n, mask=mask, other=0.0)
        g_xhat += tl.load(g_xhat_part_ptr + t * N + offs_n, mask=mask, other=0.0)
    tl.store(dgamma_ptr + offs_n, g_xhat, mask=mask)
    tl.store(dbeta_ptr + offs_n, g_sum, mask=mask)
    if BATCH_STATS:
        scale = tl.load(scale_ptr + offs_n, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + offs_n, mask=mask, other=0.0)
        tl.store(u_ptr + offs_n, -scale * rstd * g_xhat / M, mask=mask)
        tl.store(v_ptr + offs_n, -scale * g_sum / M, mask=mask)


@triton.jit
def _running_stats_kernel(
    # pointers
    run_mean_ptr, run_var_ptr, num_batches_ptr, mean_ptr, var_ptr,
    # sizes
    N, momentum,
    # meta-parameters
    CUMULATIVE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_batches = tl.load(num_batches_ptr) + 1
    tl.store(num_batches_ptr, num_batches)
    if CUMULATIVE:
        factor = 1.0 / num_batches.to(tl.float32)
    else:
        factor = momentum
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = offs_n < N
        run_mean = tl.load(run_mean_ptr + offs_n, mask=mask)
        run_var = tl.load(run_var_ptr + offs_n, mask=mask)
        mean = tl.load(mean_ptr + offs_n, mask=mask)
        var = tl.load(var_ptr + offs_n, mask=mask)
        new_mean = (1.0 - factor) * run_mean.to(tl.float32) + factor * mean
        new_var = (1.0 - factor) * run_var.to(tl.float32) + factor * var
        tl.store(run_mean_ptr + offs_n, new_mean.to(run_mean.dtype), mask=mask)
        tl.store(run_var_ptr + offs_n, new_var.to(run_var.dtype), mask=mask)


# ---------------------------------------------------------------- launchers

_BLOCK_N = 128


def bn_stats(partials, tile_rows: int, M: int, running_mean, running_var, gamma, beta, eps: float):
    """(mean, var, rstd, scale, shift), fp32 [N]: from the GEMM's partials when given
    (batch statistics; var is the unbiased variance, for the running statistics, while rstd
    normalises with the biased one), else from the running statistics (var = running_var)."""
    ref = running_mean if partials is None else partials[0]
    N = ref.shape[-1]
    out = [torch.empty(N, device=ref.device, dtype=torch.float32) for _ in range(5)]
    shift_part, mean_part, m2_part = partials if partials is not None else (None, None, None)
    _bn_stats_kernel[(triton.cdiv(N, _BLOCK_N),)](
        shift_part, mean_part, m2_part, running_mean, running_var, gamma, beta, *out,
        M, N, 0 if partials is None else partials[0].shape[0], eps,
        BATCH_STATS=partials is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        TILE_ROWS=tile_rows, BLOCK_N=_BLOCK_N,
    )
    return tuple(out)


def bn_grad(partials, M: int, scale, rstd, batch_stats: bool):
    """(dgamma, dbeta, u, v), fp32 [N], from the per-row-tile sums of g_y and g_y * xhat;
    u and v are None with running statistics."""
    g_sum_part, g_xhat_part = partials
    N = g_sum_part.shape[1]
    dgamma, dbeta = (torch.empty(N, device=scale.device, dtype=torch.float32) for _ in range(2))
    u, v = (torch.empty_like(dgamma) for _ in range(2)) if batch_stats else (None, None)
    _bn_grad_kernel[(triton.cdiv(N, _BLOCK_N),)](
        g_sum_part, g_xhat_part, scale, rstd, dgamma, dbeta, u, v,
        M, N, g_sum_part.shape[0],
        BATCH_STATS=batch_stats, BLOCK_N=_BLOCK_N,
    )
    return dgamma, dbeta, u, v


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_unbiased, momentum):
    """In place, as BatchNorm1d does in training: bump num_batches_tracked, then blend the
    batch mean and unbiased variance in with `momentum` (None: cumulative average)."""
    N = running_mean.shape[0]
    _running_stats_kernel[(1,)](
        running_mean, running_var, num_batches_tracked, mean, var_unbiased,
        N, 0.0 if momentum is None else float(momentum),
        CUMULATIVE=momentum is None, BLOCK_N=_BLOCK_N,
    )
