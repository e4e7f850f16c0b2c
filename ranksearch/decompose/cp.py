"""CP decomposition of convolutions (Lebedev et al. 2014): four thin convs through rank R.

The kernel is fitted by CP-ALS (tensorly's ``parafac``) as ``W[n, c, i, j] = sum_r A[n, r] B[c, r]
V[i, r] H[j, r]`` and realised as 1x1 C->R, a (kh x 1) depthwise conv R->R with the vertical
stride, padding and dilation, a (1 x kw) depthwise conv R->R with the horizontal ones, and 1x1
R->N with the bias. A vertical conv commutes with horizontal padding (and pointwise convs with any
padding), so every padding mode is kept exactly. Grouped convs are decomposed group by group.

Rank bounds: 1 to the parameter break-even rank ``C/G*N/G*kh*kw // (C/G + N/G + kh + kw)``;
larger ranks cost more parameters than the layer itself, and the bound is also below the generic
largest CP rank of the kernel (its size over its largest dimension), so there is nothing to gain
beyond it. CP is not exact at the largest rank.
"""

from __future__ import annotations

import logging
import math

import torch
from tensorly.decomposition import parafac
from torch import nn

from ..layers import LayerSpec
from .base import DecompositionMethod, LayerCost, Rank, copy_bias, factor_cache, make_conv, register
from .tucker2 import decline_reason, input_positions, kernel_by_group, tensorly_torch

__all__ = ["CPDecomposition"]

log = logging.getLogger("ranksearch.decompose.cp")

#: ALS settings. Line search (tensorly's extrapolation) roughly halves the iterations and escapes
#: many swamps; an exactly CP-rank-R kernel typically reaches _GOOD_ENOUGH in 30-250 iterations.
_MAX_ITERATIONS = 300
_TOL = 1e-10  # change of the relative error between iterations that counts as converged
_GOOD_ENOUGH = 1e-6  # close to the float32 rounding of the weights themselves: stop
#: A start "stalls" when its last _STALL_WINDOW iterations improved the error by less than
#: _STALL_FRACTION of itself. A stalled start (a swamp or local minimum) is followed by the next
#: start and the best fit is kept; a start still improving at _MAX_ITERATIONS is not (more starts
#: would not help it, only cost). Measured over 200 random exactly low-rank float32 kernels each
#: (output error < 1e-4), the shared suite's cases: 12x8x3x3 at R=10 misses 5, 12x8x3x5 at R=16
#: misses 1, grouped 6x4x3x3 at R=4 none (a single start: ~4% missed). On real (random) kernels a
#: 12x8x3x3 layer takes 0.1-0.5 s at any rank; a 64x64x3x3 one 1-18 s (R = 28..275), since one
#: tensorly ALS iteration there costs ~50 ms.
_STALL_WINDOW = 20
_STALL_FRACTION = 1e-3
_STARTS = (("svd", 0), ("random", 1), ("random", 2))


class _StallCheck:
    """A ``parafac`` callback that records the relative errors and stops a start that stalls.

    ``parafac`` calls it once before the first iteration and once after each one (with the
    previous error on line-search iterations).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.errors: list[float] = []
        self.stalled = False

    def __call__(self, _cp_tensor: object, error: object) -> bool:
        self.errors.append(float(error))  # type: ignore[arg-type]
        if self.errors[-1] < _GOOD_ENOUGH:
            return True
        if len(self.errors) > _STALL_WINDOW:
            before = self.errors[-_STALL_WINDOW - 1]
            self.stalled = before - self.errors[-1] < _STALL_FRACTION * self.errors[-1]
        return self.stalled

    @property
    def converged(self) -> bool:
        """Whether the fit is as good as it gets: ``parafac``'s tolerance or a tiny error."""
        return not self.stalled and (len(self.errors) <= self.limit or self.errors[-1] < _GOOD_ENOUGH)


def _split_padding(padding: tuple[int, ...] | str) -> tuple[tuple[int, int] | str, tuple[int, int] | str]:
    if isinstance(padding, str):  # 'same' / 'valid' mean the same thing for each 1-D conv
        return padding, padding
    return (padding[0], 0), (0, padding[1])


