"""One suite every registered decomposition method must pass.

It runs over ``ranksearch.methods()`` and a set of awkward layers (strides, non-square kernels,
string padding, dilation, no bias, groups, Conv1d, reflect padding, embeddings).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cost import count_flops
from ranksearch.decompose import factor_cache, get_method
from ranksearch.decompose._reshape import Regroup
from ranksearch.layers import spec_from_module

from .low_rank_weights import LOW_RANK_WEIGHTS

# Leaf modules a replacement may contain: plain torch layers (plus the tensor-train helpers, which
# hold plain nn.Linear layers and only reshape between them).
PLAIN_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.Identity, nn.Flatten, nn.Unflatten, Regroup)

LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), (3, 24)),
    "linear-nobias-3d": (lambda: nn.Linear(24, 20, bias=False), (2, 5, 24)),
    "conv1x1": (lambda: nn.Conv2d(16, 12, 1), (2, 16, 7, 7)),
    "conv1x1-grouped-stride": (lambda: nn.Conv2d(16, 12, 1, stride=2, padding=1, groups=2), (2, 16, 9, 9)),
    "conv3x3-stride2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 11, 11)),
    "conv-nonsquare": (lambda: nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2)), (2, 8, 10, 9)),
    "conv-same-dilated-nobias": (lambda: nn.Conv2d(8, 12, 3, padding="same", dilation=2, bias=False), (2, 8, 9, 9)),
    "conv-grouped-reflect": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2, padding_mode="reflect"), (2, 8, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, stride=2), (2, 8, 15)),
    "embedding": (lambda: nn.Embedding(40, 16), None),
}
FULL_RANK_EXACT = {"svd", "channel", "spatial", "tucker2", "tt"}


def _inputs(case: str) -> torch.Tensor:
    _, shape = LAYERS[case]
    if shape is None:
        return torch.randint(0, 40, (2, 6))
    return torch.randn(*shape)


def _cases():
    for method in ranksearch.methods():
        for case in LAYERS:
            yield pytest.param(method, case, id=f"{method}-{case}")


def _supported(method: str, case: str) -> tuple[nn.Module, torch.Tensor]:
    make, _ = LAYERS[case]
    layer = make().eval()
    x = _inputs(case)
    spec = spec_from_module("layer", layer, x.shape)
    if not get_method(method).supports(spec):
        pytest.skip(get_method(method).unsupported_reason(spec))
    return layer, x


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _small_rank(method: str, layer: nn.Module, x: torch.Tensor):
    spec = spec_from_module("layer", layer, x.shape)
    m = get_method(method)
    _low, high = m.rank_bounds(spec)
    return m.rank_from_scale(spec, 0.3), high


@pytest.mark.parametrize("method,case", list(_cases()))
def test_exactly_low_rank_layer_is_reproduced(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    rank, _ = _small_rank(method, layer, x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(LOW_RANK_WEIGHTS[method](layer, rank, gen))
    replacement = ranksearch.decompose(layer, method, rank)
    with torch.no_grad():
        assert _relative_error(replacement(x), layer(x)) < 1e-4


@pytest.mark.parametrize("method,case", list(_cases()))
def test_full_rank_reproduces_and_error_does_not_grow_with_rank(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    spec = spec_from_module("layer", layer, x.shape)
    m = get_method(method)
    with torch.no_grad():
        reference = layer(x)
        errors = [
            _relative_error(ranksearch.decompose(layer, method, m.rank_from_scale(spec, s))(x), reference)
            for s in (0.2, 0.5, 1.0)
        ]
    for smaller, larger in zip(errors, errors[1:]):
        assert larger <= smaller * 1.02 + 1e-6, errors
    if method in FULL_RANK_EXACT:
        assert errors[-1] < 1e-4


@pytest.mark.parametrize("method,case", list(_cases()))
def test_analytic_cost_equals_built_module(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    spec = spec_from_module("layer", layer, x.shape)
    m = get_method(method)
    rank, _ = _small_rank(method, layer, x)
    replacement = ranksearch.decompose(layer, method, rank)
    cost = m.cost(spec, rank)
    assert cost.flops == count_flops(replacement, x)
    assert cost.params == sum(p.numel() for p in replacement.parameters())
    assert replacement(x).shape == layer(x).shape


@pytest.mark.parametrize("method,case", list(_cases()))
def test_remembered_rank_for_cost_fraction_is_the_computed_one(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    spec = spec_from_module("layer", layer, x.shape)
    m = get_method(method)
    fractions = [0.05, 0.2, 0.35, 0.5, 0.8, 1.0]
    computed = [m._bisect_cost_fraction(spec, f) for f in fractions]
    assert len(set(map(str, computed))) > 1  # the fractions ask for different ranks
    for _ in range(2):  # the second pass is answered from memory: the same ranks
        assert [m.rank_for_cost_fraction(spec, f) for f in fractions] == computed
    # a spec whose fields are lists (built by hand) cannot be remembered, and is still answered
    by_hand = dataclasses.replace(spec, input_shape=list(spec.input_shape) if spec.input_shape else None,
                                  kernel_size=list(spec.kernel_size))
    assert [m.rank_for_cost_fraction(by_hand, f) for f in fractions] == computed


@pytest.mark.parametrize("method,case", list(_cases()))
def test_replacement_is_plain_layers_and_structure_matches(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    spec = spec_from_module("layer", layer, x.shape)
    rank, _ = _small_rank(method, layer, x)
    replacement = ranksearch.decompose(layer, method, rank)
    for leaf in replacement.modules():
        if not list(leaf.children()):
            assert isinstance(leaf, PLAIN_LEAVES), type(leaf)
    skeleton = get_method(method).structure(spec, rank)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
        k: v.shape for k, v in replacement.state_dict().items()
    }
    skeleton.load_state_dict(replacement.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(x), replacement(x))


@pytest.mark.parametrize("method,case", list(_cases()))
def test_replacement_exports(method: str, case: str) -> None:
    layer, x = _supported(method, case)
    rank, _ = _small_rank(method, layer, x)
    replacement = ranksearch.decompose(layer, method, rank)
    exported = torch.export.export(replacement, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), replacement(x), atol=1e-6)


@pytest.mark.parametrize("method", ranksearch.methods())
def test_dtype_is_preserved(method: str) -> None:
    for case in LAYERS:
        make, _ = LAYERS[case]
        layer = make().to(torch.float64)
        x = _inputs(case)
        if x.is_floating_point():
            x = x.to(torch.float64)
        spec = spec_from_module("layer", layer, x.shape)
        if get_method(method).supports(spec):
            rank, _ = _small_rank(method, layer, x)
            replacement = ranksearch.decompose(layer, method, rank)
            assert all(p.dtype == torch.float64 for p in replacement.parameters())
            assert replacement(x).dtype == torch.float64
            return
    pytest.fail(f"{method} supports none of the test layers")


@pytest.mark.parametrize("method", ranksearch.methods())
def test_depthwise_conv_is_declined_with_a_reason(method: str) -> None:
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    spec = spec_from_module("dw", depthwise, (1, 8, 8, 8))
    m = get_method(method)
    reason = m.unsupported_reason(spec)
    assert reason
    with pytest.raises(ranksearch.UnsupportedLayerError, match="dw"):
        m.build(depthwise, 1, name="dw")


@pytest.mark.parametrize("method", ["svd", "channel", "spatial"])
def test_rank_sweep_factorizes_once(method: str) -> None:
    layer = nn.Linear(64, 48) if method == "svd" else nn.Conv2d(16, 24, 3)
    spec = spec_from_module("layer", layer)
    _low, high = get_method(method).rank_bounds(spec)
    factor_cache.clear()
    for rank in range(1, min(high, 20) + 1):
        ranksearch.decompose(layer, method, rank)
    assert factor_cache.misses == 1


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ranksearch.UnknownMethodError) as info:
        ranksearch.decompose(nn.Linear(4, 4), "nope", 2)
    for name in ranksearch.methods():
        assert name in str(info.value)


def test_rank_out_of_bounds_is_rejected() -> None:
    with pytest.raises(ranksearch.InvalidRankError, match="outside"):
        ranksearch.decompose(nn.Linear(8, 4), "svd", 5)
    with pytest.raises(ranksearch.InvalidRankError):
        ranksearch.decompose(nn.Linear(8, 4), "svd", 0)


def test_singular_values_are_split_evenly() -> None:
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.mul_(100.0)
    first, second = ranksearch.decompose(layer, "svd", 8)
    ratio = first.weight.detach().norm() / second.weight.detach().norm()
    assert math.isclose(float(ratio), 1.0, rel_tol=1e-3)
