"""Spatial separable decomposition (Jaderberg et al. 2014, scheme 2): kh x kw -> (kh x 1) then (1 x kw).

The kernel W[n, c, i, j] rearranged as a (C*kh, N*kw) matrix is truncated by SVD. The first conv
(kh x 1, C -> r) takes the vertical stride, padding and dilation, the second (1 x kw, r -> N) the
horizontal ones; any padding mode stays exact because a vertical conv commutes with horizontal
padding. Grouped convs are decomposed group by group.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import LayerSpec
from .base import (
    DecompositionMethod, LayerCost, Rank, cached_svd, copy_bias, make_conv, register,
    split_singular_values, weight_as_float,
)


def split_padding(padding: tuple[int, ...] | str) -> tuple[tuple[int, int] | str, tuple[int, int] | str]:
    """A 2-D conv's padding split into the vertical conv's and the horizontal conv's."""
    if isinstance(padding, str):
        return padding, padding
    return (padding[0], 0), (0, padding[1])


@register
class SpatialDecomposition(DecompositionMethod):
    name = "spatial"
    kinds = ("conv2d",)
    summary = "spatial separable: kh x kw conv -> (kh x 1, C->r) then (1 x kw, r->N) (Jaderberg 2014)"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        if reason is None and min(spec.kernel_size) == 1:
            reason = "the kernel is already one-dimensional; nothing to separate"
        if reason is None and spec.groups == spec.in_features and spec.groups > 1:
            reason = "depthwise convolutions are declined (too little to factorize per group)"
        return reason

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        kh, kw = spec.kernel_size
        return 1, min(spec.in_features // spec.groups * kh, spec.out_features // spec.groups * kw)

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        r = int(rank)  # type: ignore[arg-type]
        kh, kw = spec.kernel_size
        params = r * (spec.in_features * kh + spec.out_features * kw) + (spec.out_features if spec.bias else 0)
        if spec.input_shape is None:
            return LayerCost(flops=0, params=params)
        batch = spec.positions // (spec.output_spatial[0] * spec.output_spatial[1])
        out_h, out_w = spec.output_spatial
        first_w = spec.input_shape[-1]  # the first conv (kh x 1) does not change the width
        flops = batch * out_h * first_w * r * spec.in_features * kh + spec.positions * spec.out_features * r * kw
        return LayerCost(flops=flops, params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        r, groups = int(rank), spec.groups  # type: ignore[arg-type]
        kh, kw = spec.kernel_size
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        pad_first, pad_second = split_padding(spec.padding)
        return nn.Sequential(
            make_conv(2, spec.in_features, groups * r, (kh, 1), stride=(sh, 1), padding=pad_first,
                      dilation=(dh, 1), groups=groups, padding_mode=spec.padding_mode),
            make_conv(2, groups * r, spec.out_features, (1, kw), stride=(1, sw), padding=pad_second,
                      dilation=(1, dw), groups=groups, bias=spec.bias, padding_mode=spec.padding_mode),
        )

    def rank_matrices(self, layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
        groups, (kh, kw) = spec.groups, spec.kernel_size
        n_g, c_g = spec.out_features // groups, spec.in_features // groups
        weight = weight_as_float(layer).reshape(groups, n_g, c_g, kh, kw)
        return [weight.permute(0, 2, 3, 1, 4).reshape(groups, c_g * kh, n_g * kw)]

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        r, groups = int(rank), spec.groups  # type: ignore[arg-type]
        kh, kw = spec.kernel_size
        n_g, c_g = spec.out_features // groups, spec.in_features // groups
        matrices = self.rank_matrices(layer, spec)[0]  # M[g, (c, i), (n, j)] = W[g*n_g + n, c, i, j]
        firsts, seconds = [], []
        for g in range(groups):
            u, s, vh = cached_svd(layer.weight, matrices[g], ("spatial", groups, g))
            left, right = split_singular_values(u, s, vh, r)  # (c_g*kh, r), (r, n_g*kw)
            firsts.append(left.reshape(c_g, kh, r).permute(2, 0, 1).unsqueeze(-1))  # (r, c_g, kh, 1)
            seconds.append(right.reshape(r, n_g, kw).permute(1, 0, 2).unsqueeze(2))  # (n_g, r, 1, kw)
        first, second = replacement[0], replacement[1]  # type: ignore[index]
        first.weight.copy_(torch.cat(firsts))
        second.weight.copy_(torch.cat(seconds))
        copy_bias(second, layer)
