"""ranksearch.report: the Markdown report and its figures, from a result, a plan or a study."""

from __future__ import annotations

import math

import matplotlib.image
import optuna
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.decompose import get_method
from ranksearch.exceptions import PlanError, StudyMismatchError
from ranksearch.layers import LayerSpec
from ranksearch.plan import CompressionPlan
from ranksearch.report import layer_rows, make_figures, write_report


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


@pytest.fixture(scope="module")
def result() -> ranksearch.SearchResult:
    return ranksearch.optimize(
        _mlp(), torch.randn(4, 32), target_flops=0.5, n_trials=6, seed=0, search_space="transformer",
        show_progress_bar=False,
    )


def _png_size(path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def test_report_from_a_result_has_the_comparison_the_layers_and_three_figures(result, tmp_path) -> None:
    path = write_report(tmp_path, result=result)
    text = path.read_text()
    b, f = result.baseline, result.final
    assert f"| FLOPs (multiply-adds) | {b.flops:,} | {f.flops:,} | {f.flops / b.flops:.2f}x |" in text
    assert f"| parameters | {b.params:,} | {f.params:,} |" in text
    assert f"| quality score | {b.score:.4f} | {f.score:.4f} |" in text
    for choice in result.plan.replaced:
        assert f"| `{choice.name}` |" in text
    assert f"Plan from trial {result.plan.metadata['trial']}." in text
    finished = [t for t in result.study.trials if t.state.is_finished()]
    assert "## Search" in text and f"- trials: {len(finished)} (" in text
    for name in ("pareto.png", "layers.png", "history.png"):
        assert f"]({name})" in text
        width, height = _png_size(tmp_path / name)
        assert width > 300 and height > 150


def test_layer_rows_use_the_methods_cost_and_savings_shares_add_up(result) -> None:
    specs = [LayerSpec.from_dict(d) for d in result.plan.metadata["layer_specs"]]
    rows = layer_rows(specs, result.plan)
    assert [r.name for r in rows] == [s.name for s in specs]
    for row, spec in zip(rows, specs):
        choice = result.plan.choice_for(spec.name)
        if choice is None or choice.is_kept:
            assert row.method == "keep" and row.flops_after == spec.flops
        else:
            cost = get_method(choice.method).cost(spec, choice.rank)
            assert (row.flops_after, row.params_after) == (cost.flops, cost.params)
    saved = sum(r.flops_saved for r in rows)
    assert saved == result.baseline.flops - result.final.flops  # every FLOP of this MLP is in a Linear
    shares = [r.flops_saved / saved for r in rows if r.method != "keep"]
    assert math.isclose(sum(shares), 1.0)


def test_figures_mark_the_target_the_per_layer_costs_and_the_running_best(result) -> None:
    figures = make_figures(result=result)
    assert set(figures) == {"pareto", "layers", "history"}
    pareto = figures["pareto"].axes[0]
    target = result.targets["flops"]
    vertical = [line for line in pareto.get_lines() if list(line.get_xdata()) == [target, target]]
    assert vertical, "the target is drawn as a vertical line at its FLOP count"
    assert "FLOPs" in pareto.get_xlabel() and "quality" in pareto.get_ylabel()

    bars = figures["layers"].axes[0].patches
    rows = [r for r in layer_rows([LayerSpec.from_dict(d) for d in result.plan.metadata["layer_specs"]], result.plan)]
    assert sorted(round(b.get_width(), 6) for b in bars) == sorted(round(r.cost_fraction, 6) for r in rows)

    history = figures["history"].axes[0]
    step = next(line for line in history.get_lines() if line.get_label() == "best feasible score")
    ys = list(step.get_ydata())
    assert ys == sorted(ys), "the best feasible score never goes down"
    feasible = [t.values[0] for t in result.study.trials
                if t.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())]
    assert ys[-1] == max(feasible)


def test_report_from_the_plan_file_alone(result, tmp_path) -> None:
    result.plan.save(tmp_path / "plan.json")
    path = write_report(tmp_path / "r", plan=CompressionPlan.load(tmp_path / "plan.json"))
    text = path.read_text()
    assert f"| FLOPs (multiply-adds) | {result.baseline.flops:,} | {result.final.flops:,} |" in text
    assert "no study given" in text
    assert (tmp_path / "r" / "layers.png").exists()
    assert not (tmp_path / "r" / "pareto.png").exists() and not (tmp_path / "r" / "history.png").exists()


def test_report_from_the_study_alone_reports_its_best_feasible_trial(result, tmp_path) -> None:
    text = write_report(tmp_path, study=result.study).read_text()
    assert f"Plan from trial {result.plan.metadata['trial']}." in text
    assert "best trial (as recorded)" in text
    assert f"| quality score | {result.baseline.score:.4f} | {result.final.score:.4f} |" in text


def test_hand_written_plan_without_metadata_still_reports(tmp_path) -> None:
    plan = CompressionPlan.from_dict({"layers": [{"name": "fc", "method": "svd", "rank": 4}]})
    text = write_report(tmp_path, plan=plan).read_text()
    assert "per-layer costs are unknown" in text and "fc: svd rank 4" in text
    assert "No figures of the original model were stored" in text


def test_unknown_method_in_a_plan_is_shown_not_fatal() -> None:
    spec = LayerSpec("fc", "linear", 64, 32, input_shape=(4, 64))
    plan = CompressionPlan.from_dict({"layers": [{"name": "fc", "method": "from-the-future", "rank": 4}]})
    (row,) = layer_rows([spec], plan)
    assert row.flops_after is None and "from-the-future" in row.note


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(PlanError, match="nothing to report"):
        write_report(tmp_path)
    foreign = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(StudyMismatchError, match="not made by ranksearch"):
        write_report(tmp_path, study=foreign)
