"""Backend choice: which implementation runs a fused chain.

- ``auto``      Triton kernels on CUDA tensors, the pure-PyTorch reference on CPU (default).
- ``triton``    Triton kernels; CUDA tensors only.
- ``interpret`` Triton kernels on CPU tensors through Triton's interpreter (slow; for tests).
                Needs ``TRITON_INTERPRET=1`` in the environment before ``dwfast`` is imported.
- ``torch``     the pure-PyTorch reference: eager ``F.linear``/``F.batch_norm``/``relu``.

Chosen by :func:`set_backend` or the environment variable ``DWFAST_BACKEND``.
"""
import os

BACKENDS = ("auto", "triton", "interpret", "torch")
_backend = None


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown dwfast backend {name!r}; choose one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every fused chain: one of ``auto, triton, interpret, torch``."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    """The selected backend name (``DWFAST_BACKEND`` if :func:`set_backend` was never called;
    read once: it costs microseconds, and this runs on every forward)."""
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get("DWFAST_BACKEND", "auto"))
    return _backend


# True while a stand-in GPU is active (bench/standin.py): CPU tensors then take the triton
# path, which compiles every kernel for the stand-in's target and records its launch.
STANDIN = False


def is_reference(x) -> bool:
    """Whether a chain on tensor `x` runs the pure-PyTorch reference (cheaper to ask than
    :func:`resolve_backend`, and never raises; on the CPU every step of a forward counts)."""
    name = get_backend()
    return name == "torch" or (name == "auto" and not x.is_cuda and not STANDIN)


def resolve_backend(device) -> str:
    """The concrete backend (``triton``, ``interpret`` or ``torch``) for tensors on ``device``."""
    name = get_backend()
    is_cuda = device.type == "cuda" or STANDIN
    if name == "auto":
        return "triton" if is_cuda else "torch"
    if name == "triton" and not is_cuda:
        raise RuntimeError(
            "dwfast backend 'triton' needs CUDA tensors; use backend 'torch' on the CPU, "
            "or 'interpret' (with TRITON_INTERPRET=1) to run the kernels through Triton's interpreter")
    if name == "interpret" and is_cuda:
        raise RuntimeError("dwfast backend 'interpret' runs on CPU tensors; use 'triton' or 'auto' on CUDA")
    if name == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("dwfast backend 'interpret' needs TRITON_INTERPRET=1 set before dwfast is imported")
    return name


# ---------------------------------------------------------------- whole-net path

WHOLE_NET_MODES = ("auto", "never")
_whole_net = None


def _check_whole_net(mode):
    if mode not in WHOLE_NET_MODES:
        raise ValueError(f"unknown whole-net mode {mode!r}; choose one of {WHOLE_NET_MODES} "
                         "('never' forces the per-layer chain)")
    return mode


def set_whole_net(mode: str) -> None:
    """``auto`` (default): run a qualifying narrow chain as one kernel (see
    ``dwfast.whole_net``); ``never``: always the per-layer chain. There is no ``always``:
    chains that don't qualify have no whole-net kernel."""
    global _whole_net
    _whole_net = _check_whole_net(mode)


def get_whole_net() -> str:
    """The whole-net mode (``DWFAST_WHOLE_NET`` if :func:`set_whole_net` was never called; read
    once)."""
    global _whole_net
    if _whole_net is None:
        _whole_net = _check_whole_net(os.environ.get("DWFAST_WHOLE_NET", "auto"))
    return _whole_net
