"""``python -m bench.kernels``: dwfast's kernels as the GPU compiles them, without a GPU.

Every row is a kernel that a real dwfast step launches. A model is built and run (a training
step, an eval forward, the whole-net path) under the stand-in driver of ``bench/standin.py``,
which reports an sm_90 (or sm_80) device and records launches instead of running them. So
the launchers pick their tiles, Triton specialises the arguments (dtypes, 16-byte
divisibility of pointers and integers) and compiles with its bundled ptxas exactly as for a
real launch, and nothing here knows a kernel's signature, but which programs of the backward
kernel take which role (ROLES: a row per role, with its own main loop). Each compiled kernel's
cubin is then read with Triton's bundled ``nvdisasm`` (its SASS) and ``cuobjdump``:

- registers: ``cuobjdump --dump-resource-usage`` (REG);
- spills: bytes of local-memory stores and loads (STL / LDL) in the SASS. That is what
  ``ptxas -v`` reports as "bytes spill stores / loads" (checked equal on spilling kernels),
  without compiling again;
- shared memory: the launch's dynamic allocation (Triton's metadata);
- MMA kind: ``wgmma`` (HGMMA in the SASS), ``mma`` (mma.sync: HMMA), ``fma`` (the kernel has a
  ``tt.dot`` in its TTGIR but no tensor-core instruction), ``-`` (no dot);
- the *main loop*: the innermost SASS loop (a backward branch) holding the most MMA
  instructions (FFMA for an fma dot). Its global loads are listed by kind and bytes per
  instruction (``ld`` = LDG into registers, ``cp`` = cp.async LDGSTS into shared memory,
  ``tma`` = UTMALDG), and its waits and barriers are counted. Kernels without a dot list
  every global load of the kernel instead.
- overlap (``ovl``): *yes* when the main loop can run the MMA of one iteration while the
  loads of later ones are in flight: every global load in it is asynchronous (cp.async or
  TMA; one plain LDG and the loop waits on it), cp.async waits leave at least one group in
  flight (``DEPBAR.LE SB0, N`` with N >= 1 throughout, i.e. at least one later stage
  prefetched), and a wgmma loop keeps at least one MMA group in flight
  (``WARPGROUP.DEPBAR.LE gsb0, N`` with N >= 1: ``wgmma.wait_group 0`` inside the loop
  drains the tensor cores every iteration). A static reading of the code, not a timing.

Grid CTAs are compared with the device's SMs (132 on an H100): ``48%`` of the SMs get a CTA,
or ``2.1x`` as many CTAs as SMs. Compiled kernels are cached by Triton in memory and on disk,
and their analysis here by hash, so shapes that share a specialisation compile once.
Outputs of the recorded steps are garbage (nothing runs): this is about compiled form only.

Needs ``TRITON_INTERPRET`` unset (the interpreter compiles nothing).
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Dict, List, NamedTuple, Optional

import torch
import triton
from triton.runtime.cache import get_cache_manager

import dwfast

from . import BUDGET_BELOW, at_least, comma_list, models, new_file
from .standin import DEVICES, standin_gpu

# dtype labels: fp32 runs at torch's default matmul precision "highest", tf32 is fp32 at "high"
DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
          "fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high")}
MODES = ("train", "infer", "whole")
MODE_HELP = ("train: forward + backward + SGD step, per-layer path (BatchNorm, ReLU); infer: eval "
             "forward, per-layer path (BatchNorm folded); whole: the same chain without BatchNorm in the "
             "dtype itself, whole-net path where it qualifies (a training step, then an eval forward)")


class Case(NamedTuple):
    """One recorded step: what runs, on which model, for which device."""
    arch: int
    dtype: str
    mode: str
    batch: int
    features: int
    widths: tuple
    outputs: int

    def title(self) -> str:
        hidden = f"[{self.widths[0]}]x{len(self.widths)}" if len(set(self.widths)) == 1 else list(self.widths)
        return (f"sm_{self.arch} {self.dtype} {self.mode} B={self.batch} "
                f"MLP({self.features}, {hidden}, {self.outputs})")


# ---------------------------------------------------------------- recording


@contextlib.contextmanager
def _settings(precision: str, whole_net: str):
    prev = torch.get_float32_matmul_precision(), dwfast.get_whole_net(), dwfast.get_backend()
    torch.set_float32_matmul_precision(precision)
    dwfast.set_whole_net(whole_net)
    dwfast.set_backend("triton")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev[0])
        dwfast.set_whole_net(prev[1])
        dwfast.set_backend(prev[2])


def _whole_net_steps(model, dtype, x):
    """A training step, then an eval forward, of `model` cast to `dtype`: under autocast
    dwfast takes the per-layer path (the whole-net kernels take one dtype)."""
    model, x = model.to(dtype), x.to(dtype)
    model(x).float().square().mean().backward()
    model.eval()
    with torch.no_grad():
        model(x)


def record(case: Case):
    """Run `case`'s steps under the stand-in GPU: train and infer as the sweep times them
    (``bench.models.make_step``: its dtype policy, loss and optimizer), whole as
    `_whole_net_steps`. Returns (launches, error or None): a step that fails (a compile
    error, shared memory over the device's limit) ends the case."""
    dtype, precision = DTYPES[case.dtype]
    torch.manual_seed(0)
    model = dwfast.MLP(case.features, list(case.widths), case.outputs, batchnorm=case.mode != "whole")
    x, target = torch.randn(case.batch, case.features), torch.randn(case.batch, case.outputs)
    launches = []
    try:
        with _settings(precision, "auto" if case.mode == "whole" else "never"), \
                standin_gpu(case.arch, record_args=True) as drv:
            launches = drv.launches
            if case.mode == "whole":
                _whole_net_steps(model, dtype, x)
            else:
                models.make_step("dwfast", model, case.mode, dtype, x, target)[0]()
    except Exception as e:  # noqa: BLE001 -- reported per case, the others go on
        lines = str(e).strip().splitlines() or [""]
        return launches, f"{type(e).__name__}: " + " ... ".join(dict.fromkeys((lines[0], lines[-1])))
    return launches, None


# ---------------------------------------------------------------- reading the cubin


def _width(opcode: str) -> int:
    """Bytes moved by one LDG / LDGSTS / STL / LDL instruction, from its SASS modifiers."""
    mods = set(opcode.split(".")[1:])
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def _sass(cubin_path: str) -> List[tuple]:
    """[(address, opcode, operands)] of the cubin's SASS, predicates dropped, branch targets
    as hex addresses (nvdisasm prints labels). Without nvdisasm's dataflow analysis, which
    ``cuobjdump -sass`` runs: faster, and nothing here needs it."""
    text = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", "-ndf", cubin_path], check=True,
                          capture_output=True, text=True).stdout
    labels, pending, out = {}, [], []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        instr = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);", line)
        if label:
            pending.append(label.group(1))
        elif instr:
            addr = int(instr.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            out.append((addr, instr.group(2), instr.group(3).strip()))
    target = re.compile(r"`\((\.L_x_\d+)\)")
    return [(addr, op, target.sub(lambda m: hex(labels[m.group(1)]), args)) for addr, op, args in out]


def _registers(cubin_path: str) -> int:
    text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin_path], check=True,
                          capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


