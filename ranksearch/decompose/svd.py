"""Truncated SVD of fully connected layers, 1x1 convolutions and embeddings.

``W = U S V^T`` truncated to rank r becomes two layers through r channels; each factor takes
sqrt(S). Grouped 1x1 convolutions are decomposed group by group into two grouped convs.
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
class SVD(DecompositionMethod):
    name = "svd"
    kinds = ("linear", "conv1d", "conv2d", "embedding")
    summary = "truncated SVD: Linear / 1x1 conv / Embedding -> two layers through rank r"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        if reason is None and spec.is_conv and math.prod(spec.kernel_size) != 1:
            reason = "svd takes 1x1 convolutions only; use channel, spatial or tucker2 for larger kernels"
        if reason is None and spec.is_conv and spec.groups == spec.in_features and spec.groups > 1:
            reason = "depthwise convolutions have no channel mixing to factorize"
        return reason

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        return 1, min(spec.in_features // spec.groups, spec.out_features // spec.groups)

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        r = int(rank)  # type: ignore[arg-type]
        params = r * (spec.in_features + spec.out_features) + (spec.out_features if spec.bias else 0)
        if spec.input_shape is None:
            return LayerCost(flops=0, params=params)
        if spec.kind == "embedding":  # the lookup is free, the projection r -> dim is not
            return LayerCost(flops=spec.positions * r * spec.out_features, params=params)
        return LayerCost(flops=spec.positions * r * (spec.in_features + spec.out_features), params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        r = int(rank)  # type: ignore[arg-type]
        if spec.kind == "linear":
            return nn.Sequential(
                nn.Linear(spec.in_features, r, bias=False), nn.Linear(r, spec.out_features, bias=spec.bias)
            )
        if spec.kind == "embedding":
            return nn.Sequential(nn.Embedding(spec.in_features, r), nn.Linear(r, spec.out_features, bias=False))
        dims, groups = conv_dims(spec), spec.groups
        # stride and padding act on the first conv; a zero-padded border then maps to the bias only,
        # exactly as in the original 1x1 conv.
        return nn.Sequential(
            make_conv(dims, spec.in_features, groups * r, 1, stride=spec.stride, padding=spec.padding,
                      groups=groups, padding_mode=spec.padding_mode),
            make_conv(dims, groups * r, spec.out_features, 1, groups=groups, bias=spec.bias),
        )

    def rank_matrices(self, layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
        weight = weight_as_float(layer)
        if spec.kind == "embedding":
            return [weight]
        return [weight.reshape(spec.groups, spec.out_features // spec.groups, -1)]

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        r = int(rank)  # type: ignore[arg-type]
        matrix = self.rank_matrices(layer, spec)[0]
        first, second = replacement[0], replacement[1]  # type: ignore[index]
        if spec.kind == "embedding":
            u, s, vh = cached_svd(layer.weight, matrix, "embedding")
            left, right = split_singular_values(u, s, vh, r)
            first.weight.copy_(left)
            second.weight.copy_(right.T)
            first.padding_idx = layer.padding_idx
            first.scale_grad_by_freq = layer.scale_grad_by_freq
            first.sparse = layer.sparse
            return
        groups = spec.groups  # matrix: (G, N/G, C/G)
        lefts, rights = [], []
        for g in range(groups):
            u, s, vh = cached_svd(layer.weight, matrix[g], ("group", groups, g))
            left, right = split_singular_values(u, s, vh, r)
            lefts.append(left)
            rights.append(right)
        left = torch.cat(lefts)  # (N, r): group g's block in rows g*N/G...
        right = torch.cat(rights)  # (G*r, C/G)
        first.weight.copy_(right.reshape(first.weight.shape))
        second.weight.copy_(left.reshape(second.weight.shape))
        copy_bias(second, layer)
