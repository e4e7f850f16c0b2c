"""Per-layer sensitivity: the quality each layer loses on its own, and plans that spend the budget
where it costs the least quality.

Each searchable layer is replaced alone, by each method the space allows, at a few cost fractions,
and the model is scored (:func:`measure_sensitivity`; the table does not depend on the budget and
can be reused, see :class:`SensitivityTable`). Two warm-start plans come out of that table:

* **threshold** - AIMET's greedy compression-ratio selection: one quality loss shared by all
  layers; each layer takes its cheapest option within that loss, and the loss is bisected until
  the whole model meets the budget (on predicted, then measured latency: ``ranksearch.fitting``).
  (AIMET does this with spatial SVD only; here every method the space allows competes per layer.)
* **lagrangian** - minimises the summed loss under the budget (a multiple-choice knapsack, solved by
  Lagrangian relaxation: each layer moves down the lower convex hull of its options, the moves
  that lose the least quality per cost saved first, one layer at a time, until the budget is met),
  which spends more on the layers that tolerate it.

The Lagrangian plan also takes the ranks on the space's grid between the ones the table scored
(:func:`ranks_between`, losses on the line between), so that its fit can stop near the budget.
Both assume losses add up across layers, which holds roughly for small losses; the search then
corrects what the assumption gets wrong.

A user's ``eval_fn`` on a small validation set often cannot tell one layer compressed alone from
the original: on the benchmark's CNN, most layers lost exactly nothing at most ranks, so both plans
took each layer's cheapest "lossless" rank even when the budget allowed more, and never spent more
than half of the original's latency. Ties are broken by how much each option changes the model's
outputs on the example inputs (:func:`_break_ties`), which grows steadily as the rank falls.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from .decompose import get_method
from .decompose.base import Rank
from .exceptions import InvalidInputsError
from .fitting import Choices, Fit
from .plan import KEEP
from .quality import FidelityScorer
from .warmstart import Seed, seed_method

if TYPE_CHECKING:
    from .trials import TrialRunner
    from .space import LayerCandidates

__all__ = ["Option", "SensitivityTable", "measure_sensitivity", "layer_options", "threshold_choices",
           "lagrangian_choices", "ranks_between", "sensitivity_seeds", "least_loss_cut", "cut_ladders",
           "open_ladders", "loss_per_cost_saved", "step_value",
           "budget_cost", "BudgetCost", "StepValue", "SENSITIVITY_SEEDS"]

log = logging.getLogger("ranksearch.sensitivity")

#: cost fractions each layer is scored at: dense at the cheap end, where tight budgets pick and a
#: layer's loss changes fastest (AIMET scores ten ratios per layer)
SENSITIVITY_FRACTIONS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75)
#: the origins of the seeds made from the table (``sensitivity_seeds``)
SENSITIVITY_SEEDS = ("seed:sensitivity-lagrangian", "seed:sensitivity-threshold")


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: its quality loss (scored alone) and its cost (ms, FLOPs or params)."""

    method: str
    rank: Rank | None
    loss: float
    cost: float


#: ``cost(name, method, rank)``: what the budget counts for one layer so treated (``rank`` None: kept)
BudgetCost = Callable[[str, str, "Rank | None"], float]


#: ``value(name, method, rank, raised)``: what raising a layer from ``rank`` to ``raised`` (``None``:
#: kept) buys per unit of cost, > 0 when it buys anything (:func:`step_value`)
StepValue = Callable[[str, str, Rank, "Rank | None"], float]


def budget_cost(runner: TrialRunner) -> BudgetCost:
    """The cost a search's budget counts for one layer: predicted latency, else FLOPs, else parameters."""
    return partial(_layer_cost, runner)


def _layer_cost(runner: TrialRunner, name: str, method: str, rank: Rank | None) -> float:
    """What the budget counts for one layer: predicted latency, else FLOPs, else parameters."""
    spec = runner.workbench.specs[name]
    if runner.predictor is not None:
        return runner.predictor.table.layer_ms(name, method, rank)
    if method == KEEP:
        return float(spec.flops if runner.targets.flops is not None else spec.params)
    cost = get_method(method).cost(spec, rank)  # type: ignore[arg-type]
    return float(cost.flops if runner.targets.flops is not None else cost.params)


