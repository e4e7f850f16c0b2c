"""Tensor-train (``tt``) and tensor-ring (``tr``) specifics: tensorization, chain wiring, caching,
and tt's convolution chain.

The shared suite (test_methods_shared.py) covers exactness on low-rank weights, cost against
fvcore, structure and export on the small layers; this file covers what is particular to
tensorized layers: how sizes are factored, which sizes are declined, inputs of any leading
shape, three-mode chains and a larger layer.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cost import count_flops
from ranksearch.decompose import factor_cache, get_method
from ranksearch.decompose.tr import load_tr_cores, ring_split_mode
from ranksearch.decompose.tt import balanced_factors, choose_layout, load_tt_cores, tt_ranks
from ranksearch.layers import spec_from_module

METHODS = ("tt", "tr")


def _dense_from_cores(cores: list[torch.Tensor]) -> torch.Tensor:
    """W[(o_1..o_d), (i_1..i_d)] = trace(prod_k G_k[:, o_k, i_k, :]), by einsum (independent of the chain)."""
    d = len(cores)
    letters = "abcdefghij"  # bond indices
    outs, ins = "klmnop"[:d], "qrstuv"[:d]
    terms = [f"{letters[k]}{outs[k]}{ins[k]}{letters[(k + 1) % d]}" for k in range(d)]
    full = torch.einsum(f"{','.join(terms)}->{outs}{ins}", *cores)
    return full.reshape(math.prod(full.shape[:d]), -1)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- tensorization -----------------------------------------------------------------------------


def test_balanced_factors() -> None:
    assert balanced_factors(24, 2) == (4, 6)
    assert balanced_factors(24, 3) == (2, 3, 4)
    assert balanced_factors(512, 3, minimum=4) == (8, 8, 8)
    assert balanced_factors(256, 3, minimum=4) == (4, 8, 8)
    assert balanced_factors(36, 2) == (6, 6)
    assert balanced_factors(17, 2) is None  # prime
    assert balanced_factors(24, 3, minimum=4) is None  # 4 * 4 * 4 > 24
    for n in (12, 60, 96, 100, 768, 1000):
        for parts in (2, 3):
            factors = balanced_factors(n, parts)
            assert factors is not None and math.prod(factors) == n and len(factors) == parts
            assert list(factors) == sorted(factors) and min(factors) >= 2


@pytest.mark.parametrize("in_features,out_features,order", [
    (24, 16, 2), (24, 20, 2), (784, 10, 2), (512, 256, 3), (768, 3072, 3), (64, 64, 3),
])
def test_layout_choice(in_features: int, out_features: int, order: int) -> None:
    layout = choose_layout(in_features, out_features)
    assert layout.order == order
    assert math.prod(layout.in_modes) == in_features and math.prod(layout.out_modes) == out_features
    # inputs descending, outputs ascending: the first and last chain steps are the narrowest
    assert list(layout.in_modes) == sorted(layout.in_modes, reverse=True)
    assert list(layout.out_modes) == sorted(layout.out_modes)


def test_layout_of_a_wide_layer_is_balanced() -> None:
    layout = choose_layout(512, 256)
    assert layout.in_modes == (8, 8, 8) and layout.out_modes == (4, 8, 8)
    assert layout.bond_bounds() == (32, 64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("in_features,out_features,culprit", [
    (17, 16, "in_features=17"), (16, 13, "out_features=13"), (16, 2, "out_features=2"), (3, 16, "in_features=3"),
])
def test_unfactorable_sizes_are_declined_with_a_reason(
    method: str, in_features: int, out_features: int, culprit: str
) -> None:
    layer = nn.Linear(in_features, out_features)
    reason = get_method(method).unsupported_reason(spec_from_module("fc", layer))
    assert reason is not None and culprit in reason and "svd" in reason
    with pytest.raises(ranksearch.UnsupportedLayerError, match="fc"):
        ranksearch.decompose(layer, method, 1, name="fc")


def test_tr_declines_convolutions() -> None:
    reason = get_method("tr").unsupported_reason(spec_from_module("conv", nn.Conv2d(16, 16, 3)))
    assert reason is not None and "linear" in reason


@pytest.mark.parametrize("conv,words", [
    (nn.Conv1d(16, 16, 3), "conv1d"),
    (nn.Conv2d(16, 16, 1), "1x1"),
    (nn.Conv2d(16, 16, (1, 3)), "one-dimensional"),
    (nn.Conv2d(16, 16, 3, groups=16), "depthwise"),
])
def test_tt_declines_the_convolutions_it_cannot_help_with_a_reason(conv: nn.Module, words: str) -> None:
    assert words in get_method("tt").unsupported_reason(spec_from_module("conv", conv))


# --- the chain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features,out_features", [(24, 16), (64, 64), (512, 256)])
def test_tt_chain_computes_the_cores_contraction(in_features: int, out_features: int) -> None:
    """Random cores written into the chain give exactly the dense TT-matrix (2 and 3 modes)."""
    layer = nn.Linear(in_features, out_features).double()
    spec = spec_from_module("fc", layer)
    layout = choose_layout(in_features, out_features)
    ranks = tt_ranks(layout, 5)
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(a, o, i, b, generator=gen, dtype=torch.float64)
             for a, o, i, b in zip(ranks, layout.out_modes, layout.in_modes, ranks[1:])]
    chain = get_method("tt").structure(spec, 5).double()
    load_tt_cores(chain, cores)
    with torch.no_grad():
        chain.bias.copy_(layer.bias)
        x = torch.randn(3, in_features, dtype=torch.float64, generator=gen)
        expected = x @ _dense_from_cores(cores).T + layer.bias
        assert _relative_error(chain(x), expected) < 1e-12


@pytest.mark.parametrize("in_features,out_features", [(24, 16), (64, 64), (512, 256)])
def test_tr_chain_closes_the_ring(in_features: int, out_features: int) -> None:
    """Random ring cores written into the chain give exactly the trace of their product."""
    spec = spec_from_module("fc", nn.Linear(in_features, out_features, bias=False))
    layout = choose_layout(in_features, out_features)
    rank = 3
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(rank, o, i, rank, generator=gen, dtype=torch.float64)
             for o, i in zip(layout.out_modes, layout.in_modes)]
    chain = get_method("tr").structure(spec, rank).double()
    assert chain.bias is None
    load_tr_cores(chain, cores)
    with torch.no_grad():
        x = torch.randn(2, in_features, dtype=torch.float64, generator=gen)
        assert _relative_error(chain(x), x @ _dense_from_cores(cores).T) < 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(64,), (2, 5, 64), (2, 3, 4, 64)])
def test_any_leading_shape(method: str, shape: tuple[int, ...]) -> None:
    layer = nn.Linear(64, 48)  # two modes: 48 has no three factors >= 4
    x = torch.randn(*shape)
    spec = spec_from_module("fc", layer, shape)
    m = get_method(method)
    rank = m.rank_from_scale(spec, 0.5)
    replacement = ranksearch.decompose(layer, method, rank)
    with torch.no_grad():
        out = replacement(x)
        assert out.shape == (*shape[:-1], 48)
        # the same function as on the flattened rows: leading dims are only carried along
        flat = replacement(x.reshape(-1, 64)).reshape(out.shape)
        assert torch.allclose(out, flat, atol=1e-6)
    assert m.cost(spec, rank).flops == count_flops(replacement, x)


@pytest.mark.parametrize("method,in_features,out_features", [("tt", 24, 20), ("tr", 24, 16)])
def test_two_mode_top_rank_reproduces_the_layer(method: str, in_features: int, out_features: int) -> None:
    layer = nn.Linear(in_features, out_features)
    x = torch.randn(2, 5, in_features)
    spec = spec_from_module("fc", layer, x.shape)
    _low, high = get_method(method).rank_bounds(spec)
    replacement = ranksearch.decompose(layer, method, high)
    with torch.no_grad():
        assert _relative_error(replacement(x), layer(x)) < 1e-5


def test_tr_top_rank_is_bounded_by_the_split_core() -> None:
    """Ring rank R splits one unfolding into R * R components, so R * R fits in min(n, N / n)."""
    spec = spec_from_module("fc", nn.Linear(24, 20))  # pair sizes (24, 20)
    assert get_method("tr").rank_bounds(spec) == (1, 4)
    with pytest.raises(ranksearch.InvalidRankError, match="outside"):
        ranksearch.decompose(nn.Linear(24, 20), "tr", 5)


def test_tr_splits_the_ring_where_it_allows_the_largest_rank() -> None:
    layout = choose_layout(512, 256)  # pair sizes (32, 64, 64)
    assert ring_split_mode(layout) == (1, 8)


# --- a larger layer, ranks, caching ------------------------------------------------------------


def test_wide_layer_decomposes_and_top_tt_rank_is_exact() -> None:
    layer = nn.Linear(512, 256)
    x = torch.randn(4, 512)
    spec = spec_from_module("fc", layer, x.shape)
    tt = get_method("tt")
    _low, high = tt.rank_bounds(spec)
    assert high == 64
    with torch.no_grad():
        exact = ranksearch.decompose(layer, "tt", high)
        assert _relative_error(exact(x), layer(x)) < 1e-5
        small = ranksearch.decompose(layer, "tt", 8)
        assert tt.cost(spec, 8).params == sum(p.numel() for p in small.parameters()) < spec.params / 10
        ring = ranksearch.decompose(layer, "tr", 4)
        assert ring(x).shape == (4, 256)


@pytest.mark.parametrize("method", METHODS)
def test_cost_grows_with_rank_and_fraction_is_respected(method: str) -> None:
    spec = spec_from_module("fc", nn.Linear(512, 256), (8, 512))
    m = get_method(method)
    low, high = m.rank_bounds(spec)
    costs = [m.cost(spec, r) for r in range(low, high + 1)]
    assert all(a.flops < b.flops and a.params < b.params for a, b in zip(costs, costs[1:]))
    rank = m.rank_for_cost_fraction(spec, 0.25)
    assert rank is not None and m.cost(spec, rank).flops <= 0.25 * spec.flops
    if rank < high:
        assert m.cost(spec, rank + 1).flops > 0.25 * spec.flops


@pytest.mark.parametrize("method", METHODS)
def test_factorizations_are_cached_per_rank(method: str) -> None:
    layer = nn.Linear(64, 48)
    factor_cache.clear()
    for _ in range(2):
        for rank in (1, 2, 3):
            ranksearch.decompose(layer, method, rank)
    assert factor_cache.misses == 3
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place update invalidates the cached cores
    ranksearch.decompose(layer, method, 1)
    assert factor_cache.misses == 4


def test_two_mode_tt_is_the_truncated_svd_of_its_rank_matrix() -> None:
    """With two modes, TT at rank r is the best rank-r approximation of the (o1 i1, o2 i2) reshaping."""
    layer = nn.Linear(24, 20, bias=False)
    spec = spec_from_module("fc", layer)
    tt = get_method("tt")
    (matrix,) = tt.rank_matrices(layer, spec)
    assert matrix.shape == choose_layout(24, 20).pair_sizes
    s = torch.linalg.svdvals(matrix)
    rank = 6
    replacement = ranksearch.decompose(layer, "tt", rank)
    with torch.no_grad():
        dense = replacement(torch.eye(24, dtype=torch.float32)).T  # (out, in)
        error = _relative_error(dense.double(), layer.weight.double())
    assert math.isclose(error, float(s[rank:].norm() / s.norm()), rel_tol=1e-4)


# --- tt on Conv2d ------------------------------------------------------------------------------


def test_tt_conv_is_the_four_conv_chain_of_its_kernels_tensor_train() -> None:
    """The chain's four kernels contract back to the TT-SVD approximation of the kernel, in (c, i, j, n) order."""
    layer = nn.Conv2d(16, 24, 3, padding=1)
    spec = spec_from_module("conv", layer, (1, 16, 8, 8))
    first, vertical, horizontal, last = ranksearch.decompose(layer, "tt", 6)
    assert [tuple(m.weight.shape) for m in (first, vertical, horizontal, last)] == [
        (6, 16, 1, 1), (6, 6, 3, 1), (6, 6, 1, 3), (24, 6, 1, 1)]
    assert (vertical.padding, horizontal.padding) == ((1, 0), (0, 1))
    contracted = torch.einsum("ac,bai,dbj,nd->ncij", first.weight[:, :, 0, 0], vertical.weight[..., 0],
                              horizontal.weight[:, :, 0], last.weight[:, :, 0, 0])
    with torch.no_grad():
        error = _relative_error(contracted.double(), layer.weight.double())
    # TT-SVD's error is at most the root sum of squares of what each bond's truncation drops
    tensor = layer.weight.detach().double().permute(1, 2, 3, 0)
    dropped = [torch.linalg.svdvals(tensor.reshape(rows, -1))[6:].norm() for rows in (16, 48, 144)]
    assert 0 < error <= float(torch.stack(dropped).norm() / tensor.norm()) * (1 + 1e-6)
    convs = (first, vertical, horizontal, last)
    assert get_method("tt").cost(spec, 6).params == sum(p.numel() for conv in convs for p in conv.parameters())


def test_tt_conv_top_rank_reproduces_a_resnet_conv() -> None:
    layer = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 32, 9, 9)
    spec = spec_from_module("conv", layer, x.shape)
    tt = get_method("tt")
    _low, high = tt.rank_bounds(spec)
    assert high == min(32 * 3, 3 * 64)  # the middle bond: (c, i) against (j, n)
    with torch.no_grad():
        assert _relative_error(ranksearch.decompose(layer, "tt", high)(x), layer(x)) < 1e-5
    rank = tt.rank_for_cost_fraction(spec, 0.3)
    assert rank is not None and tt.cost(spec, rank).flops <= 0.3 * spec.flops < tt.cost(spec, rank + 1).flops
