"""Per-method rank suggestions from a layer's weights: VBMF or an energy threshold, then rounding.

How each method's rank is read off the weights:

* **Methods with a matricization** (``method.rank_matrices`` returns one matrix per rank component:
  ``svd``, ``channel``, ``spatial``, ``tucker2``, ``tt``, ...): each component's rank is the
  heuristic's rank of its matrix; for grouped convs (a leading groups dim) the largest over the
  groups. For ``tucker2`` these are the mode-1 and mode-0 unfoldings (Kim et al., ICLR 2016); the
  energy of an unfolding is the Tucker core energy along that mode.
* **Methods without one** (``rank_matrices`` returns ``[]``: ``cp``, ``btd``, ...): the rank at
  which the method costs what the heuristic's rank of the layer's *reference* method costs
  (:func:`default_method`: ``tucker2`` or ``channel`` for k x k convs, ``svd`` otherwise), found
  with ``method.rank_for_cost_fraction``. A CP rank is at least the largest mode rank, but that
  lower bound is far too small for useful accuracy, so matching the cost of the VBMF Tucker-2 ranks
  is the rule used instead. Multi-integer ranks found this way (``btd``'s ``(B, r1, r2)``) are not
  rounded: their components are not all channel counts.

Weakened VBMF (MUSCO, Gusak et al., ICCVW 2019) keeps a fraction ``weakening`` of what VBMF
discards: ``r = r_vbmf + weakening * (full - r_vbmf)``, rounded up, ``full`` being the full rank
of the matricization.

A layer is kept (the suggestion's ``rank`` is ``None``, with a ``reason``) when the method does not
apply to it, when the heuristic finds nothing to keep (VBMF rank 0: the weights look like noise),
or when the rank is at or over the break-even rank (the replacement would not be cheaper).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..decompose import get_method, methods
from ..decompose.base import DecompositionMethod, LayerCost, Rank, factor_cache
from ..exceptions import InvalidHeuristicError, InvalidWeightsError
from ..layers import LayerSpec
from .energy import check_tau, energy_rank
from .vbmf import evbmf_from_singular_values

__all__ = [
    "HEURISTICS",
    "Heuristic",
    "RankSuggestion",
    "check_round_to",
    "check_weakening",
    "default_method",
    "round_rank",
    "suggest",
    "suggest_rank",
]

logger = logging.getLogger("ranksearch.rank")

Heuristic = Literal["vbmf", "energy"]
HEURISTICS: tuple[str, ...] = ("vbmf", "energy")

#: one matricization's spectrum per group: (singular values, matrix shape)
_Spectrum = list[tuple[np.ndarray, tuple[int, int]]]


@dataclass(frozen=True)
class RankSuggestion:
    """A heuristic's answer for one layer and method.

    Attributes:
        method: the method name.
        rank: the suggested rank (int or tuple), ``None`` to keep the layer.
        heuristic_rank: the heuristic's own rank per matricization before weakening, clamping and
            rounding (``None`` when it was not computed, e.g. for an unsupported layer).
        rule: how the rank was found: ``"matricization"``, ``"cost-match:<reference method>"``
            (see the module docstring), or ``"unsupported"`` when the method does not apply.
        reason: why the layer is kept (``None`` when a rank is suggested).
    """

    method: str
    rank: Rank | None
    heuristic_rank: Rank | None = None
    rule: str = "matricization"
    reason: str | None = None

    @property
    def is_kept(self) -> bool:
        return self.rank is None


def default_method(spec: LayerSpec) -> str | None:
    """The method seeds use for ``spec`` when none is given, or ``None`` if no candidate applies.

    Linear, embedding and 1x1 convs: ``svd``. k x k conv2d: ``tucker2`` (Kim et al. 2016), or
    ``channel`` where ``tucker2`` is not registered or does not apply. k x k conv1d: ``channel``.
    Only registered methods that support ``spec`` are returned.
    """
    if spec.kind in ("linear", "embedding") or (spec.is_conv and math.prod(spec.kernel_size) == 1):
        candidates: tuple[str, ...] = ("svd",)
    elif spec.kind == "conv2d":
        candidates = ("tucker2", "channel")
    else:
        candidates = ("channel",)
    registered = methods()
    for name in candidates:
        if name in registered and get_method(name).supports(spec):
            return name
    return None


def round_rank(rank: int, multiple: int = 1, upper: int | None = None) -> int | None:
    """Round ``rank`` up to a multiple of ``multiple``, never reaching ``upper``.

    Args:
        rank: a rank, at least 1.
        multiple: round up to a multiple of this (e.g. 8, which hardware runs faster).
        upper: the layer's break-even rank (``method.break_even_rank(spec)``). A rank at or over it
            gives ``None``: the replacement would cost as much as the layer, which is kept instead.
            When rounding up would reach it, the rank is returned unrounded.

    Returns:
        The rounded rank, or ``None`` to keep the layer.

    Raises:
        InvalidHeuristicError: if ``rank`` or ``multiple`` is below 1.

    Example:
        >>> round_rank(13, 8, upper=20), round_rank(13, 8, upper=15), round_rank(15, 8, upper=15)
        (16, 13, None)
    """
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise InvalidHeuristicError(f"rank must be an int of at least 1, got {rank!r}")
    check_round_to(multiple)
    rank = int(rank)
    if upper is not None and rank >= upper:
        return None
    rounded = math.ceil(rank / multiple) * multiple
    if upper is not None and rounded >= upper:
        return rank
    return rounded


def check_round_to(multiple: int) -> int:
    """Return ``multiple`` if it is an int of at least 1 (a rounding multiple), else raise."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InvalidHeuristicError(f"round_to must be an int of at least 1 (e.g. 8), got {multiple!r}")
    return multiple


