"""Per-layer sensitivity: the quality each layer loses on its own, and plans that spend the budget
where it costs the least quality.

Each searchable layer is replaced alone, by each method the space allows, at a few cost fractions,
and the model is scored. Two warm-start plans come out of that table:

* **threshold** - AIMET's greedy compression-ratio selection: one quality loss shared by all
  layers; each layer takes its cheapest option within that loss, and the loss is bisected until
  the whole model meets the budget. (AIMET does this with spatial SVD only; here every method the
  space allows competes per layer.)
* **lagrangian** - minimises the summed loss under the budget (a multiple-choice knapsack, solved by
  Lagrangian relaxation: each layer picks ``argmin loss + lambda * cost`` and ``lambda`` is
  bisected), which spends more on the layers that tolerate it.

Both assume losses add up across layers, which holds roughly for small losses; the search then
corrects what the assumption gets wrong.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .decompose import get_method
from .decompose.base import Rank
from .plan import KEEP
from .warmstart import Choices, Seed, seed_method

if TYPE_CHECKING:
    from .trials import TrialRunner

__all__ = ["Option", "layer_options", "threshold_choices", "lagrangian_choices", "sensitivity_seeds"]

log = logging.getLogger("ranksearch.sensitivity")

#: cost fractions each layer is scored at
SENSITIVITY_FRACTIONS = (0.1, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: its quality loss (scored alone) and its cost (ms, FLOPs or params)."""

    method: str
    rank: Rank | None
    loss: float
    cost: float


def _layer_cost(runner: TrialRunner, name: str, method: str, rank: Rank | None) -> float:
    """What the budget counts for one layer: predicted latency, else FLOPs, else parameters."""
    spec = runner.workbench.specs[name]
    if runner.predictor is not None:
        return runner.predictor.table.layer_ms(name, method, rank)
    if method == KEEP:
        return float(spec.flops if runner.targets.flops is not None else spec.params)
    cost = get_method(method).cost(spec, rank)  # type: ignore[arg-type]
    return float(cost.flops if runner.targets.flops is not None else cost.params)


def layer_options(runner: TrialRunner, *, fractions: Sequence[float] = SENSITIVITY_FRACTIONS,
                  max_evaluations: int = 240) -> dict[str, list[Option]]:
    """Score every layer alone at each method and fraction (fewer methods if that exceeds ``max_evaluations``)."""
    started = time.perf_counter()
    baseline = runner.baseline.score
    per_layer_methods = {c.spec.name: list(c.methods) for c in runner.searchable}
    if sum(len(m) for m in per_layer_methods.values()) * len(fractions) > max_evaluations:
        per_layer_methods = {c.spec.name: [seed_method(c)] for c in runner.searchable}
    options: dict[str, list[Option]] = {}
    evaluations = 0
    for cand in runner.searchable:
        name = cand.spec.name
        layer_options_ = [Option(KEEP, None, 0.0, _layer_cost(runner, name, KEEP, None))]
        seen: set[tuple[str, Rank]] = set()
        for method in per_layer_methods[name]:
            for fraction in fractions:
                rank = runner.space.rank_for(cand.spec, method, runner.space.snap(fraction))
                if rank is None or (method, rank) in seen:
                    continue
                seen.add((method, rank))
                model = runner.workbench.apply(runner.make_plan({name: (method, rank)}, "sensitivity"))
                try:
                    score = runner.score(model)
                except Exception as exc:  # a failing evaluation just removes the option
                    log.debug("sensitivity of %s at %s %s failed: %s", name, method, rank, exc)
                    continue
                evaluations += 1
                loss = max(0.0, baseline - score) if baseline is not None else -score
                layer_options_.append(Option(method, rank, loss, _layer_cost(runner, name, method, rank)))
        options[name] = layer_options_
    runner.workbench.apply(runner.make_plan({}, "sensitivity"))
    log.info("sensitivity: %d evaluations over %d layers in %.1f s", evaluations, len(options),
             time.perf_counter() - started)
    return options


def _choices(picks: dict[str, Option]) -> Choices:
    return {name: (o.method, o.rank) for name, o in picks.items() if o.method != KEEP}  # type: ignore[misc]


def threshold_choices(options: dict[str, list[Option]], feasible: Callable[[Choices], bool]) -> Choices | None:
    """AIMET-style: the smallest shared loss at which every layer's cheapest option meets the budget."""
    levels = sorted({o.loss for opts in options.values() for o in opts})

    def at(level: float) -> Choices:
        return _choices({name: min((o for o in opts if o.loss <= level), key=lambda o: o.cost)
                         for name, opts in options.items()})

    lo, hi = 0, len(levels) - 1
    if not feasible(at(levels[hi])):
        return None
    while lo < hi:  # the cost falls as the level rises: find the first feasible level
        mid = (lo + hi) // 2
        if feasible(at(levels[mid])):
            hi = mid
        else:
            lo = mid + 1
    return at(levels[lo])


def lagrangian_choices(options: dict[str, list[Option]], feasible: Callable[[Choices], bool]) -> Choices | None:
    """The plan minimising summed loss + lambda * cost, with the smallest lambda that meets the budget."""

    def at(lam: float) -> Choices:
        return _choices({name: min(opts, key=lambda o: (o.loss + lam * o.cost, o.cost))
                         for name, opts in options.items()})

    costs = [o.cost for opts in options.values() for o in opts if o.cost > 0]
    losses = [o.loss for opts in options.values() for o in opts if o.loss > 0]
    if not costs:
        return None
    # lambda spans from "cost hardly matters" to "loss hardly matters", on a log scale
    low = math.log(max(min(losses, default=1e-6), 1e-9) / max(costs) / 100)
    high = math.log(max(max(losses, default=1.0), 1e-9) / min(costs) * 100)
    if not feasible(at(math.exp(high))):
        return None
    for _ in range(40):
        mid = (low + high) / 2
        if feasible(at(math.exp(mid))):
            high = mid
        else:
            low = mid
    return at(math.exp(high))


def sensitivity_seeds(runner: TrialRunner) -> list[Seed]:
    """The threshold and Lagrangian plans from one sensitivity table."""
    options = layer_options(runner)
    seeds = []
    for origin, allocate in (("seed:sensitivity-lagrangian", lagrangian_choices),
                             ("seed:sensitivity-threshold", threshold_choices)):
        choices = allocate(options, runner.feasible)
        if choices:
            seeds.append(Seed(origin, choices))
    return seeds
