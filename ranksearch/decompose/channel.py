"""Channel decomposition (Zhang et al. 2015, data-free form): k x k conv C -> r, then 1x1 r -> N.

The kernel reshaped to an (N, C*k*k) matrix is truncated by SVD; the first conv keeps the
original stride, padding and dilation. Grouped convs are decomposed group by group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import LayerSpec
from .base import (
    DecompositionMethod, LayerCost, Rank, cached_svd, conv_dims, copy_bias, make_conv, register,
    split_singular_values, weight_as_float,
)


@register
class ChannelDecomposition(DecompositionMethod):
    name = "channel"
    kinds = ("conv1d", "conv2d")
    summary = "channel decomposition: k x k conv C->r, then 1x1 r->N (Zhang et al. 2015)"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        if reason is None and spec.groups == spec.in_features and spec.groups > 1:
            reason = "depthwise convolutions have no channel mixing to factorize"
        return reason

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        per_group_in = spec.in_features // spec.groups * math.prod(spec.kernel_size)
        return 1, min(per_group_in, spec.out_features // spec.groups)

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        r = int(rank)  # type: ignore[arg-type]
        per_position = r * (spec.in_features * math.prod(spec.kernel_size) + spec.out_features)
        params = per_position + (spec.out_features if spec.bias else 0)
        flops = spec.positions * per_position if spec.input_shape is not None else 0
        return LayerCost(flops=flops, params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        r, groups, dims = int(rank), spec.groups, conv_dims(spec)  # type: ignore[arg-type]
        return nn.Sequential(
            make_conv(dims, spec.in_features, groups * r, spec.kernel_size, stride=spec.stride,
                      padding=spec.padding, dilation=spec.dilation, groups=groups,
                      padding_mode=spec.padding_mode),
            make_conv(dims, groups * r, spec.out_features, 1, groups=groups, bias=spec.bias),
        )

    def rank_matrices(self, layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
        return [weight_as_float(layer).reshape(spec.groups, spec.out_features // spec.groups, -1)]

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        r, groups = int(rank), spec.groups  # type: ignore[arg-type]
        matrix = self.rank_matrices(layer, spec)[0]  # (G, N/G, C/G*k*k)
        lefts, rights = [], []
        for g in range(groups):
            u, s, vh = cached_svd(layer.weight, matrix[g], ("channel", groups, g))
            left, right = split_singular_values(u, s, vh, r)
            lefts.append(left)
            rights.append(right)
        first, second = replacement[0], replacement[1]  # type: ignore[index]
        first.weight.copy_(torch.cat(rights).reshape(first.weight.shape))
        second.weight.copy_(torch.cat(lefts).reshape(second.weight.shape))
        copy_bias(second, layer)