def check_weakening(weakening: float) -> float:
    """Return ``weakening`` as a float, or raise if it is not a number in [0, 1]."""
    if isinstance(weakening, bool) or not isinstance(weakening, (int, float, np.floating, np.integer)) or not (
        0.0 <= float(weakening) <= 1.0
    ):
        raise InvalidHeuristicError(
            f"weakening must be a number in [0, 1] (the fraction of discarded components to keep), got {weakening!r}"
        )
    return float(weakening)


def suggest_rank(
    layer: nn.Module,
    spec: LayerSpec,
    method: str | DecompositionMethod,
    *,
    heuristic: Heuristic = "vbmf",
    tau: float | None = None,
    weakening: float = 0.0,
    round_to: int = 1,
) -> Rank | None:
    """The rank a heuristic suggests for ``layer`` under ``method``, or ``None`` to keep the layer.

    Same arguments as :func:`suggest`, which also says why a layer is kept.

    Example:
        >>> torch.manual_seed(0)
        >>> layer = torch.nn.Linear(64, 32)  # freshly initialised: its weights are pure noise
        >>> spec = ranksearch.layers.spec_from_module("fc", layer, (1, 64))
        >>> suggest_rank(layer, spec, "svd") is None  # VBMF: nothing above the noise, keep it
        True
        >>> suggest_rank(layer, spec, "svd", heuristic="energy", tau=0.5, round_to=8)
        8
    """
    return suggest(
        layer, spec, method, heuristic=heuristic, tau=tau, weakening=weakening, round_to=round_to
    ).rank


def suggest(
    layer: nn.Module,
    spec: LayerSpec,
    method: str | DecompositionMethod,
    *,
    heuristic: Heuristic = "vbmf",
    tau: float | None = None,
    weakening: float = 0.0,
    round_to: int = 1,
) -> RankSuggestion:
    """The rank a heuristic suggests for ``layer`` under ``method``, with how it was found.

    Args:
        layer: the layer (its weights are read, not modified).
        spec: its :class:`~ranksearch.layers.LayerSpec` (with the input shape, so that the
            break-even rank is measured in FLOPs; parameters otherwise).
        method: a registered method name or object.
        heuristic: ``"vbmf"`` (empirical VBMF) or ``"energy"`` (keep ``tau`` of the energy).
        tau: the energy fraction in (0, 1]; required for, and only for, ``heuristic="energy"``.
        weakening: fraction in [0, 1] of the components VBMF discards to keep anyway (MUSCO);
            0 is plain VBMF. Applies to both heuristics.
        round_to: round ranks up to a multiple of this, never to or past break-even.

    Returns:
        A :class:`RankSuggestion`; its ``rank`` is ``None`` when the layer should be kept.

    Raises:
        InvalidHeuristicError: for an unknown heuristic or an invalid ``tau``, ``weakening`` or
            ``round_to``.
        UnknownMethodError: for a method name that is not registered.
        InvalidWeightsError: if the layer's weights contain NaN or infinity.
    """
    method = get_method(method)
    tau = _check_options(heuristic, tau, weakening, round_to)
    return _suggest(layer, spec, method, heuristic, tau, weakening, round_to, allow_cost_match=True)


