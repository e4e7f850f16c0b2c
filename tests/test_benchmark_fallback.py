"""The benchmark's rule for ranksearch-ft's answer when its own timing rules the search's out
(benchmarks/compare.py ``FineTunedCandidates``), and how it times the plans of its rows."""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ranksearch.cost import count_flops, count_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
    warnings.simplefilter("ignore", DeprecationWarning)
    import compare
    from compare import Fallbacks, FineTunedCandidates


def _entry(trial: int) -> tuple[int, str, float]:
    return trial, f"plan {trial}", 0.5


def test_a_missed_candidate_is_replaced_by_the_next_plan_fine_tuned_in_its_place() -> None:
    tuned_here: list[int] = []
    after_tuning = {7: 0.80, 9: 0.60}  # what this benchmark's fine-tune would give each Pareto plan

    def fine_tune(entry):
        tuned_here.append(entry[0])
        return after_tuning[entry[0]]

    # the search fine-tuned trials 3 (best after it, 0.75) and 5 (0.70, another lineage)
    candidates = FineTunedCandidates([(0.70, _entry(5)), (0.75, _entry(3))],
                                     Fallbacks([_entry(5), _entry(7), _entry(9)], {}), fine_tune)
    assert candidates.best() == _entry(3)
    # trial 3 misses here: trial 7, the next plan before fine-tuning (5 is tuned already), is
    # fine-tuned in its place and, better after it than trial 5, taken
    assert candidates.after_miss({3}) == _entry(7)
    assert tuned_here == [7]
    # trial 7 misses as well: trial 9 is fine-tuned, and trial 5 (0.70) now beats it (0.60)
    assert candidates.after_miss({3, 7}) == _entry(5)
    assert tuned_here == [7, 9]


def test_with_nothing_left_to_fine_tune_the_best_remaining_candidate_is_taken() -> None:
    def fine_tune(entry):
        raise AssertionError("nothing to fine-tune")

    candidates = FineTunedCandidates([(0.70, _entry(5)), (0.70, _entry(3))], Fallbacks([_entry(3), _entry(5)], {}),
                                     fine_tune)
    assert candidates.best() == _entry(3)  # a tie goes to the earlier trial
    assert candidates.after_miss({3}) == _entry(5)
    assert candidates.after_miss({3, 5}) is None


def test_a_missed_plan_s_headroom_spares_are_taken_before_the_next_plan_by_score() -> None:
    # trial 3 is the answer; the search cut it to about 5% under its final check two ways, as trials
    # 12 and 13 (13 scored better); plans by score: 5, 7, 13, 12
    fallbacks = Fallbacks([_entry(5), _entry(7), _entry(13), _entry(12)], {12: 3, 13: 3})
    assert fallbacks.next({3}) == _entry(13)
    assert fallbacks.next({3, 13}) == _entry(12)
    # both spares missed too: the plans by score
    assert fallbacks.next({3, 12, 13}) == _entry(5)
    # a plan without a spare falls back by score
    assert fallbacks.next({5}) == _entry(7)
    # nothing but plans ruled out or skipped: none
    assert fallbacks.next({5, 7}, skip={12, 13}) is None


def test_ranksearch_ft_fine_tunes_the_missed_answer_s_spare_in_its_place() -> None:
    tuned_here: list[int] = []
    after_tuning = {7: 0.80, 12: 0.72}

    def fine_tune(entry):
        tuned_here.append(entry[0])
        return after_tuning[entry[0]]

    candidates = FineTunedCandidates([(0.75, _entry(3)), (0.70, _entry(5))],
                                     Fallbacks([_entry(7), _entry(12)], {12: 3}), fine_tune)
    # trial 3 misses here: its spare (12), not the next plan by score (7), is fine-tuned in its place
    assert candidates.after_miss({3}) == _entry(12)
    assert tuned_here == [12]


