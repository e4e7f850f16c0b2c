"""The first trials of a search: heuristic seed plans, and the same ideas fitted to the budget.

A short search should already start from the best one-shot answers. Two kinds of warm start:

* **heuristic seeds** - the VBMF plan, optionally weakened VBMF, and the energy-threshold plans
  (``ranksearch.rank``), exactly as the heuristics give them;
* **budget-fitted seeds** - a one-dimensional knob tuned so that the plan just meets the budget
  (``ranksearch.fitting``: bisection on predicted, then on measured latency): the energy threshold ``tau`` (ranks where the spectrum says), and, per method family,
  one cost fraction shared by every layer (the "uniform ratio" plan). These are the plans a careful
  user would build by hand; the search starts from them and improves on them. Where the knob's
  plans score in no order near the budget, the best-scoring of a few cheaper ones joins them
  (``ranksearch.fitting.best_cheaper_plan``).

A choice is ``layer name -> (method, rank)``; layers not in it are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .fitting import Choices, Fit, choices_key
from .rank import default_method, suggest_rank
from .space import LayerCandidates, SearchSpace

__all__ = ["Seed", "heuristic_seeds", "vbmf_choices", "fitted_seeds", "SEED_ENERGY_TAUS", "ENERGY_FIT_SEED", "FASTEST_SEED", "Shortlist",
           "Scan", "SCAN_SUFFIX", "is_uniform_fit"]

log = logging.getLogger("ranksearch.warmstart")

#: energy thresholds of the heuristic seeds (besides VBMF)
SEED_ENERGY_TAUS = (0.80, 0.90, 0.95, 0.99)
#: the range the budget-fitted energy threshold is searched in (tight budgets need low thresholds)
ENERGY_FIT_RANGE = (0.15, 0.999)
#: the origin of the seed whose energy threshold is fitted to the budget
ENERGY_FIT_SEED = "seed:energy-fit"
#: the origin of the seed that is the fastest plan of the space, queued when the latency target is at
#: the space's floor (see ``ranksearch.search._check_latency_reachable``)
FASTEST_SEED = "seed:fastest"
#: the origins of the seeds whose cost fraction, shared by every layer, is fitted to the budget
_UNIFORM_FIT_SEED = "seed:uniform-{family}-fit"
#: appended to a fitted seed's origin for the cheaper plan of the same knob that scored above it
SCAN_SUFFIX = "-scan"

#: ``shortlist(plans, cheap, dear)``: the uniform families (``plans``: family -> cost fraction -> plan)
#: in the order to fit them on measurement, most promising first; those left out are not fitted
Shortlist = Callable[[Mapping[str, Callable[[float], Choices]], float, float], list[str]]

#: ``scan(make, knob, cheap)``: the best-scoring plan of ``make`` at ``knob`` (fitted to the budget) or
#: cheaper (``ranksearch.fitting.best_cheaper_plan`` with the search's prediction and score)
Scan = Callable[[Callable[[float], Choices], float, float], Choices]


def is_uniform_fit(origin: str | None) -> bool:
    """Whether ``origin`` names a uniform-ratio seed fitted to the budget (one per method family)."""
    prefix, suffix = _UNIFORM_FIT_SEED.split("{family}")
    return origin is not None and origin.startswith(prefix) and origin.endswith(suffix)


@dataclass(frozen=True)
class Seed:
    origin: str
    choices: Choices


def seed_method(cand: LayerCandidates) -> str:
    """The method seeds use on a layer: the heuristics' default (Tucker-2 for k x k convs, as in Kim et
    al. 2015; SVD for linear layers) when the space allows it, else the first allowed method."""
    preferred = default_method(cand.spec)
    return preferred if preferred in cand.methods else cand.methods[0]


def _heuristic_choices(reference: nn.Module, searchable: Sequence[LayerCandidates], round_to: int,
                       **options: Any) -> Choices:
    choices: Choices = {}
    for cand in searchable:
        method = seed_method(cand)
        try:
            rank = suggest_rank(reference.get_submodule(cand.spec.name), cand.spec, method, round_to=round_to, **options)
        except Exception as exc:  # one layer's heuristic failing must not sink the search
            log.debug("no seed rank for %s (%s): %s", cand.spec.name, options, exc)
            continue
        if rank is not None:
            choices[cand.spec.name] = (method, rank)
    return choices


def vbmf_choices(reference: nn.Module, searchable: Sequence[LayerCandidates], space: SearchSpace) -> Choices:
    """The VBMF plan (Kim et al. 2015): each layer at the rank VBMF estimates, by its seed method."""
    return _heuristic_choices(reference, searchable, space.round_to, heuristic="vbmf")


def heuristic_seeds(reference: nn.Module, searchable: Sequence[LayerCandidates], space: SearchSpace, *,
                    weakening: float | None = None) -> list[Seed]:
    """VBMF, weakened VBMF (if ``weakening``) and the energy-threshold plans."""
    configs: list[tuple[str, dict[str, Any]]] = [("seed:vbmf", {"heuristic": "vbmf"})]
    if weakening:
        configs.append((f"seed:vbmf-weak-{weakening:g}", {"heuristic": "vbmf", "weakening": weakening}))
    configs += [(f"seed:energy-{tau:.2f}", {"heuristic": "energy", "tau": tau}) for tau in SEED_ENERGY_TAUS]
    return [Seed(origin, _heuristic_choices(reference, searchable, space.round_to, **options))
            for origin, options in configs]


def _fit_with_knob(fit: Fit, make: Callable[[float], Choices], cheap: float,
                   dear: float) -> tuple[Choices, float] | None:
    """``fit``'s plan and a knob value that gives it (the fit returns the plan alone)."""
    knobs: dict[str, float] = {}

    def recorded(knob: float) -> Choices:
        choices = make(knob)
        knobs.setdefault(choices_key(choices), knob)
        return choices

    fitted = fit(recorded, cheap, dear)
    return (fitted, knobs[choices_key(fitted)]) if fitted else None


