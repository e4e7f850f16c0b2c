"""Tensor train of a 2-D convolution's kernel: a kh x kw conv becomes four plain convs.

The kernel ``W[n, c, i, j]`` of each group, viewed as the 4-way tensor ``T[c, i, j, n]`` (inputs
first, outputs last), is decomposed by TT-SVD (``tensorly.decomposition.tensor_train``) into cores
``G1[1, c, r1]``, ``G2[r1, i, r2]``, ``G3[r2, j, r3]``, ``G4[r3, n, 1]``. Contracting them in that
order is a chain of convs: 1x1 ``C -> r1``; ``kh x 1``, ``r1 -> r2``, with the vertical stride,
padding and dilation; ``1 x kw``, ``r2 -> r3``, with the horizontal ones; 1x1 ``r3 -> N`` with the
bias. A pointwise conv without bias commutes with any padding mode and a vertical conv with
horizontal padding, so the chain is exact at the largest rank. Grouped convs are decomposed group
by group into four grouped convs.

This is the tensor train that tensorly-torch's factorized convs use for a kernel. Garipov et al.
(2016) also split the channel modes into factors; in plain layers that needs a reshape between
every two steps, one more copy each.

The rank is one int ``r``: the bond ranks are ``r_k = min(r, L_k, R_k)``, where ``L_k`` and
``R_k`` are the products of the mode sizes left and right of bond ``k`` (TT-SVD cannot use more).
"""

from __future__ import annotations

import math

import torch
from tensorly.decomposition import tensor_train
from torch import nn

from ..layers import LayerSpec
from .base import LayerCost, copy_bias, factor_cache, make_conv
from .spatial import split_padding
from .tucker2 import decline_reason, input_positions, kernel_by_group, tensorly_torch

__all__ = ["cost", "load_weights", "rank_bounds", "rank_matrices", "structure", "unsupported_reason"]


def _mode_sizes(spec: LayerSpec) -> tuple[int, int, int, int]:
    """``(C/G, kh, kw, N/G)``: the modes of one group's kernel tensor, in chain order."""
    kh, kw = spec.kernel_size
    return spec.in_features // spec.groups, kh, kw, spec.out_features // spec.groups


def _bond_bounds(spec: LayerSpec) -> tuple[int, int, int]:
    """``min(L_k, R_k)`` for the three bonds: the largest useful rank of each."""
    sizes = _mode_sizes(spec)
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in (1, 2, 3))  # type: ignore[return-value]


def _ranks(spec: LayerSpec, rank: int) -> tuple[int, int, int]:
    """``(r1, r2, r3)`` for a uniform rank."""
    return tuple(min(rank, bound) for bound in _bond_bounds(spec))  # type: ignore[return-value]


def unsupported_reason(spec: LayerSpec) -> str | None:
    reason = decline_reason("tt", spec, None)  # depthwise and 1x1 convs, as tucker2, cp and btd
    if reason is None and min(spec.kernel_size) == 1:
        return "the kernel is one-dimensional; tucker2 or channel factorize it with fewer convs than tt"
    return reason


def rank_bounds(spec: LayerSpec) -> tuple[int, int]:
    """``(1, largest bond bound)``: the largest rank reproduces the layer exactly."""
    return 1, max(_bond_bounds(spec))


def cost(spec: LayerSpec, rank: int) -> LayerCost:
    r1, r2, r3 = _ranks(spec, rank)
    c_g, kh, kw, n_g = _mode_sizes(spec)
    per_group = c_g * r1 + r1 * kh * r2 + r2 * kw * r3 + r3 * n_g
    params = spec.groups * per_group + (spec.out_features if spec.bias else 0)
    if spec.input_shape is None:
        return LayerCost(flops=0, params=params)
    out_h, out_w = spec.output_spatial
    batch = spec.positions // (out_h * out_w)
    in_w = spec.input_shape[-1]  # the kh x 1 conv keeps the input's width
    flops = spec.groups * (
        input_positions(spec) * c_g * r1
        + batch * out_h * in_w * r1 * kh * r2
        + spec.positions * (r2 * kw * r3 + r3 * n_g)
    )
    return LayerCost(flops=flops, params=params)


def structure(spec: LayerSpec, rank: int) -> nn.Module:
    r1, r2, r3 = _ranks(spec, rank)
    groups = spec.groups
    kh, kw = spec.kernel_size
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pad_vertical, pad_horizontal = split_padding(spec.padding)
    return nn.Sequential(
        make_conv(2, spec.in_features, groups * r1, 1, groups=groups),
        make_conv(2, groups * r1, groups * r2, (kh, 1), stride=(sh, 1), padding=pad_vertical, dilation=(dh, 1),
                  groups=groups, padding_mode=spec.padding_mode),
        make_conv(2, groups * r2, groups * r3, (1, kw), stride=(1, sw), padding=pad_horizontal, dilation=(1, dw),
                  groups=groups, padding_mode=spec.padding_mode),
        make_conv(2, groups * r3, spec.out_features, 1, groups=groups, bias=spec.bias),
    )


def _kernel_tensors(layer: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """Each group's kernel as ``T[c, i, j, n]`` (float64): a ``(groups, C/G, kh, kw, N/G)`` tensor."""
    c_g, kh, kw, n_g = _mode_sizes(spec)
    return kernel_by_group(layer, spec).reshape(spec.groups, n_g, c_g, kh, kw).permute(0, 2, 3, 4, 1)


def cores(layer: nn.Module, spec: LayerSpec, rank: int, group: int) -> list[torch.Tensor]:
    """TT cores ``G1[1, c, r1], G2[r1, i, r2], G3[r2, j, r3], G4[r3, n, 1]`` of one group (cached).

    TT-SVD at one rank is not a truncation of another rank's result, so the cache key holds the ranks.
    """
    ranks = _ranks(spec, rank)

    def compute() -> list[torch.Tensor]:
        with tensorly_torch():
            tt = tensor_train(_kernel_tensors(layer, spec)[group].contiguous(), rank=[1, *ranks, 1])
        return [torch.as_tensor(core) for core in tt.factors]

    return factor_cache.get(layer.weight, ("tt-conv", spec.groups, group, ranks), compute)


def load_weights(replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: int) -> None:
    first, vertical, horizontal, last = replacement  # type: ignore[misc]
    g1s, g2s, g3s, g4s = zip(*(cores(layer, spec, rank, g) for g in range(spec.groups)))
    # weight[out, in, h, w] of each conv from the cores: G[a, mode, b] maps channel a to channel b
    first.weight.copy_(torch.cat([g1[0].T for g1 in g1s])[:, :, None, None])
    vertical.weight.copy_(torch.cat([g2.permute(2, 0, 1) for g2 in g2s])[..., None])
    horizontal.weight.copy_(torch.cat([g3.permute(2, 0, 1) for g3 in g3s])[:, :, None, :])
    last.weight.copy_(torch.cat([g4[..., 0].T for g4 in g4s])[:, :, None, None])
    copy_bias(last, layer)


def rank_matrices(layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
    """Per group, the unfolding at the bond with the largest bound (the one the top rank is set by)."""
    bounds = _bond_bounds(spec)
    k = bounds.index(max(bounds)) + 1
    sizes = _mode_sizes(spec)
    return [_kernel_tensors(layer, spec).reshape(spec.groups, math.prod(sizes[:k]), math.prod(sizes[k:]))]