def test_a_plan_is_timed_once_per_setting_and_every_row_of_it_shows_that_timing(monkeypatch) -> None:
    timed: list[nn.Module] = []

    def interleaved(original, compressed, inputs, *, rounds, round_s, **retiming):
        timed.append(compressed)
        return compare.Latency(0.5 + 0.01 * len(timed), 0.45, 0.55, 1.0)

    monkeypatch.setattr(compare, "interleaved", interleaved)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    inputs = (torch.randn(1, 8),)
    setting = compare.Setting(SimpleNamespace(model=model), "batch 1", inputs, [], 1.0,
                              count_flops(model, inputs), count_params(model))
    bench = compare.Benchmark(argparse.Namespace(quick=True, targets=(0.5, 0.35)))
    # the same plan returned at two targets (as VBMF's is at every target): timed once
    first, second = compare.Row("m", "batch 1", 0.5, "vbmf"), compare.Row("m", "batch 1", 0.35, "vbmf")
    bench.figures(setting, model, first, "vbmf:plan")
    bench.figures(setting, model, second, "vbmf:plan")
    assert len(timed) == 1
    assert second.latency == first.latency and second.flops == first.flops == 1.0
    # another plan is timed on its own
    other = compare.Row("m", "batch 1", 0.5, "energy")
    bench.figures(setting, model, other, "energy:plan")
    assert len(timed) == 2 and other.latency != first.latency


def test_a_final_timing_whose_rounds_spread_widely_gets_more_rounds(monkeypatch) -> None:
    from ranksearch.cost import LatencyRatio

    def paired(ratio: float, rounds: tuple[float, ...], pairs: int) -> LatencyRatio:
        return LatencyRatio(ratio, rounds, 1.0, ratio, pairs, "cpu", 1)

    # a noisy measurement (rounds 0.44-0.75), then calm ones at 0.70 and 0.72
    noisy = paired(0.52, (0.44, 0.53, 0.75, 0.50, 0.52), 20)
    calm = [paired(0.70, (0.70, 0.71, 0.69, 0.70, 0.72), 20), paired(0.72, (0.72, 0.71, 0.73, 0.72, 0.72), 40)]
    answers = iter([])
    asked: list[tuple[float, int]] = []

    def measure_ratio(original, compressed, inputs, *, threads, clock, seconds, chunks, timing_process):
        assert (threads, clock) == (1, "cpu")  # the clock every timing of the benchmark uses
        asked.append((seconds, chunks))
        return next(answers)

    monkeypatch.setattr(compare, "measure_ratio", measure_ratio)
    model = nn.Linear(2, 2)
    answers = iter([noisy, *calm])
    once = compare.interleaved(model, model, (), rounds=5, round_s=0.2)
    assert once.ratio == 0.52 and asked == [(pytest.approx(1.0), 5)]  # without max_spread: the noisy one decides
    answers = iter([noisy, *calm])
    asked.clear()
    latency = compare.interleaved(model, model, (), rounds=5, round_s=0.2, max_spread=0.25, more=2)
    # 0.44-0.75 is a spread of 60%: timed again; over both the spread is still wide, so once more; the
    # ratio is the measurements' ratios weighed by their pairs
    assert len(asked) == 3 and latency.ratio == pytest.approx((0.52 * 20 + 0.70 * 20 + 0.72 * 40) / 80)
    assert (latency.low, latency.high) == (0.44, 0.75)
    answers = iter(calm)
    asked.clear()
    assert compare.interleaved(model, model, (), rounds=5, round_s=0.2, max_spread=0.25, more=2).ratio == 0.70
    assert len(asked) == 1  # calm rounds: timed once


def test_a_final_timing_close_to_a_target_is_timed_again_and_the_median_decides_a_split(monkeypatch) -> None:
    from ranksearch.cost import LatencyRatio

    def paired(ratio: float) -> LatencyRatio:
        return LatencyRatio(ratio, (ratio,) * 5, 1.0, ratio, 20, "cpu", 1)

    answers = iter([])
    monkeypatch.setattr(compare, "measure_ratio", lambda *args, **kwargs: next(answers))
    model = nn.Linear(2, 2)
    limits = [0.35 * 1.03, 0.5 * 1.03]

    def timed(*ratios: float) -> compare.Latency:
        nonlocal answers
        answers = iter([paired(r) for r in ratios])
        latency = compare.interleaved(model, model, (), rounds=5, round_s=0.2, limits=limits, close_call=0.08)
        assert next(answers, None) is None, "every answer given was asked for"
        return latency

    # far from every limit: timed once
    far = timed(0.42)
    assert (far.ratio, far.timings, far.close_call) == (pytest.approx(0.42), 1, False)
    # a lucky 0.34 of a plan that times 0.39: the second timing disagrees on the side of 0.3605, a third
    # decides by the median (over the limit: the plan misses 0.35x)
    split = timed(0.34, 0.39, 0.40)
    assert split.ratio == pytest.approx(0.39) and split.timings == 3 and split.close_call
    assert not split.ratio <= limits[0]
    # two timings on the same side: their mean counts, no third
    agreed = timed(0.34, 0.35)
    assert agreed.ratio == pytest.approx(0.345) and agreed.timings == 2
    # the limit of another target counts as well (0.5 x 1.03)
    assert timed(0.53, 0.54).ratio == pytest.approx(0.535)
    # without limits, as before: one timing
    answers = iter([paired(0.34)])
    assert compare.interleaved(model, model, (), rounds=5, round_s=0.2).timings == 1


