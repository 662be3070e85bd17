"""BatchNorm1d's per-feature steps, as @triton.jit helpers the GEMM kernels call: nothing here
is a launch of its own.

Each BatchNorm block keeps an fp32 vector buffer `vec` [4, N] (rows VEC_*: center, scale,
shift, rstd), filled by the GEMM that produces z_l for the next GEMM's prologue and for the
backward, and in the backward a buffer `uv` [2, N] (u, v), filled by the dX GEMM that produces
g_y_l.

Forward statistics. The epilogue of the GEMM producing z writes per row tile t the column
partials (shift_t, mean_t, M2_t) of the stored z, mean_t and M2_t taken about shift_t (the
tile's first z). The last program to finish a column tile (a ticket counter; see `_ticket`)
merges them in tile order about c = shift_0 (Chan et al.: no cancellation, exact even when
|mean| >> std, since every mean it adds is small next to c):

    mean_t' = mean_t + (shift_t - c)
    n = n_a + n_t;  delta = mean_t' - mean_a
    M2_a += M2_t + delta^2 * n_a * n_t / n;  mean_a = (n_a mean_a + n_t mean_t') / n
    mean = c + mean_a;  var = M2 / B (biased, to normalise);  rstd = rsqrt(var + eps)
    center = mean;  scale = gamma * rstd;  shift = beta

and updates the running statistics for those columns (f = momentum, or 1 / (num_batches + 1)
when momentum is None, the cumulative average):

    running_mean = (1 - f) running_mean + f mean;  running_var = (1 - f) running_var + f M2 / (B - 1)

The last column tile to finish bumps num_batches_tracked (a second ticket), after every
column tile has read it. With running statistics (eval) the row-tile-0 programs write the
vectors from running_mean / running_var instead.

Backward. The epilogue producing g_y writes per row tile the column sums of g_y and
g_y * xhat; the last program of each column tile sums them in tile order:

    dgamma = sum g_y * xhat;  dbeta = sum g_y          (stored in the parameters' dtype)
    u = -scale * rstd * dgamma / B;  v = -scale * dbeta / B   (in uv; 0 with running stats)

Fixed order everywhere and no atomics on data: results are bitwise reproducible.
"""
import triton
import triton.language as tl

# Rows of a BatchNorm block's vector buffer vec [VEC_ROWS, N] (fp32); u and v sit in uv [2, N].
VEC_CENTER = tl.constexpr(0)
VEC_SCALE = tl.constexpr(1)
VEC_SHIFT = tl.constexpr(2)
VEC_RSTD = tl.constexpr(3)
VEC_ROWS = 4


@triton.jit
def _ticket(ticket_ptr, count):
    """True in the program that arrives last of `count` at the counter `ticket_ptr`; that
    program also resets it to 0, so the persistent counter buffer is always left zeroed.

    The barrier orders every thread's stores of this program before the release; the last
    program's acquire then makes all the others' stores visible to it (it reads them with
    .cg loads, from L2)."""
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == count - 1
    if last:
        tl.atomic_xchg(ticket_ptr, 0)
    return last


