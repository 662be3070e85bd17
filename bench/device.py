"""Where a benchmark runs: device name, peak throughput, versions and git commit.

Peaks are the vendors' dense (no sparsity) tensor-core numbers in TFLOP/s and the HBM
bandwidth in TB/s. fp32 matmuls use TF32 tensor cores only when
``torch.get_float32_matmul_precision()`` is not ``"highest"``; otherwise the CUDA-core fp32
peak applies. Unknown devices (and every CPU) get ``None``: no peak fraction is reported.
"""
import argparse
import datetime
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

# (name substring, bf16/fp16, tf32, fp32, TB/s); the first match wins, so specific names first.
PEAKS = [
    ("H100 PCIe", 756.0, 378.0, 51.0, 2.0),
    ("H100 NVL", 835.0, 418.0, 60.0, 3.9),
    ("H100", 989.0, 494.0, 67.0, 3.35),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0, 494.0, 67.0, 4.8),
    ("A100-SXM4-80GB", 312.0, 156.0, 19.5, 2.04),
    ("A100 80GB PCIe", 312.0, 156.0, 19.5, 1.94),
    ("A100", 312.0, 156.0, 19.5, 1.56),  # 40 GB parts
    ("L4", 121.0, 60.0, 30.0, 0.3),
]
THREADS_HELP = ("CPU threads for torch (default 1: with more, a busy machine's other processes make "
                "OpenMP timings swing 100x)")


def device_arg(text: str) -> str:
    """An argparse type: a CPU or CUDA device name this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA GPU that torch can use")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def pick_device(name: Optional[str] = None) -> torch.device:
    """``name`` as a device, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def _peak_row(name: str):
    return next((row for row in PEAKS if row[0] in name), None)


def peak_tflops(name: str, dtype: torch.dtype) -> Optional[float]:
    """Dense peak TFLOP/s of the GPU called ``name`` for matmuls in ``dtype``; None if unknown."""
    row = _peak_row(name)
    if row is None:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return row[1]
    return row[2] if torch.get_float32_matmul_precision() != "highest" else row[3]


def peak_gbps(name: str) -> Optional[float]:
    """Peak memory bandwidth in GB/s of the GPU called ``name``; None if unknown."""
    row = _peak_row(name)
    return None if row is None else row[4] * 1000.0


def git_commit() -> str:
    """The repository's HEAD commit (with ``+dirty`` if the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """Everything a record needs to be compared later: device, versions, commit, time."""
    import triton

    import dwfast
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dwfast": dwfast.__version__,
        "dwfast_backend": dwfast.get_backend(),
        "python": platform.python_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
