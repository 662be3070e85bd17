"""Tile configurations measured on a GPU: a table per GPU, dtype, GEMM and shape class, read by
the launchers before their heuristic (`fused_linear._tiles`, `_dw_plan`), which is the fallback
for everything the table does not hold.

The table ships with the package (`tiles.json` beside this file; DWFAST_TILES names another
file) and `python -m bench.tune --out FILE` writes one on a GPU (bench/README.md). Its layout:

    {"version": 1, "gpus": {GPU name: {dtype: {"GEMM MxNxK": config}}}}

GEMM and its sizes (each shape class holds the sizes whose power-of-two ceilings, at least 16,
are M, N, K):
    fwd   z = a @ W^T         M = batch, N = out_features, K = in_features
    dx    g_in = g_z @ W      M = batch, N = in_features,  K = out_features
    dw    dW = A^T @ B        M, N = dW's rows and columns, K = batch
config: [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages], and for dw the batch chunks
(splits) sixth. dtype: bf16, fp16, fp32 (at torch's "highest" matmul precision), tf32 (fp32
at "high" or "medium"). GPU: torch.cuda.get_device_name(), or the name a stand-in driver
reports (bench/standin.py).
"""
import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
import triton

from .launch import next_power_of_2

PATH = Path(os.environ.get("DWFAST_TILES") or Path(__file__).with_name("tiles.json"))
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())["gpus"] if path.exists() else {}


_table = _load(PATH)
_names = {}


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name for GEMMs in `dtype` at torch's current fp32 matmul precision."""
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _DTYPES[dtype]


def shape_class(M: int, N: int, K: int) -> str:
    """"MxNxK" with each size's power-of-two ceiling (at least 16)."""
    return "x".join(str(max(16, next_power_of_2(n))) for n in (M, N, K))


def gpu_name(device: torch.device) -> Optional[str]:
    """The GPU the kernels run on for `device`: its CUDA name, or the active stand-in driver's."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _names:
            _names[index] = torch.cuda.get_device_name(index)
        return _names[index]
    driver = triton.runtime.driver.active
    return getattr(driver, "gpu_name", None)


def lookup(gemm: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Optional[list]:
    """The table's config for a `gemm` ("fwd", "dx", "dw") of these sizes, or None. (Plans made
    from it are kept per `generation`: dwfast.ops.)"""
    if not _table:
        return None
    name = gpu_name(device)
    gpu = _table.get(name, {}) if name else {}
    return gpu.get(dtype_name(dtype), {}).get(f"{gemm} {shape_class(M, N, K)}")


_generation = 0  # bumped whenever _table changes: plans made from the table are stale then


def generation() -> int:
    """A number that changes whenever the table the launchers read does."""
    return _generation


@contextlib.contextmanager
def using(gpus: dict):
    """Within the block the launchers read `gpus` (the table's "gpus" part) instead: for the
    tuner, which times candidates through the real launchers."""
    global _table, _generation
    previous = _table
    _table, _generation = gpus, _generation + 1
    try:
        yield
    finally:
        _table, _generation = previous, _generation + 1
