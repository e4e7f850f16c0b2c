"""Block-term decomposition of convolutions (grouped Tucker, Wang & Cheng 2016).

The kernel is a sum of B Tucker-2 blocks, ``W = sum_b G_b x_0 U_b x_1 V_b`` with ``U_b`` (N x r2),
``V_b`` (C x r1) and ``G_b`` (r2 x r1 x kernel), realised as plain layers: 1x1 C->B*r1, a k x k
conv B*r1->B*r2 with ``groups=B`` (one block per group, original stride, padding, dilation and
padding mode) and 1x1 B*r2->N with the bias, which sums the blocks. Rank: ``(B, r1, r2)``. Grouped
convs are decomposed group by group (B blocks per group).

Fitting: alternating least squares. Each sweep solves jointly for all ``U_b``, then all ``V_b``
(two small linear least-squares problems), then each core in turn given the others (block
Gauss-Seidel); every step is an exact minimiser, so the error never increases. Greedy fitting of
blocks on residuals (one ``partial_tucker`` per block) was not used: it cannot recover an exact
block-term kernel, since the first block already absorbs parts of all the others. tensorly has
no block-term decomposition, hence the ALS here. ALS has local minima, so a few starts (the
leading singular vectors, then random ones) are run briefly and the best is continued.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..layers import LayerSpec
from .base import (
    DecompositionMethod, LayerCost, Rank, conv_dims, copy_bias, factor_cache, make_conv, register,
)
from .tucker2 import (
    _pointwise_then_kernel_supported, check_rank_tuple, input_positions, kernel_by_group, unfolding_bases,
)

__all__ = ["BlockTermDecomposition"]

log = logging.getLogger("ranksearch.decompose.btd")

#: blocks used by ``rank_from_scale`` (fewer when the layer has fewer channels per group)
DEFAULT_BLOCKS = 4
#: starts run for _PROBE_ITERATIONS sweeps each before the best is continued. Measured on 30 random
#: exactly block-term kernels per shape ((6,4,3x3) at (4,1,1); (12,8,3x3) at (4,1,2); (24,16,3x3) at
#: (4,2,3); (64,64,3x3) at (4,8,8)): a single start from the singular vectors fails to recover
#: 1-15 of 30; these four starts fail none. Kernels whose blocks fill both channel spaces exactly
#: (B*r1 = C and B*r2 = N) remain hard: about half are not recovered.
_STARTS = 4
_PROBE_ITERATIONS = 30
_MAX_ITERATIONS = 500
_TOL = 1e-10  # change of the relative error between sweeps that counts as converged

Blocks = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]  # (U_b, G_b, V_b)


def _reconstruct_block(u: torch.Tensor, core: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ni,ijs,cj->ncs", u, core, v)


def _solve_rows(target: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """The least-squares ``X`` of ``X @ design = target`` (``gelsd``: fine when rank-deficient)."""
    return torch.linalg.lstsq(design.T, target.T, driver="gelsd").solution.T


class _BlockTermALS:
    """ALS for ``W (N, C, S) ~ sum_b U_b G_b V_b`` (Tucker-2 blocks along N and C)."""

    def __init__(self, kernel: torch.Tensor, blocks: int, r1: int, r2: int) -> None:
        self.kernel, self.blocks, self.r1, self.r2 = kernel, blocks, r1, r2
        self.norm = float(kernel.norm())

    def start(self, index: int, singular: tuple[torch.Tensor, torch.Tensor]) -> Blocks:
        """Start 0 takes consecutive leading singular vectors per block; the others are random."""
        n, c, _ = self.kernel.shape
        if index == 0:
            u_all, v_all = singular
            us = [u_all[:, [(b * self.r2 + i) % u_all.shape[1] for i in range(self.r2)]] for b in range(self.blocks)]
            vs = [v_all[:, [(b * self.r1 + i) % v_all.shape[1] for i in range(self.r1)]] for b in range(self.blocks)]
        else:
            gen = torch.Generator().manual_seed(index)

            def draw(rows: int, cols: int) -> torch.Tensor:
                return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=self.kernel.dtype))[0]

            us = [draw(n, self.r2) for _ in range(self.blocks)]
            vs = [draw(c, self.r1) for _ in range(self.blocks)]
        cores = [torch.einsum("ni,ncs,cj->ijs", u, self.kernel, v) for u, v in zip(us, vs)]
        return us, cores, vs

    def sweep(self, state: Blocks) -> tuple[Blocks, float]:
        us, cores, vs = state
        n, c, _ = self.kernel.shape
        # all U_b at once: W_(0) (N, C*S) = [U_1 .. U_B] @ M
        m = torch.cat([torch.einsum("ijs,cj->ics", g, v).reshape(self.r2, -1) for g, v in zip(cores, vs)])
        us = list(_solve_rows(self.kernel.reshape(n, -1), m).split(self.r2, dim=1))
        # all V_b at once: W_(1) (C, N*S) = [V_1 .. V_B] @ P
        p = torch.cat([torch.einsum("ni,ijs->jns", u, g).reshape(self.r1, -1) for u, g in zip(us, cores)])
        vs = list(_solve_rows(self.kernel.transpose(0, 1).reshape(c, -1), p).split(self.r1, dim=1))
        # orthonormal U_b, V_b (the triangular parts move into the cores): keeps the scale in the
        # cores and makes the core update a projection
        cores = list(cores)
        for b in range(self.blocks):
            us[b], ru = torch.linalg.qr(us[b])
            vs[b], rv = torch.linalg.qr(vs[b])
            cores[b] = torch.einsum("ai,ijs,bj->abs", ru, cores[b], rv)
        parts = [_reconstruct_block(u, g, v) for u, g, v in zip(us, cores, vs)]
        total = sum(parts)
        for b in range(self.blocks):  # each core given the others
            residual = self.kernel - (total - parts[b])
            cores[b] = torch.einsum("ni,ncs,cj->ijs", us[b], residual, vs[b])
            new = _reconstruct_block(us[b], cores[b], vs[b])
            total, parts[b] = total - parts[b] + new, new
        return (us, cores, vs), float((self.kernel - total).norm()) / self.norm

    def run(self, state: Blocks, iterations: int) -> tuple[Blocks, list[float]]:
        errors: list[float] = []
        for _ in range(iterations):
            state, error = self.sweep(state)
            errors.append(error)
            if len(errors) >= 2 and abs(errors[-2] - errors[-1]) < _TOL:
                break
        return state, errors


@register
class BlockTermDecomposition(DecompositionMethod):
    """Sum of B Tucker-2 blocks; rank ``(B, r1, r2)`` = (blocks, input rank, output rank) per block."""

    name = "btd"
    kinds = ("conv1d", "conv2d")
    rank_arity = 3
    summary = "block-term: 1x1 C->B*r1, k x k grouped B*r1->B*r2, 1x1 B*r2->N (Wang & Cheng 2016)"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        return _pointwise_then_kernel_supported(self.name, spec, super().unsupported_reason(spec))

    def rank_bounds(self, spec: LayerSpec) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``((1, 1, 1), (min(C/G, N/G), r1_max, r2_max))`` with tucker2's per-block bounds."""
        kernel = math.prod(spec.kernel_size)
        c_g, n_g = spec.in_features // spec.groups, spec.out_features // spec.groups
        return (1, 1, 1), (min(c_g, n_g), min(c_g, n_g * kernel), min(n_g, c_g * kernel))

    def normalize_rank(self, spec: LayerSpec, rank: Rank | Sequence[int]) -> Rank:
        check_rank_tuple(self.name, rank, 3, "(blocks, r_in, r_out), e.g. (4, 8, 16)")
        return super().normalize_rank(spec, rank)

    def default_blocks(self, spec: LayerSpec) -> int:
        """The block count ``rank_from_scale`` uses: ``DEFAULT_BLOCKS``, or fewer for few channels."""
        return min(DEFAULT_BLOCKS, self.rank_bounds(spec)[1][0])

    def rank_from_scale(self, spec: LayerSpec, scale: float) -> tuple[int, int, int]:
        """``(B, ceil(scale * r1_max / B), ceil(scale * r2_max / B))`` with B fixed by the layer.

        At scale 1 the blocks together span the input and output channels once.
        """
        blocks = self.default_blocks(spec)
        _low, (_b, h1, h2) = self.rank_bounds(spec)
        return (blocks, *(max(1, math.ceil(scale * h / blocks)) for h in (h1, h2)))  # type: ignore[return-value]

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        blocks, r1, r2 = rank  # type: ignore[misc]
        core = spec.groups * blocks * r2 * r1 * math.prod(spec.kernel_size)
        first, last = spec.in_features * blocks * r1, spec.out_features * blocks * r2
        params = first + core + last + (spec.out_features if spec.bias else 0)
        if spec.input_shape is None:
            return LayerCost(flops=0, params=params)
        flops = input_positions(spec) * first + spec.positions * (core + last)
        return LayerCost(flops=flops, params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        blocks, r1, r2 = rank  # type: ignore[misc]
        dims, groups = conv_dims(spec), spec.groups
        return nn.Sequential(
            make_conv(dims, spec.in_features, groups * blocks * r1, 1, groups=groups),
            make_conv(dims, groups * blocks * r1, groups * blocks * r2, spec.kernel_size, stride=spec.stride,
                      padding=spec.padding, dilation=spec.dilation, groups=groups * blocks,
                      padding_mode=spec.padding_mode),
            make_conv(dims, groups * blocks * r2, spec.out_features, 1, groups=groups, bias=spec.bias),
        )

    def factorize(self, layer: nn.Module, spec: LayerSpec, rank: tuple[int, int, int], group: int) -> Blocks:
        """One group's blocks ``([U_b (N/G, r2)], [G_b (r2, r1, K)], [V_b (C/G, r1)])``, cached per rank."""

        def compute() -> Blocks:
            blocks, r1, r2 = rank
            kernel = kernel_by_group(layer, spec)[group]
            if kernel.norm() == 0:
                n, c, k = kernel.shape
                zeros = kernel.new_zeros
                return ([zeros(n, r2)] * blocks, [zeros(r2, r1, k)] * blocks, [zeros(c, r1)] * blocks)
            als = _BlockTermALS(kernel, blocks, r1, r2)
            singular = unfolding_bases(layer, spec, group)
            probes = [als.run(als.start(i, singular), _PROBE_ITERATIONS) for i in range(_STARTS)]
            best = min(range(_STARTS), key=lambda i: probes[i][1][-1])
            state, errors = probes[best]
            if not (len(errors) >= 2 and abs(errors[-2] - errors[-1]) < _TOL):
                state, more = als.run(state, _MAX_ITERATIONS - len(errors))
                errors = errors + more
            log.debug("btd %s group %d rank %s: start %d, relative error %.3g after %d sweeps",
                      spec.name, group, rank, best, errors[-1], len(errors))
            return state

        return factor_cache.get(layer.weight, ("btd", group, rank), compute)

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        blocks, r1, r2 = rank  # type: ignore[misc]
        us, cores, vs = [], [], []
        for g in range(spec.groups):
            group_us, group_cores, group_vs = self.factorize(layer, spec, (blocks, r1, r2), g)
            us.append(torch.cat(group_us, dim=1))  # (N/G, B*r2): the last conv sums the blocks
            cores.extend(group_cores)
            vs.extend(v.T for v in group_vs)
        first, middle, last = replacement[0], replacement[1], replacement[2]  # type: ignore[index]
        first.weight.copy_(torch.cat(vs).reshape(first.weight.shape))
        middle.weight.copy_(torch.cat(cores).reshape(middle.weight.shape))
        last.weight.copy_(torch.cat(us).reshape(last.weight.shape))
        copy_bias(last, layer)

