"""dwfast: fused Linear -> BatchNorm1d -> ReLU MLPs for PyTorch, with Triton kernels."""
from .backend import get_backend, get_whole_net, set_backend, set_whole_net
from .builders import count_params, mlp_by_budget
from .distributed import sync_batchnorm
from .chain import Block
from .functional import fused_chain
from .fuse import fuse, unfuse
from .modules import MLP, FusedSequential

__version__ = "0.1.0"