#: ``finer(name, dear, cheap)``: a layer's options strictly between two of its options, dearest first
Finer = Callable[[str, Option, Option], list[Option]]


@dataclass(frozen=True)
class SensitivityTable:
    """The quality each layer loses when compressed alone, per (method, rank).

    It depends on the model, the quality measure and the search space, not on the budget: pass
    ``result.sensitivity`` to the next :func:`ranksearch.optimize` of the same model (another target
    or batch size) to skip recomputing it.
    """

    #: layer -> ((method, rank, loss), ...); loss: the drop in score, ties broken (``_break_ties``)
    losses: dict[str, tuple[tuple[str, Rank, float], ...]]
    fingerprint: str  # the model's digest, so a table is never applied to another model
    evaluations: int
    seconds: float
    #: whether each plan's BatchNorm statistics were re-estimated before it was scored
    #: (``ranksearch.batchnorm``): the losses mean something else without it
    batchnorm_recalibrated: bool = False


def measure_sensitivity(runner: TrialRunner, *, fractions: Sequence[float] = SENSITIVITY_FRACTIONS,
                        max_evaluations: int = 320) -> SensitivityTable:
    """Score every layer alone at each method and fraction (fewer methods if that exceeds ``max_evaluations``).

    Fractions go from the cheapest up; once a rank loses nothing, the method's dearer ranks are taken
    to lose nothing too, unscored (their output distortion still orders them, see ``_break_ties``):
    a rank that keeps more of the layer does not lose more, except by the score's noise. (The
    benchmark's CNN: a validation accuracy that many layers keep at most ranks; 224 evaluations, 106 s,
    before.)
    """
    started = time.perf_counter()
    baseline = runner.baseline.score
    per_layer_methods = {c.spec.name: list(c.methods) for c in runner.searchable}
    if sum(len(m) for m in per_layer_methods.values()) * len(fractions) > max_evaluations:
        per_layer_methods = {c.spec.name: [seed_method(c)] for c in runner.searchable}
    distortion = _output_distortion(runner)
    measured: dict[str, dict[tuple[str, Rank], tuple[float, float]]] = {}  # layer -> option -> (drop, distortion)
    evaluations = lossless_after = 0
    for cand in runner.searchable:
        name = cand.spec.name
        scored: dict[tuple[str, Rank], tuple[float, float]] = {}
        for method in per_layer_methods[name]:
            lossless = False  # a cheaper rank of this method lost nothing: the dearer ones are not scored
            for fraction in sorted(fractions):
                rank = runner.space.rank_for(cand.spec, method, runner.space.snap(fraction))
                if rank is None or (method, rank) in scored:
                    continue
                plan = runner.make_plan({name: (method, rank)}, "sensitivity")
                model = runner.workbench.apply(plan)
                # as decomposed: before scoring re-estimates its BatchNorm statistics, if the search does
                distorted = distortion(model).relative_error if distortion is not None else 0.0
                if lossless:
                    drop = 0.0
                    lossless_after += 1
                else:
                    try:
                        score = runner.score(model, plan=plan)
                    except Exception as exc:  # a failing evaluation just removes the option
                        log.debug("sensitivity of %s at %s %s failed: %s", name, method, rank, exc)
                        continue
                    evaluations += 1
                    drop = max(0.0, baseline - score) if baseline is not None else -score
                    lossless = baseline is not None and drop == 0.0
                scored[(method, rank)] = (drop, distorted)
        measured[name] = scored
    losses = _break_ties(measured)
    runner.workbench.apply(runner.make_plan({}, "sensitivity"))
    seconds = time.perf_counter() - started
    log.info("sensitivity: %d evaluations over %d layers in %.1f s (%d dearer ranks of a lossless one taken as "
             "lossless)", evaluations, len(losses), seconds, lossless_after)
    return SensitivityTable(losses, runner.fingerprint["digest"], evaluations, seconds,
                            batchnorm_recalibrated=runner.recalibration is not None)


