import os

# Kernels must be decorated after this is set: the tests run Triton's interpreter on the CPU.
# On a CUDA machine, DWFAST_TEST_GPU=1 keeps the real compiler so the GPU tests can run.
if os.environ.get("DWFAST_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import dwfast  # noqa: E402

BACKENDS = ["torch", "interpret"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once per CPU backend; restores the previous choice afterwards."""
    prev = dwfast.get_backend()
    dwfast.set_backend(request.param)
    yield request.param
    dwfast.set_backend(prev)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
