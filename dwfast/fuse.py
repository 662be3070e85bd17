"""``fuse(model)``: make an existing model's ``nn.Sequential``s run fused, in place.

The technique is a class swap: each eligible ``nn.Sequential`` instance gets its ``__class__``
set to a fused subclass of its own class (:class:`FusedSequential` for a plain
``nn.Sequential``). Nothing is copied, so child modules, Parameters (and any optimizer that holds
them), buffers, hooks and state_dict keys are the very same objects as before.
"""
from typing import Dict

from torch import nn

from .chain import plan
from .modules import MLP, FusedSequential

# Original nn.Sequential subclass -> the fused class made for it, and back.
_FUSED: Dict[type, type] = {nn.Sequential: FusedSequential}
_UNFUSED: Dict[type, type] = {FusedSequential: nn.Sequential, MLP: nn.Sequential}


def _new_fused(base: type) -> nn.Module:
    cls = _fused_class(base)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # A class made at run time can't be found by name when unpickling (torch.save(model)):
    # pickle the original class instead and rebuild the fused one from it.
    return _new_fused, (_UNFUSED[type(self)],), self.__getstate__()


def _fused_class(cls: type) -> type:
    """The fused subclass of the ``nn.Sequential`` subclass ``cls``, made once and cached."""
    if cls not in _FUSED:
        fused = type(f"Fused{cls.__name__}", (FusedSequential, cls), {"__reduce_ex__": _reduce_ex})
        _FUSED[cls], _UNFUSED[fused] = fused, cls
    return _FUSED[cls]


def _eligible(m: nn.Module) -> bool:
    # Subclasses that override forward don't run nn.Sequential.forward, so there is nothing to
    # replace; already fused ones are left as they are (fuse is idempotent).
    return (isinstance(m, nn.Sequential) and not isinstance(m, FusedSequential)
            and type(m).forward is nn.Sequential.forward
            and any(isinstance(step, list) for step in plan(list(m._modules.values()))))


def fuse(module: nn.Module) -> nn.Module:
    """Make every ``nn.Sequential`` in ``module`` (``module`` itself included) run fused, in place.

    Takes any module tree: Sequentials are found at any depth, inside ``nn.ModuleList``,
    ``nn.ModuleDict`` or any other module. Each ``nn.Sequential`` (or subclass that keeps
    ``nn.Sequential.forward``) holding at least one ``Linear [BatchNorm1d] [activation] [Dropout]`` run becomes
    fused: its runs go through :func:`dwfast.functional.run_chain`, everything else runs as
    before. Children, Parameters, buffers, hooks and state_dict keys stay the same objects, so an
    optimizer built before ``fuse`` keeps working. ``print(model)`` shows the same tree with the
    converted Sequentials named ``FusedSequential`` (``Fused<Name>`` for subclasses).

    Left alone: subclasses of ``nn.Sequential`` that override ``forward`` (fuse their inner
    Sequentials instead), and Sequentials without a fusable run. Idempotent.

    Returns ``module`` itself (possibly with a new class). Raises nothing of its own.
    """
    for m in list(module.modules()):
        if _eligible(m):
            m.__class__ = _fused_class(type(m))
    return module


def unfuse(module: nn.Module) -> nn.Module:
    """Undo :func:`fuse` in place: every fused Sequential in ``module`` gets its original class back.

    Also turns :class:`dwfast.MLP` and :class:`dwfast.FusedSequential` instances into plain
    ``nn.Sequential`` (handy for eager baselines); user subclasses of ``FusedSequential`` are
    left alone. Returns ``module`` itself. Raises nothing of its own.
    """
    for m in list(module.modules()):
        if type(m) in _UNFUSED:
            m.__class__ = _UNFUSED[type(m)]
    return module
