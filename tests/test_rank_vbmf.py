"""Empirical VBMF: rank and noise variance on synthetic low-rank + noise matrices, edge cases, and
the VBMF rank each method's matricization gives."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.exceptions import InvalidHeuristicError, InvalidWeightsError
from ranksearch.layers import spec_from_module
from ranksearch.rank import evbmf, evbmf_from_singular_values, suggest, suggest_rank
from ranksearch.rank.vbmf import _free_energy, _x_lower

SHAPES = [(200, 300), (300, 200), (120, 120), (60, 200), (200, 50)]


def _low_rank_plus_noise(
    rows: int, cols: int, signal: list[float], sigma: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(signal) V^T + sigma * noise`` with orthonormal U, V; returns (matrix, noise-free part)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(signal)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=gen, dtype=torch.float64))
    clean = (u * torch.tensor(signal, dtype=torch.float64)) @ v.T
    return clean + sigma * torch.randn(rows, cols, generator=gen, dtype=torch.float64), clean


def _recoverable(rows: int, cols: int, weakest: float, sigma: float) -> bool:
    """Large-matrix theory: the weakest signal's observed singular value clears the EVB threshold.

    A signal singular value s above the noise edge is observed at sqrt((s^2 + M sigma^2)(s^2 + L sigma^2)) / s
    (Benaych-Georges & Nadakuditi 2012); EVB keeps what exceeds sigma sqrt(M x) with
    x = (1 + t)(1 + alpha / t), t ~ 2.5129 sqrt(alpha) (Nakajima et al. 2013) - computed here from
    the paper's approximation, independently of the implementation.
    """
    small, large = sorted((rows, cols))
    alpha = small / large
    t = 2.5129 * math.sqrt(alpha)
    threshold = sigma * math.sqrt(large * (1 + t) * (1 + alpha / t))
    observed = math.sqrt((weakest**2 + large * sigma**2) * (weakest**2 + small * sigma**2)) / weakest
    return observed > 1.1 * threshold


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", [1, 4, 10])
@pytest.mark.parametrize("snr", [1.5, 4.0])
@pytest.mark.parametrize("sigma", [1.0, 1e-3])
def test_recovers_rank_and_noise_variance(shape: tuple[int, int], rank: int, snr: float, sigma: float) -> None:
    rows, cols = shape
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))  # the largest pure-noise singular value
    signal = list(np.linspace(2 * snr, snr, rank) * edge)
    assert _recoverable(rows, cols, min(signal), sigma)  # the grid stays where theory says it should work
    matrix, _ = _low_rank_plus_noise(rows, cols, signal, sigma, seed=rows + 7 * rank + int(10 * snr))
    result = evbmf(matrix)
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.10)
    assert len(result.estimates) == rank and len(result.singular_values) == min(shape)
    # the EVB estimates shrink the observed values towards the signal's
    observed = result.singular_values[:rank]
    assert all(0 < e < o for e, o in zip(result.estimates, observed))
    assert all(result.threshold < o for o in observed)


@pytest.mark.parametrize("shape", SHAPES + [(20, 300), (300, 20)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_gives_rank_zero(shape: tuple[int, int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sigma = 0.05
    result = evbmf(sigma * torch.randn(*shape, generator=gen, dtype=torch.float64))
    assert result.rank == 0 and result.estimates == ()
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.10)


@pytest.mark.parametrize("scale", [1e-5, 1e-2, 1e4])
def test_scale_invariant_including_tiny_network_weights(scale: float) -> None:
    """Public EVBMF scripts search sigma2 with an absolute tolerance of 1e-5 and answer rank 0/1 on
    weights of typical magnitude; the answer must not depend on the matrix's scale."""
    matrix, _ = _low_rank_plus_noise(64, 144, [40.0, 30.0, 25.0, 20.0, 18.0, 15.0], 0.5, seed=3)
    reference = evbmf(matrix)
    scaled = evbmf(matrix * scale)
    assert reference.rank == scaled.rank == 6
    assert scaled.sigma2 == pytest.approx(reference.sigma2 * scale**2, rel=1e-6)
    assert scaled.threshold == pytest.approx(reference.threshold * scale, rel=1e-6)


def test_wide_and_tall_give_the_same_answer() -> None:
    matrix, _ = _low_rank_plus_noise(50, 200, [60.0, 45.0, 30.0], 1.0, seed=4)
    tall, wide = evbmf(matrix.T), evbmf(matrix)
    assert tall.rank == wide.rank == 3
    assert tall.sigma2 == pytest.approx(wide.sigma2, rel=1e-6)
    assert tall.shape == (200, 50) and wide.shape == (50, 200)


