"""The factorization cache: keyed by a weight's contents, so copies of a model share factorizations,
an in-place update does not, and what outlives its last weight is bounded."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.decompose import FactorCache, factor_cache
from ranksearch.decompose.cache import weight_digest


@pytest.mark.parametrize("method, rank", [("svd", 2), ("channel", 2), ("spatial", 2), ("tucker2", (2, 3)), ("cp", 3)])
def test_a_copy_of_a_layer_reuses_its_factorizations(method, rank) -> None:
    """A second optimize works on a fresh deep copy of the same model: no factorization is repeated."""
    layer = nn.Conv2d(8, 12, 3, groups=2) if method != "svd" else nn.Linear(16, 12)
    factor_cache.clear()
    first = ranksearch.decompose(layer, method, rank)
    misses = factor_cache.misses
    assert misses > 0
    twin = copy.deepcopy(layer)
    del layer
    gc.collect()  # the first copy is gone: its entries are kept for the next one
    second = ranksearch.decompose(twin, method, rank)
    assert factor_cache.misses == misses
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        twin.weight.mul_(2.0)  # other contents: factorized again
    ranksearch.decompose(twin, method, rank)
    assert factor_cache.misses > misses


@pytest.mark.parametrize("method, rank", [("svd", 1), ("channel", 1), ("spatial", 1), ("tucker2", (1, 2)), ("cp", 2)])
def test_equal_weights_split_into_different_groups_do_not_share_factorizations(method, rank) -> None:
    """A grouped conv and a plain one can hold equal weight tensors; their factors differ."""
    kernel = 1 if method == "svd" else 3
    grouped, plain = nn.Conv2d(4, 8, kernel, groups=2), nn.Conv2d(2, 8, kernel)
    with torch.no_grad():
        plain.weight.copy_(grouped.weight)
    assert weight_digest(grouped.weight) == weight_digest(plain.weight)
    factor_cache.clear()
    ranksearch.decompose(grouped, method, rank)
    shared = ranksearch.decompose(plain, method, rank)
    factor_cache.clear()
    alone = ranksearch.decompose(plain, method, rank)
    for a, b in zip(shared.parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_entries_outliving_their_weights_are_bounded_oldest_first() -> None:
    cache = FactorCache(keep_bytes=3 * 1000 * 8)  # three orphans of 1000 float64
    weights = [torch.full((10,), float(i)) for i in range(4)]
    for w in weights:
        cache.get(w, "k", lambda: torch.zeros(1000, dtype=torch.float64))
    assert cache.misses == 4
    del w
    for i in range(4):  # each freed in turn; the fourth pushes the first out
        weights[i] = None  # type: ignore[call-overload]
        gc.collect()
    assert [cache.get(torch.full((10,), float(i)), "k", lambda: torch.ones(1)).sum().item() for i in (3, 2, 1)] == [0, 0, 0]
    assert cache.misses == 4
    assert cache.get(torch.full((10,), 0.0), "k", lambda: torch.ones(1)).item() == 1.0  # evicted: computed again
    assert cache.misses == 5


def test_entries_of_a_live_weight_are_never_evicted() -> None:
    cache = FactorCache(keep_bytes=0)
    weight = torch.randn(6, 4)
    cache.get(weight, "k", lambda: torch.zeros(10_000))
    for _ in range(3):  # other weights come and go
        cache.get(torch.randn(6, 4), "k", lambda: torch.zeros(10_000))
        gc.collect()
    cache.get(weight, "k", lambda: torch.ones(1))
    assert cache.misses == 4


def test_the_digest_tells_dtype_shape_and_values_apart() -> None:
    base = torch.arange(12, dtype=torch.float32)
    digests = {weight_digest(t) for t in (base, base.reshape(3, 4), base.double(), base + 1, base.to(torch.bfloat16))}
    assert len(digests) == 5
    assert weight_digest(base.reshape(4, 3).T) == weight_digest(base.reshape(4, 3).T.contiguous())