@triton.jit
def _store_vectors(vec_ptr, N, offs_n, mask_n, mean, rstd, gamma_ptr, beta_ptr,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """vec rows 0-3 (center, scale, shift, rstd) for features `offs_n` from mean and rstd."""
    scale = rstd
    shift = tl.zeros_like(rstd)
    if HAS_GAMMA:
        scale *= tl.load(gamma_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    if HAS_BETA:
        shift += tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(vec_ptr + VEC_CENTER * N + offs_n, mean, mask=mask_n)
    tl.store(vec_ptr + VEC_SCALE * N + offs_n, scale, mask=mask_n)
    tl.store(vec_ptr + VEC_SHIFT * N + offs_n, shift, mask=mask_n)
    tl.store(vec_ptr + VEC_RSTD * N + offs_n, rstd, mask=mask_n)


@triton.jit
def _fixed_vectors(vec_ptr, run_mean_ptr, run_var_ptr, gamma_ptr, beta_ptr, eps, N, offs_n, mask_n,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """vec rows 0-3 from the running statistics (eval-mode BatchNorm)."""
    mean = tl.load(run_mean_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    var = tl.load(run_var_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    _store_vectors(vec_ptr, N, offs_n, mask_n, mean, tl.math.rsqrt(var + eps), gamma_ptr, beta_ptr,
                   HAS_GAMMA, HAS_BETA)


@triton.jit
def _stats_partials(z, mask, offs_m, offs_n, mask_n, pid_m, part_ptr, M, N, row_tiles, BLOCK_M: tl.constexpr):
    """Write this row tile's (shift, mean, M2) of the fp32 tile `z` to part [3, row_tiles, N]."""
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    shift = tl.sum(tl.where((offs_m == pid_m * BLOCK_M)[:, None], z, 0.0), axis=0)
    diff = tl.where(mask, z - shift[None, :], 0.0)
    mean = tl.sum(diff, axis=0) / count
    dev = tl.where(mask, diff - mean[None, :], 0.0)
    plane = row_tiles * N
    tl.store(part_ptr + pid_m * N + offs_n, shift, mask=mask_n)
    tl.store(part_ptr + plane + pid_m * N + offs_n, mean, mask=mask_n)
    tl.store(part_ptr + 2 * plane + pid_m * N + offs_n, tl.sum(dev * dev, axis=0), mask=mask_n)


@triton.jit
def _finalize_stats(part_ptr, vec_ptr, gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, done_ptr,
                    eps, momentum, offs_n, mask_n, M, N, row_tiles, col_tiles,
                    TILE_ROWS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                    RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr):
    """Merge the row-tile partials of features `offs_n`, store their vectors and update their
    running statistics (RUNNING); the last of the `col_tiles` callers bumps num_batches."""
    plane = row_tiles * N
    count = tl.zeros_like(offs_n).to(tl.float32)
    mean = tl.zeros_like(count)
    m2 = tl.zeros_like(count)
    origin = tl.load(part_ptr + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
    for t in range(0, row_tiles):
        n_t = tl.minimum(M - t * TILE_ROWS, TILE_ROWS).to(tl.float32)
        shift_t = tl.load(part_ptr + t * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        mean_t = tl.load(part_ptr + plane + t * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        mean_t += shift_t - origin
        m2_t = tl.load(part_ptr + 2 * plane + t * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        total = count + n_t
        delta = mean_t - mean
        m2 += m2_t + delta * delta * (count * n_t / total)
        mean = (count * mean + n_t * mean_t) / total  # not mean += delta * ...: inf must stay inf
        count = total
    mean += origin
    _store_vectors(vec_ptr, N, offs_n, mask_n, mean, tl.math.rsqrt(m2 / count + eps), gamma_ptr, beta_ptr,
                   HAS_GAMMA, HAS_BETA)
    if RUNNING:
        num_batches = tl.load(nbt_ptr)
        if CUMULATIVE:
            factor = 1.0 / (num_batches + 1).to(tl.float32)
        else:
            factor = momentum
        run_mean = tl.load(run_mean_ptr + offs_n, mask=mask_n)
        run_var = tl.load(run_var_ptr + offs_n, mask=mask_n)
        new_mean = (1.0 - factor) * run_mean.to(tl.float32) + factor * mean
        new_var = (1.0 - factor) * run_var.to(tl.float32) + factor * (m2 / (count - 1.0))
        tl.store(run_mean_ptr + offs_n, new_mean.to(run_mean.dtype), mask=mask_n)
        tl.store(run_var_ptr + offs_n, new_var.to(run_var.dtype), mask=mask_n)
        if _ticket(done_ptr, col_tiles):  # every column tile has read num_batches
            tl.store(nbt_ptr, num_batches + 1)


@triton.jit
def _grad_partials(g_y, xhat, mask, offs_n, mask_n, pid_m, part_ptr, N, row_tiles):
    """Write this row tile's column sums of g_y and g_y * xhat to part [2, row_tiles, N]."""
    g_y = tl.where(mask, g_y, 0.0)
    tl.store(part_ptr + pid_m * N + offs_n, tl.sum(g_y, axis=0), mask=mask_n)
    tl.store(part_ptr + row_tiles * N + pid_m * N + offs_n, tl.sum(g_y * xhat, axis=0), mask=mask_n)


@triton.jit
def _finalize_grad(part_ptr, vec_ptr, uv_ptr, dgamma_ptr, dbeta_ptr, offs_n, mask_n, M, N, row_tiles,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BATCH_STATS: tl.constexpr):
    """Sum the row-tile partials of features `offs_n` into dgamma, dbeta (their parameters'
    dtype) and, with batch statistics, u and v (uv)."""
    g_sum = tl.zeros_like(offs_n).to(tl.float32)
    g_xhat = tl.zeros_like(g_sum)
    for t in range(0, row_tiles):
        g_sum += tl.load(part_ptr + t * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        g_xhat += tl.load(part_ptr + (row_tiles + t) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
    if HAS_GAMMA:
        tl.store(dgamma_ptr + offs_n, g_xhat.to(dgamma_ptr.dtype.element_ty), mask=mask_n)
    if HAS_BETA:
        tl.store(dbeta_ptr + offs_n, g_sum.to(dbeta_ptr.dtype.element_ty), mask=mask_n)
    if BATCH_STATS:
        scale = tl.load(vec_ptr + VEC_SCALE * N + offs_n, mask=mask_n, other=0.0)
        rstd = tl.load(vec_ptr + VEC_RSTD * N + offs_n, mask=mask_n, other=0.0)
        tl.store(uv_ptr + offs_n, -scale * rstd * g_xhat / M, mask=mask_n)
        tl.store(uv_ptr + N + offs_n, -scale * g_sum / M, mask=mask_n)