def test_finds_the_global_minimum_of_the_free_energy() -> None:
    """The free energy has several local minima (one near "all noise"); the answer is the lowest."""
    rows, cols = 30, 30
    matrix, _ = _low_rank_plus_noise(rows, cols, list(np.linspace(25, 12, 8)), 1.0, seed=2)
    result = evbmf(matrix)
    values = np.array(result.singular_values)
    scale = float((values**2).sum()) / (rows * cols)  # evbmf works on the matrix scaled to RMS 1
    gamma2 = values**2 / scale
    x_lower = _x_lower(rows / cols)
    grid = np.linspace(math.log(1e-6), 0.0, 20_000)
    energies = _free_energy(grid, gamma2, rows, cols, x_lower)
    local_minima = np.flatnonzero((energies[1:-1] < energies[:-2]) & (energies[1:-1] < energies[2:]))
    assert local_minima.size >= 2  # the case is one where a local search can go wrong
    at_answer = _free_energy(np.array([math.log(result.sigma2 / scale)]), gamma2, rows, cols, x_lower)[0]
    assert at_answer <= energies.min() + 1e-9


def test_known_sigma2_is_used() -> None:
    matrix, _ = _low_rank_plus_noise(80, 120, [50.0, 40.0, 35.0, 30.0], 1.0, seed=6)
    assert evbmf(matrix, sigma2=1.0).rank == 4
    assert evbmf(matrix, sigma2=1.0).sigma2 == pytest.approx(1.0, rel=1e-12)
    assert evbmf(matrix, sigma2=100.0).rank == 0  # all of it is within a noise that large


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero would warn
        return fn(*args)


def test_zero_matrix() -> None:
    result = _no_warnings(evbmf, np.zeros((30, 50)))
    assert (result.rank, result.sigma2, result.estimates) == (0, 0.0, ())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exactly_low_rank_matrix_has_zero_singular_values(dtype: torch.dtype) -> None:
    """37 (numerically) zero singular values; in float32 the rounding errors must not count as signal."""
    gen = torch.Generator().manual_seed(7)
    matrix = torch.randn(40, 3, generator=gen, dtype=dtype) @ torch.randn(3, 70, generator=gen, dtype=dtype)
    result = _no_warnings(evbmf, matrix)
    assert result.rank == 3
    assert result.sigma2 < 1e-8 * float(matrix.double().square().mean())
    # the same float32 values in a float64 array claim float64 precision: eps says otherwise
    assert evbmf(matrix.double(), eps=float(torch.finfo(dtype).eps)).rank == 3


def test_rank_deficient_noisy_matrix_with_zero_rows() -> None:
    matrix, _ = _low_rank_plus_noise(40, 90, [50.0, 40.0, 30.0], 1.0, seed=8)
    padded = torch.cat([matrix, torch.zeros(20, 90, dtype=matrix.dtype)])  # 20 zero singular values
    result = _no_warnings(evbmf, padded)
    assert result.singular_values[-1] == pytest.approx(0.0, abs=1e-9)
    assert result.rank >= 3 and result.estimates[:3] == pytest.approx([50.0, 40.0, 30.0], rel=0.1)
    # noise covers 2/3 of the entries: EVB's one noise variance is their average
    assert result.sigma2 == pytest.approx(2 / 3, rel=0.10)


@pytest.mark.parametrize("shape", [(1, 10), (10, 1), (1, 1), (2, 2)])
def test_tiny_matrices(shape: tuple[int, int]) -> None:
    result = _no_warnings(evbmf, np.arange(1, 1 + math.prod(shape), dtype=float).reshape(shape))
    assert result.rank == 0  # too small for EVB to tell signal from noise
    assert result.shape == shape


def test_numpy_and_torch_inputs_agree() -> None:
    matrix, _ = _low_rank_plus_noise(30, 45, [30.0, 20.0], 0.5, seed=9)
    from_torch = evbmf(matrix.float().requires_grad_())
    from_numpy = evbmf(matrix.float().numpy())
    assert from_torch.rank == from_numpy.rank == 2
    assert from_torch.sigma2 == pytest.approx(from_numpy.sigma2, rel=1e-6)
    rank, sigma2 = from_numpy  # unpacks like a tuple
    assert (rank, sigma2) == (from_numpy.rank, from_numpy.sigma2)


def test_from_singular_values_matches() -> None:
    matrix, _ = _low_rank_plus_noise(30, 45, [30.0, 20.0], 0.5, seed=10)
    values = torch.linalg.svdvals(matrix)
    assert evbmf_from_singular_values(values.flip(0), (30, 45)) == evbmf(matrix)


def test_x_lower_matches_the_paper() -> None:
    assert _x_lower(1.0) == pytest.approx((1 + 2.5129) * (1 + 1 / 2.5129), rel=1e-4)


