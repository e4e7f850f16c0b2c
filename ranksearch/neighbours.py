"""Local moves around the best plan so far: the search's trials after the seeds.

With a tight budget most of the plan space breaks it, and a sampler exploring the whole space
spends many trials on plans that are pruned. The best plans are usually close to the best one
found so far (a fitted seed, typically), so once a plan meets the budget, every trial is a
*neighbour* of the best feasible trial, queued into the Optuna study with its exact ranks:

* an **exchange** moves budget between two layers: one gets a higher cost fraction (or is kept),
  another a lower one (or is compressed when it was kept), so the latency stays about the same;
* a **switch** gives one compressed layer another method at the same cost fraction;
* a **grow** spends the slack of a plan that came in under the budget (a seed fitted by a few noisy
  measurements often lands several percent short): layers get their next larger rank, one at a
  time, while the plan's latency - predicted, scaled by how far the prediction was off on the plan
  itself - has used no more than half the slack (the next grow takes the rest). With a
  sensitivity table, a plan's first grow raises first the layers where the table says a step buys
  the most quality per millisecond; its later grows, and steps the table sees no gain in, pick
  layers at random. A plan whose grows keep breaking the budget has no real slack (its measurement
  flattered it), and is not grown again.

Moves act on the plan's exact (method, rank) choices, not on the sampler's rounded parameters, so a
neighbour of a plan fitted tightly to the budget differs from it only where it was moved. A
neighbour that breaks the budget is pruned like any other trial. The sampler (Optuna's TPE)
proposes a trial only while no plan meets the budget, or when no move finds a plan not tried yet.

Why not every other trial from the sampler, as the search did before: in the benchmark's 14 full
runs before this change (149 searches with a plan) the answer came from a neighbour 71 times, a
seed 64, a repair or a spare 14, and a sampled trial never. Under FLOP budgets, where no timing
noise enters (the benchmark's CNN at 4 budgets x 5 seeds, MiniLM at 3 x 5; 24 and 18 trials:
``benchmarks/bench_local_moves.py``), giving the sampler's trials to neighbours scored as high or
higher on validation in all 35 searches, higher in 10 (up to +0.078); at 60 trials (the CNN, 2
budgets x 3 seeds), in all 6, higher in 3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import optuna

from .decompose.base import Rank
from .fitting import Choices, choices_key
from .layers import LayerSpec
from .sensitivity import SensitivityTable, StepValue, budget_cost, step_value
from .space import LayerCandidates, SearchSpace
from .study import best_feasible, plan_of
from .warmstart import Seed

if TYPE_CHECKING:
    from .trials import TrialRunner

__all__ = ["NeighbourMoves", "StepValue", "grown_choices", "neighbour_choices", "tightened_choices", "tried_plans"]

# a plan this far (relative) under its budget has slack worth spending (about the measurement noise)
_SLACK = 0.03
# grows of one plan that broke the budget before it is not grown again
_FAILED_GROWS = 2
# the share of a plan's slack one grow spends: latency is not smooth in the ranks (kernels change
# with shapes), so a grow aimed at the whole slack often overshoots; the next grow takes the rest
_GROW_SHARE = 0.5


def neighbour_choices(choices: Choices, searchable: Sequence[LayerCandidates], space: SearchSpace,
                      rng: np.random.Generator) -> Choices:
    """A copy of ``choices`` with one or two exchanges, and sometimes a method switch.

    Moves can cancel out (or hit the edge of the grid); those are drawn again, so the result
    differs from ``choices`` unless no move can change it.
    """
    moved = dict(choices)
    for _ in range(20):
        moved = _move(choices, searchable, space, rng)
        if moved != choices:
            break
    return moved


def grown_choices(choices: Choices, searchable: Sequence[LayerCandidates], space: SearchSpace,
                  rng: np.random.Generator, fits: Callable[[Choices], bool], value: StepValue | None = None) -> Choices:
    """``choices`` with compressed layers raised to their next rank on the grid, one at a time, as
    long as ``fits`` accepts the plan (a layer past the top of the range is kept); a layer whose step
    does not fit is not raised again.

    The layers go in random order; with ``value``, the layer whose next step is worth most goes
    first, and the random order takes over once no step left is worth anything.
    """
    by_name = {c.spec.name: c for c in searchable}
    out = dict(choices)
    open_layers = [name for name in out if name in by_name]

    def next_up(name: str) -> Rank | None:
        method, rank = out[name]
        return _next_rank_up(by_name[name].spec, method, rank, space)

    while open_layers:
        worth = [value(name, *out[name], next_up(name)) for name in open_layers] if value is not None else []
        if worth and max(worth) > 0:
            name = open_layers.pop(int(np.argmax(worth)))
        else:
            name = open_layers.pop(int(rng.integers(len(open_layers))))
        method, rank = out[name]
        grown = dict(out)
        raised = next_up(name)
        if raised is None:
            del grown[name]  # past the top of the range: kept
        else:
            grown[name] = (method, raised)
        if fits(grown):
            out = grown
            if name in out:
                open_layers.append(name)  # it may take another step later
    return out


def tried_plans(trials: Sequence[optuna.trial.FrozenTrial], fingerprint: dict) -> set[str]:
    """The ``choices_key`` of every plan ``trials`` built or ruled out (a move to one of them is wasted)."""
    return {choices_key({c.name: (c.method, c.rank) for c in plan_of(t, fingerprint).replaced})
            for t in trials if "plan" in t.user_attrs}


def tightened_choices(choices: Choices, searchable: Sequence[LayerCandidates], space: SearchSpace,
                      fits: Callable[[Choices], bool], step: float = 0.02) -> Choices | None:
    """``choices`` with every compressed layer's cost fraction cut by one shared factor, the smallest
    cut (in ``step``s) that ``fits`` accepts; ``None`` when even the cheapest ranks do not fit.

    The plan keeps its shape - which layers are compressed, by which method, and how the budget is
    shared between them - so its quality falls about as little as the cut: the repair for a plan that
    misses its latency target by a few percent (see ``ranksearch.final_checks``).
    """
    by_name = {c.spec.name: c for c in searchable}
    fractions = {name: space.cost_fraction_of(by_name[name].spec, method, rank)
                 for name, (method, rank) in choices.items() if name in by_name}
    for k in range(1, int(round(1 / step))):
        scale = 1 - k * step
        cut = dict(choices)
        for name, fraction in fractions.items():
            method, rank = choices[name]
            spec = by_name[name].spec
            smaller = space.rank_for(spec, method, max(space.cost_fraction_low, fraction * scale))
            if smaller is not None and space.cost_fraction_of(spec, method, smaller) < fraction:
                cut[name] = (method, smaller)  # (rounding can land back on the rank, or above it)
        if cut != choices and fits(cut):
            return cut
    return None


def _next_rank_up(spec: LayerSpec, method: str, rank: Rank, space: SearchSpace) -> Rank | None:
    """The next larger rank on the space's grid (ranks are rounded, so one cost-fraction step may not
    change it); ``None`` past the top of the range (the layer is then kept)."""
    fraction = space.cost_fraction_of(spec, method, rank)
    step = space.cost_fraction_step
    for k in range(1, int((space.cost_fraction_high - space.cost_fraction_low) / step) + 2):
        if fraction + k * step > space.cost_fraction_high + 1e-9:
            return None
        raised = space.rank_for(spec, method, fraction + k * step)
        if raised is None:
            return None
        if raised != rank and space.cost_fraction_of(spec, method, raised) > fraction:
            return raised
    return None


def _move(choices: Choices, searchable: Sequence[LayerCandidates], space: SearchSpace,
          rng: np.random.Generator) -> Choices:
    out = dict(choices)
    by_name = {c.spec.name: c for c in searchable}
    names = list(by_name)
    low, high, step = space.cost_fraction_low, space.cost_fraction_high, space.cost_fraction_step

    def fraction(name: str) -> float | None:
        if name not in out:
            return None
        method, rank = out[name]
        return space.cost_fraction_of(by_name[name].spec, method, rank)

    def set_fraction(name: str, value: float | None, method: str | None = None) -> None:
        cand = by_name[name]
        if value is None:
            out.pop(name, None)
            return
        if method is None:
            method = out[name][0] if name in out else cand.methods[int(rng.integers(len(cand.methods)))]
        rank = space.rank_for(cand.spec, method, min(high, max(low, value)))
        if rank is None:
            out.pop(name, None)
        else:
            out[name] = (method, rank)

    for _ in range(int(rng.integers(1, 3))):  # one or two exchanges
        if len(names) < 2:
            break
        up, down = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        steps = int(rng.integers(1, 3)) * step
        now_up, now_down = fraction(up), fraction(down)
        if now_up is not None:  # spend more on `up`: a larger fraction, or keep it past the top
            set_fraction(up, None if now_up + steps > high + 1e-9 else now_up + steps)
        # ...and less on `down`: a smaller fraction, or compress it if it was kept
        set_fraction(down, high if now_down is None else max(low, now_down - steps))
    switchable = [n for n in out if len(by_name[n].methods) > 1]
    if switchable and rng.random() < 0.3:
        name = switchable[int(rng.integers(len(switchable)))]
        others = [m for m in by_name[name].methods if m != out[name][0]]
        set_fraction(name, fraction(name), method=others[int(rng.integers(len(others)))])
    return out


class NeighbourMoves:
    """Optuna callback: after each finished trial, once the seeds are done, queue a neighbour of the
    best feasible one (none while no trial is feasible: the sampler proposes the next).

    Args:
        runner: the search's trial runner (layers, space, and how a plan is queued).
        total: trials wanted; nothing is queued for trials past it.
        seed: makes the moves reproducible.
        sensitivity: the search's per-layer sensitivity table, if any: a plan's first grow raises the
            layers where it says a step buys the most quality per cost.
    """

    def __init__(self, runner: TrialRunner, total: int, seed: int | None = None,
                 sensitivity: SensitivityTable | None = None) -> None:
        self.runner = runner
        self.total = total
        self.value = step_value(sensitivity, budget_cost(runner)) if sensitivity is not None else None
        self.rng = np.random.default_rng(seed)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        if len(trials) >= self.total or any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            return  # the queued trials (the seeds first) run before any move
        best = best_feasible(trials)
        if not best:
            return
        runner, parent_trial = self.runner, best[0]
        parent = {c.name: (c.method, c.rank) for c in plan_of(parent_trial, runner.fingerprint).replaced}
        tried = tried_plans(trials, runner.fingerprint)
        if self._worth_growing(parent_trial, trials):
            fits = runner.fits_beside(parent, parent_trial.user_attrs.get("measured_latency_ms"), spend=_GROW_SHARE)
            # the table's order first; once that plan was tried (a second grow of this plan), random order
            for value in ([self.value] if self.value is not None else []) + [None]:
                choices = grown_choices(parent, runner.searchable, runner.space, self.rng, fits, value)
                if choices_key(choices) not in tried:
                    runner.enqueue(study, Seed("neighbour", choices), neighbour_of=parent_trial.number, move="grow")
                    return
        for _ in range(10):  # a move can land on a plan already tried; try another
            choices = neighbour_choices(parent, runner.searchable, runner.space, self.rng)
            if choices_key(choices) not in tried:
                runner.enqueue(study, Seed("neighbour", choices), neighbour_of=parent_trial.number, move="exchange")
                return

    @staticmethod
    def _worth_growing(parent: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]) -> bool:
        """Whether the plan is under every budget by more than ``_SLACK``, and its grows have not
        already broken the budget ``_FAILED_GROWS`` times."""
        slack = -max(parent.constraints.values(), default=0.0)
        failed = sum(1 for t in trials if t.user_attrs.get("neighbour_of") == parent.number
                     and t.user_attrs.get("move") == "grow" and t.state == optuna.trial.TrialState.PRUNED)
        return slack > _SLACK and failed < _FAILED_GROWS

