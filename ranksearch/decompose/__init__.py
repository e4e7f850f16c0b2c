"""Decomposition methods: the registry and one module per family.

Importing this package registers every built-in method; ``methods()`` lists them.
"""

from __future__ import annotations

from torch import nn

from .base import DecompositionMethod, LayerCost, Rank, get_method, methods, register
from .cache import FactorCache, factor_cache

# Each import registers its methods; the order here is the order ``methods()`` lists them in.
from . import svd, channel, spatial, tucker2, cp, btd  # noqa: E402,F401  isort: skip
from . import tt, tr  # noqa: E402,F401  isort: skip  (after every other family)

__all__ = [
    "DecompositionMethod",
    "FactorCache",
    "LayerCost",
    "Rank",
    "decompose",
    "factor_cache",
    "get_method",
    "methods",
    "register",
]


def decompose(layer: nn.Module, method: str, rank: Rank, *, name: str = "") -> nn.Module:
    """Return the replacement of ``layer`` by ``method`` at ``rank`` (the layer is not modified).

    Args:
        layer: an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Embedding``.
        method: a name from :func:`methods`.
        rank: an int, or a tuple for methods with several ranks (``tucker2``: ``(r_in, r_out)``).
        name: the layer's name, used in error messages.

    Raises:
        UnknownMethodError: for a method name that is not registered.
        UnsupportedLayerError: if the method cannot decompose this layer (the message says why).
        InvalidRankError: if the rank is out of the method's bounds for this layer.

    Example:
        >>> import torch, ranksearch
        >>> layer = torch.nn.Linear(64, 32)
        >>> ranksearch.decompose(layer, "svd", 8)
        Sequential(...)
    """
    return get_method(method).build(layer, rank, name=name)
