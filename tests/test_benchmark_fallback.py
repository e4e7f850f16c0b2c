"""The benchmark's rule for ranksearch-ft's answer when its own timing rules the search's out
(benchmarks/compare.py ``FineTunedCandidates``), and how it times the plans of its rows."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ranksearch.cost import count_flops, count_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
    warnings.simplefilter("ignore", DeprecationWarning)
    import compare
    from compare import FineTunedCandidates


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
                                     [_entry(5), _entry(7), _entry(9)], fine_tune)
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

    candidates = FineTunedCandidates([(0.70, _entry(5)), (0.70, _entry(3))], [_entry(3), _entry(5)], fine_tune)
    assert candidates.best() == _entry(3)  # a tie goes to the earlier trial
    assert candidates.after_miss({3}) == _entry(5)
    assert candidates.after_miss({3, 5}) is None


def test_a_plan_is_timed_once_per_setting_and_every_row_of_it_shows_that_timing(monkeypatch) -> None:
    timed: list[nn.Module] = []

    def interleaved(original, compressed, inputs, *, rounds, min_run_time):
        timed.append(compressed)
        return compare.Latency(0.5 + 0.01 * len(timed), 0.45, 0.55, 1.0)

    monkeypatch.setattr(compare, "interleaved", interleaved)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    inputs = (torch.randn(1, 8),)
    setting = compare.Setting(SimpleNamespace(model=model), "batch 1", inputs, [], 1.0,
                              count_flops(model, inputs), count_params(model))
    bench = compare.Benchmark(argparse.Namespace(quick=True))
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


def _row(target: float, method: str, ratio: float | None, test: float = 0.5, **fields) -> compare.Row:
    quality = compare.Quality(test, {"acc": test}, {"acc": test}) if ratio is not None else None
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
