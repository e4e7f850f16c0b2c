"""Rank heuristics that read a good rank off a layer's weights: empirical VBMF and energy thresholds.

Example:
    >>> import ranksearch
    >>> result = ranksearch.rank.evbmf(weight_matrix)
    >>> result.rank, result.sigma2
    >>> ranksearch.rank.energy_rank(result.singular_values, 0.9)
    >>> ranksearch.rank.suggest_rank(layer, spec, "tucker2", heuristic="vbmf", round_to=8)
"""

from __future__ import annotations

from .energy import check_tau, cumulative_energy, energy_rank
from .suggest import (
    HEURISTICS, Heuristic, RankSuggestion, check_round_to, check_weakening, default_method, round_rank,
    suggest, suggest_rank,
)
from .vbmf import EVBMFResult, evbmf, evbmf_from_singular_values

__all__ = [
    "EVBMFResult",
    "HEURISTICS",
    "Heuristic",
    "RankSuggestion",
    "check_round_to",
    "check_tau",
    "check_weakening",
    "cumulative_energy",
    "default_method",
    "energy_rank",
    "evbmf",
    "evbmf_from_singular_values",
    "round_rank",
    "suggest",
    "suggest_rank",
]
