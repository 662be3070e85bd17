"""Triton kernels and their launchers (installed as ``dwfast.kernels``)."""
from .batchnorm import bn_grad, bn_stats, update_running_stats
from .fused_linear import (ACTIVATIONS, NO_ACT, Act, BNGrad, act_bwd, act_fwd, dropout_scale, linear_dw, linear_dx,
                           linear_fwd)

__all__ = ["ACTIVATIONS", "Act", "BNGrad", "NO_ACT", "act_bwd", "act_fwd", "bn_grad", "bn_stats", "dropout_scale",
           "linear_dw", "linear_dx", "linear_fwd", "update_running_stats"]