def _output_distortion(runner: TrialRunner) -> FidelityScorer | None:
    """The outputs' relative error against the original's on the example inputs, to break the ties
    of ``eval_fn`` (``None`` without one: the score is then that fidelity already)."""
    if runner.eval_fn is None:
        return None
    try:
        return FidelityScorer(runner.reference, [runner.inputs])
    except InvalidInputsError:  # no floating-point output to compare: ties stay ties
        return None


def _break_ties(measured: dict[str, dict[tuple[str, Rank], tuple[float, float]]]
                ) -> dict[str, tuple[tuple[str, Rank, float], ...]]:
    """Each option's loss: its drop in score, plus its output distortion scaled so that the largest
    adds a tenth of the smallest drop measured. Options the score tells apart keep their order;
    those it cannot are ordered by distortion, so the dearer of two "lossless" ranks loses less."""
    drops = [drop for options in measured.values() for drop, _ in options.values() if drop > 0]
    distortions = [d for options in measured.values() for _, d in options.values() if math.isfinite(d)]
    largest = max(distortions, default=0.0)
    weight = 0.1 * min(drops, default=1e-3) / largest if largest > 0 else 0.0
    return {name: tuple((method, rank, drop + weight * min(distortion, largest))
                        for (method, rank), (drop, distortion) in options.items())
            for name, options in measured.items()}


def layer_options(runner: TrialRunner, table: SensitivityTable) -> dict[str, list[Option]]:
    """Each layer's options (keep, and every scored method and rank the space still allows) with
    their loss from ``table`` and their cost under this search's budget."""
    return {cand.spec.name: _options_of(runner, table, cand) for cand in runner.searchable}


def _options_of(runner: TrialRunner, table: SensitivityTable, cand: LayerCandidates) -> list[Option]:
    """One layer's options: keep first, then every method and rank ``table`` scored that the space allows."""
    name = cand.spec.name
    return [Option(KEEP, None, 0.0, _layer_cost(runner, name, KEEP, None)),
            *(Option(method, rank, loss, _layer_cost(runner, name, method, rank))
              for method, rank, loss in table.losses.get(name, ()) if method in cand.methods)]


def _choices(picks: dict[str, Option]) -> Choices:
    return {name: (o.method, o.rank) for name, o in picks.items() if o.method != KEEP}  # type: ignore[misc]


def threshold_choices(options: dict[str, list[Option]], fit: Fit) -> Choices | None:
    """AIMET-style: the smallest shared loss at which every layer's cheapest option meets the budget.

    Only the scored options take part. With the ranks between them (:func:`ranks_between`) too
    (81280ab), the shared loss moved each layer in small steps and the tests' digits MLP's plan spent
    0.95 of a FLOP budget of 0.7x (0.86 before), but in a benchmark run the seed scored lower on
    MiniLM at all six settings: below its lowest of the ten runs before at five, below their median
    at the sixth. (A guess, not checked: holding every layer at one loss compresses more layers than
    the coarse steps do, which leave some layers at no loss.)
    """
    levels = sorted({o.loss for opts in options.values() for o in opts})

    def at(index: float) -> Choices:
        level = levels[int(index)]
        return _choices({name: min((o for o in opts if o.loss <= level), key=lambda o: o.cost)
                         for name, opts in options.items()})

    # the cost falls as the shared loss level rises: the highest level is the cheap end
    return fit(at, len(levels) - 1, 0, integer=True)


