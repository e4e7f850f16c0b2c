"""One trial of the search: sample per-layer choices, check the budget cheaply, rebuild, score.

Ranks are searched as a cost fraction per layer (see ``ranksearch.space``). Before the model is
rebuilt, the plan's analytic FLOPs and parameters and its predicted latency are set as Optuna
constraints; a plan that already breaks a budget is pruned without the quality evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from torch import nn

from .cost import LatencyPredictor
from .decompose import get_method
from .exceptions import EvaluationError
from .layers import LayerSpec
from .plan import KEEP, CompressionPlan, LayerChoice
from .quality import FidelityScorer, checked_score
from .result import ModelStats
from .space import LayerCandidates, SearchSpace
from .targets import Targets
from .warmstart import Seed, fitted_seeds, heuristic_seeds, seed_method
from .workbench import ModelWorkbench, plan_cost

__all__ = ["TrialRunner"]

log = logging.getLogger("ranksearch.search")

EvalFn = Callable[[nn.Module], float]


def _param_names(name: str) -> tuple[str, str]:
    return f"{name}.method", f"{name}.cost_fraction"


def _relative_cost(spec: LayerSpec, method: str, rank: Any) -> float:
    cost = get_method(method).cost(spec, rank)
    if spec.flops:
        return cost.flops / spec.flops
    return cost.params / spec.params


class TrialRunner:
    """State shared by the trials of one ``optimize`` call."""

    def __init__(
        self, *, reference: nn.Module, inputs: tuple[Any, ...], candidates: list[LayerCandidates],
        space: SearchSpace, targets: Targets, baseline: ModelStats, eval_fn: EvalFn | None,
        scorer: FidelityScorer | None, predictor: LatencyPredictor | None, measure: Callable[[nn.Module], Any],
        fingerprint: dict[str, Any], latency_check_every: int,
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
        self.fingerprint = fingerprint
        self.latency_check_every = latency_check_every
        self.workbench = ModelWorkbench(reference, [c.spec for c in self.searchable])
        self.evaluated = 0

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

    def violations(self, choices: dict[str, tuple[str, Any]]) -> dict[str, float]:
        """Relative excess over each budget of a plan, from analytic costs and predicted latency."""
        plan = self.make_plan(choices, "check")
        saved = plan_cost(self.specs, plan)
        predicted = self.predictor.predict(plan) if self.predictor is not None else None
        return self.targets.violations(latency_ms=predicted, flops=self.baseline.flops - saved.flops,
                                       params=self.baseline.params - saved.params)

    def feasible(self, choices: dict[str, tuple[str, Any]]) -> bool:
        return all(v <= 0 for v in self.violations(choices).values())

    def seeds(self, *, weakening: float | None, sensitivity: bool) -> list[Seed]:
        """Heuristic seeds, budget-fitted ones, then (optionally) sensitivity-allocated ones, without duplicates."""
        from .sensitivity import sensitivity_seeds  # imports this module's TrialRunner for typing

        heuristic = heuristic_seeds(self.reference, self.searchable, self.space, weakening=weakening)
        fitted = fitted_seeds(self.reference, self.searchable, self.space, self.feasible)
        allocated = sensitivity_seeds(self) if sensitivity else []
        # most promising first, so a small trial budget still runs them: the VBMF plan (the classic
        # one-shot answer), plans fitted to the budget, then the fixed energy thresholds
        vbmf = [s for s in heuristic if s.origin.startswith("seed:vbmf")]
        energy = [s for s in heuristic if not s.origin.startswith("seed:vbmf")]
        found = vbmf + allocated + fitted + energy
        unique: dict[str, Seed] = {}
        for seed in found:
            unique.setdefault(json.dumps(sorted((k, m, str(r)) for k, (m, r) in seed.choices.items())), seed)
        return list(unique.values())

    def seed_params(self, seed: Seed) -> dict[str, Any]:
        """Optuna parameters that approximate a seed plan (the seed's exact ranks are used in the trial)."""
        params: dict[str, Any] = {}
        for cand in self.searchable:
            method_param, fraction_param = _param_names(cand.spec.name)
            method, rank = seed.choices.get(cand.spec.name, (KEEP, None))
            params[method_param] = method
            if method != KEEP:
                params[fraction_param] = self.space.snap(_relative_cost(cand.spec, method, rank))
        return params

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
        seed_choices = trial.user_attrs.get("seed_choices")
        if seed_choices is not None:
            self.sample_choices(trial)  # registers the enqueued parameters with the sampler
            choices = {name: (m, tuple(r) if isinstance(r, list) else r) for name, (m, r) in seed_choices.items()}
            origin = trial.user_attrs["seed"]
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
        for key, value in violations.items():
            trial.set_constraint(key, value)
        cost_time = time.perf_counter() - started
        trial.set_user_attr("time_cost_s", cost_time)
        broken = {k: v for k, v in violations.items() if v > 0}
        if broken:
            reason = ", ".join(f"{k} {v:+.1%} over budget" for k, v in broken.items())
            trial.set_user_attr("skipped", f"not evaluated: {reason}")
            raise optuna.TrialPruned(reason)

        t0 = time.perf_counter()
        model = self.workbench.apply(plan)
        t1 = time.perf_counter()
        score = self.score(model, trial)
        t2 = time.perf_counter()
        trial.set_user_attr("time_rebuild_s", t1 - t0)
        trial.set_user_attr("time_eval_s", t2 - t1)
        self.evaluated += 1
        if self.predictor is not None and self._check_due():
            measured = self.measure(model).ms
            self.predictor.record(plan, measured)
            trial.set_user_attr("measured_latency_ms", measured)
        cost = predicted if predicted is not None else (flops if self.targets.flops is not None or self.targets.params is None else params)
        return score, float(cost)

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
            measured = self.measure(self.workbench.apply(plan)).ms
            log.debug("calibration plan at cost fraction %.2f: predicted %.3f ms, measured %.3f ms",
                      fraction, self.predictor.predict(plan), measured)
            self.predictor.record(plan, measured)
        self.workbench.apply(self.make_plan({}, "calibration"))

    def _check_due(self) -> bool:
        """Whether this evaluated trial gets a full-model latency check: the first three (so the
        predictor is calibrated early, when it matters most), then every ``latency_check_every``."""
        every = self.latency_check_every
        return bool(every) and (self.evaluated <= 3 or self.evaluated % every == 0)

    def score(self, model: nn.Module, trial: optuna.Trial | None = None) -> float:
        if self.eval_fn is not None:
            return checked_score(self.eval_fn, model)
        assert self.scorer is not None
        fidelity = self.scorer(model)
        if trial is not None and fidelity.top1_agreement is not None:
            trial.set_user_attr("top1_agreement", fidelity.top1_agreement)
        return fidelity.score