_MMA = {"HGMMA": "wgmma", "QGMMA": "wgmma", "HMMA": "mma", "IMMA": "mma"}


def _loads(sass) -> Counter:
    """Counter of the global loads in `sass` by kind and bytes per instruction: "ld 16"
    (LDG.128), "cp 4" (a 4-byte cp.async), "tma" (a TMA copy)."""
    kinds = Counter()
    for _, op, _ in sass:
        base = op.split(".")[0]
        if base in ("LDG", "LDGSTS"):
            kinds[f"{'ld' if base == 'LDG' else 'cp'} {_width(op)}"] += 1
        elif base in ("UTMALDG", "UBLKCP"):
            kinds["tma"] += 1
    return kinds


def _waits(sass, opcode: str) -> List[int]:
    """The N of each `opcode ..., N` wait in `sass` (DEPBAR.LE SB0, N: cp.async groups left
    in flight; WARPGROUP.DEPBAR.LE gsb0, N: wgmma groups left in flight)."""
    return [int(args.rsplit(",", 1)[1], 0) for _, op, args in sass if op == opcode and "," in args]


def _mma_loops(sass, counted) -> List[list]:
    """The instructions of every innermost loop holding instructions in `counted`, in address
    order (a kernel whose programs take different roles has a main loop per role)."""
    loops = []
    for addr, op, args in sass:
        target = args.split()[-1] if args else ""
        if op.split(".")[0] == "BRA" and target.startswith("0x") and int(target, 16) < addr:
            loops.append((int(target, 16), addr))
    hits = {lp: sum(lp[0] <= a <= lp[1] and op.split(".")[0] in counted for a, op, _ in sass) for lp in loops}
    loops = [lp for lp in loops if hits[lp]]
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [[ins for ins in sass if start <= ins[0] <= end] for start, end in sorted(inner)]