def lagrangian_choices(options: dict[str, list[Option]], fit: Fit, finer: Finer | None = None) -> Choices | None:
    """The plan minimising summed loss under the budget, on the Lagrangian path walked one layer at a time.

    Minimising ``loss + lambda * cost`` per layer solves the relaxed knapsack; as ``lambda`` grows,
    each layer moves down the lower convex hull of its (cost, loss) options. Bisecting ``lambda``
    itself moves every layer whose hull segment has the same slope at once - on a model of
    repeated blocks, many - and stops on whichever side of the budget they land, leaving slack:
    on the benchmark's MiniLM at batch 1, 0.35x, three searches' plans measured 0.338-0.350 of the
    original and kept one, two or three of the sensitive last-block layers, scoring 0.32-0.49.
    Here the knob is the number of hull segments taken, least loss per cost saved first, so
    consecutive plans differ in one layer and the fit stops where the budget does.

    ``finer(name, dear, cheap)`` gives the ranks between two neighbouring hull points (see
    :func:`ranks_between`): the table scores a few cost fractions only, and one move between them
    can be most of the budget's slack (the benchmark's MiniLM at batch 1, 0.35x: the path's last
    move timed 6% of the plan, and the fit stopped 5.2% under the target; on the tests' digits MLP,
    FLOP budgets of 0.3-0.7 were left 5-17% unspent). The moves through them keep the segment's
    slope, so the path's order is unchanged and only its steps get smaller.
    """
    start, path = _lagrangian_path(options, finer)
    if not path:
        return None

    def at(steps: float) -> Choices:
        picks = dict(start)
        for name, option in path[:int(steps)]:
            picks[name] = option
        return _choices(picks)

    return fit(at, len(path), 0, integer=True)


def _lagrangian_path(options: dict[str, list[Option]], finer: Finer | None = None
                     ) -> tuple[dict[str, Option], list[tuple[str, Option]]]:
    """Each layer's least-loss option (the cheapest of equals), and the moves down every layer's lower
    convex hull in (cost, loss), least loss per cost saved first: applying the first ``k`` moves
    gives the Lagrangian plan of every ``lambda`` between the ``k``-th slope and the next. With
    ``finer``, each move between hull points goes through the ranks between them, one at a time."""
    start: dict[str, Option] = {}
    segments: list[tuple[float, int, int, int, str, Option]] = []  # (slope, layer, step, sub-step, name, option)
    for layer, (name, opts) in enumerate(options.items()):
        if not opts:
            continue
        here = start[name] = min(opts, key=lambda o: (o.loss, o.cost))
        slope = 0.0
        for step in range(len(opts)):
            cheaper = [o for o in opts if o.cost < here.cost]
            if not cheaper:
                break
            # gift wrapping: the next hull point is the one reached at the smallest slope (the
            # cheapest of equal slopes), so slopes only grow along the hull (``max``: rounding
            # must not put a layer's later move before its earlier one)
            nxt = min(cheaper, key=lambda o: ((o.loss - here.loss) / (here.cost - o.cost), o.cost))
            slope = max(slope, (nxt.loss - here.loss) / (here.cost - nxt.cost))
            on_the_way = finer(name, here, nxt) if finer is not None else []
            for sub, option in enumerate([*on_the_way, nxt]):
                segments.append((slope, layer, step, sub, name, option))
            here = nxt
    segments.sort(key=lambda s: s[:4])
    return start, [(name, option) for *_, name, option in segments]


def ranks_between(runner: TrialRunner, name: str, dear: Option, cheap: Option) -> list[Option]:
    """The ranks of ``cheap``'s method on the space's cost-fraction grid whose cost lies strictly
    between ``cheap``'s and ``dear``'s, dearest first; their losses on the line between the two (the
    table did not score them: where a layer's loss is convex in its cost the line overstates it,
    elsewhere it can understate it - the search's trials score the plans that come out)."""
    spec, space, method = runner.workbench.specs[name], runner.space, cheap.method
    low = space.cost_fraction_of(spec, method, cheap.rank)  # type: ignore[arg-type]
    high = space.cost_fraction_of(spec, method, dear.rank) if dear.method == method else 1.0  # type: ignore[arg-type]
    between: list[Option] = []
    for fraction in reversed(space.grid()):  # dearest first
        if not low < fraction < high:
            continue
        rank = space.rank_for(spec, method, fraction)
        if rank is None or rank in (cheap.rank, dear.rank) or any(rank == o.rank for o in between):
            continue
        cost = _layer_cost(runner, name, method, rank)
        if cheap.cost < cost < (between[-1] if between else dear).cost:
            share = (cost - cheap.cost) / (dear.cost - cheap.cost)
            between.append(Option(method, rank, cheap.loss + share * (dear.loss - cheap.loss), cost))
    return between


