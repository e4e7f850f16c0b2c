"""Model latency predicted from the per-layer table, and checked against full-model measurements.

A plan's latency is predicted as the model's measured baseline minus the per-layer savings the
:class:`~ranksearch.cost.LatencyTable` gives for its choices. Layers timed alone do not add up
exactly to the model (caches, allocation, one more module call per replaced layer), so each
full-model check recorded with :meth:`LatencyPredictor.record` also calibrates a small
correction: a scale on the savings and a cost per replaced layer, fitted by least squares with a
prior that keeps them at "no correction" until the checks say otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..exceptions import InvalidInputsError
from ..plan import CompressionPlan
from .table import LatencyTable

__all__ = ["LatencyPredictor"]

log = logging.getLogger("ranksearch.cost")

# Predictions are kept above this fraction of the baseline: a table that promises more saving
# than the whole model takes is wrong, and a latency of zero would break ratios downstream.
_FLOOR = 0.01


@dataclass(frozen=True)
class _Check:
    saving: float  # sum of the table's per-layer savings, ms
    replaced: int  # layers the plan replaces
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

    def __init__(self, table: LatencyTable, baseline_ms: float, *, calibrate: bool = True, prior_checks: float = 2.0) -> None:
        if isinstance(baseline_ms, bool) or not isinstance(baseline_ms, (int, float)) or not math.isfinite(baseline_ms) or baseline_ms <= 0:
            raise InvalidInputsError(f"baseline_ms must be the measured latency of the model in ms (> 0), got {baseline_ms!r}")
        if not prior_checks > 0:
            raise InvalidInputsError(f"prior_checks must be > 0, got {prior_checks!r}")
        self.table = table
        self.baseline_ms = float(baseline_ms)
        self.calibrate = calibrate
        self.prior_checks = float(prior_checks)
        self.checks: list[_Check] = []
        self.scale = 1.0  # multiplies the table's savings
        self.per_layer_ms = 0.0  # added per replaced layer

    def table_saving(self, plan: CompressionPlan) -> tuple[float, int]:
        """Sum of the table's savings over the plan's replaced layers, and how many there are."""
        saving = 0.0
        for choice in plan.replaced:
            saving += self.table.saving_ms(choice.name, choice.method, choice.rank)
        return saving, len(plan.replaced)

    def _corrected(self, saving: float, replaced: int) -> float:
        predicted = self.baseline_ms - self.scale * saving + self.per_layer_ms * replaced
        return max(predicted, _FLOOR * self.baseline_ms)

    def predict(self, plan: CompressionPlan) -> float:
        """Predicted latency of ``plan`` applied to the model, in ms.

        ``baseline - scale * sum(per-layer savings) + per_layer_ms * replaced layers``; the
        correction is ``scale = 1, per_layer_ms = 0`` until checks are recorded.

        Raises:
            PlanMismatchError: if the plan names a layer the table does not cover.
        """
        return self._corrected(*self.table_saving(plan))

    def record(self, plan: CompressionPlan, measured_ms: float) -> None:
        """Record a full-model measurement of ``plan`` and recalibrate.

        The prediction error reported by :meth:`error_summary` is that of the prediction made
        before this check was recorded, so it is an honest out-of-sample figure.
        """
        if isinstance(measured_ms, bool) or not isinstance(measured_ms, (int, float)) or not math.isfinite(measured_ms) or measured_ms <= 0:
            raise InvalidInputsError(f"measured_ms must be a measured latency in ms (> 0), got {measured_ms!r}")
        saving, replaced = self.table_saving(plan)
        self.checks.append(_Check(saving, replaced, self._corrected(saving, replaced), float(measured_ms)))
        if self.calibrate:
            self._refit()

    def _refit(self) -> None:
        """Least squares for ``baseline - measured = scale * saving - per_layer_ms * replaced``,
        with prior rows pulling ``scale`` to 1 and ``per_layer_ms`` to 0."""
        savings = np.array([c.saving for c in self.checks])
        counts = np.array([c.replaced for c in self.checks], dtype=float)
        observed = np.array([self.baseline_ms - c.measured for c in self.checks])
        # prior rows scaled like a typical check, so prior_checks means what it says
        s_typ = max(float(np.mean(np.abs(savings))), 1e-3 * self.baseline_ms)
        n_typ = max(float(np.mean(counts)), 1.0)
        weight = math.sqrt(self.prior_checks)
        a = np.vstack([np.column_stack([savings, -counts]), [weight * s_typ, 0.0], [0.0, weight * n_typ]])
        b = np.concatenate([observed, [weight * s_typ, 0.0]])
        (scale, per_layer), *_ = np.linalg.lstsq(a, b, rcond=None)
        self.scale = float(np.clip(scale, 0.25, 4.0))  # a wild scale means a bad check, not physics
        self.per_layer_ms = float(per_layer)

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
