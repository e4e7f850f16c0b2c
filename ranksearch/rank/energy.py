"""Energy thresholds: the smallest rank that keeps a fraction ``tau`` of a spectrum's energy.

The energy of a rank-``r`` truncation is the sum of its ``r`` largest squared singular values, so
keeping ``tau`` of the energy bounds the relative Frobenius error by ``sqrt(1 - tau)``. For Tucker
decompositions the squared singular values of a mode unfolding are the energies of the HOSVD
core's slices along that mode, so the same rule gives the Tucker core energy per mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..exceptions import InvalidHeuristicError, InvalidWeightsError

__all__ = ["energy_rank", "cumulative_energy", "check_tau"]

#: relative slack on the energy comparison, so that a fraction reached exactly is not lost to
#: floating-point rounding of the cumulative sum
_SLACK = 1e-12


def check_tau(tau: Any) -> float:
    """Return ``tau`` as a float, or raise if it is not a number in (0, 1].

    Raises:
        InvalidHeuristicError: naming the valid range.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)):
        raise InvalidHeuristicError(f"tau must be a number in (0, 1], got {tau!r}")
    value = float(tau)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise InvalidHeuristicError(
            f"tau must be in (0, 1] (the fraction of squared singular values to keep, e.g. 0.9), got {tau!r}"
        )
    return value


def cumulative_energy(singular_values: Any) -> np.ndarray:
    """Fraction of the total energy kept by ranks ``1..n``: ``cumsum(s^2) / sum(s^2)`` (descending).

    An all-zero spectrum gives all ones (rank 0 already keeps everything).

    Raises:
        InvalidHeuristicError: if the values are not 1-D or one is negative.
        InvalidWeightsError: if a value is NaN or infinite.
    """
    energies = _squared_descending(singular_values)
    cumulative = np.cumsum(energies)
    total = cumulative[-1] if cumulative.size else 0.0
    if total == 0.0:
        return np.ones_like(cumulative)
    return cumulative / total


def energy_rank(singular_values: Any, tau: float) -> int:
    """The smallest rank whose truncation keeps at least ``tau`` of the squared singular values.

    Args:
        singular_values: a 1-D array, sequence or tensor of singular values, in any order.
        tau: fraction of the energy to keep, in (0, 1]; ``1`` keeps everything but what is
            below floating-point rounding of the total.

    Returns:
        The rank, ``0`` for an all-zero (or empty) spectrum.

    Raises:
        InvalidHeuristicError: if ``tau`` is not in (0, 1], or the values are not 1-D or negative.
        InvalidWeightsError: if a value is NaN or infinite.

    Example:
        >>> energy_rank([2.0, 1.0, 1.0], 0.6)  # 4 / 6 of the energy in the first value
        1
    """
    tau = check_tau(tau)
    energies = _squared_descending(singular_values)
    cumulative = np.cumsum(energies)
    if cumulative.size == 0 or cumulative[-1] == 0.0:
        return 0
    total = cumulative[-1]
    # the first index where the kept energy reaches tau of the total
    index = int(np.searchsorted(cumulative, tau * total * (1.0 - _SLACK), side="left"))
    return min(index + 1, energies.size)


def _squared_descending(singular_values: Any) -> np.ndarray:
    if isinstance(singular_values, torch.Tensor):
        values = singular_values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        values = np.asarray(singular_values, dtype=np.float64)
    if values.ndim != 1:
        raise InvalidHeuristicError(f"singular values must be 1-D, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InvalidWeightsError("the singular values contain NaN or infinity; fix the weights first")
    if values.size and values.min() < 0:
        raise InvalidHeuristicError(f"singular values must be non-negative, got {values.min()}")
    return np.sort(values)[::-1] ** 2
