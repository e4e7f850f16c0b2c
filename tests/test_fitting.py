"""ranksearch.fitting: one-knob plans fitted to the budget, first on prediction, then on measurement."""

from __future__ import annotations

import logging

import pytest

from ranksearch.fitting import best_cheaper_plan, boundary, fit_to_budget


def _plan(knob: float) -> dict:
    # the knob is the plan's "cost": a plan is a dict so the fitting code can pass it around
    return {"layer": ("svd", knob)}


def _threshold(limit: float, calls: list | None = None):
    def feasible(choices: dict) -> bool:
        if calls is not None:
            calls.append(choices["layer"][1])
        return choices["layer"][1] <= limit
    return feasible


def test_boundary_finds_the_dearest_feasible_knob_either_direction() -> None:
    up = boundary(_plan, _threshold(0.37), 0.0, 1.0, steps=14)
    assert up is not None and 0.37 - 1e-3 < up <= 0.37
    # knob decreasing towards the dear end: feasible when knob >= 0.37
    down = boundary(_plan, lambda c: c["layer"][1] >= 0.37, 1.0, 0.0, steps=14)
    assert down is not None and 0.37 <= down < 0.37 + 1e-3


def test_boundary_ends() -> None:
    assert boundary(_plan, _threshold(2.0), 0.0, 1.0, steps=5) == 1.0  # everything feasible: the dear end
    assert boundary(_plan, _threshold(-1.0), 0.0, 1.0, steps=5) is None  # nothing feasible
    assert boundary(_plan, _threshold(0.0), 0.0, 1.0, steps=5) == 0.0  # only the cheap end


def test_integer_knob_stops_at_adjacent_indices() -> None:
    calls: list = []
    found = boundary(_plan, _threshold(6, calls), 0, 40, steps=50, integer=True)
    assert found == 6
    assert all(float(c).is_integer() for c in calls) and len(calls) <= 8


def test_measured_round_corrects_a_wrong_prediction_in_few_measurements() -> None:
    measured: list = []
    # the prediction is pessimistic: it says the budget ends at 0.40; measured, it ends at 0.55
    choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(0.40),
                            measured_feasible=_threshold(0.55, measured), measured_steps=6)
    assert choices is not None
    knob = choices["layer"][1]
    assert knob <= 0.55 and knob > 0.55 - 0.6 / 2 ** 5  # the bracket [0.40, 1.0] halved five times
    assert len(measured) <= 7
    assert measured[0] == pytest.approx(0.40, abs=1e-3)  # the first measurement checks the prediction's answer
    assert 1.0 not in measured  # the dear end is not measured when the prediction rules it out


def test_by_default_a_far_off_prediction_is_corrected_to_within_a_few_percent() -> None:
    # predicted 0.9, measured 0.3; halving the bracket: 0.45 misses, 0.225 meets, 0.3375 misses,
    # and the next two measurements (0.281 meets, 0.309 misses) take the plan from 0.225 to 0.281
    measured: list = []
    choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(0.9),
                            measured_feasible=_threshold(0.3, measured))
    assert choices is not None and 0.28 <= choices["layer"][1] <= 0.3
    assert len(measured) <= 6


def test_optimistic_prediction_is_corrected_downwards() -> None:
    choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(0.7),
                            measured_feasible=_threshold(0.3), measured_steps=8)
    assert choices is not None and 0.3 - 0.01 < choices["layer"][1] <= 0.3


def test_measurement_can_find_a_plan_the_prediction_rules_out() -> None:
    choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(-1.0),
                            measured_feasible=_threshold(0.2), measured_steps=8)
    assert choices is not None and choices["layer"][1] <= 0.2


def test_a_miss_of_the_cheap_end_gets_a_second_look_before_the_fit_gives_no_plan() -> None:
    looks: list = []

    def second_look(choices: dict) -> bool:  # timed again, the cheapest plan meets the budget after all
        looks.append(choices["layer"][1])
        return choices["layer"][1] <= 0.05

    # one slow timing: every plan measured once misses, and the prediction saw nothing feasible either
    choices = fit_to_budget(_plan, 0.05, 1.0, predicted_feasible=_threshold(-1.0), measured_feasible=_threshold(-1.0),
                            second_look=second_look, measured_steps=4)
    assert choices == _plan(0.05) and looks == [0.05]  # only the cheap end is looked at again
    # the bisection's last resort, the cheap end measured after dearer plans missed, is looked at too
    looks.clear()
    choices = fit_to_budget(_plan, 0.05, 1.0, predicted_feasible=_threshold(0.5), measured_feasible=_threshold(-1.0),
                            second_look=second_look, measured_steps=2)
    assert choices == _plan(0.05) and looks == [0.05]
    # a real miss stays a miss; without a second look the fit gives up on the one timing
    assert fit_to_budget(_plan, 0.05, 1.0, predicted_feasible=_threshold(-1.0), measured_feasible=_threshold(-1.0),
                         second_look=lambda choices: False) is None
    assert fit_to_budget(_plan, 0.05, 1.0, predicted_feasible=_threshold(-1.0),
                         measured_feasible=_threshold(-1.0)) is None


