"""Fit a one-knob plan to the budget: the least compressed setting of the knob that still meets it.

Several warm starts have one knob (an energy threshold, a shared cost fraction, a shared quality
loss, a Lagrange multiplier) whose plans get cheaper monotonically as it moves one way. The plan
wanted is the one at the boundary: as little compression as the budget allows.

The boundary is found in two rounds: first by bisection on the *predicted* latency (free, but the
per-layer table can be off by tens of percent inside the model), then on the *measured* latency of
the whole model, starting from the predicted boundary. Each measurement recalibrates the
prediction (a line through the last two measurements: plans with nearby knob values share most of
its error), and the next plan measured is where the recalibrated prediction puts the boundary, so
a handful of measurements place it where the real model puts it. Without a latency target the budget is analytic and one round suffices.

The plan at the boundary is not always the best the knob gives under the budget: at deep cuts the
score jumps about as the knob moves, and a slightly cheaper plan can score well above it
(``best_cheaper_plan``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

from .decompose.base import Rank

__all__ = ["Choices", "Fit", "WELL_UNDER", "SCAN_WINDOW", "SCAN_LEVELS", "boundary", "choices_key", "fit_to_budget",
           "best_cheaper_plan"]

log = logging.getLogger(__name__)

#: a plan measured more than this far under the budget (relative) is not where a fit stops on the
#: prediction's word alone: the next dearer plan is measured too. The per-layer table's steps between
#: ranks can be off by more than that inside the model (the benchmark's CNN at batch 1, 0.7x: the
#: energy threshold's plans step from rank 16 to 20 in the first block between tau 0.665 and 0.690,
#: predicted +23%; the fit stopped at tau 0.684, measured 6% under the target, and the energy
#: baseline met the target at tau 0.715)
WELL_UNDER = 0.03

#: how far under the fitted plan's cost (relative to the budget, by prediction) ``best_cheaper_plan``
#: looks, and at how many evenly spaced levels. On the benchmark's CNN, the energy threshold's plans
#: between 0.46 and 0.51 of the original's latency at batch 8 scored 0.39-0.52 on validation, in no
#: order (test 0.40-0.51, in step with validation: the plans differ, not the noise), and the fit lands
#: on whichever plan sits at the boundary (in one benchmark run a seed at 0.49 scoring 0.45, where the
#: energy baseline's plan at 0.46 scored 0.50). Plans 2-8% under it cost a few evaluations to score.
#: Do picks by validation hold on test? ``benchmarks/bench_knob_scan.py`` (24 knobs fitted to FLOP
#: budgets on the benchmark's two models): at 8% and four levels, 7 picks moved off the fitted plan,
#: +0.018 on validation and +0.006 on test on average (test higher at 5, lower at 2), 4.1% cheaper; a
#: 4% window moved 5 (+0.003-0.005 on test); 12% moved 6-9 (+0.011-0.016) but gave up 5.6-5.8%.
SCAN_WINDOW = 0.08
SCAN_LEVELS = 4

#: layer name -> (method, rank); layers not in it are kept
Choices = dict[str, tuple[str, Rank]]


def choices_key(choices: Choices) -> str:
    """A string that is equal for equal choices, whatever their order (for caches and duplicate checks)."""
    return json.dumps(sorted((name, method, str(rank)) for name, (method, rank) in choices.items()))


class Fit(Protocol):
    """``fit(make, cheap, dear, integer=False)``: the plan ``make(knob)`` at the dearest knob value
    in ``[cheap, dear]`` that meets the budget, or ``None`` when even ``make(cheap)`` misses it."""

    def __call__(self, make: Callable[[float], Choices], cheap: float, dear: float, *,
                 integer: bool = False) -> Choices | None: ...


def boundary(make: Callable[[float], Choices], feasible: Callable[[Choices], bool], cheap: float, dear: float, *,
             steps: int, integer: bool = False, check_dear: bool = True) -> float | None:
    """The knob value nearest ``dear`` whose plan is feasible, by bisection between ``cheap`` and ``dear``.

    ``make(cheap)`` is the most compressed plan; plans get dearer towards ``dear`` (the knob may
    increase or decrease towards it). ``integer`` knobs are indices and are bisected to adjacent
    values. Returns ``None`` if no probed value is feasible, ``make(cheap)`` included.
    ``check_dear=False`` skips probing ``dear`` itself (when it is known to miss).
    """
    if check_dear and feasible(make(dear)):
        return dear
    good, bad = cheap, dear  # invariant: bad is infeasible; good is feasible once `good_known`
    good_known = False
    for _ in range(steps):
        if integer and abs(bad - good) <= 1:
            break
        probe = (good + bad) / 2
        if integer:
            probe = float(round(probe))
            if probe in (good, bad):
                break
        if feasible(make(probe)):
            good, good_known = probe, True
        else:
            bad = probe
    if good_known:
        return good
    return cheap if feasible(make(cheap)) else None


def _between(value: float, a: float, b: float) -> bool:
    return min(a, b) < value < max(a, b)


def fit_to_budget(make: Callable[[float], Choices], cheap: float, dear: float, *,
                  predicted_feasible: Callable[[Choices], bool],
                  measured_feasible: Callable[[Choices], bool] | None,
                  rescaled: Callable[[list[Choices]], Callable[[Choices], bool]] | None = None,
                  second_look: Callable[[Choices], bool] | None = None,
                  measured_slack: Callable[[Choices], float] | None = None,
                  integer: bool = False, predicted_steps: int = 14, measured_steps: int = 6) -> Choices | None:
    """Bisect on the prediction, then refine on measurement from there (see the module docstring).

    ``measured_feasible`` is ``None`` when the budget is analytic (FLOPs, parameters): the first
    round is then exact. ``rescaled(plans)`` is the prediction mapped onto the measurements of the
    plans measured so far (most recent last; a feasibility check, aiming slightly under the budget
    so that steps coming from the infeasible side cross it): after each measurement, the next knob
    value measured is where the rescaled prediction puts the boundary inside the bracket left (a
    secant step, which lands near the boundary in one or two measurements when the prediction is
    off by a factor or an offset). When it puts the boundary at the bracket's feasible end, the
    fit stops; without it, the bracket is halved. ``measured_steps`` bounds the measurements: six,
    since the secant steps overshoot where the knob's latency jumps (the energy threshold on the
    benchmark's CNN at batch 8, 0.5x: tau 0.570 and 0.548 missed, 0.416 met, 0.487 missed by 1%,
    and with four measurements the seed stayed at 0.44 of the original; the energy baseline met the
    target at tau 0.48).

    ``second_look(plan)`` measures a plan again and says whether it meets the budget after all. A
    miss of the cheap end ends the fit with no plan, on one timing; that timing gets a second look
    first. (MiniLM at batch 1, 0.35x: the plan with every layer at the smallest rank timed once at
    0.44 of the original, a dearer plan at 0.30 a moment before, and the three fits that reached
    it - the uniform-svd, Lagrangian and threshold seeds - gave none.)

    ``measured_slack(plan)`` is how far under the budget a measured plan is (relative; negative
    over it). Where the rescaled prediction says stop but the plan kept is more than
    :data:`WELL_UNDER` under the budget, the next dearer plan the knob gives is measured before the
    fit stops: the prediction's step to it may be wrong, and the measurement says.
    """
    guess = boundary(make, predicted_feasible, cheap, dear, steps=predicted_steps, integer=integer)
    if measured_feasible is None:
        return make(guess) if guess is not None else None
    log.debug("fit on [%.4g, %.4g]: the prediction puts the boundary at %s", cheap, dear,
              "none" if guess is None else f"{guess:.4g}")
    # the prediction may be wrong either way: start the measured round at its answer (or at the
    # cheap end when it saw nothing feasible - measurement may disagree)
    good, bad = cheap, dear  # invariant: bad is infeasible (or unprobed dear); good is feasible once good_known
    good_known = False
    probe = guess if guess is not None else cheap
    measured: list[Choices] = []
    for _ in range(measured_steps):
        measured.append(make(probe))
        fits = measured_feasible(measured[-1])
        if not fits and probe == cheap and second_look is not None:
            fits = second_look(measured[-1])
        log.debug("fit: knob %.4g %s the budget by measurement", probe, "meets" if fits else "misses")
        if fits:
            good, good_known = probe, True
            if probe == dear:
                break
        else:
            bad = probe
            if probe == cheap:
                return None
        if integer and abs(bad - good) <= 1:
            break
        probe = _next_probe(make, measured, good, bad, rescaled, integer=integer, steps=predicted_steps,
                            resolution=abs(dear - cheap) / 2 ** 7, good_known=good_known)
        if probe is None and good_known and measured_slack is not None:
            slack = measured_slack(make(good))
            if slack > WELL_UNDER:
                probe = _next_dearer(make, good, bad, measured, integer=integer, steps=predicted_steps)
                if probe is not None:
                    log.debug("fit: knob %.4g is %.1f%% under the budget by measurement; the next dearer plan "
                              "(knob %.4g) is measured too", good, 100 * slack, probe)
        if probe is None:
            break
    if good_known:
        log.debug("fit: knob %.4g", good)
        return make(good)
    log.debug("fit: no knob value measured met the budget; the cheap end %.4g if it does", cheap)
    cheapest = make(cheap)
    if measured_feasible(cheapest) or (second_look is not None and second_look(cheapest)):
        return cheapest
    return None


def _next_dearer(make: Callable[[float], Choices], good: float, bad: float, measured: list[Choices], *,
                 integer: bool, steps: int) -> float | None:
    """The knob value nearest ``good`` towards ``bad`` whose plan differs from ``make(good)`` (by
    bisection on the plans alone); ``None`` when that plan has been measured already."""
    kept = make(good)
    same, other = good, bad
    if make(bad) == kept:
        return None
    for _ in range(steps):
        middle = (same + other) / 2
        if integer:
            middle = float(round(middle))
        if middle in (same, other):
            break
        if make(middle) == kept:
            same = middle
        else:
            other = middle
    return None if make(other) in measured else other


def _next_probe(make: Callable[[float], Choices], measured: list[Choices], good: float, bad: float,
                rescaled: Callable[[list[Choices]], Callable[[Choices], bool]] | None, *, integer: bool,
                steps: int, resolution: float, good_known: bool) -> float | None:
    """The next knob value to measure, strictly inside (good, bad); ``None`` when none is worth it."""
    probe = (good + bad) / 2
    if rescaled is not None:
        estimate = boundary(make, rescaled(measured), good, bad, steps=steps, integer=integer, check_dear=False)
        if estimate is not None and abs(estimate - good) > (0 if integer else resolution):
            probe = estimate
        elif good_known:
            return None  # rescaled, the prediction puts the boundary at the bracket's feasible end
        # else no plan measured so far fits, and the rescaled prediction says only the cheapest
        # would: it is extrapolating from misses alone, so halve the bracket rather than settle
        # for the cheapest plan (a seed far under the budget)
    if integer:
        probe = float(round(probe))
    if not _between(probe, good, bad) or make(probe) in (make(good), make(bad)):
        return None  # the knob cannot tell the bracket's ends apart any more
    return probe


def best_cheaper_plan(make: Callable[[float], Choices], knob: float, cheap: float, *,
                      excess: Callable[[Choices], float], score: Callable[[Choices], float],
                      window: float = SCAN_WINDOW, levels: int = SCAN_LEVELS) -> tuple[Choices, float]:
    """The best-scoring of ``make(knob)`` (a plan fitted to the budget) and the knob's cheaper plans
    down to ``window`` under its cost, with that score.

    ``excess(plan)`` is the plan's relative excess over the budget (negative under it, by
    prediction; see ``TrialRunner.violations``). The cheaper plans are the dearest the knob gives at
    ``levels`` excess levels evenly spaced down to ``window`` under the fitted plan's (bisection on
    the knob between ``cheap`` and ``knob``; no timing), those inside the window each scored once;
    the fitted plan wins ties.
    See :data:`SCAN_WINDOW` for why.
    """
    fitted = make(knob)
    top = excess(fitted)
    plans = [fitted]
    for step in range(1, levels + 1):
        level = top - window * step / levels
        found = boundary(make, lambda choices: excess(choices) <= level, cheap, knob, steps=14, check_dear=False)
        if found is None:
            break  # even the cheapest plan is above this level
        plan = make(found)
        if excess(plan) < top - window:
            break  # the knob steps past the window here: a plan that much cheaper gives up too much
        if plan not in plans:
            plans.append(plan)
    scores = [score(plan) for plan in plans]
    best = max(range(len(plans)), key=lambda i: (scores[i], -i))
    log.debug("scan under the fitted plan: %s", ", ".join(
        f"{excess(plan):+.1%} scores {value:.4g}" for plan, value in zip(plans, scores)))
    return plans[best], scores[best]