@register
class CPDecomposition(DecompositionMethod):
    """CP (canonical polyadic) decomposition of a Conv2d kernel; rank is an int R."""

    name = "cp"
    kinds = ("conv2d",)
    summary = "CP: 1x1 C->R, (kh x 1) and (1 x kw) depthwise, 1x1 R->N (Lebedev et al. 2014)"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        return decline_reason(self.name, spec, super().unsupported_reason(spec))

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        """``(1, parameter break-even rank)``, see the module docstring."""
        kh, kw = spec.kernel_size
        c_g, n_g = spec.in_features // spec.groups, spec.out_features // spec.groups
        return 1, max(1, c_g * n_g * kh * kw // (c_g + n_g + kh + kw))

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        r = int(rank)  # type: ignore[arg-type]
        kh, kw = spec.kernel_size
        channels = spec.groups * r  # the depthwise convs' width
        params = r * (spec.in_features + spec.out_features) + channels * (kh + kw)
        params += spec.out_features if spec.bias else 0
        if spec.input_shape is None:
            return LayerCost(flops=0, params=params)
        out_h, _out_w = spec.output_spatial
        batch = math.prod(spec.input_shape[:-3])
        flops = (
            input_positions(spec) * spec.in_features * r  # 1x1 on the input
            + batch * out_h * spec.input_shape[-1] * channels * kh  # vertical: output rows, input width
            + spec.positions * (channels * kw + spec.out_features * r)
        )
        return LayerCost(flops=flops, params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        r, groups = int(rank), spec.groups  # type: ignore[arg-type]
        channels = groups * r
        kh, kw = spec.kernel_size
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        pad_vertical, pad_horizontal = _split_padding(spec.padding)
        return nn.Sequential(
            make_conv(2, spec.in_features, channels, 1, groups=groups),
            make_conv(2, channels, channels, (kh, 1), stride=(sh, 1), padding=pad_vertical, dilation=(dh, 1),
                      groups=channels, padding_mode=spec.padding_mode),
            make_conv(2, channels, channels, (1, kw), stride=(1, sw), padding=pad_horizontal, dilation=(1, dw),
                      groups=channels, padding_mode=spec.padding_mode),
            make_conv(2, channels, spec.out_features, 1, groups=groups, bias=spec.bias),
        )

    def factorize(self, layer: nn.Module, spec: LayerSpec, rank: int, group: int) -> list[torch.Tensor]:
        """One group's balanced CP factors ``[A (N/G, R), B (C/G, R), V (kh, R), H (kw, R)]``, cached.

        The weights are spread evenly over the four factors (each column scaled by
        ``|weight|^(1/4)``) so that no layer of the replacement carries all the magnitude.
        """

        def compute() -> list[torch.Tensor]:
            kernel = kernel_by_group(layer, spec)[group].reshape(
                spec.out_features // spec.groups, spec.in_features // spec.groups, *spec.kernel_size
            )
            if kernel.norm() == 0:  # ALS divides by the norm; the zero kernel has zero factors
                return [kernel.new_zeros(size, rank) for size in kernel.shape]
            weights, factors = self._als(kernel, rank, spec.name, group)
            norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
            scale = (weights.abs() * norms.prod(dim=0)) ** 0.25
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            balanced = [f / n * scale for f, n in zip(factors, safe)]
            balanced[0] = balanced[0] * torch.sign(weights)
            return balanced

        return factor_cache.get(layer.weight, ("cp", spec.groups, group, rank), compute)

    @staticmethod
    def _als(kernel: torch.Tensor, rank: int, name: str, group: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        best: tuple[float, object] | None = None
        with tensorly_torch():
            for init, seed in _STARTS:
                check = _StallCheck(_MAX_ITERATIONS)
                cp_tensor = parafac(kernel, rank, init=init, random_state=seed, n_iter_max=_MAX_ITERATIONS,
                                    tol=_TOL, linesearch=True, callback=check)
                status = "converged" if check.converged else "stalled" if check.stalled else "iteration limit"
                log.debug("cp %s group %d rank %d, %s start: relative error %.3g after %d steps (%s)",
                          name, group, rank, init, check.errors[-1], len(check.errors), status)
                if best is None or check.errors[-1] < best[0]:
                    best = (check.errors[-1], cp_tensor)
                if not check.stalled:  # converged, or still improving when the budget ran out
                    break
        assert best is not None
        weights, factors = best[1]  # type: ignore[misc]
        return weights, list(factors)

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        r = int(rank)  # type: ignore[arg-type]
        outs, ins, verticals, horizontals = zip(*(self.factorize(layer, spec, r, g) for g in range(spec.groups)))
        first, vertical, horizontal, last = (replacement[i] for i in range(4))  # type: ignore[index]
        first.weight.copy_(torch.cat([b.T for b in ins]).reshape(first.weight.shape))
        vertical.weight.copy_(torch.cat([v.T for v in verticals]).reshape(vertical.weight.shape))
        horizontal.weight.copy_(torch.cat([h.T for h in horizontals]).reshape(horizontal.weight.shape))
        last.weight.copy_(torch.cat(outs).reshape(last.weight.shape))
        copy_bias(last, layer)
