"""A stand-in GPU for Triton: compile every launch for a real target, run nothing.

Without a GPU, Triton's interpreter runs kernels but compiles nothing, so it shows neither
what a kernel becomes on an H100 (registers, spills, MMA kind, load widths) nor what a
launch costs the host. Under :func:`standin_gpu`, Triton's active driver reports a CUDA
target (sm_90 by default, 132 SMs) and its launcher records each launch instead of running
it. Every launch then goes through the real path: the launchers pick their tiles, Triton
specialises the arguments (dtypes, 16-byte alignment of pointers and integers) and compiles
with its bundled ptxas, and the host-side work of launching can be timed. Tensors stay on
the CPU; kernels write nothing, so outputs are garbage: use it for compiled form, launch
counts and host time, never for values.

The process must not run Triton's interpreter (``TRITON_INTERPRET`` unset before the kernels
are imported); tests run this in a subprocess.
"""
import contextlib
from typing import List, NamedTuple, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from dwfast import backend

# What launchers and Triton ask of a device, with an H100 SXM's and an A100 SXM's values.
H100 = {"multiprocessor_count": 132, "max_shared_mem": 232448, "max_num_regs": 65536, "warpSize": 32,
        "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}
A100 = {"multiprocessor_count": 108, "max_shared_mem": 166912, "max_num_regs": 65536, "warpSize": 32,
        "sm_clock_rate": 1410000, "mem_clock_rate": 1215000, "mem_bus_width": 5120}
DEVICES = {90: H100, 80: A100}
NAMES = {90: "NVIDIA H100 80GB HBM3", 80: "NVIDIA A100-SXM4-80GB"}  # as torch.cuda.get_device_name says


class Launch(NamedTuple):
    """One recorded launch: the compiled kernel's name, its grid and its metadata; `src` is
    what was compiled (Triton's ASTSource: the JIT function, its constexprs and argument
    specialisation) and `args` the launch's arguments in kernel order, tensors replaced by
    their shapes (so a record keeps no tensor alive), when the driver records them."""
    name: str
    grid: Tuple[int, int, int]
    metadata: object
    src: object = None
    args: tuple = ()


class _Utils:
    def __init__(self, props):
        self.props = props

    def get_device_properties(self, device):
        return dict(self.props)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded
        return None, 0, 0, 0, 1024


class _Launcher:
    """Triton's launcher for a kernel on the stand-in: records each launch with the active stand-in."""

    def __init__(self, src, metadata):
        self.name, self.metadata = src.fn.__name__ if hasattr(src, "fn") else str(src), metadata
        self.src = src

    def __call__(self, grid_x, grid_y, grid_z, *rest):
        # rest: stream, function, packed metadata, launch metadata, enter/exit hooks, args.
        # Recording them is opt-in: it would add to the host time the stand-in measures.
        # The active stand-in records it: a compiled kernel (and its launcher) outlives the
        # stand-in it was compiled under, in Triton's cache and in dwfast's.
        driver = triton.runtime.driver.active
        args = ()
        if driver.record_args:
            args = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in rest[6:])
        driver.launches.append(Launch(self.name, (grid_x, grid_y, grid_z), self.metadata, self.src, args))


class StandInDriver(DriverBase):
    """A Triton driver for a CUDA device that isn't there (see the module docstring)."""

    def __init__(self, arch: int = 90, props=None, record_args: bool = False):
        super().__init__()
        self.arch = arch
        self.gpu_name = NAMES.get(arch)  # the tile table's key (kernels/tiles.py)
        self.utils = _Utils(props or DEVICES.get(arch, H100))
        self.launches: List[Launch] = []
        self.record_args = record_args
        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        # Triton keeps its compiled kernels per device index: an index per stand-in target keeps
        # an sm_80 stand-in's kernels apart from an sm_90 one's, and both from a real GPU's.
        return 1000 + self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in GPU runs nothing, so it times nothing")


@contextlib.contextmanager
def standin_gpu(arch: int = 90, props=None, record_args: bool = False):
    """Within the block Triton compiles for sm_`arch` and records launches instead of running
    them; yields the driver, whose ``launches`` lists them (with each launch's arguments when
    `record_args`). The device's properties are `props`, by default an H100's for sm_90 and an
    A100's for sm_80. dwfast's ``auto`` and ``triton`` backends send CPU tensors down the
    kernel path meanwhile. Restores the real driver after."""
    driver = StandInDriver(arch, props, record_args)
    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(driver)
    backend.STANDIN = True
    try:
        yield driver
    finally:
        backend.STANDIN = False
        triton.runtime.driver._active = previous
