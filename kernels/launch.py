"""Launching dwfast's kernels for a few microseconds of host time, and their ticket counters.

`kernel[grid](*args)` binds and specialises every argument again on each call, then checks
every global the kernel reads: about 100 us of Python for a 30-argument kernel on a slow CPU.
A narrow-deep MLP launches two kernels per block per step, so that alone would make training
CPU-bound. So launches go through the compiled kernel's handle:
- `Launch` is one launch planned once (the launchers' plans in fused_linear.py hold one per
  kernel they launch): the first call goes through Triton as usual, which compiles (or loads
  from its cache) and launches, and it keeps the compiled kernel; later calls launch that
  directly. Whoever keeps a Launch calls it only with arguments of the signature it was
  planned for (Triton's specialisation: dtypes, 16-byte alignment of pointers, integers equal
  to 1 or divisible by 16, None), on the same device and driver.
- `run` launches a kernel not planned ahead, keeping the compiled kernel of each signature it
  has seen.

Under Triton's interpreter, or with a launch hook installed (a profiler), every launch goes
through Triton.
"""
import os
import threading

import torch
import triton
from triton import knobs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are decorated
_compiled = {}


def _signature(args) -> tuple:
    """What Triton specialises a launch on, per runtime argument: an integer equal to 1 or
    divisible by 16 (or past 32 bits), a float or None as such, a bool's value, a tensor's dtype
    and the 16-byte alignment of its pointer. (One flat loop: a launch has 20 to 50 arguments,
    and a function call per argument would cost more than the rest of the launch.)"""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append((a == 1) + 2 * (not a & 15) + 4 * (a >= 0x80000000))
        elif kind is float or a is None:
            key.append(kind)
        elif kind is bool:
            key.append(a)
        else:
            key.append(a.dtype)
            key.append(not a.data_ptr() & 15)
    return tuple(key)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host (triton.cdiv is a constexpr function: slow to call here)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for the host."""
    return 1 << (n - 1).bit_length()


def _hooked() -> bool:
    """Whether a launch hook is installed (a HookChain with calls in triton >= 3.6, else set)."""
    hook = knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


def _direct(compiled, grid, args, consts) -> None:
    """Launch `compiled` (a CompiledKernel) on the current device's current stream."""
    driver = triton.runtime.driver.active
    compiled.run(grid[0], grid[1], grid[2], driver.get_current_stream(driver.get_current_device()), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *consts)


class Launch:
    """A launch of `kernel` on `grid` (3 ints) with its constexpr `consts` (in the kernel's
    parameter order), `num_warps` and `num_stages`, planned once; called with the runtime
    arguments (kernel order, before the constexprs) of each launch. See the module docstring."""
    __slots__ = ("kernel", "grid", "consts", "num_warps", "num_stages", "handle")

    def __init__(self, kernel, grid, consts, num_warps: int, num_stages: int):
        self.kernel, self.grid, self.consts = kernel, grid, tuple(consts)
        self.num_warps, self.num_stages = num_warps, num_stages
        self.handle = None  # (launcher, function, packed metadata) of the compiled kernel

    def __call__(self, args) -> None:
        handle = self.handle
        if handle is None or INTERPRET or _hooked():
            compiled = self.kernel[self.grid](*args, *self.consts, num_warps=self.num_warps,
                                              num_stages=self.num_stages)
            if not (INTERPRET or _hooked()):
                self.handle = compiled.run, compiled.function, compiled.packed_metadata
            return
        run, function, metadata = handle
        driver = triton.runtime.driver.active
        grid = self.grid
        run(grid[0], grid[1], grid[2], driver.get_current_stream(driver.get_current_device()), function, metadata,
            None, None, None, *args, *self.consts)


