"""The implementations under test, all built from one seed-identical reference model.

The reference is ``dwfast.mlp_by_budget(...)`` built under a fixed seed. Every implementation
starts from a copy of its parameters and buffers:

- ``eager``: a copy turned back into a plain ``nn.Sequential`` by ``dwfast.unfuse``: the same
  ``Linear``, ``BatchNorm1d``, ``ReLU`` children, run by PyTorch module by module;
- ``compile``: ``torch.compile`` of that ``nn.Sequential`` (default mode);
- ``compile-max-autotune``: the same with ``mode="max-autotune-no-cudagraphs"`` (CUDA graphs
  stay off for every implementation, so no one is timed with launch costs removed);
- ``dwfast``: a copy of the reference ``dwfast.MLP``, whose forward is fused.

A *step* is what gets timed. ``train``: forward, MSE loss against a fixed target, backward,
``SGD(momentum=0.9)`` step and ``zero_grad(set_to_none=True)``, the same for every
implementation. ``infer``: forward in eval mode under ``torch.no_grad()``.

FLOPs per step (``step_flops``): a forward costs ``2 * B * sum(in * out)`` over the Linear
layers (the BatchNorm, ReLU, bias and loss terms are O(B * width) per layer and ignored);
a training step costs 3x the forward (forward, grad-input and grad-weight GEMMs); the
optimizer's O(params) update is ignored.
"""
import contextlib
import copy
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import dwfast

IMPLS = ("eager", "compile", "compile-max-autotune", "dwfast")
MODES = ("train", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}


def precision(impl: str, mode: str, dtype: torch.dtype) -> Tuple[torch.dtype, Optional[torch.dtype], str]:
    """The dtype policy: how ``impl`` runs a ``mode`` step "in ``dtype``".

    Returns ``(parameter dtype, autocast dtype or None, label)``.

    - fp32: parameters, inputs and math in fp32, no autocast.
    - train in bf16/fp16: every implementation keeps fp32 master weights and runs under
      ``torch.autocast`` (what a user would run; dwfast casts its GEMMs as eager's autocast
      does and keeps BatchNorm in fp32).
    - infer in bf16/fp16: every implementation runs the model cast to the low dtype.
    """
    name = next(k for k, v in DTYPES.items() if v == dtype)
    if dtype == torch.float32:
        return torch.float32, None, "fp32"
    if mode == "train":
        return torch.float32, dtype, f"autocast {name}, fp32 params"
    return dtype, None, f"{name} params"


def reference_model(n_features: int, budget: float, depth: int, n_outputs: int, seed: int,
                    device: torch.device) -> nn.Module:
    """``dwfast.mlp_by_budget`` under ``seed``: the model every implementation copies."""
    torch.manual_seed(seed)
    return dwfast.mlp_by_budget(n_features, int(budget), depth, n_outputs, device=device)


def linear_layers(model: nn.Module):
    """The ``nn.Linear`` modules of ``model`` in order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def step_flops(model: nn.Module, batch: int, mode: str) -> int:
    """FLOPs of one ``mode`` step at ``batch`` rows (see the module docstring)."""
    forward = 2 * batch * sum(m.in_features * m.out_features for m in linear_layers(model))
    return 3 * forward if mode == "train" else forward


def build(impl: str, reference: nn.Module) -> nn.Module:
    """A fresh ``impl`` module with the reference's parameters and buffers (fp32)."""
    if impl == "dwfast":
        return copy.deepcopy(reference)
    eager = dwfast.unfuse(copy.deepcopy(reference))
    if impl == "eager":
        return eager
    if impl in _COMPILE_MODES:
        # A fresh cache per model: every configuration compiles anew, and dynamo's recompile
        # limit on nn.Sequential.forward never silently sends later configurations to eager.
        torch._dynamo.reset()
        if next(reference.parameters()).device.type == "cpu":
            # Inductor's background compile workers would share the few CPU cores with the
            # timed loop (timings 100x off were seen on 2 cores); compile in-process instead.
            import torch._inductor.config
            torch._inductor.config.compile_threads = 1
        return torch.compile(eager, mode=_COMPILE_MODES[impl])
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def make_step(impl: str, reference: nn.Module, mode: str, dtype: torch.dtype,
              x: torch.Tensor, target: torch.Tensor) -> Tuple[Callable[[], None], str]:
    """One timed step of ``impl`` on ``x`` (fp32, cast per the dtype policy).

    Returns ``(step, precision label)``. Nothing is run yet: the first calls of
    ``step`` compile (torch.compile, Triton autotuning) and must stay out of timed regions.
    """
    param_dtype, autocast_dtype, label = precision(impl, mode, dtype)
    model = build(impl, reference).to(param_dtype)
    x, target = x.to(param_dtype), target.to(param_dtype)
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
        return step, label
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with autocast:
            loss = F.mse_loss(model(x).float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, label
