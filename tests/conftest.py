import os

# Kernels must be decorated after this is set: by default the tests run Triton's interpreter
# on the CPU. On a CUDA machine DWFAST_TEST_GPU=1 keeps the real compiler and runs the kernel
# tests on the GPU instead.
GPU_MODE = os.environ.get("DWFAST_TEST_GPU") == "1"
if not GPU_MODE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import dwfast  # noqa: E402

# The CPU backends every module test runs on; the kernel backend and device for kernel tests.
BACKENDS = ["torch"] if GPU_MODE else ["torch", "interpret"]
KERNEL_BACKEND, KERNEL_DEVICE = ("triton", "cuda") if GPU_MODE else ("interpret", "cpu")

requires_cuda = pytest.mark.skipif(not (GPU_MODE and torch.cuda.is_available()),
                                   reason="needs a CUDA GPU and DWFAST_TEST_GPU=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _use(name):
    prev = dwfast.get_backend()
    dwfast.set_backend(name)
    return prev


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once per CPU backend; restores the previous choice afterwards."""
    prev = _use(request.param)
    yield request.param
    dwfast.set_backend(prev)


@pytest.fixture
def kernel_device():
    """The device kernel tests run on, with the kernel backend selected."""
    if GPU_MODE and not torch.cuda.is_available():
        pytest.skip("DWFAST_TEST_GPU=1 but no CUDA device")
    prev = _use(KERNEL_BACKEND)
    yield torch.device(KERNEL_DEVICE)
    dwfast.set_backend(prev)


def _kernel_mask_dropout(self, x):
    """nn.Dropout.forward with the fused kernels' masks: the same seed draw (ops.draw_seed)
    and the same Philox stream (kernels.dropout_scale), so an eager reference model drops
    exactly what a fused chain drops."""
    if not self.training or self.p == 0 or x.dim() != 2 or not 0 < self.p <= 1:  # (eager's errors)
        return _eager_dropout(self, x)
    from dwfast import kernels as K
    from dwfast.ops import draw_seed
    return x * K.dropout_scale(draw_seed(x.device), *x.shape, self.p).to(x.dtype)


_eager_dropout = torch.nn.Dropout.forward


@pytest.fixture(autouse=True)
def kernel_mask_dropout(monkeypatch):
    """Every test's eager nn.Dropout draws the kernels' masks (fused and eager compare 1:1)."""
    monkeypatch.setattr(torch.nn.Dropout, "forward", _kernel_mask_dropout)
