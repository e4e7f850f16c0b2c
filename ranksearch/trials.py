"""One trial of the search: sample per-layer choices, check the budget cheaply, rebuild, score.

Ranks are searched as a cost fraction per layer (see ``ranksearch.space``). Before the model is
rebuilt, the plan's analytic FLOPs and parameters and its predicted latency are checked; a plan
that breaks a FLOP or parameter budget, or whose predicted latency is over the target by more than
the predictor's error, is pruned without being built. The others are built and the whole model's
latency is measured: the measurement, not the prediction, decides whether the plan meets a latency
target (the per-layer table misses what layers do to each other inside the model). The budgets'
relative excesses are Optuna constraints (``trial.set_constraint``), which the sampler uses; only
plans within budget are scored.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from torch import nn

from .batchnorm import BatchNormRecalibration
from .cost import LatencyPredictor, LatencyRatio
from .exceptions import EvaluationError
from .fitting import Choices, best_cheaper_plan, choices_key, fit_to_budget
from .plan import KEEP, CompressionPlan, LayerChoice
from .quality import FidelityScorer, checked_score
from .rebuild import apply_plan
from .result import ModelStats
from .space import LayerCandidates, SearchSpace
from .targets import Targets
from .warmstart import Seed, fitted_seeds, heuristic_seeds, seed_method
from .workbench import ModelWorkbench, plan_cost

if TYPE_CHECKING:
    from .sensitivity import SensitivityTable

__all__ = ["TrialRunner"]

log = logging.getLogger("ranksearch.search")
fitting_log = logging.getLogger("ranksearch.fitting")
timing_log = logging.getLogger("ranksearch.timing")  # every whole-model timing, for debugging the measurements

# A measured latency this close to the target (relative) is measured again before it decides.
_NEAR_TARGET = 0.04
# The original is timed again after this many seconds, to follow the machine's drift.
_DRIFT_INTERVAL_S = 10.0
# timing_noise() spans the original's timings over this many seconds (at least its last three).
_NOISE_WINDOW_S = 60.0
# A timing over the target this much (relative) over what its caller expected, under the target, is
# timed again beside the original (see measured_latency)
_SURPRISE = 0.25
# How far the secant of calibrated_fits may tilt from the prediction scaled to a measurement (a factor).
_SLOPE_RANGE = 2.0
# Seconds of alternating blocks (``measure_ratio``) per round of a final check, and for one timing
# beside the original: a round of two separate timings took about 0.3 s.
_PAIRED_ROUND_S = 0.2
_BESIDE_ORIGINAL_S = 0.4

EvalFn = Callable[[nn.Module], float]


def _plan_key(plan: CompressionPlan) -> str:
    """The key of a plan's replaced layers, as ``measured_latency`` caches them."""
    return choices_key({c.name: (c.method, c.rank) for c in plan.replaced})


def _param_names(name: str) -> tuple[str, str]:
    return f"{name}.method", f"{name}.cost_fraction"


