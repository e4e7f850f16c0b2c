"""Tensor-ring decomposition of fully connected layers (Wang et al. 2018).

The weight is tensorized exactly as for ``tt`` (:func:`~ranksearch.decompose.tt.choose_layout`)
and decomposed by TR-SVD (``tensorly.decomposition.tensor_ring``) into ring-closed cores
``G_k[r_{k-1}, o_k, i_k, r_k]`` with every rank ``R`` and ``r_0 = r_d``:
``W[o, i] = trace(G_1[:, o_1, i_1, :] ... G_d[:, o_d, i_d, :])``.

The replacement is a chain of plain ``nn.Linear`` layers: the first maps ``i_1 -> (r_0, o_1, r_1)``
and the ring index ``r_0`` then rides along with the rows; the middle ones map
``(r_{k-1}, i_k) -> (o_k, r_k)`` as in ``tt``; the last maps ``(r_0, r_{d-1}, i_d) -> o_d``, which
closes the ring (the trace) inside its own weights, so no sum or einsum is needed and fvcore
counts every multiply-add.

The rank is the ring rank ``R``, from 1 to ``floor(sqrt(max_k min(n_k, N / n_k)))`` with
``n_k = o_k * i_k`` and ``N`` their product: TR-SVD splits one core's unfolding into ``R * R``
components, so ``R * R`` cannot exceed it. With two modes the top rank reproduces the layer when
``R * R >= min(n_1, n_2)``; with three, TR-SVD at any ``R`` is an approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tensorly.decomposition import tensor_ring
from torch import nn

from ..layers import LayerSpec
from ._reshape import ChainStep
from .base import Rank, factor_cache, register, weight_as_float
from .tt import TensorizedChain, TensorLayout, choose_layout, tensorly_torch

__all__ = ["TensorRing", "load_tr_cores", "ring_split_mode", "tr_steps"]


def ring_split_mode(layout: TensorLayout) -> tuple[int, int]:
    """``(mode, R_max)``: the core TR-SVD splits first, chosen to allow the largest ring rank."""
    sizes = layout.pair_sizes
    total = math.prod(sizes)
    room = [min(n, total // n) for n in sizes]
    mode = room.index(max(room))
    return mode, math.isqrt(room[mode])


def tr_steps(layout: TensorLayout, rank: int) -> list[ChainStep]:
    """The chain that contracts ring cores of rank ``rank`` one by one, closing the ring last.

    Before middle step ``k`` the trailing dims are ``(i_k, ..., i_d, r_0, o_1, ..., o_{k-1},
    r_{k-1})``; the last step regroups them to ``(o_1, ..., o_{d-1} | r_0, r_{d-1}, i_d)``.
    """
    ins, outs, d, r = layout.in_modes, layout.out_modes, layout.order, int(rank)
    steps = [ChainStep(
        n_in=1, view=ins, perm=(*range(1, d), 0), out=(math.prod(ins[1:]), ins[0]),
        in_dim=ins[0], out_dim=r * outs[0] * r,
    )]
    for k in range(1, d):
        view = (*ins[k:], r, *outs[:k], r)
        if k < d - 1:
            perm: tuple[int, ...] = (*range(1, len(view)), 0)
            rows, in_dim, out_dim = math.prod(ins[k + 1:]) * r * math.prod(outs[:k]), r * ins[k], outs[k] * r
        else:  # view is (i_d, r_0, o_1..o_{d-1}, r_{d-1}): outputs first, then what the trace closes
            perm = (*range(2, d + 1), 1, d + 1, 0)
            rows, in_dim, out_dim = math.prod(outs[:k]), r * r * ins[k], outs[k]
        steps.append(ChainStep(n_in=2, view=view, perm=perm, out=(rows, in_dim), in_dim=in_dim, out_dim=out_dim))
    return steps


@register
class TensorRing(TensorizedChain):
    name = "tr"
    summary = "tensor ring: Linear -> ring-closed chain of small Linears over tensorized modes (Wang 2018)"

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        return 1, ring_split_mode(choose_layout(spec.in_features, spec.out_features))[1]

    def _steps(self, spec: LayerSpec, rank: Rank) -> list[ChainStep]:
        return tr_steps(choose_layout(spec.in_features, spec.out_features), int(rank))  # type: ignore[arg-type]

    def cores(self, layer: nn.Module, spec: LayerSpec, rank: int) -> list[torch.Tensor]:
        """Ring cores ``G_k[R, o_k, i_k, R]`` of ``layer``'s weight (float64, cached per rank)."""
        layout = choose_layout(spec.in_features, spec.out_features)
        mode, _ = ring_split_mode(layout)

        def compute() -> list[torch.Tensor]:
            tensor = layout.weight_tensor(weight_as_float(layer))
            with tensorly_torch():
                ring = tensor_ring(tensor, rank=[rank] * (layout.order + 1), mode=mode)
            return [
                torch.as_tensor(core).reshape(rank, o, i, rank)
                for core, o, i in zip(ring.factors, layout.out_modes, layout.in_modes)
            ]

        return factor_cache.get(layer.weight, ("tr", layout, rank), compute)

    def load_cores(self, replacement: nn.Module, cores: Sequence[torch.Tensor]) -> None:
        load_tr_cores(replacement, cores)


def load_tr_cores(replacement: nn.Module, cores: Sequence[torch.Tensor]) -> None:
    """Write ring cores ``G_k[R, o_k, i_k, R]`` into a chain from :func:`tr_steps`."""
    linears = [m for m in replacement.steps if isinstance(m, nn.Linear)]  # type: ignore[union-attr]
    if len(linears) != len(cores):
        raise ValueError(f"{len(cores)} cores for a chain of {len(linears)} linear layers")
    with torch.no_grad():
        # first: weight[(r_0, o_1, r_1), i_1]; the others: weight[(o_k, r_k), (r_{k-1}, i_k)], where
        # for the last core r_k is r_0, which is how the ring closes.
        linears[0].weight.copy_(cores[0].permute(0, 1, 3, 2).reshape(linears[0].weight.shape))
        for linear, core in zip(linears[1:], cores[1:]):
            linear.weight.copy_(core.permute(1, 3, 0, 2).reshape(linear.weight.shape))