def fitted_seeds(reference: nn.Module, searchable: Sequence[LayerCandidates], space: SearchSpace,
                 fit: Fit, *, shortlist: Shortlist | None = None, scan: Scan | None = None) -> list[Seed]:
    """Plans tuned to just meet the budget: energy threshold, and one shared cost fraction per family.

    With ``shortlist`` (given where only measurement settles the budget, see :data:`Shortlist`),
    only the first family in its order whose fit finds a plan gets a seed: each fit on measurement
    takes several whole-model timings, and the other families' plans score lower at the same
    budget. (Two benchmark runs, the CNN's 10 searches with uniform seeds: uniform channel plans
    scored 0.11-0.58 on validation, the best family's 0.32-0.88; one search returned a uniform
    plan, Tucker-2 at 0.35x, the best family there.)

    With ``scan`` (see :data:`Scan`), each fitted plan is followed by the knob's cheaper plan that
    scored above it, if one did (origin: the fitted seed's plus :data:`SCAN_SUFFIX`).
    """
    seeds = []

    def add(origin: str, make: Callable[[float], Choices], cheap: float, dear: float) -> bool:
        found = _fit_with_knob(fit, make, cheap, dear)
        if found is None:
            return False
        fitted, knob = found
        seeds.append(Seed(origin, fitted))
        if scan is not None:
            try:
                best = scan(make, knob, cheap)
            except Exception as exc:  # a plan failing to score must not sink the search: keep the fitted one
                log.debug("no scan under %s: %s", origin, exc)
                best = fitted
            if best != fitted:
                seeds.append(Seed(origin + SCAN_SUFFIX, best))
        return True

    def energy_plan(tau: float) -> Choices:
        return _heuristic_choices(reference, searchable, space.round_to, heuristic="energy", tau=tau)

    add(ENERGY_FIT_SEED, energy_plan, *ENERGY_FIT_RANGE)

    def uniform_plan(fraction: float, family: str) -> Choices:
        choices: Choices = {}
        for cand in searchable:
            method = family if family in cand.methods else seed_method(cand)
            rank = space.rank_for(cand.spec, method, fraction)
            if rank is not None:
                choices[cand.spec.name] = (method, rank)
        return choices

    plans = {family: partial(uniform_plan, family=family)
             for family in sorted({m for cand in searchable for m in cand.methods})}
    families = list(plans)
    if shortlist is not None and len(families) > 1:
        families = shortlist(plans, space.cost_fraction_low, space.cost_fraction_high)
    for family in families:
        if add(_UNIFORM_FIT_SEED.format(family=family), plans[family], space.cost_fraction_low,
               space.cost_fraction_high) and shortlist is not None:
            break  # the most promising family that fits
    return seeds