class TrialRunner:
    """State shared by the trials of one ``optimize`` call."""

    def __init__(
        self, *, reference: nn.Module, inputs: tuple[Any, ...], candidates: list[LayerCandidates],
        space: SearchSpace, targets: Targets, baseline: ModelStats, eval_fn: EvalFn | None,
        scorer: FidelityScorer | None, predictor: LatencyPredictor | None, measure: Callable[[nn.Module], Any],
        fingerprint: dict[str, Any], latency_check_every: int,
        measure_round: Callable[[nn.Module], Any] | None = None,
        measure_pair: Callable[[nn.Module, nn.Module, float, int], LatencyRatio] | None = None,
        recalibration: BatchNormRecalibration | None = None,
    ) -> None:
        self.reference = reference
        self.inputs = inputs
        self.searchable = [c for c in candidates if c.searchable]
        self.candidates = candidates
        self.specs = [c.spec for c in candidates]
        self.space = space
        self.targets = targets
        self.baseline = baseline
        self.eval_fn = eval_fn
        self.scorer = scorer
        self.predictor = predictor
        self.measure = measure
        # one round of the final check: a single attempt (see verified_latency)
        self.measure_round = measure_round if measure_round is not None else measure
        # ``(reference, model, seconds, chunks) -> LatencyRatio``, the two timed in alternating blocks;
        # None where they cannot be (a latency_fn): then each is timed on its own, one after the other
        self.measure_pair = measure_pair
        self.fingerprint = fingerprint
        self.latency_check_every = latency_check_every
        self.workbench = ModelWorkbench(reference, [c.spec for c in self.searchable])
        # re-estimates BatchNorm statistics of each plan's model before it is scored (ranksearch.batchnorm)
        self.recalibration = recalibration
        self.evaluated = 0  # trials scored
        self.rebuilt = 0  # trials built (scored or pruned on their measured latency)
        self.scan_evaluations = 0  # plans scored outside trials by best_cheaper_plan
        # their scores and top-1 agreements by plan key, for the seed trials of the same plans to reuse
        self._scanned: dict[str, tuple[float, float | None]] = {}
        self._measured: dict[str, float] = {}  # plan key -> measured latency, ms
        self._second_looks: set[str] = set()  # plan keys timed again by second_look
        # the original's timings (when, ms), for drift() and timing_noise()
        self._original_timings: list[tuple[float, float]] = [(time.monotonic(), baseline.latency_ms)]

    # -- plans ----------------------------------------------------------------------------------

    def kept_notes(self) -> list[LayerChoice]:
        """``keep`` entries, with the reason, for layers the search could not touch."""
        return [
            LayerChoice(c.spec.name, KEEP, origin="search-space", reason="; ".join(c.notes) or "no method applies")
            for c in self.candidates if not c.searchable
        ]

    def make_plan(self, choices: dict[str, tuple[str, Any]], origin: str, metadata: Mapping[str, Any] | None = None) -> CompressionPlan:
        layers = [
            LayerChoice(name, method, rank, origin=origin)
            for name, (method, rank) in choices.items() if method != KEEP
        ]
        return CompressionPlan(layers=layers + self.kept_notes(), fingerprint=self.fingerprint, metadata=dict(metadata or {}))

    def sample_choices(self, trial: optuna.Trial) -> dict[str, tuple[str, Any]]:
        choices: dict[str, tuple[str, Any]] = {}
        for cand in self.searchable:
            method_param, fraction_param = _param_names(cand.spec.name)
            method = trial.suggest_categorical(method_param, [KEEP, *cand.methods])
            if method == KEEP:
                continue
            fraction = trial.suggest_float(fraction_param, self.space.cost_fraction_low, self.space.cost_fraction_high,
                                           step=self.space.cost_fraction_step)
            rank = self.space.rank_for(cand.spec, method, fraction)
            if rank is not None:
                choices[cand.spec.name] = (method, rank)
        return choices

    def fastest_choices(self) -> Choices:
        """The fastest plan the space allows, by the predictor: each layer replaced at the space's
        smallest cost fraction by the method predicted to save it the most time, or kept where no
        method is predicted to save any (a replacement adds layers, and small layers lose by it)."""
        assert self.predictor is not None
        original_ms = self.predictor.predict(self.make_plan({}, "check"))
        choices: Choices = {}
        for cand in self.searchable:
            fastest_ms = original_ms
            for method, rank in self.space.smallest_ranks(cand):
                predicted = self.predictor.predict(self.make_plan({cand.spec.name: (method, rank)}, "check"))
                if predicted < fastest_ms:
                    fastest_ms, choices[cand.spec.name] = predicted, (method, rank)
        return choices

    def violations(self, choices: dict[str, tuple[str, Any]], *, measured: bool = False,
                   corrected: Callable[[float], float] | None = None) -> dict[str, float]:
        """Relative excess over each budget of a plan, from analytic costs and predicted latency
        (passed through ``corrected``, if given; ``measured=True``: the whole model's measured latency)."""
        plan = self.make_plan(choices, "check")
        saved = plan_cost(self.specs, plan)
        latency = None
        if self.predictor is not None:
            latency = self.measured_latency(plan) if measured else self.predictor.predict(plan)
            if corrected is not None and not measured:
                latency = corrected(latency)
        return self.targets.violations(latency_ms=latency, flops=self.baseline.flops - saved.flops,
                                       params=self.baseline.params - saved.params)

    def feasible(self, choices: dict[str, tuple[str, Any]]) -> bool:
        """Whether the plan meets every budget, by prediction (cheap)."""
        return all(v <= 0 for v in self.violations(choices).values())

    def measured_feasible(self, choices: dict[str, tuple[str, Any]]) -> bool:
        """Whether the plan meets every budget, by measuring the whole model (cached per plan)."""
        return all(v <= 0 for v in self.violations(choices, measured=True).values())

    def fits_beside(self, parent: Choices, parent_latency_ms: float | None, *, margin: float = 0.01,
                    spend: float = 1.0) -> Callable[[Choices], bool]:
        """Whether a plan near ``parent`` meets every budget by prediction, spending at most ``spend``
        of the parent's slack and keeping ``margin`` (relative) under each budget.

        The prediction is scaled by how far it was off on the parent's measured latency: plans that
        differ in a few layers share most of the predictor's error (see ``ranksearch.neighbours``).
        """
        scale = 1.0
        if self.predictor is not None and parent_latency_ms:
            scale = parent_latency_ms / self.predictor.predict(self.make_plan(parent, "check"))
        return self._within(lambda predicted: predicted * scale, parent, margin=margin, spend=spend)

    def calibrated_fits(self, anchors: Sequence[Choices], margin: float = 0.01) -> Callable[[Choices], bool]:
        """Whether a plan meets every budget, ``margin`` under it, by the prediction mapped onto the
        measurements of ``anchors`` (plans measured last, most recent last): a line through the last
        two (predicted, measured) points - a secant step, its slope kept within a factor of
        ``_SLOPE_RANGE`` of the scaled prediction's - or, with one point or a line that does not
        rise, the prediction scaled to the last measurement."""
        assert self.predictor is not None
        points = [(self.predictor.predict(plan), self.measured_latency(plan))
                  for plan in (self.make_plan(a, "check") for a in anchors[-2:])]
        (p1, m1), (p2, m2) = points[0], points[-1]
        slope = (m2 - m1) / (p2 - p1) if abs(p2 - p1) > 0.01 * p2 else 0.0
        if slope > 0:
            # within a factor of _SLOPE_RANGE of the scaled prediction's slope: a line through two
            # plans a few percent apart is mostly their timing noise. One search's spatial plans,
            # predicted 0.711 and 0.651 of the original, measured 0.771 and 0.749: a slope of 0.37,
            # which ruled out every plan but the cheapest (measured 0.55 at a 0.7 target)
            proportional = m2 / p2
            slope = min(max(slope, proportional / _SLOPE_RANGE), proportional * _SLOPE_RANGE)

        def corrected(predicted: float) -> float:
            return m2 + slope * (predicted - p2) if slope > 0 else predicted * m2 / p2

        return self._within(corrected, anchors[-1], margin=margin, spend=1.0)

    def _within(self, corrected: Callable[[float], float], parent: Choices, *, margin: float,
                spend: float) -> Callable[[Choices], bool]:
        """``fits(choices)``: each budget's excess, by the corrected prediction, at most the parent's
        plus ``spend`` of its slack beyond ``margin`` (or ``-margin`` when it has none)."""
        start = self.violations(parent, corrected=corrected)
        limits = {k: v + spend * (-margin - v) if v < -margin else -margin for k, v in start.items()}

        def fits(choices: Choices) -> bool:
            return all(v <= limits[k] for k, v in self.violations(choices, corrected=corrected).items())

        return fits

    def fit(self, make: Callable[[float], Choices], cheap: float, dear: float, *, integer: bool = False) -> Choices | None:
        """A one-knob plan fitted to the budget (see ``ranksearch.fitting``).

        Each plan the fit measures after its first is expected to take what the plan measured before
        it took, scaled by their predictions; a miss far over that expectation, which put the plan
        under the target, gets a second look (``measured_latency``'s ``expected_ms``).
        """
        on_measurement = self.predictor is not None and bool(self.latency_check_every)
        previous: CompressionPlan | None = None  # the plan this fit measured last

        def measured_feasible(choices: Choices) -> bool:
            nonlocal previous
            assert self.predictor is not None
            plan = self.make_plan(choices, "check")
            predicted = self.predictor.predict(plan)  # before the measurement recalibrates it
            expected = None
            if previous is not None:
                expected = self.measured_latency(previous) * predicted / self.predictor.predict(previous)
            measured = self.measured_latency(plan, expected_ms=expected)
            previous = plan
            fitting_log.debug("fit: measured %.3f ms (predicted %.3f ms) against the %.3f ms target",
                              measured, predicted, self.targets.latency_ms)
            return self.measured_feasible(choices)

        def measured_slack(choices: Choices) -> float:
            return -max(self.violations(choices, measured=True).values())

        def fits_on_second_look(choices: Choices) -> bool:
            self.second_look(self.make_plan(choices, "check"))
            return self.measured_feasible(choices)

        return fit_to_budget(make, cheap, dear, predicted_feasible=self.feasible,
                             measured_feasible=measured_feasible if on_measurement else None,
                             rescaled=self.calibrated_fits if on_measurement else None,
                             second_look=fits_on_second_look if on_measurement else None,
                             measured_slack=measured_slack if on_measurement else None, integer=integer)

    def measured_latency(self, plan: CompressionPlan, model: nn.Module | None = None, *,
                         expected_ms: float | None = None) -> float:
        """The whole model's latency under ``plan`` as at the search's start, measured once per distinct
        plan (:meth:`latency_now`: beside the original, or corrected for the machine's drift); each new
        measurement also calibrates the predictor.

        A measurement within its noise of the latency target cannot say on which side the plan is:
        it is measured again beside the original (:meth:`_beside_original`).
        When the two agree on the side, their mean counts; when they do not, a third timing beside
        the original is taken and the median of the three decides. Those are the plans the search
        wants most, right at the budget. The noise is the larger of twice the measurement's own
        spread and how far the original's timings fell apart over the last minute
        (:meth:`timing_noise`), at least ``_NEAR_TARGET``: the spread of one measurement misses how
        much timings seconds apart differ on a busy machine, and how far off the drift estimate may
        be. (MiniLM at batch 1 in the benchmark: a plan timed at 0.32 of the original in its trial,
        0.37 in the final check, the best plan of its search until then.)

        A timing over the target and more than ``_SURPRISE`` over ``expected_ms`` (what the caller
        expects the plan to take), which is under the target, is a surprise: a slow moment caught by
        one timing that the original's timings around it did not show. It is timed twice more beside
        the original, and the median of the three counts. (A fit of the energy threshold on the
        benchmark's CNN at batch 1, 0.7x: threshold 0.684, expected at 0.68 of the original, measured
        1.05, and the fit ended at threshold 0.627, measured at 0.60; threshold 0.689 measured 0.66
        and 0.68 in two other runs.) A fit expects what the plan it measured before took, scaled by
        their predictions; a trial expects the predictor's prediction, calibrated by every
        measurement so far (its recent error sets :meth:`prune_margin`, typically 10%).
        """
        key = _plan_key(plan)
        if key not in self._measured:
            if model is None:
                model = self.workbench.apply(plan)
            ms, spread, how = self.latency_now(model)
            target = self.targets.latency_ms
            noise = max(2 * spread, self.timing_noise(), _NEAR_TARGET)
            if target is not None and abs(ms - target) / target < noise:
                timings = [ms, self._beside_original(model)]
                if (timings[0] <= target) == (timings[1] <= target):
                    ms = statistics.mean(timings)
                else:  # they disagree on the side: a third timing decides
                    timings.append(self._beside_original(model))
                    ms = statistics.median(timings)
                timing_log.debug("close call: %.3f ms %s; %s ms beside the original; %.3f ms against the %.3f ms "
                                 "target", timings[0], how, " and ".join(f"{t:.3f}" for t in timings[1:]), ms, target)
            elif (target is not None and expected_ms is not None and ms > target
                  and target >= expected_ms and ms > expected_ms * (1 + _SURPRISE)):
                timings = self._with_two_more(ms, model)
                ms = statistics.median(timings)
                timing_log.debug("surprise: %.3f ms %s, expected about %.3f ms; %s ms beside the original; %.3f ms "
                                 "against the %.3f ms target", timings[0], how, expected_ms,
                                 " and ".join(f"{t:.3f}" for t in timings[1:]), ms, target)
            else:
                timing_log.debug("%.3f ms %s against %s", ms, how,
                                 "no latency target" if target is None else f"the {target:.3f} ms target")
            self._measured[key] = ms
            if self.predictor is not None:
                self.predictor.record(plan, ms)
        return self._measured[key]

    def latency_now(self, model: nn.Module) -> tuple[float, float, str]:
        """One timing of ``model`` as a latency at the search's start: ``(ms, spread, how)``.

        Timed beside the original in alternating blocks where the two can be (``measure_pair``; the
        spread is then that of the two halves' ratios), else alone and divided by the machine's
        :meth:`drift` (the spread of its blocks). ``how`` says which, for the timing log.
        """
        if self.measure_pair is not None:
            paired = self.measure_pair(self.reference, model, _BESIDE_ORIGINAL_S, 2)
            return paired.ratio * self.baseline.latency_ms, paired.spread, f"beside the original ({paired.ratio:.3f})"
        first = self.measure(model)
        drift = self.drift()
        return first.ms / drift, first.spread, f"scaled by drift {drift:.3f}"

    def second_look(self, plan: CompressionPlan) -> float:
        """``plan``'s latency timed twice more beside the original, the median of those and its first
        measurement (once per plan: later calls return it). For a timing that decides alone what
        a single timing should not (a fit left with no plan); the predictor's record is revised."""
        key = _plan_key(plan)
        first = self.measured_latency(plan)
        if key not in self._second_looks:
            model = self.workbench.apply(plan)
            timings = self._with_two_more(first, model)
            self._measured[key] = statistics.median(timings)
            self._second_looks.add(key)
            timing_log.debug("second look: %.3f ms; %s ms beside the original; %.3f ms", first,
                             " and ".join(f"{t:.3f}" for t in timings[1:]), self._measured[key])
            if self.predictor is not None:
                self.predictor.revise(plan, self._measured[key])
        return self._measured[key]

    def _with_two_more(self, first_ms: float, model: nn.Module) -> list[float]:
        """``first_ms`` and two more timings of ``model``, each beside the original: the three a doubtful
        timing is decided on by their median (a surprise, a second look)."""
        return [first_ms, self._beside_original(model), self._beside_original(model)]

    def _beside_original(self, model: nn.Module) -> float:
        """The model timed beside the original, as a latency at the search's start: its ratio to the
        original's timing then, times the original's first latency.

        Where the two can be timed in alternating blocks (``measure_pair``: any device but a
        ``latency_fn``), they are, and the ratio holds even on a machine whose speed swings within a
        second. Otherwise the original is timed (a timing that counts for :meth:`drift` too), then the
        model.

        A ratio of two timings taken together needs no estimate of the drift. :meth:`drift` is the
        median of the original's last three timings; when two of them fell in one slow spell, every
        plan measured until they are outvoted is scaled down by that spell. (MiniLM at batch 1 in
        the benchmark: seeds timed at 0.68-0.70 of the original in their trials measured 0.80 in the
        final check.)
        """
        if self.measure_pair is not None:  # both in the same moments, block by block
            return self.latency_now(model)[0]
        self.retime_original()
        return self.measure(model).ms / self._original_timings[-1][1] * self.baseline.latency_ms

    def drift(self) -> float:
        """How much slower the machine runs the original now than when the search started.

        Speed drifts over the minutes a search takes (other work, clocks, heat), and latency targets
        are set against the original's latency at the start. So the original is timed again at most
        every ``_DRIFT_INTERVAL_S`` seconds, and measurements are divided by the median of its last
        three timings over the first.
        """
        now = time.monotonic()
        if now - self._original_timings[-1][0] > _DRIFT_INTERVAL_S:
            self.retime_original()
        return statistics.median(ms for _, ms in self._original_timings[-3:]) / self.baseline.latency_ms

    def timing_noise(self) -> float:
        """How far apart timings of one model fall now: the range of the original's timings over the
        last ``_NOISE_WINDOW_S`` seconds (at least its last three) over their median, 0 before it
        is timed twice.

        Over a minute rather than the last three alone, because :meth:`drift` takes the median of
        the last three: when all three fell in one slow stretch they agree, yet a plan timed just
        after the stretch is scaled by it. (A CNN at batch 1 in the benchmark: the drift estimate
        went from 0.87 to 1.06 and back to 0.90 within a search; a plan timed 11% under the target
        with the estimate at 1.06 got no second timing and was 4% over it in the final check.)
        """
        now = time.monotonic()
        recent = [ms for at, ms in self._original_timings if now - at <= _NOISE_WINDOW_S]
        if len(recent) < 3:
            recent = [ms for _, ms in self._original_timings[-3:]]
        return (max(recent) - min(recent)) / statistics.median(recent) if len(recent) > 1 else 0.0

    def retime_original(self, times: int = 1) -> None:
        """Time the original again (for :meth:`drift`). Two fresh timings outvote the first one, which
        may have been taken in a slow moment: every plan measured afterwards is scaled by them."""
        for _ in range(times):
            ms = self.measure(self.reference).ms
            self._original_timings.append((time.monotonic(), ms))

    def verified_latency(self, model: nn.Module, rounds: int = 5, limit_ms: float | None = None) -> tuple[float, float]:
        """The final check of a model's latency: ``(ms, spread)``, timed alternately with the original.

        A search takes minutes, and a machine's speed drifts over minutes (other work, clocks,
        heat). Alternating with the original and scaling the median ratio by the original's latency
        at the start of the search cancels that drift, so the answer is compared with the target
        under the conditions the target was set in. ``spread`` is the range of the per-round ratios
        over their median.

        A close call - ``limit_ms`` (the latency the answer is accepted up to) inside the rounds'
        range - is timed for as many rounds again and decided on all of them: the plans verified
        are the best ones, which sit at the budget, and a five-round median there says which side
        they are on little better than a coin (rounds a minute apart differ by several percent on a
        shared CPU).

        With ``measure_pair`` the two are timed in alternating blocks of about 10 ms for
        ``_PAIRED_ROUND_S`` per round, and the rounds are consecutive parts of those pairs: on a
        2-core cloud CPU whose speed swings by 20% within a second, ratios so timed scattered a third
        as much as those of separate timings, in less time (``ranksearch.cost.measure_ratio``). Without
        it (a ``latency_fn``), each round times the original, then the model, with ``measure_round``:
        one attempt, where a single measurement retries (up to three attempts) while its spread is
        high. The median over rounds already discounts a noisy round, and on a busy machine the retries
        would multiply the time of the checks, the largest part of a search's time outside its trials.
        """

        def timed(count: int) -> tuple[float, list[float], int]:
            """(ratio, per-round ratios, weight) of ``count`` rounds"""
            if self.measure_pair is not None:
                paired = self.measure_pair(self.reference, model, count * _PAIRED_ROUND_S, count)
                return paired.ratio, list(paired.chunk_ratios), paired.pairs
            ratios = []
            for _ in range(count):
                original = self.measure_round(self.reference).ms
                ratios.append(self.measure_round(model).ms / original)
            return statistics.median(ratios), ratios, count

        ratio, ratios, weight = timed(rounds)
        if limit_ms is not None and min(ratios) <= limit_ms / self.baseline.latency_ms <= max(ratios):
            again, more_ratios, more_weight = timed(rounds)
            ratios += more_ratios
            ratio = ((ratio * weight + again * more_weight) / (weight + more_weight) if self.measure_pair is not None
                     else statistics.median(ratios))  # paired: two ratios weighed by their pairs
        return ratio * self.baseline.latency_ms, (max(ratios) - min(ratios)) / ratio

    def prune_margin(self) -> float:
        """How far over the target a *predicted* latency may be and the plan still gets measured:
        twice the predictor's recent error, within [10%, 40%] (40% before it has been checked)."""
        if self.predictor is None or len(self.predictor.checks) < 3:
            return 0.4
        recent = self.predictor.checks[-10:]
        errors = sorted(abs(c.predicted - c.measured) / c.measured for c in recent)
        return min(0.4, max(0.1, 2 * errors[len(errors) // 2]))

    def seeds(self, *, weakening: float | None, sensitivity: SensitivityTable | None,
              first: Sequence[Seed] = ()) -> list[Seed]:
        """``first``, then the heuristic seeds, budget-fitted ones and (with a sensitivity table)
        sensitivity-allocated ones, without duplicates."""
        from .sensitivity import sensitivity_seeds  # imports this module's TrialRunner for typing

        started = time.perf_counter()
        if self.predictor is not None and self.latency_check_every and self.measure_pair is None:
            # seeds are fitted on measurements cached for the whole search: scale them by fresh timings
            # of the original, not by the first one alone (a slow moment then would skew every seed);
            # timings beside the original need no scaling
            self.retime_original(times=2)
        heuristic = heuristic_seeds(self.reference, self.searchable, self.space, weakening=weakening)
        on_measurement = self.predictor is not None and bool(self.latency_check_every)
        fitted = fitted_seeds(self.reference, self.searchable, self.space, self.fit,
                              shortlist=self.by_predicted_score if on_measurement else None,
                              scan=self.best_cheaper_plan)
        allocated = sensitivity_seeds(self, sensitivity) if sensitivity is not None else []
        log.info("seed plans built and fitted to the budget in %.1f s (%d whole-model measurements so far; %d plans "
                 "scored under the fitted ones)", time.perf_counter() - started, len(self._measured),
                 self.scan_evaluations)
        # most promising first, so a small trial budget still runs them: the VBMF plan (the classic
        # one-shot answer), plans fitted to the budget, then the fixed energy thresholds
        vbmf = [s for s in heuristic if s.origin.startswith("seed:vbmf")]
        energy = [s for s in heuristic if not s.origin.startswith("seed:vbmf")]
        found = [*first, *vbmf, *allocated, *fitted, *energy]
        unique: dict[str, Seed] = {}
        for seed in found:
            unique.setdefault(choices_key(seed.choices), seed)
        return list(unique.values())

    def best_cheaper_plan(self, make: Callable[[float], Choices], knob: float, cheap: float) -> Choices:
        """The best-scoring of a fitted plan and the knob's plans a little cheaper by prediction
        (``ranksearch.fitting.best_cheaper_plan``; a few evaluations, no timing)."""
        def excess(choices: Choices) -> float:
            return max(self.violations(choices).values())

        def score(choices: Choices) -> float:
            self.scan_evaluations += 1
            plan = self.make_plan(choices, "scored")
            self._scanned[_plan_key(plan)] = scored = self._evaluate(self.workbench.apply(plan), plan)
            return scored[0]

        best, _ = best_cheaper_plan(make, knob, cheap, excess=excess, score=score)
        return best

    def by_predicted_score(self, plans: Mapping[str, Callable[[float], Choices]], cheap: float,
                           dear: float) -> list[str]:
        """The names of ``plans`` (one-knob plan makers), best first by the score of each one's plan
        fitted to the budget on the prediction alone (no timing; one evaluation each); those with
        no plan the prediction puts within the budget last, the one whose cheapest plan is predicted
        fastest first: at the space's floor that is the family whose fit on timings may still find a
        plan. (The benchmark's CNN at batch 8, 0.35x, on a slow day: no family's plan was predicted
        within the target, and the fits measured the families' cheapest plans in the order of their
        names - channel at 0.58 of the original, spatial at 0.49, then Tucker-2 at 0.41.)"""
        scores: dict[str, float] = {}
        cheapest_ms: dict[str, float] = {}
        for name, make in plans.items():
            scores[name] = -math.inf
            choices = fit_to_budget(make, cheap, dear, predicted_feasible=self.feasible, measured_feasible=None)
            if choices is None:
                if self.predictor is not None:
                    cheapest_ms[name] = self.predictor.predict(self.make_plan(make(cheap), "check"))
                continue
            try:
                plan = self.make_plan(choices, "shortlist")
                scores[name] = self.score(self.workbench.apply(plan), plan=plan)
            except Exception as exc:  # a failing evaluation just puts the plan last
                log.debug("shortlist: %s scored no value: %s", name, exc)
        ranked = sorted(plans, key=lambda name: (-scores[name], cheapest_ms.get(name, math.inf)))
        log.debug("uniform seeds by their score on the prediction's fit: %s", ", ".join(
            f"{name} {scores[name]:.4g}" + (f" (cheapest plan predicted {cheapest_ms[name]:.3f} ms)"
                                             if name in cheapest_ms else "") for name in ranked))
        return ranked

    def seed_params(self, seed: Seed) -> dict[str, Any]:
        """Optuna parameters that approximate a seed plan (the seed's exact ranks are used in the trial)."""
        params: dict[str, Any] = {}
        for cand in self.searchable:
            method_param, fraction_param = _param_names(cand.spec.name)
            method, rank = seed.choices.get(cand.spec.name, (KEEP, None))
            params[method_param] = method
            if method != KEEP:
                params[fraction_param] = self.space.snap(self.space.cost_fraction_of(cand.spec, method, rank))
        return params

    def enqueue(self, study: optuna.Study, queued: Seed, **user_attrs: Any) -> None:
        """Queue a plan as the next trial: its exact choices, and the nearest parameters for the sampler."""
        exact = {name: [m, list(r) if isinstance(r, tuple) else r] for name, (m, r) in queued.choices.items()}
        study.enqueue_trial(self.seed_params(queued), user_attrs={**user_attrs, "seed_choices": exact})

    # -- one trial ------------------------------------------------------------------------------

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        """One trial; any failure other than a budget miss is recorded on the trial and the search goes on."""
        try:
            return self._trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # a broken eval_fn, rebuild or forward must not end a long search
            message = str(exc) if isinstance(exc, EvaluationError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", message)
            log.warning("trial %d failed: %s", trial.number, message)
            raise EvaluationError(message) from exc

    def _trial(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        seed_choices = trial.user_attrs.get("seed_choices")  # a queued plan (see enqueue): exact ranks
        if seed_choices is not None:
            self.sample_choices(trial)  # registers the enqueued parameters with the sampler
            choices = {name: (m, tuple(r) if isinstance(r, list) else r) for name, (m, r) in seed_choices.items()}
            origin = trial.user_attrs.get("seed", f"trial:{trial.number}")
        else:
            choices = self.sample_choices(trial)
            origin = f"trial:{trial.number}"
        plan = self.make_plan(choices, origin)
        trial.set_user_attr("plan", plan.to_dict()["layers"])

        saved = plan_cost(self.specs, plan)
        flops, params = self.baseline.flops - saved.flops, self.baseline.params - saved.params
        predicted = self.predictor.predict(plan) if self.predictor is not None else None
        trial.set_user_attr("flops", flops)
        trial.set_user_attr("params", params)
        if predicted is not None:
            trial.set_user_attr("predicted_latency_ms", predicted)
        violations = self.targets.violations(latency_ms=predicted, flops=flops, params=params)
        measure_now = predicted is not None and self._check_due()
        # Before building: FLOP and parameter budgets are exact; a predicted latency only rules a
        # plan out when it is over by more than the predictor's error, if the plan will be measured
        over = {k: v for k, v in violations.items()
                if v > (self.prune_margin() if measure_now and k == "latency" else 0.0)}
        trial.set_user_attr("time_cost_s", time.perf_counter() - started)
        if over:
            self._prune(trial, violations, "predicted")

        t0 = time.perf_counter()
        model = self.workbench.apply(plan)
        t1 = time.perf_counter()
        trial.set_user_attr("time_rebuild_s", t1 - t0)
        self.rebuilt += 1
        latency = predicted
        if measure_now:
            latency = self.measured_latency(plan, model, expected_ms=predicted)
            trial.set_user_attr("measured_latency_ms", latency)
            trial.set_user_attr("time_measure_s", time.perf_counter() - t1)
            violations = self.targets.violations(latency_ms=latency, flops=flops, params=params)
        if any(v > 0 for v in violations.values()):
            self._prune(trial, violations, "measured" if measure_now else "predicted")
        for key, value in violations.items():
            trial.set_constraint(key, value)

        t2 = time.perf_counter()
        # a plan the scan under its fitted seed scored a moment ago is not scored again
        scanned = self._scanned.pop(_plan_key(plan), None)
        score, top1 = scanned if scanned is not None else self._evaluate(model, plan)
        if scanned is not None:
            trial.set_user_attr("score_from_scan", True)
        if top1 is not None:
            trial.set_user_attr("top1_agreement", top1)
        trial.set_user_attr("time_eval_s", time.perf_counter() - t2)
        self.evaluated += 1
        cost = latency if latency is not None else (flops if self.targets.flops is not None or self.targets.params is None else params)
        return score, float(cost)

    @staticmethod
    def _prune(trial: optuna.Trial, violations: dict[str, float], how: str) -> None:
        """Record the trial as infeasible (its constraints say by how much) without scoring it."""
        for key, value in violations.items():
            trial.set_constraint(key, value)
        reason = ", ".join(f"{k} {v:+.1%} over budget ({how})" for k, v in violations.items() if v > 0)
        trial.set_user_attr("skipped", f"not evaluated: {reason}")
        raise optuna.TrialPruned(reason)

    def calibrate_latency(self, fractions: tuple[float, ...] = (0.3, 0.6)) -> None:
        """Measure a few whole-model plans before the first trial and teach the predictor from them.

        Layers timed alone miss what happens inside the model (caches, memory traffic), so the
        per-layer table can be off by tens of percent; a couple of real measurements across the
        compression range correct most of it before seeds are fitted to the budget.
        """
        if self.predictor is None:
            return
        for fraction in fractions:
            choices: dict[str, tuple[str, Any]] = {}
            for cand in self.searchable:
                method = seed_method(cand)
                rank = self.space.rank_for(cand.spec, method, self.space.snap(fraction))
                if rank is not None:
                    choices[cand.spec.name] = (method, rank)
            if not choices:
                continue
            plan = self.make_plan(choices, "calibration")
            measured, _, _ = self.latency_now(self.workbench.apply(plan))
            log.debug("calibration plan at cost fraction %.2f: predicted %.3f ms, measured %.3f ms",
                      fraction, self.predictor.predict(plan), measured)
            self.predictor.record(plan, measured)
        self.workbench.apply(self.make_plan({}, "calibration"))

    def _check_due(self) -> bool:
        """Whether the plan about to be built gets its whole-model latency measured: always with
        ``latency_check_every=1`` (the default); else the first three built plans (to calibrate the
        predictor early) and every ``latency_check_every``-th, the others relying on the prediction."""
        every, upcoming = self.latency_check_every, self.rebuilt + 1
        return bool(every) and (every == 1 or upcoming <= 3 or upcoming % every == 0)

    def score_choices(self, choices: Choices) -> float:
        """A plan's score, built and evaluated outside any trial (no timing, nothing recorded)."""
        plan = self.make_plan(choices, "scored")
        return self.score(self.workbench.apply(plan), plan=plan)

    def score(self, model: nn.Module, trial: optuna.Trial | None = None, *, plan: CompressionPlan | None = None) -> float:
        """``model``'s score; with ``plan`` (the plan ``model`` was built from, as it comes from the
        workbench), its BatchNorm statistics are re-estimated first, where the search does that."""
        value, top1 = self._evaluate(model, plan)
        if trial is not None and top1 is not None:
            trial.set_user_attr("top1_agreement", top1)
        return value

    def build(self, plan: CompressionPlan) -> nn.Module:
        """A fresh model of ``plan`` (its own copy, in eval mode), as the search scores it and returns it:
        BatchNorm statistics re-estimated where the search does that."""
        model = apply_plan(self.reference, plan).eval()
        if self.recalibration is not None:
            self.recalibration(model, [c.name for c in plan.replaced])
        return model

    def _evaluate(self, model: nn.Module, plan: CompressionPlan | None) -> tuple[float, float | None]:
        """``(score, top-1 agreement)``: ``eval_fn``'s score (no agreement), or output fidelity's.
        With ``plan``: BatchNorm statistics re-estimated first (``self.recalibration``)."""
        if plan is not None and self.recalibration is not None:
            self.recalibration(model, [c.name for c in plan.replaced])
        if self.eval_fn is not None:
            return checked_score(self.eval_fn, model), None
        assert self.scorer is not None
        fidelity = self.scorer(model)
        return fidelity.score, fidelity.top1_agreement
