"""Exactly low-rank weights per method, for the shared method suite.

``LOW_RANK_WEIGHTS[name](layer, rank, generator)`` returns a weight for ``layer`` (same shape) that
the method ``name`` represents exactly at ``rank``. A method without an entry fails the suite:
adding a method means adding its entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ranksearch.decompose.tt import choose_layout, tt_ranks

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


def _tucker2_block(n: int, c: int, kernel: torch.Size, r1: int, r2: int, gen: torch.Generator) -> torch.Tensor:
    """``core x_0 U_out x_1 U_in``: an (n, c, *kernel) kernel with Tucker ranks (r2, r1) on (n, c)."""
    core = torch.randn(r2, r1, kernel.numel(), generator=gen)
    u_out, u_in = torch.randn(n, r2, generator=gen), torch.randn(c, r1, generator=gen)
    return torch.einsum("ijs,ni,cj->ncs", core, u_out, u_in).reshape(n, c, *kernel) / (r1 * r2) ** 0.5


@low_rank_weight("tucker2")
def _tucker2_low_rank(layer: nn.Module, rank: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Each group's kernel has Tucker ranks ``rank = (r_in, r_out)`` along its channel modes."""
    n, c_g, *kernel = layer.weight.shape
    groups = _groups(layer)
    r1, r2 = rank
    return torch.cat([_tucker2_block(n // groups, c_g, torch.Size(kernel), r1, r2, gen) for _ in range(groups)])


@low_rank_weight("cp")
def _cp_low_rank(layer: nn.Module, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Each group's (N/G, C/G, kh, kw) kernel is a sum of ``rank`` rank-one terms."""
    n, c_g, kh, kw = layer.weight.shape
    groups = _groups(layer)
    blocks = []
    for _ in range(groups):
        a, b, v, h = (torch.randn(size, rank, generator=gen) for size in (n // groups, c_g, kh, kw))
        blocks.append(torch.einsum("nr,cr,ir,jr->ncij", a, b, v, h) / rank**0.5)
    return torch.cat(blocks)


@low_rank_weight("btd")
def _btd_low_rank(layer: nn.Module, rank: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Each group's kernel is a sum of ``B`` Tucker-2 blocks of ranks ``(r_in, r_out)``."""
    n, c_g, *kernel = layer.weight.shape
    groups = _groups(layer)
    blocks, r1, r2 = rank
    return torch.cat([
        sum(_tucker2_block(n // groups, c_g, torch.Size(kernel), r1, r2, gen) for _ in range(blocks))
        for _ in range(groups)
    ])


def _ring_weight(cores: list[torch.Tensor], out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> torch.Tensor:
    """``W[o, i] = trace(G_1[:, o_1, i_1, :] ... G_d[:, o_d, i_d, :])`` as an (out, in) matrix."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))  # (r_0, o_1, i_1, ..., o_k, i_k, r_k)
    full = torch.diagonal(full, dim1=0, dim2=-1).sum(-1)  # close the ring (r_0 = r_d = 1 for tt)
    d = len(cores)
    full = full.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))  # (o_1..o_d, i_1..i_d)
    return full.reshape(math.prod(out_modes), math.prod(in_modes))


def _random_cores(ranks: tuple[int, ...], out_modes: tuple[int, ...], in_modes: tuple[int, ...],
                  gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(r0, o, i, r1, generator=gen, dtype=torch.float64) / r1**0.5
        for r0, o, i, r1 in zip(ranks, out_modes, in_modes, ranks[1:])
    ]


def _tt_conv_low_rank(layer: nn.Conv2d, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Each group's kernel ``T[c, i, j, n]`` is a tensor train with uniform rank ``rank`` (capped per bond)."""
    n, c_g, kh, kw = layer.weight.shape
    groups = _groups(layer)
    sizes = (c_g, kh, kw, n // groups)
    ranks = (1, *(min(rank, math.prod(sizes[:k]), math.prod(sizes[k:])) for k in (1, 2, 3)), 1)
    blocks = []
    for _ in range(groups):
        cores = [torch.randn(r0, size, r1, generator=gen) / r1**0.5 for r0, size, r1 in zip(ranks, sizes, ranks[1:])]
        tensor = torch.einsum("ac,aib,bjd,dn->cijn", cores[0][0], *cores[1:3], cores[3][..., 0])
        blocks.append(tensor.permute(3, 0, 1, 2))
    return torch.cat(blocks).contiguous()


@low_rank_weight("tt")
def _tt_low_rank(layer: nn.Module, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A TT-matrix with uniform rank ``rank`` (capped per bond) in the layout ``tt`` chooses; for a
    Conv2d, a kernel whose channel and kernel modes form such a tensor train."""
    if isinstance(layer, nn.Conv2d):
        return _tt_conv_low_rank(layer, rank, gen)
    layout = choose_layout(layer.in_features, layer.out_features)
    cores = _random_cores(tt_ranks(layout, rank), layout.out_modes, layout.in_modes, gen)
    return _ring_weight(cores, layout.out_modes, layout.in_modes).to(layer.weight.dtype)


@low_rank_weight("tr")
def _tr_low_rank(layer: nn.Module, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A tensor ring with every rank ``rank`` in the layout ``tr`` chooses."""
    layout = choose_layout(layer.in_features, layer.out_features)
    cores = _random_cores((rank,) * (layout.order + 1), layout.out_modes, layout.in_modes, gen)
    return _ring_weight(cores, layout.out_modes, layout.in_modes).to(layer.weight.dtype)
