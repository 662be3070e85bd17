"""The implementations under test, all built from one seed-identical reference model.

The reference is ``dwfast.mlp_by_budget(...)`` built under a fixed seed. Every implementation
starts from a copy of its parameters and buffers:

- ``eager``: a copy turned back into a plain ``nn.Sequential`` by ``dwfast.unfuse``: the same
  ``Linear``, ``BatchNorm1d``, ``ReLU`` children, run by PyTorch module by module;
- ``compile``: ``torch.compile`` of that ``nn.Sequential`` (default mode);
- ``compile-max-autotune``: the same with ``mode="max-autotune-no-cudagraphs"``;
- ``compile-graphs``: the same with ``mode="reduce-overhead"`` (Inductor plus CUDA graphs;
  CUDA only);
- ``dwfast``: a copy of the reference ``dwfast.MLP``, whose forward is fused;
- ``dwfast-graphs``: that fused model with the whole step captured in one CUDA graph and
  replayed (CUDA only). Graphs are compared with graphs: launch costs vanish from both
  ``compile-graphs`` and ``dwfast-graphs``, and from no other implementation.

A *step* is what gets timed. ``train``: forward, MSE loss against a fixed target, backward,
``SGD(momentum=0.9)`` step and ``zero_grad``, the same for every implementation. ``infer``:
forward in eval mode under ``torch.no_grad()``.

FLOPs per step (``step_flops``): a forward costs ``2 * B * sum(in * out)`` over the Linear
layers (the BatchNorm, ReLU, bias and loss terms are O(B * width) per layer and ignored);
a training step costs 3x the forward (forward, grad-input and grad-weight GEMMs); the
optimizer's O(params) update is ignored.
"""
import contextlib
import copy
from typing import Callable, Optional, Tuple

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

import dwfast

IMPLS = ("eager", "compile", "compile-max-autotune", "compile-graphs", "dwfast", "dwfast-graphs")
FUSED = ("dwfast", "dwfast-graphs")  # the implementations compared with every other (baseline)
GRAPHS = ("compile-graphs", "dwfast-graphs")  # CUDA graphs: CUDA only
MODES = ("train", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs",
                  "compile-graphs": "reduce-overhead"}
WARMUP_STEPS = 3  # untimed steps before capture or timing: compilation, autotuning, optimizer state


def not_applicable(impl: str, device: torch.device) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` (shown as n/a, not a failure), or None."""
    if impl in GRAPHS and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


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
    """``dwfast.mlp_by_budget`` under ``seed``: the model every implementation copies.

    On the ``meta`` device it costs nothing, which is how sweeps are sized before they run."""
    torch.manual_seed(seed)
    return dwfast.mlp_by_budget(n_features, int(budget), depth, n_outputs, device=device)


def linear_layers(model: nn.Module):
    """The ``nn.Linear`` modules of ``model`` in order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def step_flops(model: nn.Module, batch: int, mode: str) -> int:
    """FLOPs of one ``mode`` step at ``batch`` rows (see the module docstring)."""
    forward = 2 * batch * sum(m.in_features * m.out_features for m in linear_layers(model))
    return 3 * forward if mode == "train" else forward


def forget_compiled() -> None:
    """Drop every compiled model (dynamo's caches, CUDA-graph trees and their memory).

    Call it before building the implementations of a configuration, never between them: a
    compiled model built before it would compile again when next called. Without it dynamo's
    recompile limit on ``nn.Sequential.forward`` would, after a few configurations, silently
    run later ones eagerly. Inductor's on-disk caches still serve shapes compiled before."""
    torch._dynamo.reset()


def build(impl: str, reference: nn.Module) -> nn.Module:
    """A fresh ``impl`` module with the reference's parameters and buffers (fp32).

    Raises ``ValueError`` for an unknown name."""
    if impl in FUSED:
        return copy.deepcopy(reference)
    eager = dwfast.unfuse(copy.deepcopy(reference))
    if impl == "eager":
        return eager
    if impl in _COMPILE_MODES:
        if next(reference.parameters()).device.type == "cpu":
            # Inductor's background compile workers would share the few CPU cores with the
            # timed loop (timings 100x off were seen on 2 cores); compile in-process instead.
            inductor_config.compile_threads = 1
        # Static shapes, as each model is compiled once for its one batch size.
        return torch.compile(eager, mode=_COMPILE_MODES[impl], dynamic=False)
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def _autocast(device: torch.device, dtype: Optional[torch.dtype], graphs: bool):
    if dtype is None:
        return contextlib.nullcontext()
    # Autocast's cast cache would hand a captured graph casts made outside it (PyTorch's
    # CUDA-graph notes); every step re-casts instead.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=not graphs)


def _captured(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` warmed up on a side stream, then captured in one CUDA graph; returns its replay.

    Every tensor ``step`` touches must stay where it is (static inputs, gradients kept by
    ``zero_grad(set_to_none=False)``, optimizer state made during the warm-up)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def make_step(impl: str, reference: nn.Module, mode: str, dtype: torch.dtype,
              x: torch.Tensor, target: torch.Tensor) -> Tuple[Callable[[], None], str]:
    """One timed step of ``impl`` on ``x`` (fp32, cast per the dtype policy).

    Returns ``(step, precision label)``. For ``dwfast-graphs`` the step is captured here (after
    warm-up steps) and ``step`` replays it; for every other implementation nothing has run yet,
    and the first calls of ``step`` compile (torch.compile, Triton autotuning), so they must
    stay out of timed regions.
    """
    param_dtype, autocast_dtype, label = precision(impl, mode, dtype)
    graphs = impl in GRAPHS
    model = build(impl, reference).to(param_dtype)
    x, target = x.to(param_dtype), target.to(param_dtype)  # static: a graph replays on these
    autocast = _autocast(x.device, autocast_dtype, graphs)
    mark_step = (torch.compiler.cudagraph_mark_step_begin if impl == "compile-graphs"
                 else lambda: None)  # each call is a new step for compile's CUDA-graph trees
    if mode == "infer":
        model.eval()

        def step():
            mark_step()
            with torch.no_grad(), autocast:
                model(x)
    else:
        model.train()
        # SGD keeps no step count on the host, so its step captures as it is (no capturable=).
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            mark_step()
            # Gradients stay allocated under graphs: a replay writes into the captured tensors.
            opt.zero_grad(set_to_none=not graphs)
            with autocast:
                loss = F.mse_loss(model(x).float(), target.float())
            loss.backward()
            opt.step()
    if impl == "dwfast-graphs":
        step = _captured(step, x.device)
    return step, label
