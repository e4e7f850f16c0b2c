"""Exactly low-rank weights per method, for the shared method suite.

``LOW_RANK_WEIGHTS[name](layer, rank, generator)`` returns a weight for ``layer`` (same shape) that
the method ``name`` represents exactly at ``rank``. A method without an entry fails the suite:
adding a method means adding its entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WeightFactory = Callable[[nn.Module, "int | tuple[int, ...]", torch.Generator], torch.Tensor]
LOW_RANK_WEIGHTS: dict[str, WeightFactory] = {}


def low_rank_weight(name: str) -> Callable[[WeightFactory], WeightFactory]:
    def register(fn: WeightFactory) -> WeightFactory:
        LOW_RANK_WEIGHTS[name] = fn
        return fn

    return register


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _product(m: int, n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / rank**0.5


@low_rank_weight("svd")
@low_rank_weight("channel")
def _matrix_low_rank(layer: nn.Module, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Each group's (N/G, C/G*k*k) matrix has rank ``rank`` (embedding: the table)."""
    shape = layer.weight.shape
    groups = _groups(layer)
    blocks = [_product(shape[0] // groups, shape[1:].numel(), rank, gen) for _ in range(groups)]
    return torch.cat(blocks).reshape(shape)


@low_rank_weight("spatial")
def _spatial_low_rank(layer: nn.Module, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Each group's (C/G*kh, N/G*kw) rearrangement has rank ``rank``."""
    n, c_g, kh, kw = layer.weight.shape
    groups = _groups(layer)
    blocks = []
    for _ in range(groups):
        matrix = _product(c_g * kh, n // groups * kw, rank, gen)  # M[(c, i), (n, j)]
        blocks.append(matrix.reshape(c_g, kh, n // groups, kw).permute(2, 0, 1, 3))
    return torch.cat(blocks).contiguous()
