"""LatencyPredictor arithmetic and calibration, on a fake table with fixed per-layer savings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ranksearch import CompressionPlan, LayerChoice, capture_layer_specs, get_method
from ranksearch.cost import LatencyPredictor, LatencyTable
from ranksearch.exceptions import InvalidInputsError, PlanMismatchError
from ranksearch.layers import LayerSpec, spec_from_module


class FakeTable:
    """Savings of ``svd`` on three linear layers: ``per_rank`` ms per rank below the layer's width."""

    def __init__(self, per_rank: float = 0.1) -> None:
        self.specs = {
            name: spec_from_module(name, nn.Linear(32, 32), (4, 32)) for name in ("l0", "l1", "l2")
        }
        self.per_rank = per_rank

    def spec(self, name: str) -> LayerSpec:
        return self.specs[name]

    def saving_ms(self, name: str, method: str, rank: int) -> float:
        return self.per_rank * (16 - rank)


def _plan(**ranks: int) -> CompressionPlan:
    return CompressionPlan(layers=[LayerChoice(name, "svd", rank) for name, rank in ranks.items()])


def _mparams_removed(table: FakeTable, plan: CompressionPlan) -> float:
    svd = get_method("svd")
    return sum(table.spec(c.name).params - svd.cost(table.spec(c.name), c.rank).params for c in plan.replaced) / 1e6


def test_prediction_is_baseline_minus_table_savings() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0)  # type: ignore[arg-type]
    assert predictor.predict(_plan(l0=6)) == pytest.approx(10.0 - 1.0)
    assert predictor.predict(_plan(l0=6, l1=11)) == pytest.approx(10.0 - 1.0 - 0.5)
    assert predictor.predict(CompressionPlan(layers=[LayerChoice("l0", "keep")])) == 10.0
    assert predictor.predict(CompressionPlan()) == 10.0


def test_a_replacement_slower_than_its_layer_raises_the_prediction() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0)  # type: ignore[arg-type]
    assert predictor.predict(_plan(l0=26)) == pytest.approx(11.0)


def test_prediction_never_drops_below_a_floor() -> None:
    predictor = LatencyPredictor(FakeTable(per_rank=10.0), 10.0)  # type: ignore[arg-type]
    assert predictor.predict(_plan(l0=1, l1=1)) == pytest.approx(0.1)  # 1% of the baseline


def test_error_summary_reports_errors_of_predictions_made_before_each_check() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0, calibrate=False)  # type: ignore[arg-type]
    assert predictor.error_summary() == {"checks": 0, "median_rel_error": None, "worst_rel_error": None}
    predictor.record(_plan(l0=6), 9.0)  # predicted 9.0: exact
    predictor.record(_plan(l0=11), 10.0)  # predicted 9.5: 5% low
    predictor.record(_plan(l1=1), 8.0)  # predicted 8.5: 6.25% high
    summary = predictor.error_summary()
    assert summary["checks"] == 3
    assert summary["median_rel_error"] == pytest.approx(0.05)
    assert summary["worst_rel_error"] == pytest.approx(0.0625)
    assert predictor.correction == {"scale": 1.0, "ms_per_mparam": 0.0, "per_layer_ms": 0.0}


def test_calibration_learns_a_systematic_scale_on_savings() -> None:
    table = FakeTable()
    predictor = LatencyPredictor(table, 10.0)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    plans = [_plan(**{n: int(rng.integers(1, 16)) for n in ("l0", "l1", "l2") if rng.random() < 0.7}) for _ in range(40)]
    plans = [p for p in plans if p.replaced]
    truth = {id(p): 10.0 - 1.5 * sum(table.saving_ms(c.name, "svd", c.rank) for c in p.replaced) for p in plans}
    for plan in plans:
        predictor.record(plan, truth[id(plan)])
    held_out = _plan(l0=3, l1=9, l2=14)
    expected = 10.0 - 1.5 * sum(table.saving_ms(c.name, "svd", c.rank) for c in held_out.replaced)
    assert predictor.predict(held_out) == pytest.approx(expected, rel=0.03)
    errors = [abs(c.predicted - c.measured) / c.measured for c in predictor.checks]
    assert errors[0] > 0.05  # the table alone was off
    assert max(errors[-10:]) < 0.03  # the recorded checks corrected it