def test_the_benchmark_times_each_plan_against_the_limits_of_every_target_of_the_run(monkeypatch) -> None:
    asked: list[dict] = []

    def interleaved(original, compressed, inputs, *, rounds, round_s, **retiming):
        asked.append(retiming)
        return compare.Latency(0.36, 0.35, 0.37, 1.0, timings=2, close_call=True)

    monkeypatch.setattr(compare, "interleaved", interleaved)
    model = nn.Linear(8, 2)
    inputs = (torch.randn(1, 8),)
    setting = compare.Setting(SimpleNamespace(model=model), "batch 1", inputs, [], 1.0,
                              count_flops(model, inputs), count_params(model))
    bench = compare.Benchmark(argparse.Namespace(quick=False, targets=(0.7, 0.35)))
    bench.figures(setting, model, compare.Row("m", "batch 1", 0.7, "vbmf"), "vbmf:plan")
    assert asked[0]["limits"] == [pytest.approx(0.7 * 1.03), pytest.approx(0.35 * 1.03)]
    assert asked[0]["close_call"] == compare.CLOSE_CALL > 0
    assert "1 of the 1 plans timed were close calls" in bench.close_calls()


def _scores(per_item: list[float]) -> compare.TestScores:
    items = torch.tensor(per_item)
    return compare.TestScores({"acc": float(items.mean())}, items)


def _row(target: float, method: str, ratio: float | None, test: float = 0.5, **fields) -> compare.Row:
    scores = _scores([test] * 4)
    quality = compare.Quality(test, scores, scores) if ratio is not None else None
    latency = compare.Latency(ratio, ratio, ratio, 1.0) if ratio is not None else None
    return compare.Row("cnn", "batch 1", target, method, latency=latency, quality=quality, **fields)


def test_a_target_no_method_meets_is_unreachable_not_a_loss() -> None:
    # and a search without a plan where a baseline met the target is one
    bench = compare.Benchmark(argparse.Namespace(quick=True))
    no_plan = "no plan met the target: no plan met the budget"
    bench.rows = [
        # 0.35: the search measured 0.40 at best, and no baseline met it either (the fastest 0.39)
        _row(0.35, "ranksearch", None, note=no_plan, fastest=0.40),
        _row(0.35, "uniform-tucker2", 0.39), _row(0.35, "energy", 0.44),
        # 0.5: the same answer from the search, but a baseline met the target
        _row(0.5, "ranksearch", None, note=no_plan, fastest=0.52),
        _row(0.5, "energy", 0.49),
    ]
    lines, records = bench.verdicts()
    unreachable, lost = records
    assert unreachable["ranksearch"] == unreachable["ranksearch-ft"] == "unreachable"
    assert lost["ranksearch"] == lost["ranksearch-ft"] == "no plan"
    assert "no plan: fastest found 0.40 | none meets it (fastest: uniform-tucker2 0.39)" in lines[2]


def test_a_deficit_within_the_paired_noise_of_the_test_items_is_a_tie() -> None:
    generator = torch.Generator().manual_seed(0)
    theirs = torch.rand(300, generator=generator) * 0.4 + 0.6  # cosine to the original, per test sentence
    # behind by 0.0003 on average, item by item as far apart as two models are
    ours_noisy = theirs + torch.randn(300, generator=generator) * 0.05
    ours_noisy += float(theirs.mean() - ours_noisy.mean()) - 0.0003
    verdict = compare._verdict(True, compare.TestScores({"cosine": float(ours_noisy.mean())}, ours_noisy),
                               compare.TestScores({"cosine": float(theirs.mean())}, theirs))
    assert verdict.startswith("tie")
    # behind by 0.01 on every item alike: the test items agree it is worse
    ours_worse = theirs - 0.01
    verdict = compare._verdict(True, compare.TestScores({"cosine": float(ours_worse.mean())}, ours_worse),
                               compare.TestScores({"cosine": float(theirs.mean())}, theirs))
    assert verdict == "**no** (-0.0100)"