def least_loss_cut(runner: TrialRunner, table: SensitivityTable, choices: Choices,
                   fits: Callable[[Choices], bool], step: float = 0.02) -> Choices | None:
    """``choices`` with ranks lowered where ``table`` says it costs the least quality, until ``fits``
    accepts; ``None`` when nothing fits.

    One layer at a time moves to its next lower rank (its cost fraction cut by ``step`` more), the
    move that adds the least loss per unit of cost saved first. A layer's loss at a rank is
    interpolated between the ranks the table scored, by cost. A layer the plan keeps can be
    compressed too, stepping down the ranks the table scored for it. ``ranksearch.scored_cut`` takes
    the same steps, picked by the plans' scores, for the repairs and spares of plans at the budget
    (``ranksearch.final_checks``); this cut tells it how much to save.

    Why kept layers too: a plan that keeps its most sensitive layers and has the rest near the
    space's smallest ranks has nothing left to cut among those. On the benchmark's MiniLM at batch
    1, 0.35x latency, the sensitivity-based plan (validation 0.489, the next best 0.282) measured
    1.4% over the accepted limit at its final check, and no cut of its compressed layers fitted.

    Why only then: the table scores each layer compressed alone, from the original, and a kept layer's
    dearest scored ranks often lose nothing there, so they came first; beside the plan's other
    layers they cost far more. (The benchmark's CNN at batch 1, 0.7x: the answer, validation 0.956,
    keeps three layers; its headroom spare, cut 5% under it, compressed all three and scored 0.339.)
    """
    cut = dict(choices)
    now, ladders = cut_ladders(runner, table, choices, step)
    while not fits(cut):
        move = _cheapest_move(now, ladders, choices)
        if move is None:
            return None
        now[move] = ladders[move].pop(0)
        cut[move] = (now[move].method, now[move].rank)  # type: ignore[assignment]
    return cut if cut != choices else None


def cut_ladders(runner: TrialRunner, table: SensitivityTable, choices: Choices,
                step: float = 0.02) -> tuple[dict[str, Option], dict[str, list[Option]]]:
    """Each searchable layer's option in ``choices`` (its rank, cost and loss by ``table``; kept when
    not in it) and its lower ranks, nearest first, each cheaper than the one before: a compressed
    layer's ranks ``step`` apart in cost fraction (losses interpolated by cost), a kept layer's the
    ranks the table scored. The steps :func:`least_loss_cut` and ``ranksearch.scored_cut`` take."""
    by_name = {c.spec.name: c for c in runner.searchable}
    space = runner.space
    now: dict[str, Option] = {}
    ladders: dict[str, list[Option]] = {}
    cost = budget_cost(runner)
    for name, (method, rank) in choices.items():
        option = _interpolated(cost, table, name, method)
        if name not in by_name or option is None:
            continue
        now[name] = option(rank)
        spec, fraction = by_name[name].spec, space.cost_fraction_of(by_name[name].spec, method, rank)
        ladder: list[Option] = []
        for k in range(1, int(round(1 / step))):
            lower = space.rank_for(spec, method, max(space.cost_fraction_low, fraction * (1 - k * step)))
            if lower is not None and lower != rank and all(lower != o.rank for o in ladder):
                candidate = option(lower)
                if candidate.cost < (ladder[-1] if ladder else now[name]).cost:
                    ladder.append(candidate)
        ladders[name] = ladder
    for name, cand in by_name.items():
        if name in choices:
            continue
        now[name], *scored_options = _options_of(runner, table, cand)
        ladder = []
        for candidate in sorted(scored_options, key=lambda o: -o.cost):  # dearest first, each step cheaper
            if candidate.cost < (ladder[-1] if ladder else now[name]).cost:
                ladder.append(candidate)
        ladders[name] = ladder
    return now, ladders


