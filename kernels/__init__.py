"""Triton kernels and their launchers (installed as ``dwfast.kernels``)."""
from .batchnorm import VEC_ROWS, VEC_RSTD, VEC_SCALE
from .fused_linear import (ACTIVATIONS, BATCH, FIXED, NO_BN, NO_NORM, NO_SITE, PARTIALS, ActBwd, ActFwd, DeferredDW,
                           LinearBwd, LinearFwd, Norm, Site, act_bwd, act_fwd, dropout_scale, linear_bwd, linear_fwd,
                           new_activation, new_split, new_uv, new_vec, next_split,
                           splits_apart)

__all__ = ["ACTIVATIONS", "BATCH", "FIXED", "ActBwd", "ActFwd", "DeferredDW", "LinearBwd", "LinearFwd", "NO_BN",
           "NO_NORM", "NO_SITE", "Norm", "PARTIALS", "Site", "VEC_ROWS", "VEC_RSTD", "VEC_SCALE", "act_bwd", "act_fwd",
           "dropout_scale", "linear_bwd", "linear_fwd", "new_activation", "new_split", "new_uv", "new_vec",
           "next_split", "splits_apart"]
