"""Timing one step: medians and quantiles of many repetitions after a warm-up.

On CUDA, ``triton.testing.do_bench`` times each repetition with CUDA events (it flushes the
L2 cache between repetitions and synchronises only at the end); on the CPU, each repetition
is timed with ``time.perf_counter``. CPU timings are not GPU timings: on the CPU, dwfast's
'auto' backend is the pure-PyTorch reference, so it should match eager there.
"""
import time

import numpy as np
import torch


def time_step(step, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 5) -> dict:
    """Time ``step()``: returns ``{"median_ms", "q20_ms", "q80_ms"}``.

    ``warmup_ms``/``rep_ms`` are the time spent warming up and repeating (milliseconds, as in
    ``do_bench``); on the CPU at least ``min_reps`` repetitions are timed. Call ``step``
    once before this if its first call compiles.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        median, q20, q80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        step()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    q20, median, q80 = np.quantile(times, [0.2, 0.5, 0.8])
    return {"median_ms": float(median), "q20_ms": float(q20), "q80_ms": float(q80)}


def peak_memory_reset(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device):
    """Peak allocated memory in MiB since :func:`peak_memory_reset`; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