def test_calibration_learns_a_per_layer_overhead() -> None:
    table = FakeTable()
    predictor = LatencyPredictor(table, 10.0, prior_checks=0.5)  # type: ignore[arg-type]
    for ranks in ({"l0": 4}, {"l0": 8, "l1": 8}, {"l0": 12, "l1": 2, "l2": 7}, {"l2": 15}, {"l1": 3, "l2": 3}) * 4:
        plan = _plan(**ranks)
        saving = sum(table.saving_ms(c.name, "svd", c.rank) for c in plan.replaced)
        predictor.record(plan, 10.0 - saving + 0.2 * len(plan.replaced))
    assert predictor.per_layer_ms == pytest.approx(0.2, abs=0.05)
    assert predictor.scale == pytest.approx(1.0, abs=0.05)


def test_one_wild_check_cannot_swing_the_calibration_far() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0)  # type: ignore[arg-type]
    predictor.record(_plan(l0=1), 0.5)  # the table says 8.5: a check from a broken run
    assert 0.5 <= predictor.scale <= 2.0 and predictor.ms_per_mparam >= 0
    assert predictor.predict(_plan(l1=8)) > 5.0


def test_a_revised_measurement_replaces_the_doubtful_one() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0)  # type: ignore[arg-type]
    predictor.record(_plan(l0=8), 14.0)  # a slow moment: the table says 9.2
    pulled = predictor.scale
    predictor.revise(_plan(l0=8), 9.2)  # the median of three timings agrees with the table
    assert len(predictor.checks) == 1 and predictor.checks[0].measured == 9.2
    assert predictor.scale == pytest.approx(1.0, abs=1e-3) and pulled < 0.9
    predictor.revise(_plan(l1=4), 8.8)  # a plan it has no measurement of: recorded
    assert len(predictor.checks) == 2


def test_calibrate_false_keeps_the_table_alone() -> None:
    predictor = LatencyPredictor(FakeTable(), 10.0, calibrate=False)  # type: ignore[arg-type]
    for _ in range(5):
        predictor.record(_plan(l0=6), 7.0)
    assert predictor.predict(_plan(l0=6)) == pytest.approx(9.0)


def test_params_term_uses_the_methods_analytic_params() -> None:
    table = FakeTable()
    predictor = LatencyPredictor(table, 10.0, calibrate=False)  # type: ignore[arg-type]
    predictor.ms_per_mparam = 100.0
    plan = _plan(l0=6, l1=2)
    assert predictor.predict(plan) == pytest.approx(10.0 - 1.0 - 1.4 - 100.0 * _mparams_removed(table, plan))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "9"])
def test_bad_numbers_raise(bad: object) -> None:
    with pytest.raises(InvalidInputsError):
        LatencyPredictor(FakeTable(), bad)  # type: ignore[arg-type]
    predictor = LatencyPredictor(FakeTable(), 10.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputsError):
        predictor.record(_plan(l0=6), bad)  # type: ignore[arg-type]


def test_plan_layer_missing_from_a_real_table_raises(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 8)
    table = LatencyTable(model, x, capture_layer_specs(model, x)[:1], latency_fn=lambda m, i: 1.0, cache_dir=tmp_path)
    predictor = LatencyPredictor(table, 5.0)
    assert predictor.predict(CompressionPlan(layers=[LayerChoice("0", "svd", 2)])) == pytest.approx(5.0)  # fn: 1 ms flat
    with pytest.raises(PlanMismatchError, match="not in this latency table"):
        predictor.predict(CompressionPlan(layers=[LayerChoice("2", "svd", 1)]))