# --- internals -----------------------------------------------------------------------------------


def _check_options(heuristic: str, tau: float | None, weakening: float, round_to: int) -> float | None:
    if heuristic not in HEURISTICS:
        raise InvalidHeuristicError(f"unknown heuristic {heuristic!r}; valid: {', '.join(HEURISTICS)}")
    if heuristic == "energy":
        if tau is None:
            raise InvalidHeuristicError("heuristic='energy' needs tau, the energy fraction to keep (e.g. 0.9)")
        tau = check_tau(tau)
    elif tau is not None:
        raise InvalidHeuristicError(f"tau applies to heuristic='energy' only, not {heuristic!r}")
    check_weakening(weakening)
    check_round_to(round_to)
    return tau


def _label(heuristic: str, tau: float | None, weakening: float) -> str:
    label = "VBMF" if heuristic == "vbmf" else f"energy {tau:g}"
    return f"{label} weakened {weakening:g}" if weakening else label


def _spectra(layer: nn.Module, spec: LayerSpec, method: DecompositionMethod) -> list[_Spectrum]:
    """Singular values of each of the method's matrices, per group (cached per weight contents, see ``decompose.cache``)."""

    def compute() -> list[_Spectrum]:
        if not torch.isfinite(layer.weight).all():
            raise InvalidWeightsError(
                f"layer {spec.name!r} has NaN or infinite weights; fix or retrain the model before compressing it"
            )
        spectra = []
        for matrix in method.rank_matrices(layer, spec):
            batch = matrix.detach().to(device="cpu", dtype=torch.float64)
            if batch.ndim == 2:
                batch = batch.unsqueeze(0)
            values = torch.linalg.svdvals(batch).numpy()  # (groups, min(m, n))
            shape = (int(batch.shape[-2]), int(batch.shape[-1]))
            spectra.append([(values[g], shape) for g in range(values.shape[0])])
        return spectra

    return factor_cache.get(layer.weight, ("rank-spectra", method.name, spec.kind, spec.groups), compute)


def _heuristic_rank(spectrum: _Spectrum, heuristic: str, tau: float | None, eps: float) -> tuple[int, int]:
    """The heuristic's rank (largest over groups) and the full rank of the matricization."""
    ranks = []
    for values, shape in spectrum:
        if heuristic == "vbmf":
            ranks.append(evbmf_from_singular_values(values, shape, eps=eps).rank)
        else:
            ranks.append(energy_rank(values, tau))  # type: ignore[arg-type]
    return max(ranks), max(min(shape) for _, shape in spectrum)


def _weaken(rank: int, full: int, weakening: float) -> int:
    if not weakening:
        return rank
    # the small slack keeps an exact product (0.5 * 10) from rounding up past itself
    return min(full, math.ceil(rank + weakening * (full - rank) - 1e-9))


def _cost_value(spec: LayerSpec, cost: LayerCost) -> int:
    """FLOPs when the input shape is known and the layer has any, parameters otherwise
    (the convention of ``DecompositionMethod.rank_for_cost_fraction``)."""
    return cost.flops if spec.input_shape is not None and spec.flops > 0 else cost.params


def _original_cost(spec: LayerSpec) -> int:
    return spec.flops if spec.input_shape is not None and spec.flops > 0 else spec.params


def _as_tuple(rank: Rank) -> tuple[int, ...]:
    return rank if isinstance(rank, tuple) else (int(rank),)


