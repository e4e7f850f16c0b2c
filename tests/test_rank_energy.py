"""Energy thresholds: exact ranks on constructed spectra, validation, and the rank per method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ranksearch.exceptions import InvalidHeuristicError, InvalidWeightsError
from ranksearch.layers import spec_from_module
from ranksearch.rank import cumulative_energy, energy_rank, suggest, suggest_rank

# squared values 4, 3, 2, 1: ranks 1..4 keep 0.4, 0.7, 0.9, 1.0 of the energy
SPECTRUM = [2.0, math.sqrt(3.0), math.sqrt(2.0), 1.0]


@pytest.mark.parametrize(
    "tau,rank",
    [(0.1, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.9, 3), (0.9001, 4), (1.0, 4)],
)
def test_exact_rank_on_a_constructed_spectrum(tau: float, rank: int) -> None:
    assert energy_rank(SPECTRUM, tau) == rank
    assert energy_rank(SPECTRUM[::-1], tau) == rank  # order does not matter
    assert energy_rank(torch.tensor(SPECTRUM, dtype=torch.float64), tau) == rank


@pytest.mark.parametrize("n", [1, 3, 10, 64])
@pytest.mark.parametrize("tau", [0.1, 0.3, 0.5, 0.7, 0.95, 1.0])
def test_flat_spectrum_needs_ceil_tau_n(n: int, tau: float) -> None:
    """n equal values: rank k keeps k/n, so the rank is ceil(tau n) - also when tau n is an exact
    integer that floating-point sums reach only up to rounding (0.3 * 10)."""
    expected = math.ceil(round(tau * n, 9))
    assert energy_rank(np.full(n, 0.7), tau) == expected


def test_zeros() -> None:
    assert energy_rank([0.0, 0.0, 0.0], 0.9) == 0
    assert energy_rank([], 0.9) == 0
    assert energy_rank([3.0, 0.0, 0.0], 1.0) == 1
    assert cumulative_energy([0.0, 0.0]).tolist() == [1.0, 1.0]


def test_cumulative_energy() -> None:
    assert cumulative_energy(SPECTRUM) == pytest.approx([0.4, 0.7, 0.9, 1.0])


@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=30), st.floats(0.01, 1.0))
@settings(max_examples=200, deadline=None)
def test_rank_is_the_smallest_that_keeps_tau(values: list[float], tau: float) -> None:
    rank = energy_rank(values, tau)
    energies = np.sort(np.asarray(values))[::-1] ** 2
    total = energies.sum()
    if total == 0:
        assert rank == 0
        return
    assert energies[:rank].sum() >= tau * total * (1 - 1e-9)
    assert energies[: rank - 1].sum() < tau * total * (1 + 1e-9)


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_invalid_tau(tau: object) -> None:
    with pytest.raises(InvalidHeuristicError, match=r"tau must be"):
        energy_rank(SPECTRUM, tau)  # type: ignore[arg-type]


def test_invalid_values() -> None:
    with pytest.raises(InvalidHeuristicError, match="non-negative"):
        energy_rank([1.0, -0.5], 0.9)
    with pytest.raises(InvalidHeuristicError, match="1-D"):
        energy_rank(np.ones((2, 2)), 0.9)
    with pytest.raises(InvalidWeightsError, match="NaN"):
        energy_rank([1.0, float("nan")], 0.9)


# --- energy per method ----------------------------------------------------------------------------


def _with_spectrum(rows: int, cols: int, values: list[float], seed: int) -> torch.Tensor:
    """A (rows, cols) matrix with exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def test_svd_energy_rank_on_the_weight() -> None:
    layer = nn.Linear(80, 60)
    values = [float(v) for v in np.geomspace(10, 0.01, 60)]
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum(60, 80, values, seed=0))
    spec = spec_from_module("fc", layer, (4, 80))
    for tau in (0.8, 0.9, 0.99):
        assert suggest_rank(layer, spec, "svd", heuristic="energy", tau=tau) == energy_rank(values, tau)


def test_channel_energy_rank_on_the_reshaped_kernel_and_rounding() -> None:
    layer = nn.Conv2d(8, 32, 3, padding=1)
    values = [float(v) for v in np.geomspace(5, 0.05, 32)]  # (32, 72) matrix: 32 values
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum(32, 72, values, seed=1).reshape(32, 8, 3, 3))
    spec = spec_from_module("conv", layer, (1, 8, 16, 16))
    expected = energy_rank(values, 0.9)
    suggestion = suggest(layer, spec, "channel", heuristic="energy", tau=0.9, round_to=4)
    assert suggestion.heuristic_rank == expected
    assert suggestion.rank == 4 * math.ceil(expected / 4)


def test_energy_needs_tau_and_vbmf_refuses_it() -> None:
    layer = nn.Linear(8, 8)
    spec = spec_from_module("fc", layer, (1, 8))
    with pytest.raises(InvalidHeuristicError, match="needs tau"):
        suggest(layer, spec, "svd", heuristic="energy")
    with pytest.raises(InvalidHeuristicError, match="energy"):
        suggest(layer, spec, "svd", tau=0.9)
    with pytest.raises(InvalidHeuristicError, match="unknown heuristic"):
        suggest(layer, spec, "svd", heuristic="bic")  # type: ignore[arg-type]
