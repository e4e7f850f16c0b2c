"""Empirical variational Bayesian matrix factorization (EVBMF): a matrix's rank and noise variance.

Implemented from the analytic global solution of Nakajima, Sugiyama, Babacan & Tomioka, "Global
analytic solution of fully-observed variational Bayesian matrix factorization", JMLR 14 (2013),
with the noise-variance bounds of Nakajima et al., "Condition for perfect dimensionality recovery
by variational Bayesian PCA", JMLR 16 (2015).

Model: ``V = B A^T + E`` with ``V`` of shape ``(L, M)``, ``L <= M`` (a wide matrix is transposed),
Gaussian priors on the columns of ``A`` and ``B`` whose variances are estimated (the *empirical*
part) and i.i.d. Gaussian noise of variance ``sigma2``. With ``alpha = L / M`` and ``gamma_h`` the
singular values of ``V``, the EVB solution keeps component ``h`` iff

    gamma_h > sigma * sqrt(M * x_lower),   x_lower = (1 + tau_lower) * (1 + alpha / tau_lower),

where ``tau_lower`` is the positive zero of ``log(1 + t) + alpha * log(1 + t / alpha) - t``
(about ``2.5129 * sqrt(alpha)``), and shrinks it to

    gamma_h / 2 * (1 - (L + M) sigma2 / gamma_h^2
                   + sqrt((1 - (L + M) sigma2 / gamma_h^2)^2 - 4 L M sigma2^2 / gamma_h^4)).

``sigma2`` minimises the free energy, which up to constants is (per ``M``, with
``x_h = gamma_h^2 / (M sigma2)`` and ``tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``)

    F(sigma2) = sum_h gamma_h^2 / (M sigma2) + L log sigma2
                + sum_{h: x_h > x_lower} [log(tau(x_h) + 1) + alpha log(tau(x_h) / alpha + 1) - tau(x_h)],

over ``[sigma2_lower, sigma2_upper]``: ``sigma2_upper = ||V||_F^2 / (L M)`` (everything is noise) and
``sigma2_lower = max(gamma_{H+1}^2 / (M x_lower), sum_{h > H} gamma_h^2 / (M (L - H)))`` with
``H = ceil(L / (1 + alpha)) - 1``, the most components EVB can keep.

Why this is not the usual public script: ``F`` is written with ``||V||_F^2`` instead of
``sum log gamma_h`` (zero singular values are harmless), the matrix is normalised so that
``sigma2_upper = 1`` and ``F`` is minimised over ``log sigma2`` (the public scripts minimise over
``sigma2`` itself with scipy's default absolute tolerance ``1e-5``, which is coarser than the noise
variance of typical network weights and answers rank 0 or 1 on them), and the minimisation starts
from a grid over the whole interval (``F`` can have several local minima, one near "all noise";
a bounded Brent search alone can settle in the wrong one). The noise is also kept above the
input's rounding level (``eps``): rounding errors scale with each entry rather than being i.i.d.,
and an exactly low-rank float32 matrix would otherwise get spurious components.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from ..exceptions import InvalidHeuristicError, InvalidWeightsError

__all__ = ["EVBMFResult", "evbmf", "evbmf_from_singular_values"]

#: grid over log sigma2 before the local refinement: at least this many points, at most this step
_GRID_POINTS = 512
_GRID_STEP = 0.05
#: noise below this many machine epsilons of the RMS entry is the input's rounding, not a noise
#: level to fit: rounding errors are proportional to each entry, not i.i.d., and an exactly low-rank
#: float32 matrix would otherwise get a few spurious components
_ROUNDING_MARGIN = 8.0
_FLOAT64_EPS = float(np.finfo(np.float64).eps)
#: cap on grid x singular-value elements evaluated at once (memory)
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class EVBMFResult:
    """The EVBMF solution for one matrix.

    Attributes:
        rank: number of components EVB keeps (0: the matrix is indistinguishable from noise).
        sigma2: estimated noise variance per entry (0 for the zero matrix).
        threshold: singular values above this are kept (``sqrt(M * sigma2 * x_lower)``).
        singular_values: all ``min(L, M)`` singular values of the matrix, descending.
        estimates: the EVB (shrunk) estimates of the ``rank`` kept singular values.
        shape: the matrix's shape as given.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: tuple[float, ...] = field(repr=False)
    estimates: tuple[float, ...]
    shape: tuple[int, int]

    def __iter__(self):  # unpacks like ``rank, sigma2 = evbmf(x)``
        return iter((self.rank, self.sigma2))