def _suggest(
    layer: nn.Module,
    spec: LayerSpec,
    method: DecompositionMethod,
    heuristic: str,
    tau: float | None,
    weakening: float,
    round_to: int,
    *,
    allow_cost_match: bool,
) -> RankSuggestion:
    reason = method.unsupported_reason(spec)
    if reason is not None:
        return RankSuggestion(method.name, None, rule="unsupported", reason=reason)
    spectra = _spectra(layer, spec, method)
    label = _label(heuristic, tau, weakening)
    if not spectra and allow_cost_match:
        return _cost_matched(layer, spec, method, heuristic, tau, weakening, round_to)
    if len(spectra) != method.rank_arity:
        return RankSuggestion(
            method.name, None,
            reason=f"{method.name} exposes {len(spectra)} matrices for a rank of {method.rank_arity} "
                   f"integer(s), so {label} cannot suggest its rank",
        )
    low, high = method.rank_bounds(spec)
    lows, highs = _as_tuple(low), _as_tuple(high)
    dtype = layer.weight.dtype
    # the weights' own precision, not the float64 of the matrices: see evbmf's ``eps``
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(np.finfo(np.float64).eps)
    raw, components = [], []
    for i, spectrum in enumerate(spectra):
        rank, full = _heuristic_rank(spectrum, heuristic, tau, eps)
        raw.append(rank)
        if rank == 0:
            what = "finds no component above the noise" if heuristic == "vbmf" else "finds all-zero weights"
            which = f" (rank component {i})" if len(spectra) > 1 else ""
            return RankSuggestion(method.name, None, _pack(raw, method), reason=f"{label} {what}{which}")
        components.append(min(max(_weaken(rank, full, weakening), lows[i]), highs[i]))
    return _finish(method, spec, _pack(components, method), round_to, _pack(raw, method), "matricization", True)


def _pack(components: Sequence[int], method: DecompositionMethod) -> Rank:
    return int(components[0]) if method.rank_arity == 1 and len(components) == 1 else tuple(components)


def _cost_matched(
    layer: nn.Module,
    spec: LayerSpec,
    method: DecompositionMethod,
    heuristic: str,
    tau: float | None,
    weakening: float,
    round_to: int,
) -> RankSuggestion:
    """For a method without a matricization: the rank that costs what the reference's suggestion costs."""
    reference_name = default_method(spec)
    if reference_name is None or reference_name == method.name:
        return RankSuggestion(
            method.name, None, rule="cost-match",
            reason=f"{method.name} has no matricization and no reference method applies to this layer",
        )
    reference = get_method(reference_name)
    rule = f"cost-match:{reference_name}"
    ref = _suggest(layer, spec, reference, heuristic, tau, weakening, 1, allow_cost_match=False)
    if ref.rank is None:
        return RankSuggestion(method.name, None, ref.heuristic_rank, rule, reason=f"{reference_name}: {ref.reason}")
    fraction = _cost_value(spec, reference.cost(spec, ref.rank)) / _original_cost(spec)
    rank = method.rank_for_cost_fraction(spec, fraction)
    if rank is None:
        return RankSuggestion(
            method.name, None, ref.heuristic_rank, rule,
            reason=f"even the smallest {method.name} rank costs more than {reference_name} at rank {ref.rank} "
                   f"({fraction:.0%} of the layer)",
        )
    logger.debug("%s on %s: %s rank %s -> cost fraction %.3f -> rank %s",
                 method.name, spec.name, reference_name, ref.rank, fraction, rank)
    return _finish(method, spec, rank, round_to, ref.heuristic_rank, rule, not isinstance(rank, tuple))


def _finish(
    method: DecompositionMethod,
    spec: LayerSpec,
    rank: Rank,
    round_to: int,
    heuristic_rank: Rank | None,
    rule: str,
    round_components: bool,
) -> RankSuggestion:
    """Round to ``round_to`` below break-even, or keep the layer if the rank is at/over it."""
    if not isinstance(rank, tuple):
        upper = method.break_even_rank(spec)
        if upper is None:
            return RankSuggestion(method.name, None, heuristic_rank, rule,
                                  reason=f"even the smallest {method.name} rank costs more than the layer")
        rounded = round_rank(rank, round_to, upper)
        if rounded is None:
            return RankSuggestion(
                method.name, None, heuristic_rank, rule,
                reason=f"rank {rank} is at or over the break-even rank {upper}: no cheaper than the layer",
            )
        return RankSuggestion(method.name, rounded, heuristic_rank, rule)
    # Several integers: break-even is where the replacement costs what the layer does.
    original = _original_cost(spec)
    candidates = [rank]
    if round_components and round_to > 1:
        _low, high = method.rank_bounds(spec)
        rounded_tuple = tuple(min(math.ceil(r / round_to) * round_to, h) for r, h in zip(rank, _as_tuple(high)))
        candidates.insert(0, rounded_tuple)
    for candidate in candidates:
        if _cost_value(spec, method.cost(spec, candidate)) < original:
            return RankSuggestion(method.name, candidate, heuristic_rank, rule)
    return RankSuggestion(
        method.name, None, heuristic_rank, rule,
        reason=f"rank {rank} costs at least as much as the layer (at or over break-even)",
    )