def test_analytic_budget_uses_one_round() -> None:
    choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(0.42), measured_feasible=None)
    assert choices is not None and 0.42 - 1e-3 < choices["layer"][1] <= 0.42
    assert fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(-1.0), measured_feasible=None) is None


def _latency_fit(measured_ms, target: float, calls: list):
    """A prediction (the knob itself) that measurement contradicts by ``measured_ms(knob)``; rescaled
    to a measurement, it aims 1% under the target (as ``TrialRunner.fit`` does)."""
    def measured_feasible(choices: dict) -> bool:
        calls.append(choices["layer"][1])
        return measured_ms(choices["layer"][1]) <= target

    def rescaled(anchors: list):  # scaled to the last measurement (TrialRunner.calibrated_fits also draws lines)
        scale = measured_ms(anchors[-1]["layer"][1]) / anchors[-1]["layer"][1]
        return lambda choices: choices["layer"][1] * scale <= 0.99 * target

    return measured_feasible, rescaled


def test_rescaled_prediction_lands_on_the_boundary_in_two_measurements() -> None:
    calls: list = []
    measured_feasible, rescaled = _latency_fit(lambda knob: 1.2 * knob, 0.6, calls)  # off by a factor
    choices = fit_to_budget(_plan, 0.01, 1.0, predicted_feasible=_threshold(0.6),
                            measured_feasible=measured_feasible, rescaled=rescaled, measured_steps=4)
    assert choices is not None and 0.99 * 0.5 - 1e-3 < choices["layer"][1] <= 0.5
    assert calls[0] == pytest.approx(0.6, abs=1e-3) and len(calls) == 2


def test_rescaled_steps_converge_when_the_error_is_not_a_factor() -> None:
    calls: list = []
    # measured = knob + 0.1: rescaling the prediction at one point is right only there
    measured_feasible, rescaled = _latency_fit(lambda knob: knob + 0.1, 0.5, calls)
    choices = fit_to_budget(_plan, 0.01, 1.0, predicted_feasible=_threshold(0.5),
                            measured_feasible=measured_feasible, rescaled=rescaled, measured_steps=4)
    assert choices is not None and 0.4 - 0.01 < choices["layer"][1] <= 0.4
    # the plain bisection of the bracket [0.01, 0.5] would be 0.12 away after four steps
    assert len(calls) <= 4


def test_a_rescaled_prediction_drawn_from_misses_alone_does_not_settle_for_the_cheapest_plan() -> None:
    calls: list = []

    def measured_feasible(choices: dict) -> bool:  # measured, the budget ends at 0.5
        calls.append(choices["layer"][1])
        return choices["layer"][1] <= 0.5

    def rescaled(anchors: list):  # extrapolated from misses: only the cheapest plan fits
        return lambda choices: choices["layer"][1] <= 0.01

    # the prediction is optimistic (0.8): its answer misses, and the rescaled prediction then
    # points at the cheap end; the bracket is halved instead (0.405 fits), and from a plan that
    # fits the fit stops where the rescaled prediction says
    choices = fit_to_budget(_plan, 0.01, 1.0, predicted_feasible=_threshold(0.8),
                            measured_feasible=measured_feasible, rescaled=rescaled, measured_steps=4)
    assert choices is not None and choices["layer"][1] == pytest.approx(0.405, abs=1e-3)
    assert calls[0] == pytest.approx(0.8, abs=1e-3) and 0.01 not in calls


def test_the_debug_log_names_each_measured_knob_value_and_the_answer(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="ranksearch.fitting"):
        choices = fit_to_budget(_plan, 0.0, 1.0, predicted_feasible=_threshold(0.7),
                                measured_feasible=_threshold(0.3), measured_steps=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "ranksearch.fitting"]
    assert lines[0].startswith("fit on [0, 1]: the prediction puts the boundary at 0.7")
    probes = [line for line in lines if "by measurement" in line]
    assert len(probes) == 3 and "misses" in probes[0]  # 0.7 measured first, over the real 0.3
    assert choices is not None and lines[-1] == f"fit: knob {choices['layer'][1]:.4g}"