def evbmf(matrix: Any, *, sigma2: float | None = None, eps: float | None = None) -> EVBMFResult:
    """Rank and noise variance of ``matrix`` by empirical VBMF (Nakajima et al., JMLR 2013).

    Args:
        matrix: a 2-D numpy array or torch tensor (any float dtype or device), tall or wide.
        sigma2: the noise variance if known; estimated from the matrix when ``None``.
        eps: relative precision of the entries (default: the machine epsilon of the matrix's
            dtype). The estimated noise is at least ``8 eps`` of the RMS entry, so rounding
            errors are not taken for a noise level.

    Returns:
        An :class:`EVBMFResult`; ``result.rank`` and ``result.sigma2`` are the main answers.

    Raises:
        InvalidHeuristicError: if ``matrix`` is not 2-D or is empty, or ``sigma2`` is negative.
        InvalidWeightsError: if ``matrix`` contains NaN or infinity.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 80)) + 0.1 * rng.normal(size=(60, 80))
        >>> evbmf(x).rank
        3
    """
    if eps is None:
        eps = _machine_eps(matrix)
    array = _as_array(matrix)
    if array.ndim != 2:
        raise InvalidHeuristicError(
            f"evbmf takes a 2-D matrix, got shape {tuple(array.shape)}; reshape (matricize) it first"
        )
    if array.size == 0:
        raise InvalidHeuristicError(f"evbmf got an empty matrix of shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidWeightsError("evbmf: the matrix contains NaN or infinity; fix the weights first")
    # torch's SVD: numpy's is far slower on small matrices when BLAS threads are oversubscribed
    singular_values = torch.linalg.svdvals(torch.from_numpy(array)).numpy()
    return evbmf_from_singular_values(singular_values, array.shape, sigma2=sigma2, eps=eps)


def evbmf_from_singular_values(
    singular_values: Any, shape: tuple[int, int], *, sigma2: float | None = None, eps: float = _FLOAT64_EPS
) -> EVBMFResult:
    """:func:`evbmf` for a matrix of ``shape`` given all its singular values (saves the SVD).

    Args:
        singular_values: all ``min(shape)`` singular values, in any order.
        shape: the matrix's ``(rows, columns)``.
        sigma2: the noise variance if known; estimated when ``None``.
        eps: relative precision of the matrix's entries (``torch.finfo(dtype).eps`` of the
            weights it came from; float64's by default), see :func:`evbmf`.

    Raises:
        InvalidHeuristicError: if the number of singular values is not ``min(shape)``, one is
            negative, or ``sigma2`` or ``eps`` is negative.
        InvalidWeightsError: if a singular value is NaN or infinite.
    """
    rows, cols = (int(d) for d in shape)
    values = np.sort(_as_array(singular_values).reshape(-1))[::-1]
    small, large = min(rows, cols), max(rows, cols)  # L <= M: a wide matrix is read transposed
    if small < 1:
        raise InvalidHeuristicError(f"evbmf got an empty matrix of shape {(rows, cols)}")
    if values.size != small:
        raise InvalidHeuristicError(
            f"a {rows}x{cols} matrix has {small} singular values, got {values.size}; pass all of them"
        )
    if not np.isfinite(values).all():
        raise InvalidWeightsError("evbmf: the singular values contain NaN or infinity; fix the weights first")
    if values[-1] < 0:
        raise InvalidHeuristicError("singular values must be non-negative")
    if sigma2 is not None and not (math.isfinite(sigma2) and sigma2 >= 0):
        raise InvalidHeuristicError(f"sigma2 must be a non-negative number, got {sigma2!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidHeuristicError(f"eps must be a non-negative number, got {eps!r}")

    spectrum = tuple(float(v) for v in values)
    total = float(np.sum(values**2))
    if total == 0.0:
        return EVBMFResult(0, 0.0, 0.0, spectrum, (), (rows, cols))

    # Normalise so that sigma2_upper = ||V||^2 / (L M) = 1: the search is then scale free.
    scale = total / (small * large)
    gamma2 = values**2 / scale
    alpha = small / large
    x_lower = _x_lower(alpha)
    if sigma2 is None:
        floor = max((_ROUNDING_MARGIN * eps) ** 2, _FLOAT64_EPS**2)
        noise = _estimate_sigma2(gamma2, small, large, x_lower, floor)
    else:
        noise = sigma2 / scale
    if noise == 0.0:  # a known noise-free matrix: every non-zero component is signal
        kept = values[values > 0]
        return EVBMFResult(int(kept.size), 0.0, 0.0, spectrum, tuple(float(v) for v in kept), (rows, cols))

    threshold2 = large * noise * x_lower
    kept_gamma2 = gamma2[gamma2 > threshold2]
    estimates = _shrink(kept_gamma2, noise, small, large) * math.sqrt(scale)
    return EVBMFResult(
        rank=int(kept_gamma2.size),
        sigma2=float(noise * scale),
        threshold=float(math.sqrt(threshold2 * scale)),
        singular_values=spectrum,
        estimates=tuple(float(e) for e in estimates),
        shape=(rows, cols),
    )


# --- the analytic solution -----------------------------------------------------------------------


def _machine_eps(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        return float(torch.finfo(value.dtype).eps)
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return _FLOAT64_EPS


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _tau_lower(alpha: float) -> float:
    """The positive zero of ``log(1 + t) + alpha log(1 + t / alpha) - t``.

    The function is 0 at 0, has slope 1 there and is concave, so it has exactly one positive zero;
    it is solved here rather than taken from the approximation ``2.5129 sqrt(alpha)``, which is
    exact only for ``alpha = 1``.
    """

    def crossing(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    # the zero lies above sqrt(alpha) (Nakajima et al.) and below 10 for alpha <= 1
    return float(brentq(crossing, math.sqrt(alpha), 10.0, xtol=1e-14, rtol=1e-14))


def _x_lower(alpha: float) -> float:
    tau = _tau_lower(alpha)
    return (1.0 + tau) * (1.0 + alpha / tau)


def _free_energy(log_sigma2: np.ndarray, gamma2: np.ndarray, small: int, large: int, x_lower: float) -> np.ndarray:
    """The EVB free energy (per ``M``, up to constants) at each ``log sigma2``; see the module docstring."""
    alpha = small / large
    total = float(gamma2.sum())
    out = np.empty(log_sigma2.shape, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // gamma2.size)
    for start in range(0, log_sigma2.size, step):
        t = log_sigma2[start:start + step]
        sigma2 = np.exp(t)
        x = gamma2[None, :] / (large * sigma2[:, None])
        above = x > x_lower
        d = np.where(above, x, x_lower) - (1.0 + alpha)
        tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))
        psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
        out[start:start + step] = total / (large * sigma2) + small * t + np.where(above, psi1, 0.0).sum(axis=1)
    return out


def _estimate_sigma2(gamma2: np.ndarray, small: int, large: int, x_lower: float, floor: float) -> float:
    """Minimise the free energy over ``[sigma2_lower, 1]`` (normalised units): grid, then Brent."""
    most_kept = math.ceil(small / (1.0 + small / large)) - 1
    tail = gamma2[most_kept:]
    lower = max(float(tail[0]) / (large * x_lower), float(tail.sum()) / (large * tail.size), floor)
    if lower >= 1.0:  # nothing can be kept (e.g. a single row): all noise
        return 1.0
    log_lower = math.log(lower)
    grid = np.linspace(log_lower, 0.0, max(_GRID_POINTS, math.ceil(-log_lower / _GRID_STEP) + 1))
    energies = _free_energy(grid, gamma2, small, large, x_lower)
    best = int(np.argmin(energies))
    # The dense grid finds the basin of the global minimum (a bounded Brent search over the whole
    # interval can stop in the "all noise" one); Brent then refines within a grid step.
    result = minimize_scalar(
        lambda t: float(_free_energy(np.array([t]), gamma2, small, large, x_lower)[0]),
        bounds=(grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]),
        method="bounded",
        options={"xatol": 1e-10},
    )
    log_sigma2 = float(result.x) if result.fun <= energies[best] else float(grid[best])
    return math.exp(log_sigma2)


def _shrink(gamma2: np.ndarray, sigma2: float, small: int, large: int) -> np.ndarray:
    """The EVB estimate of each kept singular value (normalised units)."""
    gamma = np.sqrt(gamma2)
    ratio = (small + large) * sigma2 / gamma2
    # gamma2 > M sigma2 x_lower >= (sqrt L + sqrt M)^2 sigma2 keeps the discriminant non-negative
    root = np.sqrt(np.maximum((1.0 - ratio) ** 2 - 4.0 * small * large * sigma2**2 / gamma2**2, 0.0))
    return gamma / 2.0 * (1.0 - ratio + root)
