"""What users put in their models: :class:`FusedSequential` and :class:`MLP`.

Both are ``nn.Sequential`` subclasses holding plain ``nn.Linear``/``nn.BatchNorm1d``/``nn.ReLU``
children, so ``print(model)``, ``state_dict()`` keys, ``model[i]`` and optimizers behave as they
do for ``nn.Sequential``; only ``forward`` differs: it runs each maximal run of
``Linear [BatchNorm1d] [activation] [Dropout]`` blocks through :func:`dwfast.functional.run_chain`.
"""
from collections import OrderedDict
from numbers import Integral
from typing import List, Sequence, Union

import torch
from torch import nn

from .chain import any_hooks, plan
from .functional import run_chain


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose runs of ``Linear [BatchNorm1d] [activation] [Dropout]`` run fused.

    Takes the same arguments as ``nn.Sequential``. The grouping of the children into fused runs
    is kept until the children change (replaced, appended, deleted) and made anew on every
    forward while any hook is set, so hooks always fire. Results, gradients and BatchNorm running statistics are
    those of ``nn.Sequential``; see :func:`dwfast.functional.run_chain` for the errors raised.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        for step in self._plan():
            input = run_chain(input, step) if isinstance(step, list) else step(input)
        return input

    def __prepare_scriptable__(self) -> nn.Sequential:
        """What torch.jit.script compiles: an ``nn.Sequential`` of the same children (TorchScript
        runs no Triton kernel; the scripted model computes what eager does, on the same
        Parameters and buffers)."""
        return nn.Sequential(OrderedDict(self._modules))

    def _plan(self):
        """plan() of the children, cached while they stay the same objects, of the same types, and
        carry no hooks (hooks exclude a module from fusion, and may come and go without a trace)."""
        children = tuple(self._modules.values())
        if any_hooks(children):
            return plan(children)
        cached = self.__dict__.get("_dwfast_plan")
        key = (children, tuple(map(type, children)))  # (a child's __class__ may be swapped in place)
        if cached is None or cached[0] != key:
            cached = (key, plan(children))
            object.__setattr__(self, "_dwfast_plan", cached)  # a plain attribute: not in the state_dict
        return cached[1]


def _check_width(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"MLP {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"MLP {name} must be >= 1, got {value}")
    return int(value)


class MLP(FusedSequential):
    """A fused multi-layer perceptron built from plain ``nn`` modules.

    Args:
        in_features: width of the input.
        hidden: hidden widths, a sequence of ints (or one int for a single hidden layer;
            an empty sequence gives a single ``nn.Linear``).
        out_features: width of the output.
        batchnorm: add ``nn.BatchNorm1d(h)`` after each hidden ``nn.Linear``.
        dropout: if > 0, add ``nn.Dropout(dropout)`` after each hidden ``nn.ReLU``.
        bias: passed to every ``nn.Linear``.
        device, dtype: factory keywords passed to every ``nn.Linear`` and ``nn.BatchNorm1d``.

    Children, per hidden width ``h``: ``Linear(prev, h)``, ``BatchNorm1d(h)``, ``ReLU()``,
    ``Dropout(dropout)``; then ``Linear(prev, out_features)``. They are numbered ``0, 1, ...``
    as in ``nn.Sequential(*layers)``, so the state_dict loads (strictly) into a plain
    ``nn.Sequential`` built the same way, and back.

    Raises:
        TypeError: a width is not an int.
        ValueError: a width is < 1, or ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(self, in_features: int, hidden: Union[int, Sequence[int]], out_features: int, *,
                 batchnorm: bool = True, dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        widths = [hidden] if isinstance(hidden, Integral) else list(hidden)
        prev = _check_width("in_features", in_features)
        widths = [_check_width(f"hidden[{i}]", h) for i, h in enumerate(widths)]
        out_features = _check_width("out_features", out_features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        layers: List[nn.Module] = []
        for h in widths:
            layers.append(nn.Linear(prev, h, bias=bias, **factory))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h, **factory))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, out_features, bias=bias, **factory))
        super().__init__(*layers)

    def __getitem__(self, idx):
        # nn.Sequential slices with self.__class__(OrderedDict), which MLP's signature can't take.
        if isinstance(idx, slice):
            return FusedSequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)
