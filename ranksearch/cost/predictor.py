"""Model latency predicted from the per-layer table, and checked against full-model measurements.

A plan's latency is predicted as the model's measured baseline minus the per-layer savings the
:class:`~ranksearch.cost.LatencyTable` gives for its choices. Layers timed alone do not add up
exactly to the model, so each full-model check recorded with :meth:`LatencyPredictor.record`
also calibrates a small correction with three terms, each for a known cause:

* a scale on the table's savings: inside the model a layer's inputs come from the previous layer,
  not from the cache it left them in when timed alone in a loop;
* a time per million parameters removed: inside the model a layer's weights are usually evicted
  by the other layers', so a smaller weight saves memory traffic the isolated timing never saw
  (this is what makes low-rank linear layers gain more in a model than alone);
* a time per replaced layer: one more module call and intermediate tensor each.

They are fitted by bounded least squares (scipy's ``lsq_linear``) with prior rows that hold them
at "no correction" until the checks say otherwise, so a few noisy checks cannot swing them far.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from ..decompose import get_method
from ..exceptions import InvalidInputsError
from ..plan import CompressionPlan
from .table import LatencyTable

__all__ = ["LatencyPredictor"]

log = logging.getLogger("ranksearch.cost")

# Predictions are kept above this fraction of the baseline: a table that promises more saving
# than the whole model takes is wrong, and a latency of zero would break ratios downstream.
_FLOOR = 0.01
# The calibrated scale on the table's savings stays in this range; further out means bad checks
# (a busy machine), not physics.
_SCALE_RANGE = (0.5, 2.0)


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInputsError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Features:
    saving_ms: float  # sum of the table's per-layer savings
    mparams_removed: float  # millions of parameters the plan removes (negative if it adds)
    replaced: int  # layers the plan replaces


@dataclass(frozen=True)
class _Check:
    features: _Features
    predicted: float  # what predict() said before this check was recorded
    measured: float


class LatencyPredictor:
    """Predict a compressed model's latency; learn from full-model measurements.

    Args:
        table: the per-layer latency table of the model.
        baseline_ms: the measured latency of the uncompressed model.
        calibrate: fit the correction from recorded checks (``False``: the table alone).
        prior_checks: how many checks' worth of weight the "no correction" prior has; larger
            values make the correction move more slowly.

    Example:
        >>> predictor = LatencyPredictor(table, measure_latency(model, x).ms)
        >>> predictor.predict(plan)
        >>> predictor.record(plan, measure_latency(apply_plan(model, plan), x).ms)
        >>> predictor.error_summary()
        {'checks': 1, 'median_rel_error': 0.04, 'worst_rel_error': 0.04}
    """

    def __init__(
        self, table: LatencyTable, baseline_ms: float, *, calibrate: bool = True, prior_checks: float = 3.0
    ) -> None:
        self.table = table
        self.baseline_ms = _positive(baseline_ms, "baseline_ms (the measured latency of the model, in ms)")
        prior_checks = _positive(prior_checks, "prior_checks")
        self.calibrate = calibrate
        self.prior_checks = float(prior_checks)
        self.checks: list[_Check] = []
        self.scale = 1.0  #: factor on the table's savings
        self.ms_per_mparam = 0.0  #: ms saved per million parameters removed
        self.per_layer_ms = 0.0  #: ms added per replaced layer

    def _features(self, plan: CompressionPlan) -> _Features:
        saving, removed = 0.0, 0
        for choice in plan.replaced:
            spec = self.table.spec(choice.name)
            method = get_method(choice.method)
            saving += self.table.saving_ms(choice.name, choice.method, choice.rank)
            rank = method.normalize_rank(spec, choice.rank)  # type: ignore[arg-type]
            removed += spec.params - method.cost(spec, rank).params
        return _Features(saving, removed / 1e6, len(plan.replaced))

    def _corrected(self, f: _Features) -> float:
        predicted = (
            self.baseline_ms - self.scale * f.saving_ms - self.ms_per_mparam * f.mparams_removed
            + self.per_layer_ms * f.replaced
        )
        return max(predicted, _FLOOR * self.baseline_ms)

    def table_saving(self, plan: CompressionPlan) -> float:
        """Sum of the table's per-layer savings over the plan's replaced layers, in ms."""
        return self._features(plan).saving_ms

    def predict(self, plan: CompressionPlan) -> float:
        """Predicted latency of ``plan`` applied to the model, in ms.

        ``baseline - scale * sum(per-layer savings) - ms_per_mparam * (millions of parameters
        removed) + per_layer_ms * (replaced layers)``; until checks are recorded the correction
        is ``scale = 1`` and zero for the other two terms, i.e. the table alone.

        Raises:
            PlanMismatchError: if the plan names a layer the table does not cover.
        """
        return self._corrected(self._features(plan))

    def record(self, plan: CompressionPlan, measured_ms: float) -> None:
        """Record a full-model measurement of ``plan`` and recalibrate.

        The prediction error reported by :meth:`error_summary` is that of the prediction made
        before this check was recorded, so it is an honest out-of-sample figure.
        """
        measured_ms = _positive(measured_ms, "measured_ms (a measured latency, in ms)")
        features = self._features(plan)
        self.checks.append(_Check(features, self._corrected(features), measured_ms))
        if self.calibrate:
            self._refit()

    def revise(self, plan: CompressionPlan, measured_ms: float) -> None:
        """Replace the measurement recorded last for ``plan`` (e.g. a median of several timings after
        a doubtful one) and recalibrate; record it if ``plan`` has none."""
        measured_ms = _positive(measured_ms, "measured_ms (a measured latency, in ms)")
        features = self._features(plan)
        for index in range(len(self.checks) - 1, -1, -1):
            if self.checks[index].features == features:
                self.checks[index] = replace(self.checks[index], measured=measured_ms)
                if self.calibrate:
                    self._refit()
                return
        self.record(plan, measured_ms)

    @property
    def correction(self) -> dict[str, float]:
        """The current calibration terms (``scale`` 1 and the others 0 mean the table alone)."""
        return {"scale": self.scale, "ms_per_mparam": self.ms_per_mparam, "per_layer_ms": self.per_layer_ms}

    def _refit(self) -> None:
        """Least squares for ``baseline - measured = scale * saving + ms_per_mparam * mparams_removed
        - per_layer_ms * replaced``, bounded (``scale`` in range, ``ms_per_mparam >= 0``), with
        prior rows of ``prior_checks`` checks' weight pulling it to ``(1, 0, 0)``."""
        a = np.array(
            [[c.features.saving_ms, c.features.mparams_removed, -float(c.features.replaced)] for c in self.checks]
        )
        b = np.array([self.baseline_ms - c.measured for c in self.checks])
        # Each prior row is sized like a typical check's term, so that prior_checks means what it
        # says whatever the units; the floor keeps a term that is ~0 in every check at ~0.
        typical = np.maximum(np.abs(a).mean(axis=0), [1e-3 * self.baseline_ms, 1e-6, 1e-3])
        weight = math.sqrt(self.prior_checks)
        prior_a = np.diag(weight * typical)
        prior_b = np.array([weight * typical[0], 0.0, 0.0])
        result = lsq_linear(
            np.vstack([a, prior_a]), np.concatenate([b, prior_b]),
            bounds=([_SCALE_RANGE[0], 0.0, -np.inf], [_SCALE_RANGE[1], np.inf, np.inf]),
        )
        self.scale, self.ms_per_mparam, self.per_layer_ms = (float(v) for v in result.x)

    def error_summary(self) -> dict[str, Any]:
        """``{"checks", "median_rel_error", "worst_rel_error"}`` over the recorded checks
        (relative error ``|predicted - measured| / measured``; ``None`` without checks)."""
        if not self.checks:
            return {"checks": 0, "median_rel_error": None, "worst_rel_error": None}
        errors = [abs(c.predicted - c.measured) / c.measured for c in self.checks]
        return {
            "checks": len(errors),
            "median_rel_error": float(np.median(errors)),
            "worst_rel_error": float(max(errors)),
        }