def test_invalid_inputs() -> None:
    with pytest.raises(InvalidHeuristicError, match="2-D"):
        evbmf(np.zeros((2, 3, 4)))
    with pytest.raises(InvalidHeuristicError, match="empty"):
        evbmf(np.zeros((0, 3)))
    with pytest.raises(InvalidWeightsError, match="NaN"):
        evbmf(np.array([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(InvalidHeuristicError, match="sigma2"):
        evbmf(np.eye(3), sigma2=-1.0)
    with pytest.raises(InvalidHeuristicError, match="3 singular values"):
        evbmf_from_singular_values([1.0, 2.0], (3, 5))


# --- VBMF per method ------------------------------------------------------------------------------


def _noisy(matrix: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return matrix + sigma * torch.randn(matrix.shape, generator=gen, dtype=matrix.dtype)


def test_svd_linear_layer() -> None:
    gen = torch.Generator().manual_seed(11)
    layer = nn.Linear(96, 64)
    signal, _ = _low_rank_plus_noise(64, 96, [8.0, 6.0, 5.0, 4.0, 3.5], 0.02, seed=11)
    with torch.no_grad():
        layer.weight.copy_(signal)
    spec = spec_from_module("fc", layer, (8, 96))
    suggestion = suggest(layer, spec, "svd")
    assert (suggestion.rank, suggestion.heuristic_rank, suggestion.rule) == (5, 5, "matricization")
    # the weakened VBMF keeps half of the 64 - 5 discarded components (rounded up)
    assert suggest_rank(layer, spec, "svd", weakening=0.5) == 5 + math.ceil(0.5 * 59)
    assert suggest_rank(layer, spec, "svd", round_to=8) == 8
    # pure noise: VBMF keeps nothing, so the layer is kept
    with torch.no_grad():
        layer.weight.copy_(0.02 * torch.randn(64, 96, generator=gen))
    noise = suggest(layer, spec, "svd")
    assert noise.rank is None and "noise" in noise.reason


def test_channel_conv_and_groups_take_the_largest_rank() -> None:
    layer = nn.Conv2d(16, 48, 3, padding=1, groups=2)
    blocks = [
        _low_rank_plus_noise(24, 72, [6.0, 5.0, 4.0], 0.02, seed=12)[0],  # group 0: rank 3
        _low_rank_plus_noise(24, 72, [6.0, 5.0, 4.0, 3.5, 3.0, 2.5], 0.02, seed=13)[0],  # group 1: rank 6
    ]
    with torch.no_grad():
        layer.weight.copy_(torch.cat(blocks).reshape(layer.weight.shape))
    spec = spec_from_module("conv", layer, (2, 16, 10, 10))
    assert suggest_rank(layer, spec, "channel") == 6


def test_spatial_reads_its_own_matricization() -> None:
    layer = nn.Conv2d(16, 24, 3, padding=1)
    # rank 4 in the (C kh, N kw) rearrangement the spatial method truncates
    matrix, _ = _low_rank_plus_noise(16 * 3, 24 * 3, [6.0, 5.0, 4.0, 3.0], 0.01, seed=14)
    with torch.no_grad():
        layer.weight.copy_(matrix.reshape(16, 3, 24, 3).permute(2, 0, 1, 3))
    spec = spec_from_module("conv", layer, (2, 16, 12, 12))
    assert suggest_rank(layer, spec, "spatial") == 4


@pytest.mark.skipif("tucker2" not in ranksearch.methods(), reason="tucker2 is not registered")
def test_tucker2_vbmf_on_the_mode_unfoldings() -> None:
    """Kim et al.: VBMF on the input- and output-channel unfoldings gives (r_in, r_out)."""
    gen = torch.Generator().manual_seed(15)
    n, c, k, r_out, r_in = 64, 48, 3, 6, 4
    core = torch.randn(r_out, r_in, k, k, generator=gen, dtype=torch.float64)
    u_out, _ = torch.linalg.qr(torch.randn(n, r_out, generator=gen, dtype=torch.float64))
    u_in, _ = torch.linalg.qr(torch.randn(c, r_in, generator=gen, dtype=torch.float64))
    kernel = torch.einsum("oikl,no,ci->nckl", core, u_out, u_in)
    kernel = kernel / kernel.norm() * 10
    layer = nn.Conv2d(c, n, k, padding=1)
    with torch.no_grad():
        layer.weight.copy_(_noisy(kernel, 0.005, gen))
    spec = spec_from_module("conv", layer, (2, c, 12, 12))
    assert suggest_rank(layer, spec, "tucker2") == (r_in, r_out)