def _pipelining(body) -> tuple:
    """({cp.async and wgmma wait depths (min), barriers}, overlap) of a main loop's
    instructions (see the module docstring)."""
    cp, wg = _waits(body, "DEPBAR.LE"), _waits(body, "WARPGROUP.DEPBAR.LE")
    loop = {"cp_async_wait": min(cp, default=None), "wgmma_wait": min(wg, default=None),
            "barriers": sum(op.startswith("BAR.SYNC") for _, op, _ in body)}
    kinds = {key.split()[0] for key in _loads(body)}
    prefetch = "tma" in kinds or ("cp" in kinds and min(cp, default=0) >= 1)
    return loop, "ld" not in kinds and prefetch and min(wg, default=1) >= 1


class Analysis(NamedTuple):
    """What the compiled kernel is (per compiled kernel, whatever its grid)."""
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    mma: tuple            # kinds used, e.g. ("wgmma",); ("fma",) for a dot without tensor cores
    mma_instr: tuple      # the SASS MMA instructions' shapes and types, e.g. HGMMA.64x128x16.F32.BF16
    loop: Optional[dict]  # main loop: cp.async / wgmma wait depths, barriers (None without a dot)
    loads: dict           # "ld 16" etc. -> instructions, in the main loop (the kernel without a dot)
    overlap: Optional[bool]
    loops: tuple = ()     # (loop, loads, overlap) of every main loop, in address order


_analyses: Dict[str, Analysis] = {}


def analyse(launch) -> Analysis:
    """Read `launch`'s compiled kernel from Triton's cache (cached here by kernel hash)."""
    md = launch.metadata
    if md.hash in _analyses:
        return _analyses[md.hash]
    files = get_cache_manager(md.hash).get_group(f"{launch.src.name[:150]}.json")
    path = {name.rsplit(".", 1)[1]: p for name, p in files.items()}
    sass = _sass(path["cubin"])
    with open(path["ttgir"]) as f:
        has_dot = re.search(r"\b(tt\.dot|ttng\.warp_group_dot)\b", f.read()) is not None
    spills = {kind: sum(_width(op) for _, op, _ in sass if op.split(".")[0] == kind) for kind in ("STL", "LDL")}
    mma_ops = sorted({op for _, op, _ in sass if op.split(".")[0] in _MMA})
    mma = tuple(sorted({_MMA[op.split(".")[0]] for op in mma_ops})) or (("fma",) if has_dot else ())
    loops = []
    if has_dot:
        counted = set(_MMA) if mma_ops else {"FFMA"}
        bodies = _mma_loops(sass, counted) or [[]]
        for body in bodies:
            loop, overlap = _pipelining(body)
            loops.append((loop, dict(_loads(body).most_common()), overlap))
        # the main loop: the one with the most MMA instructions
        size = [sum(op.split(".")[0] in counted for _, op, _ in body) for body in bodies]
        loop, loads, overlap = loops[size.index(max(size))]
    else:
        loop, loads, overlap = None, dict(_loads(sass).most_common()), None
    result = Analysis(_registers(path["cubin"]), spills["STL"], spills["LDL"], md.shared, mma, tuple(mma_ops), loop,
                      loads, overlap, tuple(loops))
    _analyses[md.hash] = result
    return result


# ---------------------------------------------------------------- one row per kernel


