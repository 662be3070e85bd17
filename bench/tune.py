"""``python -m bench.tune --out FILE``: time tile configurations on a GPU and write the tile table.

For each shape class of the sweep's layers (every Linear of ``dwfast.mlp_by_budget(128,
budget, depth)`` at each batch; kernels/tiles.py defines the classes), and each GEMM of such a
block (fwd, dx, dw), a few configurations are timed through the real launchers with
``triton.testing.do_bench``: the heuristic's, the next larger and smaller tile of
``fused_linear.TILES`` and the heuristic's with four stages. The fastest goes into the table,
with every time measured beside it (``"timings"``). The launchers read the candidate through
``kernels.tiles.using``, so what is timed is what a launch with the table runs:

- fwd: ``linear_fwd`` of a middle block (input from the previous block with its activation
  and BatchNorm applied on load, batch statistics, the next block's weight copied);
- dx: ``linear_bwd`` of such a block with its dW deferred (the launch runs only dX programs);
- dw: ``linear_bwd`` of a first block without input gradient (only its dW programs).

A class is tuned whole or not at all, in order, until ``--time-limit`` (compiling each candidate
is most of the cost): the GPU kit gives this step a minute. The table is written for the GPU's
name (``torch.cuda.get_device_name()``); copy it to ``kernels/tiles.json`` (merging other GPUs'
entries) to ship it.

``--dry-run``, and any run without CUDA, times nothing: it writes the heuristic's configuration
of every class for an H100, as the launchers choose it under the stand-in driver
(bench/standin.py), with ``"timed": false``. It takes a second; CI runs it.
"""
import argparse
import contextlib
import json
import sys
import time
from typing import Dict, List, Optional

import torch

import dwfast
from dwfast.kernels import fused_linear as F
from dwfast.kernels import tiles

from . import BUDGET_BELOW, at_least, comma_list, new_file
from .kernels import DTYPES
from .standin import standin_gpu

DEFAULTS = {"batches": "4096,32768", "budgets": "1e6,1e7,5e7", "depths": "1,4,16,64", "dtypes": "bf16"}
GEMMS = ("fwd", "dx", "dw")


def shapes(batches: List[int], budgets: List[float], depths: List[int]) -> List[tuple]:
    """[(batch, out_features, in_features)]: one per shape class of the sweep's layers, in sweep
    order."""
    out, seen = [], set()
    for batch in batches:
        for budget in budgets:
            for depth in depths:
                for m in dwfast.mlp_by_budget(128, int(budget), depth, device="meta"):
                    if isinstance(m, torch.nn.Linear):
                        key = tiles.shape_class(batch, m.out_features, m.in_features)
                        if key not in seen:
                            seen.add(key)
                            out.append((batch, m.out_features, m.in_features))
    return out


def _sizes(gemm: str, batch: int, n: int, k: int) -> tuple:
    """(M, N, K) of `gemm` for a layer k -> n, as kernels/tiles.py counts them."""
    return {"fwd": (batch, n, k), "dx": (batch, k, n), "dw": (n, k, batch)}[gemm]


