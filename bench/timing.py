"""Timing the implementations of one configuration: interleaved repetitions, medians, spreads.

Every implementation of a configuration is timed in the same loop: each round runs one
repetition of each, in an order that rotates from round to round. A slow spell of the machine
(another process, a clock change) then hits every implementation alike, and the ratio of two
implementations is taken round by round, so it comes with its own spread. On CUDA each
repetition is timed with CUDA events and the L2 cache is flushed before it (as
``triton.testing.do_bench`` does), with one synchronisation at the end; on the CPU with
``time.perf_counter``. CPU timings are not GPU timings: on the CPU, dwfast's ``auto`` backend
is the pure-PyTorch reference, so it should match eager there.
"""
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

MAX_ROUNDS = 2000  # enough for stable quantiles; bounds the cost of microsecond steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepFailed(Exception):
    def __init__(self, name: str, exc: BaseException):
        super().__init__(name)
        self.name, self.exc = name, exc


def _run(name: str, step: Callable[[], None]) -> None:
    try:
        step()
    except Exception as exc:  # which implementation failed matters more than where
        raise _StepFailed(name, exc) from exc


def interleaved(steps: Dict[str, Callable[[], None]], device: torch.device, warmup_ms: float = 25.0,
                rep_ms: float = 100.0, min_reps: int = 5) -> Tuple[Dict[str, List[float]], Dict[str, BaseException]]:
    """Time every ``steps[name]()`` in rotating rounds; returns ``(times, errors)``.

    ``times[name]`` lists one time per round in milliseconds (the same rounds for every name);
    ``errors[name]`` is the exception of a step that raised, which is then left out and the
    timing starts over without it. Warm-up runs rounds for about ``warmup_ms``; then about
    ``rep_ms`` of each step is timed, and at least ``min_reps`` rounds. Call each step once
    before this if its first call compiles.
    """
    steps, errors = dict(steps), {}
    while steps:
        try:
            return _rounds(steps, device, warmup_ms, rep_ms, min_reps), errors
        except _StepFailed as failed:
            errors[failed.name] = failed.exc
            del steps[failed.name]
    return {}, errors


def _rounds(steps, device, warmup_ms, rep_ms, min_reps) -> Dict[str, List[float]]:
    names = list(steps)
    start, n_warm = time.perf_counter(), 0
    while n_warm < 1 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        for name in names:
            _run(name, steps[name])
        _sync(device)
        n_warm += 1
    round_ms = (time.perf_counter() - start) * 1e3 / n_warm
    n_rounds = int(min(MAX_ROUNDS, max(min_reps, rep_ms * len(names) / max(round_ms, 1e-3))))
    times = {name: [] for name in names}
    if device.type == "cuda":
        cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # > any L2
        events = []
        for r in range(n_rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                cache.zero_()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                _run(name, steps[name])
                end.record()
                events.append((name, begin, end))
        torch.cuda.synchronize(device)
        for name, begin, end in events:
            times[name].append(begin.elapsed_time(end))
        return times
    for r in range(n_rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            _run(name, steps[name])
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: List[float]) -> dict:
    """``{"median_ms", "q20_ms", "q80_ms"}`` of one implementation's times."""
    q20, median, q80 = np.quantile(times, [0.2, 0.5, 0.8])
    return {"median_ms": float(median), "q20_ms": float(q20), "q80_ms": float(q80)}


def ratio(slow: List[float], fast: List[float]) -> dict:
    """``slow / fast`` round by round: ``{"median", "q20", "q80"}`` of the per-round ratios
    (for a speedup, ``slow`` is the baseline's times and ``fast`` the fused one's)."""
    q20, median, q80 = np.quantile(np.asarray(slow) / np.asarray(fast), [0.2, 0.5, 0.8])
    return {"median": float(median), "q20": float(q20), "q80": float(q80)}


def peak_memory_reset(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak allocated memory in MiB since :func:`peak_memory_reset`; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