def _specialisation(src) -> tuple:
    """(constexpr flags, arguments not divisible by 16) of a compiled source: the flags the
    kernel declares constexpr, and the pointer / integer arguments Triton did not specialise
    as 16-divisible (those get narrower loads)."""
    names = src.fn.arg_names
    declared = {p.name for p in src.fn.params if p.is_constexpr}
    flags = {names[k[0]]: getattr(v, "value", v) for k, v in src.constants.items() if names[k[0]] in declared}
    flags = {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in flags.items()}  # (dtypes)
    div16 = {names[k[0]] for k, attrs in src.attrs.items() if ["tt.divisibility", 16] in [list(a) for a in attrs]}
    plain = [n for n, ty in src.signature.items()
             if n not in div16 and (ty.startswith("*") or ty[:1] in "iu") and (names.index(n),) not in src.constants]
    return flags, plain


def _short(name: str) -> str:
    return name.strip("_").removesuffix("_kernel")


# Kernels whose programs take different roles, each with a main loop of its own: per kernel
# and role in source order, (row name, argument holding how many programs take it (the next
# ones; None: the rest), prefix of its tile meta-parameters, constexpr flag without which the
# role is not compiled). Compiled roles' loops are in address order, as in the source.
ROLES = {"linear_bwd": (("linear_dx", "DX_PROGRAMS", "DX_", "HAS_DX"),   # dX
                        ("linear_dw", "DW_PROGRAMS", "DW_", "DW_MODE"),  # this block's dW
                        ("linear_dwn", None, "NX_", "NEXT"))}          # the next block's, deferred


def _roles(short: str, analysis: Analysis, flags: dict, sizes: dict, ctas: int) -> list:
    """[(row name, CTAs, tile prefix, main loop or None)] of a launch: one per role with programs."""
    roles = ROLES.get(short)
    if not roles or not all(arg is None or arg in sizes for _, arg, _, _ in roles):
        return [(short, ctas, "", None)]
    compiled = [role for role in roles if role[3] is None or flags.get(role[3])]
    out, left = [], ctas
    for i, (name, arg, prefix, _) in enumerate(compiled):
        n = sizes[arg] if arg is not None else left
        left -= n
        loop = analysis.loops[i] if len(analysis.loops) == len(compiled) else None
        if n:
            out.append((name, n, prefix, loop))
    return out