def _stepped(knob: float) -> dict:
    # a knob whose plans change in steps of 0.1 (as ranks rounded to a multiple change with a threshold)
    return {"layer": ("svd", round(knob * 10) / 10)}


@pytest.mark.parametrize("budget_ends_at, kept", [(0.61, 0.6), (0.58, 0.5)])
def test_a_plan_measured_well_under_the_budget_gets_the_next_dearer_plan_measured(budget_ends_at, kept) -> None:
    calls: list = []

    def measured_feasible(choices: dict) -> bool:
        calls.append(choices["layer"][1])
        return choices["layer"][1] <= budget_ends_at

    def slack(choices: dict) -> float:  # relative, as TrialRunner.fit's measured_slack
        return (budget_ends_at - choices["layer"][1]) / budget_ends_at

    def rescaled(anchors: list):  # the prediction's step to 0.6 is too dear: it says stop at 0.5
        return lambda choices: choices["layer"][1] <= 0.5

    common = dict(predicted_feasible=_threshold(0.5), measured_feasible=measured_feasible, rescaled=rescaled,
                  measured_steps=6)
    assert fit_to_budget(_stepped, 0.0, 1.0, **common)["layer"][1] == 0.5  # without: one measurement, stop
    assert calls == [0.5]
    calls.clear()
    # 0.5 is 14-18% under the budget: the next dearer plan (0.6) is measured, and kept if it meets it
    choices = fit_to_budget(_stepped, 0.0, 1.0, measured_slack=slack, **common)
    assert choices is not None and choices["layer"][1] == kept
    assert calls == [0.5, 0.6]


def test_a_plan_measured_just_under_the_budget_is_kept_without_measuring_the_next() -> None:
    calls: list = []
    choices = fit_to_budget(_stepped, 0.0, 1.0, predicted_feasible=_threshold(0.5),
                            measured_feasible=_threshold(0.51, calls), rescaled=lambda anchors: _threshold(0.5),
                            measured_slack=lambda choices: (0.51 - choices["layer"][1]) / 0.51)  # 2% under
    assert choices is not None and choices["layer"][1] == 0.5 and calls == [0.5]


def _stepped_plan(knob: float) -> dict:
    # plans change in steps of 1 along the knob (a rank), as a real knob's do
    return {"layer": ("svd", float(int(knob)))}


def test_best_cheaper_plan_takes_a_cheaper_plan_that_scores_higher_within_the_window() -> None:
    """Scores in no order along the knob (as at deep cuts): the fitted plan (rank 50, at the budget)
    scores 0.40, rank 47 scores 0.55, rank 44 scores 0.90 but is 12% under the budget, past the 8%
    window. The scan scores the dearest plan at each of four levels 2% apart and takes rank 47."""
    jagged = {50: 0.40, 49: 0.42, 48: 0.41, 47: 0.55, 46: 0.45, 45: 0.44, 44: 0.90}
    scored: list[float] = []

    def score(choices: dict) -> float:
        scored.append(choices["layer"][1])
        return jagged.get(int(choices["layer"][1]), 0.0)

    def excess(choices: dict) -> float:  # relative to a budget of 50.5
        return choices["layer"][1] / 50.5 - 1

    best, value = best_cheaper_plan(_stepped_plan, 50.7, 1.0, excess=excess, score=score)
    assert best == {"layer": ("svd", 47.0)} and value == 0.55
    assert scored[0] == 50.0 and len(scored) == len(set(scored)) <= 5  # the fitted plan, then each level once
    # the last level is 8% under the fitted plan (rank 45.96): its dearest plan, rank 45, is past it
    assert min(scored) == 46.0

    # a fitted plan that scores best, or ties, is kept
    best, _ = best_cheaper_plan(_stepped_plan, 50.7, 1.0, excess=excess, score=lambda c: 1.0)
    assert best == {"layer": ("svd", 50.0)}
    # scores that rise with cost: nothing cheaper beats the fitted plan
    best, _ = best_cheaper_plan(_stepped_plan, 50.7, 1.0, excess=excess, score=lambda c: c["layer"][1])
    assert best == {"layer": ("svd", 50.0)}
