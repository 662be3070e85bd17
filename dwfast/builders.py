"""Build models to a size: :func:`count_params` and :func:`mlp_by_budget`."""
from math import isqrt
from numbers import Integral

from torch import nn

from .modules import MLP


def count_params(module: nn.Module) -> int:
    """The number of parameter elements in ``module``: trainable and frozen alike.

    Shared Parameters count once; buffers (BatchNorm running statistics) don't count.
    Raises ``ValueError`` (from PyTorch) on uninitialized lazy parameters.
    """
    return sum(p.numel() for p in module.parameters())


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"mlp_by_budget {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"mlp_by_budget {name} must be >= {minimum}, got {value}")
    return int(value)


def mlp_by_budget(n_features: int, n_params: int, depth: int, n_outputs: int = 1, **mlp_kwargs) -> MLP:
    """An :class:`MLP` with ``depth`` hidden layers of one width ``w`` and about ``n_params`` parameters.

    With ``f = n_features``, ``o = n_outputs``, ``d = depth``, ``b = 1`` if ``bias`` else 0 and
    ``a = 2`` if ``batchnorm`` else 0 (BatchNorm's affine weight and bias), the parameter count is
    the quadratic::

        P(w) = (d - 1) * w**2 + (f + o + d * (b + a)) * w + b * o      (d >= 1)

    ``P`` increases with ``w``, so the width whose count is closest to ``n_params`` is next to the
    real root of ``P(w) = n_params``; it is found with integer arithmetic (exact for any size) by
    checking the root's neighbours. Ties go to the smaller width. ``depth = 0`` has one possible
    count, ``P = (f + b) * o``, and returns an ``MLP`` of that single ``nn.Linear`` whenever
    ``n_params`` reaches it.

    Args:
        n_features: input width (>= 1).
        n_params: parameter budget, as counted by :func:`count_params`.
        depth: number of hidden layers (>= 0).
        n_outputs: output width (>= 1).
        **mlp_kwargs: passed to :class:`MLP` (``batchnorm``, ``bias``, ``dropout``, ``device``,
            ``dtype``); ``batchnorm`` and ``bias`` enter the count.

    Returns:
        The MLP; ``count_params`` of it is ``P(w)``.

    Raises:
        TypeError: a size is not an int.
        ValueError: a size is out of range, or ``n_params`` is below the smallest possible
            count (``P(1)``, or ``P`` for ``depth = 0``); the message gives that minimum.
    """
    f = _check_int("n_features", n_features, 1)
    o = _check_int("n_outputs", n_outputs, 1)
    d = _check_int("depth", depth, 0)
    n = _check_int("n_params", n_params, 0)
    b = 1 if mlp_kwargs.get("bias", True) else 0
    a = 2 if mlp_kwargs.get("batchnorm", True) else 0
    A, B, C = d - 1, f + o + d * (b + a), b * o

    def count(w):
        return A * w * w + B * w + C
    minimum = count(1) if d else (f + b) * o
    if n < minimum:
        raise ValueError(f"mlp_by_budget: n_params={n} is below the smallest MLP with depth={d} "
                         f"for {f} features and {o} outputs, which has {minimum} parameters")
    if d == 0:
        return MLP(f, [], o, **mlp_kwargs)
    if A == 0:  # one hidden layer: P is linear in w
        root = (n - C) // B
    else:  # floor of sqrt, so within one of the real root (-B + sqrt(B^2 + 4A(n - C))) / 2A
        root = (isqrt(B * B + 4 * A * (n - C)) - B) // (2 * A)
    width = min((w for w in range(root - 1, root + 3) if w >= 1), key=lambda w: (abs(count(w) - n), w))
    return MLP(f, [width] * d, o, **mlp_kwargs)