def run(kernel, grid, args, consts, num_warps: int, num_stages: int):
    """Launch `kernel` on `grid` (3 ints) with runtime `args` followed by its constexpr `consts`,
    both in the kernel's parameter order (runtime parameters first)."""
    if INTERPRET or _hooked():
        kernel[grid](*args, *consts, num_warps=num_warps, num_stages=num_stages)
        return
    key = (kernel, triton.runtime.driver.active.get_current_device(), consts, num_warps, num_stages,
           _signature(args))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, *consts, num_warps=num_warps, num_stages=num_stages)
        return
    _direct(compiled, grid, args, consts)


# Per (device, stream, thread) buffers that live as long as the process: launches on one stream
# run one after another, so each can use them whole (and so can every replay of a captured CUDA
# graph); per thread too, as a launch's partials may be read by the ops after it (synchronised
# BatchNorm) and another thread's launch on the stream must not come between.
_buffers = {}


def _stream(device: torch.device):
    return triton.runtime.driver.active.get_current_stream(device.index) if device.type == "cuda" else 0


def _buffer(kind: str, device: torch.device, count: int, make) -> torch.Tensor:
    key = (kind, device, _stream(device), threading.get_ident())
    buf = _buffers.get(key)
    if buf is None or buf.numel() < count:
        buf = make(max(count, 1024))
        _buffers[key] = buf
    return buf


def tickets(device: torch.device, count: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least `count` ticket counters. Kernels reset every counter
    they use before they end, so the buffer is zero again for the next launch."""
    return _buffer("tickets", device, count, lambda n: torch.zeros(n, device=device, dtype=torch.int32))


def scratch(device: torch.device, count: int) -> torch.Tensor:
    """An fp32 buffer of at least `count` elements for a launch's own partial results (written
    and read within the launch, or read by the host right after it)."""
    return _buffer("scratch", device, count, lambda n: torch.empty(n, device=device, dtype=torch.float32))


class Workspace:
    """Buffers for what one launch of a chain's backward writes and the next one reads (the
    previous block's g_y and u, v; a deferred dW's g_z), kept with their views, so that a step
    allocates none of them: an allocation costs about as much host time as a launch.

    Two buffers per kind and dtype, by parity: the launch of block i writes those of parity i % 2
    and reads block i + 1's, of the other, which nothing writes before the launch after it has
    read them (launches on one stream run in order). One workspace per (device, stream, thread)
    (`workspace`), as for scratch: a backward on the CPU (the interpreter) runs on its caller's
    thread, so two threads never share one. Only up to TRANSIENT_BYTES per buffer: wide layers'
    would hold GPU memory for a host time their GEMMs hide, so `view` returns None for them and
    the caller allocates."""
    TRANSIENT_BYTES = 1 << 22
    MAX_VIEWS = 64  # distinct shapes kept (past that, all are made again)
    __slots__ = ("device", "buffers", "views")

    def __init__(self, device: torch.device):
        self.device, self.buffers, self.views = device, {}, {}

    def view(self, kind: str, parity: int, dtype: torch.dtype, M: int, N: int, ld: int, size: int):
        """An uninitialised [M, N] view, rows `ld` apart, at the start of buffer (kind, parity,
        dtype) of at least `size` elements; None past TRANSIENT_BYTES."""
        key = (kind, parity, dtype, M, N, ld, size)
        view = self.views.get(key)
        if view is not None:
            return view
        if size * dtype.itemsize > self.TRANSIENT_BYTES:
            return None
        buf = self.buffers.get(key[:3])
        if buf is None or buf.numel() < size:
            buf = self.buffers[key[:3]] = torch.empty(size, dtype=dtype, device=self.device)
            self.views.clear()  # (views of the one replaced would keep it alive)
        if len(self.views) >= self.MAX_VIEWS:
            self.views.clear()
        view = self.views[key] = buf.as_strided((M, N), (ld, 1))
        return view


def workspace(device: torch.device) -> Workspace:
    """The Workspace of `device`'s current stream and this thread."""
    key = ("workspace", device, _stream(device), threading.get_ident())
    work = _buffers.get(key)
    if work is None:
        work = _buffers[key] = Workspace(device)
    return work