def test_for_accuracy_only_the_items_the_two_models_disagree_on_count() -> None:
    # 500 items; the baseline gets 10 more right. Disagreeing on just those 10: no. Disagreeing on
    # 70 (40 the baseline gets right, 30 ours does): the 10 are within the noise of which model gets
    # which item right
    right = [1.0] * 400 + [0.0] * 100
    ours_few = [1.0] * 390 + [0.0] * 110
    assert compare._verdict(True, _scores(ours_few), _scores(right)) == "**no** (-0.0200)"
    ours_many = [1.0] * 360 + [0.0] * 40 + [1.0] * 30 + [0.0] * 70
    assert compare._verdict(True, _scores(ours_many), _scores(right)).startswith("tie")
    # at least as good, or missing the target
    assert compare._verdict(True, _scores(right), _scores(ours_few)) == "yes"
    assert compare._verdict(False, _scores(right), _scores(ours_few)) == "**no** (misses)"


def test_after_fine_tuning_every_row_keeps_the_fine_tune_only_where_it_raised_the_validation_score() -> None:
    # optimize(finetune_fn=...) returns a plan as decomposed when no fine-tune beats it; every row alike
    before, tuned_down, tuned_up = (_scores([1.0] * right + [0.0] * (100 - right)) for right in (99, 90, 95))
    ours = compare.Row("cnn", "batch 1", 0.7, "ranksearch-ft", latency=compare.Latency(0.69, 0.68, 0.70, 1.0),
                       quality=compare.Quality(0.98, before, tuned_down, val_ft=0.98))  # a tie: not kept
    energy = compare.Row("cnn", "batch 1", 0.7, "energy", latency=compare.Latency(0.70, 0.69, 0.71, 1.0),
                         quality=compare.Quality(0.80, tuned_down, tuned_up, val_ft=0.97))  # kept
    assert ours.scores(after_ft=True) is before and energy.scores(after_ft=True) is tuned_up
    bench = compare.Benchmark(argparse.Namespace(quick=True))
    bench.rows = [compare.Row("cnn", "batch 1", 0.7, "ranksearch", latency=ours.latency, quality=ours.quality),
                  ours, energy]
    lines, (record,) = bench.verdicts()
    assert record["ranksearch-ft"] == "yes"  # 0.99 (kept as decomposed) against 0.95; fine-tuned, 0.90: no
    header, body = bench._row_table([ours, energy])
    assert body[0][header.index("acc after FT")] == "0.9900" and body[1][header.index("acc after FT")] == "0.9500"
    assert "fine-tune not kept (val 0.9800 -> 0.9800; fine-tuned, test 0.9000)" in body[0][-1]
    assert "not kept" not in body[1][-1]


def test_the_efficiency_table_shows_the_val_of_an_answer_its_trial_left_unscored() -> None:
    """A repair whose trial timed it over the target is pruned there (no score) and can still be the
    answer after its final check; the table then shows the benchmark's own validation score of it."""
    import math

    import optuna

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.6, 5.0], user_attrs={"seed": "seed:energy-fit"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs={"neighbour_of": 0, "move": "repair"}))
    stats = compare.SearchStats("minilm", "batch 1", 0.7)
    compare.Benchmark.trial_stats(stats, study, 10.0, 1.0, chosen=1, chosen_val=0.65)
    assert stats.best_origin == "trial 1 (repair of 0)" and stats.best_val == 0.65
    compare.Benchmark.trial_stats(stats, study, 10.0, 1.0, chosen=0, chosen_val=0.65)
    assert stats.best_val == 0.6  # a scored trial keeps its own score
    stats = compare.SearchStats("minilm", "batch 1", 0.7)
    compare.Benchmark.trial_stats(stats, study, 10.0, 1.0, chosen=1)
    assert math.isnan(stats.best_val)


