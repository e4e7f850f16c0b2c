"""Method-specific tests for the tensor decompositions of convolutions: tucker2, cp, btd.

The shared suite (test_methods_shared.py) covers exactness, cost, structure and export on its
layer set; these tests add awkward convs, rank validation, caching and properties of the fits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from torch import nn

import ranksearch
from ranksearch.cost import count_flops
from ranksearch.decompose import factor_cache, get_method
from ranksearch.exceptions import InvalidRankError, InvalidWeightsError
from ranksearch.layers import spec_from_module

from .low_rank_weights import LOW_RANK_WEIGHTS

METHODS = ("tucker2", "cp", "btd")

# (layer factory, input shape): non-square strides, string padding, every padding mode, dilation
AWKWARD = {
    "strided-circular": (
        lambda: nn.Conv2d(6, 10, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1), padding_mode="circular",
                          bias=False),
        (2, 6, 11, 13),
    ),
    "grouped-replicate": (
        lambda: nn.Conv2d(8, 12, 3, stride=(1, 2), padding=1, groups=2, padding_mode="replicate"),
        (2, 8, 9, 10),
    ),
    "valid-dilated": (lambda: nn.Conv2d(5, 7, (2, 3), padding="valid", dilation=(3, 2)), (1, 5, 10, 9)),
    "same-reflect": (lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"), (2, 6, 7, 7)),
}
SMALL_RANKS = {"tucker2": (2, 3), "cp": 3, "btd": (2, 2, 1)}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _layer(case: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = AWKWARD[case]
    return make().eval(), torch.randn(*shape)


@pytest.mark.parametrize("case", ["grouped-replicate", "strided-circular", "same-reflect"])
def test_tucker2_full_rank_is_exact(case: str) -> None:
    layer, x = _layer(case)
    method = get_method("tucker2")
    _low, full = method.rank_bounds(spec_from_module("layer", layer))
    with torch.no_grad():
        assert _relative_error(ranksearch.decompose(layer, "tucker2", full)(x), layer(x)) < 1e-5


def test_tucker2_full_rank_is_exact_on_grouped_conv1d() -> None:
    layer, x = nn.Conv1d(6, 9, 5, stride=2, padding=2, groups=3, padding_mode="reflect"), torch.randn(2, 6, 17)
    _low, full = get_method("tucker2").rank_bounds(spec_from_module("layer", layer))
    assert full == (2, 3)
    with torch.no_grad():
        assert _relative_error(ranksearch.decompose(layer, "tucker2", full)(x), layer(x)) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(AWKWARD))
def test_exactly_low_rank_awkward_conv_is_reproduced_at_exact_cost(method: str, case: str) -> None:
    layer, x = _layer(case)
    rank = SMALL_RANKS[method]
    with torch.no_grad():
        layer.weight.copy_(LOW_RANK_WEIGHTS[method](layer, rank, torch.Generator().manual_seed(3)))
        replacement = ranksearch.decompose(layer, method, rank)
        assert _relative_error(replacement(x), layer(x)) < 1e-4
    cost = get_method(method).cost(spec_from_module("layer", layer, x.shape), rank)
    assert cost.flops == count_flops(replacement, x)
    assert cost.params == sum(p.numel() for p in replacement.parameters())


def test_cp_puts_vertical_and_horizontal_geometry_on_the_depthwise_convs() -> None:
    layer, _x = _layer("strided-circular")
    first, vertical, horizontal, last = ranksearch.decompose(layer, "cp", 4)
    assert (vertical.kernel_size, vertical.stride, vertical.padding, vertical.dilation) == (
        (3, 1), (2, 1), (1, 0), (2, 1))
    assert (horizontal.kernel_size, horizontal.stride, horizontal.padding, horizontal.dilation) == (
        (1, 5), (1, 3), (0, 2), (1, 1))
    assert vertical.groups == horizontal.groups == 4 and vertical.padding_mode == "circular"
    assert first.kernel_size == last.kernel_size == (1, 1) and first.padding == (0, 0)


@pytest.mark.parametrize(
    "method,rank,message",
    [
        ("tucker2", 4, r"tuple of 2 ints \(r_in, r_out\)"),
        ("tucker2", (1, 2, 3), r"tuple of 2 ints \(r_in, r_out\)"),
        ("tucker2", ("2", "3"), r"tuple of 2 ints"),
        ("tucker2", (2.5, 3), r"tuple of 2 ints"),
        ("tucker2", (0, 3), r"outside \[\(1, 1\), \(8, 12\)\]"),
        ("tucker2", (9, 3), "outside"),
        ("btd", 4, r"tuple of 3 ints \(blocks, r_in, r_out\)"),
        ("btd", (2, 3), r"tuple of 3 ints \(blocks, r_in, r_out\)"),
        ("btd", (9, 1, 1), "outside"),
        ("cp", (2, 3), "one int"),
        ("cp", 10_000, "outside"),
        ("cp", 0, "outside"),
    ],
)
def test_invalid_ranks_are_rejected_with_what_to_pass(method: str, rank: object, message: str) -> None:
    with pytest.raises(InvalidRankError, match=message):
        ranksearch.decompose(nn.Conv2d(8, 12, 3), method, rank)  # type: ignore[arg-type]


def test_numpy_integer_ranks_are_accepted() -> None:
    replacement = ranksearch.decompose(nn.Conv2d(8, 12, 3), "tucker2", (np.int64(2), np.int64(3)))
    assert replacement[1].weight.shape == (3, 2, 3, 3)


@pytest.mark.parametrize("method", METHODS)
def test_one_by_one_convs_are_declined_in_favour_of_svd(method: str) -> None:
    reason = get_method(method).unsupported_reason(spec_from_module("pw", nn.Conv2d(8, 8, 1)))
    assert reason is not None and "svd" in reason


def test_cp_declines_conv1d() -> None:
    assert "conv2d" in get_method("cp").unsupported_reason(spec_from_module("c", nn.Conv1d(4, 4, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_building_a_rank_twice_factorizes_once(method: str) -> None:
    layer = nn.Conv2d(8, 12, 3, groups=2)
    rank = SMALL_RANKS[method]
    factor_cache.clear()
    first = ranksearch.decompose(layer, method, rank)
    misses = factor_cache.misses
    second = ranksearch.decompose(layer, method, rank)
    assert factor_cache.misses == misses
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():  # an in-place update invalidates the cache
        layer.weight.mul_(2.0)
    ranksearch.decompose(layer, method, rank)
    assert factor_cache.misses > misses


def test_tucker2_rank_sweep_reuses_the_unfolding_svds_and_btd_shares_them() -> None:
    layer = nn.Conv2d(8, 12, 3)
    factor_cache.clear()
    ranks = [(1, 1), (2, 3), (4, 4), (8, 12)]
    for rank in ranks:
        ranksearch.decompose(layer, "tucker2", rank)
    assert factor_cache.misses == 2 + len(ranks)  # one SVD per unfolding, one fit per rank
    ranksearch.decompose(layer, "btd", (2, 2, 2))
    assert factor_cache.misses == 2 + len(ranks) + 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", [nn.Conv2d(8, 12, 3), nn.Conv2d(64, 32, (3, 5), groups=4), nn.Conv2d(3, 64, 7)])
def test_rank_from_scale_is_monotone_in_cost_and_within_bounds(method: str, layer: nn.Module) -> None:
    spec = spec_from_module("layer", layer, (1, layer.in_channels, 20, 20))
    m = get_method(method)
    previous = (-1, -1)
    for scale in np.linspace(0.0, 1.0, 41):
        rank = m.rank_from_scale(spec, float(scale))
        assert m.normalize_rank(spec, rank) == rank
        cost = m.cost(spec, rank)
        assert (cost.flops, cost.params) >= previous and cost.flops >= previous[0]
        previous = (cost.flops, cost.params)


def test_btd_scale_one_spans_the_channels_with_default_blocks() -> None:
    spec = spec_from_module("layer", nn.Conv2d(64, 32, 3))
    blocks, r1, r2 = get_method("btd").rank_from_scale(spec, 1.0)
    assert blocks == 4 and blocks * r1 == 64 and blocks * r2 == 32


def test_tucker2_rank_matrices_are_the_unfoldings_whose_ranks_are_the_tucker_ranks() -> None:
    layer = nn.Conv2d(8, 12, 3, groups=2)
    with torch.no_grad():
        layer.weight.copy_(LOW_RANK_WEIGHTS["tucker2"](layer, (2, 3), torch.Generator().manual_seed(0)))
    mode1, mode0 = get_method("tucker2").rank_matrices(layer, spec_from_module("layer", layer))
    assert mode1.shape == (2, 4, 6 * 9) and mode0.shape == (2, 6, 4 * 9)
    assert [int(torch.linalg.matrix_rank(m, rtol=1e-5)) for m in mode1] == [2, 2]
    assert [int(torch.linalg.matrix_rank(m, rtol=1e-5)) for m in mode0] == [3, 3]
    assert torch.equal(mode0[1, 2], layer.weight.detach().double()[6 + 2].reshape(-1))  # row = output channel


def _tucker2_kernel(replacement: nn.Module) -> torch.Tensor:
    first, middle, last = (m.weight.detach().double() for m in replacement)
    return torch.einsum("ni,ijhw,jc->nchw", last[:, :, 0, 0], middle, first[:, :, 0, 0])


def test_tucker2_hooi_fits_at_least_as_well_as_truncated_hosvd() -> None:
    layer = nn.Conv2d(16, 24, 3)
    weight = layer.weight.detach().double()
    r1, r2 = 5, 7
    u_out = torch.linalg.svd(weight.reshape(24, -1))[0][:, :r2]
    u_in = torch.linalg.svd(weight.transpose(0, 1).reshape(16, -1))[0][:, :r1]
    hosvd = torch.einsum("na,ma,mkhw,kb,cb->nchw", u_out, u_out, weight, u_in, u_in)
    fitted = _tucker2_kernel(ranksearch.decompose(layer.double(), "tucker2", (r1, r2)))
    assert (fitted - weight).norm() <= (hosvd - weight).norm() * (1 + 1e-9)


def test_btd_with_one_block_fits_like_tucker2() -> None:
    layer = nn.Conv2d(8, 12, 3).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        tucker = _relative_error(ranksearch.decompose(layer, "tucker2", (3, 4))(x), layer(x))
        block = _relative_error(ranksearch.decompose(layer, "btd", (1, 3, 4))(x), layer(x))
    assert block <= tucker * 1.01


def test_cp_spreads_the_magnitude_evenly_over_its_four_convs() -> None:
    layer = nn.Conv2d(8, 12, 3)
    with torch.no_grad():
        layer.weight.mul_(1000.0)
    norms = [float(conv.weight.detach().norm()) for conv in ranksearch.decompose(layer, "cp", 5)]
    assert max(norms) / min(norms) < 1 + 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_zero_kernel_gives_the_bias_and_nan_kernel_is_refused(method: str) -> None:
    layer, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        layer.weight.zero_()
        out = ranksearch.decompose(layer, method, SMALL_RANKS[method])(x)
        assert torch.allclose(out, layer(x))
        layer.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(InvalidWeightsError, match="NaN"):
        ranksearch.decompose(layer, method, SMALL_RANKS[method])


def test_decomposing_leaves_the_tensorly_backend_alone() -> None:
    before = tl.get_backend()
    factor_cache.clear()
    for method in METHODS:
        ranksearch.decompose(nn.Conv2d(4, 6, 3), method, SMALL_RANKS[method])
    assert tl.get_backend() == before