def rows(launches, sms: int) -> List[dict]:
    """One row per distinct (compiled kernel, grid, role), in launch order."""
    out, index, variants = [], {}, {}
    for launch in launches:
        key = launch.metadata.hash, launch.grid
        if key in index:
            for i in index[key]:
                out[i]["count"] += 1
            continue
        short = _short(launch.name)
        flags, plain = _specialisation(launch.src)
        names = launch.src.fn.arg_names
        sizes = {}
        if len(launch.args) == len(names):
            sizes = {n: v for n, v in zip(names, launch.args)
                     if isinstance(v, int) and not isinstance(v, bool) and n not in flags}
        analysis = analyse(launch)
        index[key] = []
        ctas = launch.grid[0] * launch.grid[1] * launch.grid[2]
        for name, ctas, prefix, loop in _roles(short, analysis, flags, sizes, ctas):
            seen = variants.setdefault(name, [])
            if launch.metadata.hash not in seen:
                seen.append(launch.metadata.hash)
            fields = analysis._asdict()
            if loop is not None:
                fields.update(zip(("loop", "loads", "overlap"), loop))
            index[key].append(len(out))
            out.append(dict(
                kernel=name, variant=seen.index(launch.metadata.hash) + 1, count=1, arch=launch.metadata.target.arch,
                grid=list(launch.grid), ctas=ctas, sm_fill=ctas / sms,
                tile=[flags[prefix + n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if prefix + n in flags],
                num_warps=launch.metadata.num_warps, num_stages=launch.metadata.num_stages,
                flags={n: v for n, v in flags.items() if "BLOCK_" not in n}, not_div16=plain, sizes=sizes,
                hash=launch.metadata.hash, **fields))
    for row in out:  # a variant number only where a kernel compiled more than one way
        row["label"] = row["kernel"] + (f".{row['variant']}" if len(variants[row["kernel"]]) > 1 else "")
    return out


# ---------------------------------------------------------------- output

COLUMNS = (("kernel", 13), ("tile", 10), ("w", 2), ("s", 1), ("CTAs", 5), ("SMs", 4), ("regs", 4),
           ("spill st/ld", 11), ("smem", 5), ("mma", 9), ("ovl", 3), ("loop", 10), ("loads", 9))
_LEFT = (0, 1, 9, 10, 11, 12)  # text columns; the others are numbers
LEGEND = """\
w, s: warps, stages. SMs: share of the SMs given a CTA, or CTAs per SM. spill: bytes of
local stores / loads (K = 1000). smem: dynamic shared memory (K = 1024 B). mma: wgmma
(Hopper warpgroup MMA), mma (mma.sync), fma (a dot on CUDA cores), - (no dot).
loop, in the main loop (innermost loop with the most MMA / FMA instructions): cN = cp.async
waits leave N groups in flight (min), wN = wgmma waits leave N groups (min), bN = barriers
per iteration. ovl: loads of later iterations in flight during this one's MMA (every global
load asynchronous, c >= 1 or TMA, w >= 1). loads: global loads of the main loop (of the
kernel without a dot) as kind + bytes per instruction, most frequent first: ld = LDG to
registers, cp = cp.async LDGSTS, tma = UTMALDG."""


def _num(n: int, unit: int = 1000) -> str:
    """n as is below 10 units, else in K of `unit` (one decimal below 100 K)."""
    if n < 10 * unit:
        return str(n)
    return f"{n / unit:.0f}K" if n >= 100 * unit or n % unit == 0 else f"{n / unit:.1f}K"


def _flag_text(flags: dict) -> str:
    return " ".join(n if v is True else f"{n}={v}" for n, v in flags.items() if v not in (False, None, 0))


def format_row(row: dict) -> List[str]:
    """The table's cells for one row."""
    loop = row["loop"] or {}
    loop_text = " ".join(f"{key}{loop[name]}" for key, name in (("c", "cp_async_wait"), ("w", "wgmma_wait"),
                                                                 ("b", "barriers")) if loop.get(name) is not None)
    loads = " ".join(k.replace(" ", "") for k in row["loads"])
    fill = row["sm_fill"]
    return [row["label"], "x".join(map(str, row["tile"])) or "-", str(row["num_warps"]), str(row["num_stages"]),
            str(row["ctas"]), f"{fill:.0%}" if fill < 1 else f"{fill:.1f}x", str(row["registers"]),
            f"{_num(row['spill_stores'])}/{_num(row['spill_loads'])}" if row["spill_stores"] + row["spill_loads"]
            else "0", _num(row["shared"], 1024), "+".join(row["mma"]) or "-",
            "-" if row["overlap"] is None else "yes" if row["overlap"] else "no", loop_text or "-", loads or "-"]


def table(case: Case, result: dict, verbose: bool = False) -> str:
    """`case`'s rows as a text table, a line per variant's specialisation under it."""
    lines = [f"== {case.title()}"]
    if result["error"]:
        lines.append(f"   error: {result['error']}")
    if not result["kernels"]:
        return "\n".join(lines + ["   (no launches)"])
    for cells in [[name for name, _ in COLUMNS]] + [format_row(row) for row in result["kernels"]]:
        lines.append(" ".join(c.ljust(w) if i in _LEFT else c.rjust(w)
                              for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))).rstrip())
    done = set()
    for row in result["kernels"]:
        if verbose or row["label"] not in done:
            done.add(row["label"])
            extra = " | " + " ".join(f"{n}={v}" for n, v in row["sizes"].items()) if verbose else ""
            plain = f" | not 16-divisible: {' '.join(row['not_div16'])}" if row["not_div16"] else ""
            lines.append(textwrap.fill(f"{row['label']}: {_flag_text(row['flags'])}{plain}{extra}", 100,
                                       initial_indent="   ", subsequent_indent="     "))
    return "\n".join(lines)


def run(case: Case, kernels: Optional[List[str]] = None) -> dict:
    """Record and analyse one case: {case fields, "error", "kernels": rows}, rows filtered
    to kernel names containing one of `kernels`."""
    launches, error = record(case)
    result = rows(launches, DEVICES[case.arch]["multiprocessor_count"])
    if kernels:
        result = [r for r in result if any(k in r["kernel"] for k in kernels)]
    return dict(case._asdict(), error=error, kernels=result)


