"""A checked Triton interpreter: bounds and race checks for kernels run with TRITON_INTERPRET=1.

Triton's interpreter (triton/runtime/interpreter.py, Triton 3.9) runs a launch's programs one
after another on the CPU, with every pointer a real host address, and dereferences those
addresses without any check. So an out-of-bounds load reads whatever lies next to the tensor,
an out-of-bounds store silently corrupts the heap, and two programs storing to the same address
simply run in order. On a GPU these are faults, garbage or nondeterminism. This module patches
the interpreter at the level every memory access goes through, and checks them during a launch.

Usage::

    import checked_interpreter as ci
    with ci.checked() as chk:          # or: chk = ci.install(); ...; ci.uninstall()
        run_some_kernels()
    print(chk.report())
    chk.assert_clean()                  # raises AssertionError listing the findings

`install()` must be called with TRITON_INTERPRET=1 (the kernels must be interpreted), any time
before the launches to check (before or after the kernels are decorated).

What is patched
---------------
- `GridExecutor._init_args_hst`: after the interpreter maps the launch's arguments to host
  tensors (the very tensors whose addresses the kernel sees), the checker records, for every
  tensor argument (also inside tuples and TensorDescriptor bases), its storage's byte range
  [storage.data_ptr(), + storage.nbytes()) and its view's span. `GridExecutor.__call__` is
  wrapped to open and close a launch (the race analysis runs when the launch ends).
- `interpreter_builder.set_grid_idx`: the current program id.
- `create_masked_load` / `create_masked_store` (plain `tl.load` / `tl.store`, unmasked ones
  included: the interpreter routes them through the masked versions with an all-true mask,
  and tensor-descriptor loads/stores as well), `create_atomic_rmw`, `create_atomic_cas`,
  `create_atomic_load`, `create_atomic_store`.

Check 1: bounds. Each element whose mask is on must lie, with all its bytes, inside the storage
of one of the launch's tensor arguments. A violation records the kernel, the program id, load
or store, the kernel source line, the number of bad elements of that access, the first bad
address, the argument nearest to it (name, offset from its data_ptr in bytes and elements,
storage size). With `sanitize=True` (default) the bad elements are masked off before the real
access (a load gives `other`, a store is dropped), so a run goes on instead of crashing or
corrupting memory. Accesses inside a storage but outside every argument's view span are
recorded as a weaker finding ("outside-view") when `view_check=True` (off by default: dwfast's
workspace views and persistent scratch buffers are legitimately bigger than what a view shows).
One access (one tl.load / tl.store) whose elements fall into two different argument storages
is reported too (an index that ran off one tensor into a neighbouring argument's allocation;
without this, such an access would pass, since both addresses are "inside some argument").
On a new out-of-bounds finding the checker also scans the heap for a live CPU tensor holding
the address (shown in the finding: "no live CPU tensor holds it" or which one does).

Kernels that reach tensors through addresses stored in another tensor (dwfast's whole-net
`_pack_kernel` / `_unpack_kernel` read a table of layer addresses) need those tensors declared:
`register_indirect(table, tensors)` makes them part of the memory of every launch given `table`.

Check 2: races (`races=True`, default). Every plain load/store and every atomic of the launch is
logged per byte (address, program, sequence number, and the stored bytes). When the launch ends,
the accesses to each byte are ordered by time and each is paired with the previous plain store
to that byte and (a load) with the next one. A pair from two different programs with at least
one plain store is a conflict unless the programs synchronise in between: the earlier program
has a release (release / acq_rel) atomic on some address X after its access and the later one
has an acquire (acquire / acq_rel) atomic on the same X before its access. (The interpreter runs
the earlier program entirely before the later one, so the later one's atomic on X comes after
the earlier one's in X's modification order; all-RMW release sequences make that
synchronises-with, which is exactly dwfast's `_ticket` "last program" pattern.) Conflicts:
- write-write: two programs storing the same byte; reported with whether the values were equal
  (equal values: benign on every GPU in practice, but still formally a race);
- read-write: a program loading a byte that another program stores, with no synchronisation
  between them (either order: a read of a store made by an earlier program, or a read of a byte
  a later program overwrites; both are nondeterministic on a GPU).
Plain accesses racing with atomics of other programs are not checked, nor are races between
different launches (stream order makes those ordered).

Limits
------
- Only what a run executes is checked: masks and branches taken for the shapes run.
- Pointers not derived from a tensor argument (e.g. an integer cast to a pointer) are checked
  against the arguments as well; their targets are then reported as out of bounds.
- The interpreter itself is single-threaded and global: the checker is too (one launch at a
  time, no thread isolation).
- Intra-program hazards (a program reading its own store across threads without a barrier)
  are invisible: the interpreter has no threads, and neither does the checker.
- Memory: race checking logs ~20 bytes per accessed byte per launch; fine for test shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import weakref
from typing import Dict, List, Optional

import numpy as np

__all__ = ["install", "uninstall", "checked", "Checker", "Finding", "current", "register_indirect"]

_TRITON_DIR = None
_THIS_FILE = os.path.abspath(__file__)


@dataclasses.dataclass
class Finding:
    """One (deduplicated) violation. `kind` is 'oob', 'outside-view', 'race-ww' or 'race-rw'."""
    kind: str
    kernel: str
    access: str            # 'load', 'store', 'atomic', or for races e.g. 'store/store'
    where: str             # kernel source location(s)
    detail: str            # human-readable description of the first instance
    count: int = 1         # how many accesses (oob) / bytes (races) matched this key
    launches: int = 1      # in how many launches it occurred
    extra: Dict = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return (f"[{self.kind}] {self.kernel} {self.access} at {self.where}: {self.detail} "
                f"(x{self.count} in {self.launches} launch(es))")


@dataclasses.dataclass
class _Arg:
    name: str
    lo: int          # storage bytes [lo, hi)
    hi: int
    ptr: int         # data_ptr()
    view_lo: int     # view span [view_lo, view_hi)
    view_hi: int
    itemsize: int
    desc: str


class _Launch:
    __slots__ = ("name", "args", "ilo", "ihi", "vlo", "vhi", "grid", "pid", "pid_tuple", "seq", "log",
                 "atomics", "locs", "bad")

    def __init__(self, name: str, args: List[_Arg]):
        self.name = name
        self.args = args
        iv = sorted(set((a.lo, a.hi) for a in args if a.hi > a.lo))
        merged = []  # distinct storages (overlapping ones, which torch never makes, merged)
        for lo, hi in iv:
            if merged and lo < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ilo = np.array([m[0] for m in merged], dtype=np.uint64)
        self.ihi = np.array([m[1] for m in merged], dtype=np.uint64)
        vv = sorted((a.view_lo, a.view_hi) for a in args if a.view_hi > a.view_lo)
        mv = []
        for lo, hi in vv:
            if mv and lo <= mv[-1][1]:
                mv[-1][1] = max(mv[-1][1], hi)
            else:
                mv.append([lo, hi])
        self.vlo = np.array([m[0] for m in mv], dtype=np.uint64)
        self.vhi = np.array([m[1] for m in mv], dtype=np.uint64)
        self.grid = (1, 1, 1)
        self.pid = 0
        self.pid_tuple = (0, 0, 0)
        self.seq = 0
        self.log = []        # (kind 0 load / 1 store, addr uint64[n], width, pid, seq, bytes uint8[n, w] | None)
        self.atomics = {}    # pid -> list of (seq, addr uint64[n], releases, acquires)
        self.locs = {}       # seq -> source location
        self.bad = False


def _inside(addr: np.ndarray, width: int, lo: np.ndarray, hi: np.ndarray, index: bool = False):
    """Whether each address's `width` bytes lie inside one of the sorted disjoint [lo, hi)
    (and, with `index`, which one)."""
    if lo.size == 0:
        ok = np.zeros(addr.shape, dtype=bool)
        return (ok, np.zeros(addr.shape, dtype=np.int64)) if index else ok
    i = np.searchsorted(lo, addr, side="right").astype(np.int64) - 1
    ok = i >= 0
    ic = np.clip(i, 0, None)
    ok &= addr + np.uint64(width) <= hi[ic]
    return (ok, ic) if index else ok


def _source_location() -> str:
    """The innermost frame outside Triton and this module (the kernel's source line)."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_TRITON_DIR) and fn != _THIS_FILE:
            return f"{os.path.basename(fn)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def _tensor_args(name, value, out):
    """Collect the tensors among a launch argument (tuples, TensorDescriptor bases, wrappers)."""
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _tensor_args(f"{name}[{i}]", v, out)
        return
    base = getattr(value, "base", None)
    if base is not None and hasattr(base, "data_ptr") and not hasattr(value, "untyped_storage"):
        # TensorWrapper (reinterpret) or TensorDescriptor
        _tensor_args(name, base, out)
        return
    if not hasattr(value, "data_ptr") or not hasattr(value, "untyped_storage"):
        return
    st = value.untyped_storage()
    lo, nbytes = st.data_ptr(), st.nbytes()
    ptr = value.data_ptr()
    isz = value.element_size()
    if value.numel() == 0:
        vlo = vhi = ptr
    else:
        neg = sum((s - 1) * st_ for s, st_ in zip(value.shape, value.stride()) if st_ < 0)
        pos = sum((s - 1) * st_ for s, st_ in zip(value.shape, value.stride()) if st_ > 0)
        vlo, vhi = ptr + neg * isz, ptr + (pos + 1) * isz
    out.append(_Arg(name, lo, lo + nbytes, ptr, vlo, vhi, isz,
                    f"{tuple(value.shape)}/{tuple(value.stride())} {str(value.dtype).replace('torch.', '')}"
                    f" storage {nbytes}B"))


# Tensors a kernel reaches through addresses stored in another tensor (a "table" argument), as
# dwfast's whole-net pack/unpack kernels do: storage data_ptr of the table -> (weakref to the
# table, [(name, weakref to tensor)]).
_INDIRECT: Dict[int, tuple] = {}


def register_indirect(table, tensors, names=None):
    """Declare that a launch given `table` may also access `tensors` (whose addresses `table`
    holds). Kept by weak reference; registering the same table again replaces its list."""
    refs = []
    for i, t in enumerate(tensors):
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        refs.append((names[i] if names else f"[{i}]", weakref.ref(t)))
    _INDIRECT[table.untyped_storage().data_ptr()] = (weakref.ref(table), refs)


def _indirect_args(found):
    extra = []
    for a in found:
        entry = _INDIRECT.get(a.lo)
        if entry is None:
            continue
        holder, refs = entry
        if holder() is None:
            continue
        for name, ref in refs:
            t = ref()
            if t is not None:
                _tensor_args(f"{a.name}->{name}", t, extra)
    return found + extra


def _live_tensor_containing(addr: int) -> str:
    """A description of some live tensor whose storage holds `addr` (slow: scans the heap)."""
    try:
        import warnings
        import torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objs = gc.get_objects()
        for o in objs:
            if type(o) in (torch.Tensor, torch.nn.Parameter) and not o.is_meta and o.device.type == "cpu":
                try:
                    st = o.untyped_storage()
                except Exception:
                    continue
                lo = st.data_ptr()
                if lo <= addr < lo + st.nbytes():
                    return (f"; it lies inside a live tensor not passed to the launch: {tuple(o.shape)} "
                            f"{str(o.dtype).replace('torch.', '')} at offset {addr - o.data_ptr():+d} B")
    except Exception:
        pass
    return "; no live CPU tensor holds it"


class Checker:
    """Holds the findings of every checked launch since install (see the module docstring)."""

    def __init__(self, races=True, sanitize=True, view_check=False, raise_on_violation=False,
                 max_race_pairs=200000):
        self.races = races
        self.sanitize = sanitize
        self.view_check = view_check
        self.raise_on_violation = raise_on_violation
        self.max_race_pairs = max_race_pairs
        self.findings: Dict[tuple, Finding] = {}
        self.launches = 0
        self.kernels: Dict[str, int] = {}
        self.accesses = 0
        self.stats = {"cross_program_pairs": 0, "synchronised_pairs": 0}
        self._launch: Optional[_Launch] = None
        self._seen_keys_this_launch = set()

    # ------------------------------------------------------------------ results
    @property
    def violations(self) -> List[Finding]:
        return list(self.findings.values())

    def clear(self):
        self.findings.clear()
        self.launches = 0
        self.kernels.clear()
        self.accesses = 0

    def report(self) -> str:
        head = (f"checked {self.launches} launches of {len(self.kernels)} kernels "
                f"({self.accesses} memory accesses; {self.stats['cross_program_pairs']} cross-program byte pairs, "
                f"{self.stats['synchronised_pairs']} of them ordered by an atomic): {len(self.findings)} finding(s)")
        return "\n".join([head] + ["  " + f.line() for f in self.findings.values()])

    def assert_clean(self, kinds=("oob", "race-ww", "race-rw")):
        bad = [f for f in self.findings.values() if f.kind in kinds]
        if bad:
            raise AssertionError("checked interpreter found:\n" + "\n".join(f.line() for f in bad))

    def _add(self, key, make):
        f = self.findings.get(key)
        if f is None:
            f = self.findings[key] = make()
            self._seen_keys_this_launch.add(key)
            if self.raise_on_violation:
                raise AssertionError(f.line())
            return f
        if key not in self._seen_keys_this_launch:
            f.launches += 1
            self._seen_keys_this_launch.add(key)
        return f

    # ------------------------------------------------------------------ launch
    def _begin(self, name, args):
        self._launch = _Launch(name, args)
        self._seen_keys_this_launch = set()
        self.launches += 1
        self.kernels[name] = self.kernels.get(name, 0) + 1

    def _end(self):
        launch, self._launch = self._launch, None
        if launch is not None and self.races and launch.log:
            try:
                self._analyse_races(launch)
            finally:
                launch.log = None

    def _nearest(self, launch: _Launch, addr: int):
        best, bestd = None, None
        for a in launch.args:
            d = 0 if a.lo <= addr < a.hi else (a.lo - addr if addr < a.lo else addr - a.hi + 1)
            if bestd is None or d < bestd:
                best, bestd = a, d
        return best

    def _describe_addr(self, launch, addr: int) -> str:
        a = self._nearest(launch, addr)
        if a is None:
            return f"address {addr:#x} (the launch has no tensor arguments)"
        off = addr - a.ptr
        where = "inside" if a.lo <= addr < a.hi else ("before" if addr < a.lo else "past the end of")
        return (f"address {addr:#x} {where} the storage of `{a.name}` [{a.desc}]: offset {off:+d} B "
                f"({off / a.itemsize:+g} elements) from its data_ptr; storage [{a.lo - a.ptr:+d}, {a.hi - a.ptr:+d}) B")

    # ------------------------------------------------------------------ accesses
    def _access(self, kind: str, ptrs, mask, width: int):
        """Bounds-check one access; returns (flat addresses on, flat mask to use or None if unchanged)."""
        launch = self._launch
        p = np.asarray(ptrs)
        m = np.ones(p.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), p.shape)
        self.accesses += 1
        on = p[m]
        if on.size == 0:
            return on, m, None
        ok, which = _inside(on, width, launch.ilo, launch.ihi, index=True)
        newmask = None
        if ok.all() and which.size > 1 and (which != which[0]).any():
            # One access spread over two storages: an index that ran off one tensor into
            # another argument (storages are distinct allocations; a kernel's pointer tensor
            # derives from one base). Reported, not masked.
            loc = _source_location()
            j = int(np.flatnonzero(which != which[0])[0])
            key = ("oob", launch.name, kind, loc, "span")
            f = self.findings.get(key)
            if f is None:
                detail = (f"program {launch.pid_tuple} of grid {launch.grid}: one access touches "
                          f"{np.unique(which).size} argument storages: element 0 at "
                          f"{self._describe_addr(launch, int(on[0]))}, element {j} at "
                          f"{self._describe_addr(launch, int(on[j]))}")
            f = self._add(key, lambda: Finding("oob", launch.name, kind, loc, detail, 0))
            f.count += 1
        if not ok.all():
            loc = _source_location()
            bad_addrs = on[~ok]
            first = int(bad_addrs[0])
            desc = self._describe_addr(launch, first)
            nb = int(bad_addrs.size)
            nearest = self._nearest(launch, first)
            key = ("oob", launch.name, kind, loc, nearest.name if nearest else None)
            f = self.findings.get(key)
            if f is None:
                detail = (f"program {launch.pid_tuple} of grid {launch.grid}: {nb} of {on.size} enabled elements "
                          f"out of bounds; first {desc}{_live_tensor_containing(first)}")
            f = self._add(key, lambda: Finding("oob", launch.name, kind, loc, detail, 0,
                                               extra={"args": [dataclasses.asdict(a) for a in launch.args]}))
            f.count += 1
            if self.sanitize:
                newmask = m.copy()
                newmask[m] = ok
                m = newmask
                on = on[ok]
        elif self.view_check and launch.vlo.size and not _inside(on, width, launch.vlo, launch.vhi).all():
            loc = _source_location()
            inview = _inside(on, width, launch.vlo, launch.vhi)
            first = int(on[~inview][0])
            key = ("outside-view", launch.name, kind, loc)
            detail = (f"program {launch.pid_tuple}: {int((~inview).sum())} elements inside a storage but outside "
                      f"every argument's view; first {self._describe_addr(launch, first)}")
            f = self._add(key, lambda: Finding("outside-view", launch.name, kind, loc, detail, 0))
            f.count += 1
        return on, m, newmask

    def _log(self, kind: int, on: np.ndarray, width: int, values=None):
        launch = self._launch
        if not self.races or on.size == 0:
            return
        launch.seq += 1
        launch.locs[launch.seq] = _source_location()
        launch.log.append((kind, on.astype(np.uint64, copy=True), width, launch.pid, launch.seq, values))

    def _log_atomic(self, on: np.ndarray, sem_name: str):
        launch = self._launch
        if not self.races:
            return
        launch.seq += 1
        rel = sem_name in ("RELEASE", "ACQUIRE_RELEASE")
        acq = sem_name in ("ACQUIRE", "ACQUIRE_RELEASE")
        launch.atomics.setdefault(launch.pid, []).append((launch.seq, np.unique(on.astype(np.uint64)), rel, acq))

    # ------------------------------------------------------------------ races
    def _analyse_races(self, launch: _Launch):
        kinds, addrs, pids, seqs, vals = [], [], [], [], []
        for kind, on, w, pid, seq, v in launch.log:
            n = on.size
            if w == 1:
                a = on
            else:
                a = (on[:, None] + np.arange(w, dtype=np.uint64)[None, :]).ravel()
            addrs.append(a)
            kinds.append(np.full(a.size, kind, dtype=np.int8))
            pids.append(np.full(a.size, pid, dtype=np.int64))
            seqs.append(np.full(a.size, seq, dtype=np.int64))
            if v is None:
                vals.append(np.zeros(a.size, dtype=np.uint8))
            else:
                vals.append(np.asarray(v, dtype=np.uint8).reshape(n * w))
        addr = np.concatenate(addrs)
        kind = np.concatenate(kinds)
        pid = np.concatenate(pids)
        seq = np.concatenate(seqs)
        val = np.concatenate(vals)
        is_store = kind == 1
        if not is_store.any():
            return
        # Only bytes that some program stores can take part in a conflict.
        stored = np.unique(addr[is_store])
        keep = np.isin(addr, stored, assume_unique=False)
        if not keep.all():
            addr, kind, pid, seq, val, is_store = (a[keep] for a in (addr, kind, pid, seq, val, is_store))
        if (pid == pid[0]).all():
            return
        order = np.lexsort((seq, addr))
        addr, kind, pid, seq, val, is_store = (x[order] for x in (addr, kind, pid, seq, val, is_store))
        n = addr.size
        idx = np.arange(n, dtype=np.int64)
        newgrp = np.ones(n, dtype=bool)
        newgrp[1:] = addr[1:] != addr[:-1]
        gstart = np.maximum.accumulate(np.where(newgrp, idx, 0))
        gend = np.empty(n, dtype=np.int64)  # exclusive end of the group
        starts = np.flatnonzero(newgrp)
        ends = np.append(starts[1:], n)
        gend[:] = np.repeat(ends, np.diff(np.append(starts, n)))
        st_pos = np.where(is_store, idx, -1)
        cum = np.maximum.accumulate(st_pos)
        prev = np.empty(n, dtype=np.int64)
        prev[0] = -1
        prev[1:] = cum[:-1]
        prev_ok = prev >= gstart
        st_pos2 = np.where(is_store, idx, n)
        cum2 = np.minimum.accumulate(st_pos2[::-1])[::-1]
        nxt = np.empty(n, dtype=np.int64)
        nxt[-1] = n
        nxt[:-1] = cum2[1:]
        nxt_ok = (nxt < gend) & ~is_store
        firsts, seconds = [], []
        sel = prev_ok.copy()
        sel[sel] = pid[prev[sel]] != pid[sel]
        firsts.append(prev[sel]); seconds.append(idx[sel])
        sel = nxt_ok.copy()
        sel[sel] = pid[nxt[sel]] != pid[sel]
        firsts.append(idx[sel]); seconds.append(nxt[sel])
        first = np.concatenate(firsts)
        second = np.concatenate(seconds)
        if first.size == 0:
            return
        if first.size > self.max_race_pairs:
            first, second = first[:self.max_race_pairs], second[:self.max_race_pairs]
        # Synchronisation: per (p1, s1, p2, s2) op pair.
        rows = np.stack([pid[first], seq[first], pid[second], seq[second]], axis=1)
        uniq, inv = np.unique(rows, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        synced = np.zeros(len(uniq), dtype=bool)
        atom = launch.atomics
        for r, (p1, s1, p2, s2) in enumerate(uniq.tolist()):
            a1, a2 = atom.get(p1), atom.get(p2)
            if not a1 or not a2:
                continue
            rel = [x for (s, x, rl, _) in a1 if rl and s > s1]
            acq = [x for (s, x, _, aq) in a2 if aq and s < s2]
            if rel and acq:
                ra = np.unique(np.concatenate(rel))
                qa = np.unique(np.concatenate(acq))
                synced[r] = np.intersect1d(ra, qa, assume_unique=True).size > 0
        bad = ~synced[inv]
        self.stats["cross_program_pairs"] += int(bad.size)
        self.stats["synchronised_pairs"] += int(bad.size - bad.sum())
        if not bad.any():
            return
        first, second = first[bad], second[bad]
        k1, k2 = kind[first], kind[second]
        ww = (k1 == 1) & (k2 == 1)
        eq = val[first] == val[second]
        # Group by (type, loc1, loc2) for the report.
        loc = launch.locs
        groups = {}
        for i in range(first.size):
            f_, s_ = int(first[i]), int(second[i])
            typ = "race-ww" if ww[i] else "race-rw"
            acc = ("store" if k1[i] == 1 else "load") + "/" + ("store" if k2[i] == 1 else "load")
            key = (typ, launch.name, acc, loc.get(int(seq[f_]), "?"), loc.get(int(seq[s_]), "?"))
            g = groups.get(key)
            if g is None:
                groups[key] = g = [0, 0, f_, s_]
            g[0] += 1
            g[1] += bool(eq[i]) if ww[i] else 0
        for key, (cnt, neq, f_, s_) in groups.items():
            typ, name, acc, l1, l2 = key
            a = int(addr[f_])
            extra = ""
            if typ == "race-ww":
                extra = (f"; values equal in {neq} of {cnt} bytes" if neq < cnt else "; all values equal")
            detail = (f"programs {self._pid_tuple(launch, int(pid[f_]))} then {self._pid_tuple(launch, int(pid[s_]))}"
                      f" without an acquire/release atomic between them, first at {self._describe_addr(launch, a)}"
                      f"{extra}")
            f = self._add(key, lambda: Finding(typ, name, acc, f"{l1} -> {l2}", detail, 0,
                                               extra={"all_equal": None}))
            f.count += cnt
            if typ == "race-ww":
                ae = neq == cnt
                f.extra["all_equal"] = ae if f.extra.get("all_equal") is None else (f.extra["all_equal"] and ae)

    @staticmethod
    def _pid_tuple(launch, lin):
        gy, gz = launch.grid[1], launch.grid[2]
        return (lin // (gy * gz), (lin // gz) % gy, lin % gz)


# ---------------------------------------------------------------------- patching

_current: Optional[Checker] = None
_saved = []


def current() -> Optional[Checker]:
    """The installed Checker, or None."""
    return _current


def install(races=True, sanitize=True, view_check=False, raise_on_violation=False) -> Checker:
    """Patch Triton's interpreter so that every launch is checked; returns the Checker that
    collects the findings. Installing again replaces the Checker (the patches stay)."""
    global _current, _TRITON_DIR
    import triton
    from triton.runtime import interpreter as I

    _TRITON_DIR = os.path.dirname(os.path.abspath(triton.__file__))
    chk = Checker(races=races, sanitize=sanitize, view_check=view_check, raise_on_violation=raise_on_violation)
    if _current is not None:
        _current = chk
        return chk
    _current = chk
    B = I.interpreter_builder
    GE = I.GridExecutor

    def save(obj, name, new):
        _saved.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, new)

    orig_init = GE._init_args_hst
    orig_call = GE.__call__

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        c = _current
        if c is not None:
            found = []
            for name, v in zip(self.arg_names, args_hst):
                _tensor_args(name, v, found)
            for name, v in kwargs_hst.items():
                _tensor_args(name, v, found)
            if _INDIRECT:
                found = _indirect_args(found)
            c._begin(getattr(self.fn, "__name__", "?"), found)
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            c = _current
            if c is not None:
                c._end()

    save(GE, "_init_args_hst", _init_args_hst)
    save(GE, "__call__", __call__)

    cls = type(B)
    o_set_grid_dim = cls.set_grid_dim
    o_set_grid_idx = cls.set_grid_idx
    o_load = cls.create_masked_load
    o_store = cls.create_masked_store
    o_rmw = cls.create_atomic_rmw
    o_cas = cls.create_atomic_cas
    o_aload = cls.create_atomic_load
    o_astore = cls.create_atomic_store
    TensorHandle = I.TensorHandle
    sem_names = {v: k for k, v in I._ir.MEM_SEMANTIC.__members__.items()} if hasattr(
        I._ir.MEM_SEMANTIC, "__members__") else {}
    state = {"atomic": None}

    def _width(ptrs):
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def set_grid_dim(self, nx, ny, nz):
        o_set_grid_dim(self, nx, ny, nz)
        c = _current
        if c is not None and c._launch is not None:
            c._launch.grid = (nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        o_set_grid_idx(self, x, y, z)
        c = _current
        if c is not None and c._launch is not None:
            L = c._launch
            L.pid_tuple = (x, y, z)
            L.pid = (x * L.grid[1] + y) * L.grid[2] + z

    def _checked(c, kind, ptrs, mask):
        """Check one plain or atomic access: (enabled addresses, flat mask, the mask to go on
        with (out-of-bounds elements masked off), whether it is an atomic's)."""
        atomic = state["atomic"]
        on, m, newmask = c._access("atomic" if atomic else kind, ptrs.data, None if mask is None else mask.data,
                                   _width(ptrs))
        if newmask is not None:
            mask = TensorHandle(newmask, mask.dtype if mask is not None else I.tl.int1)
        if atomic:
            c._log_atomic(on, atomic)
        return on, m, mask, atomic

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        c = _current
        if c is None or c._launch is None:
            return o_load(self, ptrs, mask, other, cache_policy, is_volatile)
        on, m, mask, atomic = _checked(c, "load", ptrs, mask)
        if not atomic:
            c._log(0, on, _width(ptrs))
        return o_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        c = _current
        if c is None or c._launch is None:
            return o_store(self, ptrs, value, mask, cache_policy)
        on, m, mask, atomic = _checked(c, "store", ptrs, mask)
        w = _width(ptrs)
        if not atomic and c.races and on.size:
            vals = np.broadcast_to(np.asarray(value.data), np.asarray(ptrs.data).shape)[m]
            vals = np.ascontiguousarray(vals)
            c._log(1, on, w, vals.view(np.uint8).reshape(on.size, -1)[:, :w] if vals.itemsize >= w else
                   np.zeros((on.size, w), np.uint8))
        return o_store(self, ptrs, value, mask, cache_policy)

    def _sem(sem):
        name = sem_names.get(sem)
        if name is None:
            name = str(sem).split(".")[-1]
        return name

    def create_atomic_load(self, ptr, mask, sem, scope):
        prev, state["atomic"] = state["atomic"], _sem(sem)
        try:
            return o_aload(self, ptr, mask, sem, scope)
        finally:
            state["atomic"] = prev

    def create_atomic_store(self, ptr, val, mask, sem, scope):
        prev, state["atomic"] = state["atomic"], _sem(sem)
        try:
            return o_astore(self, ptr, val, mask, sem, scope)
        finally:
            state["atomic"] = prev

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        c = _current
        if c is None or c._launch is None:
            return o_rmw(self, rmwOp, ptr, val, mask, sem, scope)
        on, m, newmask = c._access("atomic", ptr.data, None if mask is None else mask.data, _width(ptr))
        if newmask is not None:
            mask = TensorHandle(newmask, mask.dtype if mask is not None else I.tl.int1)
        c._log_atomic(on, _sem(sem))
        return o_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        c = _current
        if c is None or c._launch is None:
            return o_cas(self, ptr, cmp, val, sem, scope)
        on, m, newmask = c._access("atomic", ptr.data, None, _width(ptr))
        if newmask is not None and not newmask.all():
            raise RuntimeError(f"checked interpreter: out-of-bounds atomic_cas in {c._launch.name} "
                               "(cannot be masked off): " + c.violations[-1].line())
        c._log_atomic(on, _sem(sem))
        return o_cas(self, ptr, cmp, val, sem, scope)

    for name, fn in [("set_grid_dim", set_grid_dim), ("set_grid_idx", set_grid_idx),
                     ("create_masked_load", create_masked_load), ("create_masked_store", create_masked_store),
                     ("create_atomic_load", create_atomic_load), ("create_atomic_store", create_atomic_store),
                     ("create_atomic_rmw", create_atomic_rmw), ("create_atomic_cas", create_atomic_cas)]:
        save(cls, name, fn)
    return chk


def uninstall() -> Optional[Checker]:
    """Undo every patch; returns the Checker that was installed (its findings stay readable)."""
    global _current
    chk = _current
    while _saved:
        obj, name, orig = _saved.pop()
        setattr(obj, name, orig)
    _current = None
    return chk


@contextlib.contextmanager
def checked(races=True, sanitize=True, view_check=False, raise_on_violation=False):
    """Context manager: install a fresh Checker, yield it; on exit uninstall, or put back the
    Checker that was installed before."""
    global _current
    prev = _current
    chk = install(races=races, sanitize=sanitize, view_check=view_check, raise_on_violation=raise_on_violation)
    try:
        yield chk
    finally:
        if prev is None:
            uninstall()
        else:
            _current = prev