def heuristic(gemm: str, batch: int, n: int, k: int, dtype: torch.dtype, device) -> list:
    """The launchers' own configuration (the table left aside)."""
    with tiles.using({}):
        if gemm == "dw":
            p = F._dw_plan(batch, n, k, dtype, device, 128 * 64)
            return [p.block_m, p.block_n, p.block_k, p.num_warps, p.num_stages, p.programs // p.tiles]
        return list(F._tiles(gemm, *_sizes(gemm, batch, n, k), dtype, device))


def candidates(gemm: str, batch: int, n: int, k: int, dtype: torch.dtype, device) -> List[list]:
    """The heuristic's configuration first, then its neighbours in TILES and four stages; for a
    wide 16-bit GEMM (the heuristic's largest tile) also 128 x 256, which TILES leaves out
    because its statistics epilogue may spill: timing decides."""
    first = heuristic(gemm, batch, n, k, dtype, device)
    i = F.TILES.index(tuple(first[:2])) if tuple(first[:2]) in F.TILES else 0
    out = [first, first[:4] + [4] + first[5:]]
    for j in (i - 1, i + 1):
        if 0 <= j < len(F.TILES):
            bm, bn = F.TILES[j]
            accumulators = F._accumulators(gemm, *_sizes(gemm, batch, n, k), dtype) if gemm != "dw" else 1
            out.append([bm, bn, first[2], F._warps(bm * bn * accumulators)] + first[4:])
    if gemm != "dw" and i == 0 and dtype != torch.float32 and _sizes(gemm, batch, n, k)[1] >= 256:
        out.append([128, 256, first[2], 8] + first[4:])
    return out


def _block(batch: int, n: int, k: int, dtype: torch.dtype):
    """A middle block k -> n of a chain, on the GPU: its launchers' arguments."""
    dev = torch.device("cuda")
    K = dwfast.kernels
    w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
    x = K.new_activation(batch, k, w, w)
    x.copy_(torch.randn(batch, k, device=dev))
    vec_in = K.new_vec(k, dev)
    vec_in.copy_(torch.stack([torch.zeros(k), torch.ones(k), torch.zeros(k), torch.ones(k)]))
    site = K.Site(vec_in, K.ACTIVATIONS["relu"])
    ones, zeros = torch.ones(n, device=dev), torch.zeros(n, device=dev)
    norm = K.Norm(K.BATCH, K.new_vec(n, dev), ones, zeros, zeros.clone(), ones.clone(),
                  torch.zeros((), device=dev, dtype=torch.long), uv=K.new_uv(n, dev))
    norm_in = K.Norm(K.BATCH, vec_in, torch.ones(k, device=dev), torch.zeros(k, device=dev), uv=K.new_uv(k, dev))
    z, _ = K.linear_fwd(x, w, None, site, norm, chained=True)
    return w, x, z, site, norm, norm_in


def timed(gemm: str, batch: int, n: int, k: int, dtype: torch.dtype, config: list, name: str) -> float:
    """Milliseconds (median) of the launch that runs `gemm` with `config` (module docstring)."""
    import triton.testing
    K = dwfast.kernels
    w, x, z, site, norm, norm_in = _block(batch, n, k, dtype)
    g_y = K.new_activation(batch, n, z)
    g_y.copy_(torch.randn(batch, n, device=z.device))
    key = f"{gemm} {tiles.shape_class(*_sizes(gemm, batch, n, k))}"
    steps = {
        "fwd": lambda: K.linear_fwd(x, w, None, site, norm, chained=True),
        "dx": lambda: K.linear_bwd(g_y, z, w, norm, x, site, norm_in, chained=True, defer=True),
        "dw": lambda: K.linear_bwd(g_y, z, w, norm, x, input_grad=False),
    }
    with tiles.using({name: {tiles.dtype_name(dtype): {key: config}}}):
        return triton.testing.do_bench(steps[gemm], warmup=10, rep=40, return_mode="median")


def tune(args) -> dict:
    """The table: timed on the GPU, or the heuristic's for an H100 (dry run)."""
    dry = args.dry_run or not torch.cuda.is_available()
    classes = shapes(args.batches, args.budgets, args.depths)
    table: Dict[str, dict] = {}
    timings: Dict[str, dict] = {}
    start = time.monotonic()
    with standin_gpu() if dry else contextlib.nullcontext() as drv:
        name = drv.gpu_name if dry else torch.cuda.get_device_name()
        device = torch.device("cpu") if dry else torch.device("cuda")
        for dtype_label in args.dtypes:
            dtype, precision = DTYPES[dtype_label]
            prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                entries = table.setdefault(tiles.dtype_name(dtype), {})
                for batch, n, k in classes:
                    if not dry and time.monotonic() - start > args.time_limit:
                        print(f"time limit: B={batch} {k} -> {n} and later classes not tuned", flush=True)
                        break
                    for gemm in GEMMS:
                        key = f"{gemm} {tiles.shape_class(*_sizes(gemm, batch, n, k))}"
                        options = candidates(gemm, batch, n, k, dtype, device)
                        if dry:
                            entries[key] = options[0]
                            continue
                        ms = {json.dumps(c): timed(gemm, batch, n, k, dtype, c, name) for c in options}
                        best = min(ms, key=ms.get)
                        entries[key] = json.loads(best)
                        timings.setdefault(tiles.dtype_name(dtype), {})[key] = ms
                        print(f"{dtype_label} {key} (B={batch}, {k} -> {n}): {best} {ms[best]:.3f} ms "
                              f"(heuristic {ms[json.dumps(options[0])]:.3f} ms)", flush=True)
            finally:
                torch.set_float32_matmul_precision(prev)
    return {"version": 1, "timed": not dry, "gpus": {name: table}, "timings": {name: timings}}


def parser() -> argparse.ArgumentParser:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("--out", type=new_file, required=True, help="where the table goes (JSON, kernels/tiles.py's layout)")
    batches, budgets = comma_list(int, minimum=2), comma_list(float, minimum=1, below=BUDGET_BELOW)
    depths = comma_list(int, minimum=0)
    dtypes = comma_list(str, DTYPES)
    p.add_argument("--batches", type=batches, default=batches(DEFAULTS["batches"]))
    p.add_argument("--budgets", type=budgets, default=budgets(DEFAULTS["budgets"]))
    p.add_argument("--depths", type=depths, default=depths(DEFAULTS["depths"]))
    p.add_argument("--dtypes", type=dtypes, default=dtypes(DEFAULTS["dtypes"]),
                   help="bf16, fp16, fp32 (matmul precision 'highest'), tf32")
    p.add_argument("--time-limit", type=at_least(1e-3, float), default=45.0, help="seconds of tuning (default 45)")
    p.add_argument("--dry-run", action="store_true",
                   help="time nothing: the heuristic's configurations for an H100 (also without CUDA)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Tune and write the table; 0 on success."""
    args = parser().parse_args(argv)
    if dwfast.kernels.launch.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the tuner plans tiles for a real GPU")
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser().error(f"unknown dtypes {bad}; choose from {', '.join(DTYPES)}")
    doc = tune(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    entries = sum(len(v) for g in doc["gpus"].values() for v in g.values())
    print(f"{entries} entries for {', '.join(doc['gpus'])} ({'timed' if doc['timed'] else 'untimed: dry run'}) "
          f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