def cases(args) -> List[Case]:
    """The cases the command line asks for: every arch x dtype x mode x batch x model."""
    models_ = []
    if args.budgets:
        for budget in args.budgets:
            for depth in args.depths:
                mlp = dwfast.mlp_by_budget(args.features or 128, int(budget), depth, args.outputs or 1)
                widths = tuple(m.out_features for m in models.linear_layers(mlp)[:-1])
                models_.append((args.features or 128, widths, args.outputs or 1))
    for w in args.widths:
        models_.append((args.features or w, (w,) * args.depth, args.outputs or w))
    return [Case(arch, dtype, mode, batch, *m) for arch in args.arch for dtype in args.dtypes
            for m in models_ for batch in args.batches for mode in args.modes]


def parser() -> argparse.ArgumentParser:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile dwfast's kernels as real launches compile them, for sm_90 / sm_80 without a "
                    "GPU, and print per kernel its tile, warps, stages, grid against the SMs, registers, "
                    "spills, shared memory, MMA kind, main-loop overlap and global load widths.",
        epilog="Examples:\n  python -m bench.kernels --widths 256 --dtypes bf16\n"
               "  python -m bench.kernels --batches 4096 --widths 64,252,256,811,4096 --dtypes bf16,fp32 "
               "--modes train,whole --kernels linear_,mlp_\n"
               "  python -m bench.kernels --budgets 1e6,1e7 --depths 1,8 --arch 90,80 --json out.json\n\n" + LEGEND)
    p.add_argument("--widths", type=comma_list(int, minimum=1), default=[],
                   help="hidden widths; each gives MLP(W, [W] * depth, W) (default 256 unless --budgets)")
    p.add_argument("--depth", type=at_least(0), default=2, help="hidden layers for --widths (default 2)")
    p.add_argument("--budgets", type=comma_list(float, minimum=1, below=BUDGET_BELOW), default=[],
                   help="parameter budgets: dwfast.mlp_by_budget(features, budget, depth, outputs) per --depths")
    p.add_argument("--depths", type=comma_list(int, minimum=0), default=[1, 8],
                   help="depths for --budgets (default 1,8)")
    p.add_argument("--features", type=at_least(1), help="input width (default W for --widths, 128 for --budgets)")
    p.add_argument("--outputs", type=at_least(1), help="output width (default W for --widths, 1 for --budgets)")
    p.add_argument("--batches", type=comma_list(int, minimum=2), default=[4096], help="batch sizes (default 4096)")
    p.add_argument("--dtypes", type=comma_list(str, DTYPES), default=["bf16"],
                   help="bf16, fp16, fp32 (matmul precision 'highest'), tf32 (fp32 at 'high'); default bf16")
    p.add_argument("--modes", type=comma_list(str, MODES), default=list(MODES), help=MODE_HELP)
    p.add_argument("--arch", type=comma_list(int, DEVICES), default=[90], help="targets: 90 (H100), 80 (A100)")
    p.add_argument("--kernels", type=comma_list(str), help="only kernels whose name contains one of these")
    p.add_argument("--json", type=new_file, metavar="PATH",
                   help="also write the results as JSON ('-': to stdout, no table)")
    p.add_argument("-v", "--verbose", action="store_true", help="a specialisation line for every row, with sizes")
    return p


def main(argv=None) -> int:
    """Run the report; returns 1 if any case failed, else 0."""
    args = parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: Triton's interpreter compiles nothing")
    if not args.widths and not args.budgets:
        args.widths = [256]
    results = []
    for case in cases(args):
        result = run(case, args.kernels)
        results.append(result)
        if args.json != "-":
            print(table(case, result, args.verbose), flush=True)
    if args.json != "-":
        print("\n" + LEGEND)
    if args.json is not None:
        text = json.dumps({"triton": triton.__version__, "torch": torch.__version__, "cases": results}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return int(any(r["error"] for r in results))


if __name__ == "__main__":
    sys.exit(main())