def open_ladders(ladders: dict[str, list[Option]], choices: Choices) -> dict[str, list[Option]]:
    """The ladders a cut may step down: the layers ``choices`` compresses, and the layers it keeps only
    when those have nothing left to cut (see :func:`least_loss_cut`)."""
    return ({name: ladder for name, ladder in ladders.items() if ladder and name in choices}
            or {name: ladder for name, ladder in ladders.items() if ladder})


def loss_per_cost_saved(now: Option, to: Option) -> float:
    """The loss the table says a step from ``now`` down to ``to`` adds, per unit of cost it saves."""
    return max(0.0, to.loss - now.loss) / (now.cost - to.cost)


def _cheapest_move(now: dict[str, Option], ladders: dict[str, list[Option]], choices: Choices) -> str | None:
    """The layer whose next step down adds the least loss per unit of cost saved, by the table."""
    moves = [(loss_per_cost_saved(now[name], ladder[0]), name)
             for name, ladder in open_ladders(ladders, choices).items()]
    return min(moves)[1] if moves else None


def step_value(table: SensitivityTable, cost: BudgetCost) -> StepValue:
    """``value(name, method, rank, raised)``: the loss ``table`` says a layer saves going from ``rank``
    to ``raised`` (``None``: kept, no loss) per unit of cost it adds (infinite when it adds none), 0
    when it saves nothing. ``cost``: what the budget counts per layer (a search's: :func:`budget_cost`).
    Losses between the ranks the table scored are interpolated by cost, as in :func:`least_loss_cut`;
    the order of a grow (``ranksearch.neighbours.grown_choices``).

    Why: a grow spends a plan's slack one rank step at a time, and at random it spends it as much on
    the layers that gain nothing. The benchmark's CNN at batch 8, 0.5x latency: the energy plan at
    threshold 0.566 scored 0.633 on validation; with one layer at a time raised to its rank at
    threshold 0.612, the first block's two convs took it to 0.750 and 0.672, the other seven layers
    to 0.633-0.672. The table, scored one layer at a time, gained most per FLOP on those two convs
    and nothing on the other seven.
    """

    interpolated: dict[tuple[str, str], Callable[[Rank], Option] | None] = {}  # a grow asks about each layer often

    def value(name: str, method: str, rank: Rank, raised: Rank | None) -> float:
        if (name, method) not in interpolated:
            interpolated[name, method] = _interpolated(cost, table, name, method)
        option = interpolated[name, method]
        if option is None:
            return 0.0
        now = option(rank)
        after = Option(KEEP, None, 0.0, cost(name, KEEP, None)) if raised is None else option(raised)
        saved = now.loss - after.loss
        if saved <= 0:
            return 0.0
        return saved / (after.cost - now.cost) if after.cost > now.cost else math.inf

    return value


def _interpolated(cost: BudgetCost, table: SensitivityTable, name: str,
                  method: str) -> Callable[[Rank], Option] | None:
    """``option(rank)``: a layer's option at any rank of ``method``, its loss interpolated by cost
    between the ranks ``table`` scored (``None`` when it scored none of that method)."""
    scored = sorted((cost(name, m, r), loss) for m, r, loss in table.losses.get(name, ()) if m == method)
    if not scored:
        return None
    costs, losses = zip(*scored)

    def option(rank: Rank) -> Option:
        at = cost(name, method, rank)
        return Option(method, rank, float(np.interp(at, costs, losses)), at)

    return option


def sensitivity_seeds(runner: TrialRunner, table: SensitivityTable) -> list[Seed]:
    """The threshold and Lagrangian plans from one sensitivity table."""
    options = layer_options(runner, table)
    finer = partial(ranks_between, runner)
    seeds = []
    lagrangian, threshold = SENSITIVITY_SEEDS
    for origin, choices in ((lagrangian, lagrangian_choices(options, runner.fit, finer)),
                            (threshold, threshold_choices(options, runner.fit))):
        if choices:
            seeds.append(Seed(origin, choices))
    return seeds