def test_the_same_plan_from_a_baseline_and_from_ranksearch_is_timed_once(monkeypatch) -> None:
    from ranksearch import LayerChoice
    from ranksearch.plan import CompressionPlan

    timed: list[nn.Module] = []

    def interleaved(original, compressed, inputs, *, rounds, round_s, **retiming):
        timed.append(compressed)
        return compare.Latency(0.34 + 0.05 * (len(timed) - 1), 0.3, 0.4, 1.0)  # a second timing would miss

    monkeypatch.setattr(compare, "interleaved", interleaved)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    inputs = (torch.randn(1, 8),)
    setting = compare.Setting(SimpleNamespace(model=model, name="m"), "batch 1", inputs, [], 1.0,
                              count_flops(model, inputs), count_params(model))
    bench = compare.Benchmark(argparse.Namespace(quick=True, targets=(0.5,)))
    choices = {"0": ("svd", 2), "2": ("svd", 1)}
    # a uniform-ratio baseline tuned onto these choices (its knob bisection measures 0.34)
    knob = compare.Knob("uniform-svd", lambda value: choices, compare.choices_key, lambda c: 0.34, 0.05, 0.9, 2)
    tunable = compare.Tunable(knob, "cost fraction", build=lambda value: model, timing=lambda value: model,
                              from_choices=True)
    scores = compare.TestScores({"acc": 0.5}, torch.ones(4))
    monkeypatch.setattr(bench, "quality", lambda task, compressed: compare.Quality(0.5, scores, scores, 0.5))
    baseline = bench.tuned_row(setting, tunable, 0.35, {}, None)
    # ranksearch returns the same plan: its row shows the baseline's timing, not a second one
    plan = CompressionPlan.for_model(model, [LayerChoice(name, method, rank) for name, (method, rank) in choices.items()])
    row = compare.Row("m", "batch 1", 0.35, "ranksearch")
    bench.verified_plan(setting, row, (7, plan, model, 0.34), lambda missed: None)
    assert len(timed) == 1
    assert row.latency == baseline.latency and row.meets and baseline.meets


def test_ranksearch_is_also_compared_with_every_baseline_given_its_batchnorm_reestimation() -> None:
    """A baseline that the re-estimation lifts above ranksearch makes that verdict a loss, while the
    verdict against the baselines as published stands; where no row has BatchNorm, dashes."""
    plain, lifted, ours_scores = (_scores([1.0] * right + [0.0] * (100 - right)) for right in (60, 99, 95))
    latency = compare.Latency(0.50, 0.49, 0.51, 1.0)
    ours = compare.Row("cnn", "batch 1", 0.5, "ranksearch", latency=latency,
                       quality=compare.Quality(0.97, ours_scores, ours_scores, test_bn=ours_scores))
    energy = compare.Row("cnn", "batch 1", 0.5, "energy", latency=latency,
                         quality=compare.Quality(0.60, plain, plain, test_bn=lifted))
    bench = compare.Benchmark(argparse.Namespace(quick=True))
    bench.rows = [ours, energy]
    lines, (record,) = bench.verdicts()
    assert record["ranksearch"] == "yes" and record[compare.BN_VERDICT] == "no"
    assert lines[2].endswith("| energy: 0.50, 0.9900 | **no** (-0.0400) |")
    header, body = bench._row_table([ours, energy])
    assert body[1][header.index("acc, BN re-estimated")] == "0.9900"

    for row in bench.rows:
        row.quality.test_bn = None
    lines, (record,) = bench.verdicts()
    assert compare.BN_VERDICT not in record and lines[2].endswith("| - | - |")
    assert "acc, BN re-estimated" not in bench._row_table([ours, energy])[0]


def test_a_baseline_s_model_is_scored_with_the_layers_after_its_first_decomposed_one_reestimated() -> None:
    import ranksearch
    from ranksearch.plan import CompressionPlan, LayerChoice
    from tests.test_batchnorm import BatchNormNet

    torch.manual_seed(0)
    model = BatchNormNet().eval()
    calib = [torch.randn(64, 1, 8, 8)]
    seen: list[nn.Module] = []
    task = SimpleNamespace(model=model, inputs={"batch 1": (torch.randn(1, 1, 8, 8),)}, calib_data=calib,
                           test_scores=lambda m: seen.append(m) or _scores([1.0]))
    compressed = ranksearch.apply_plan(model, CompressionPlan.for_model(model, [LayerChoice("conv2", "tucker2", (4, 4))]))
    kept = {k: v.clone() for k, v in compressed.state_dict().items()}
    compare.reestimated_test(task, compressed)
    (scored,) = seen
    expected = ranksearch.recalibrate_batchnorm(copy.deepcopy(compressed), calib, ["bn2", "bn3"])
    assert torch.equal(scored.bn1.running_mean, model.bn1.running_mean)  # before conv2: kept
    for name in ("bn2", "bn3"):  # after it: re-estimated on calib, as ranksearch does
        assert torch.equal(scored.get_submodule(name).running_var, expected.get_submodule(name).running_var)
        assert not torch.equal(scored.get_submodule(name).running_var, model.get_submodule(name).running_var)
    assert all(torch.equal(v, kept[k]) for k, v in compressed.state_dict().items())  # scored on a copy
    task.calib_data = None
    assert compare.reestimated_test(task, compressed) is None
