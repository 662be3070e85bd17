"""dwfast: fused Linear -> BatchNorm1d -> ReLU MLPs for PyTorch, with Triton kernels."""
from .backend import get_backend, set_backend
from .functional import Block, fused_chain

__version__ = "0.1.0"
