"""Smoke tests of the benchmark's baseline builders (benchmarks/baselines.py) on a toy model.

The benchmark itself (benchmarks/compare.py) takes minutes; these check, in seconds, that each
baseline builds the plans its description promises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ranksearch
from ranksearch import get_method

from .models import SmallCNN, small_cnn_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines
from baselines import (
    choices_key,
    greedy_choices,
    greedy_layer_scores,
    heuristic_choices,
    make_plan,
    timing_model,
    tltorch_model,
    uniform_choices,
)

SPACE = ranksearch.load_space({
    "methods": {"conv2d": ["svd", "channel", "spatial", "tucker2"], "linear": ["svd"]},
    "cost_fraction": {"low": 0.05, "high": 0.9},
})


@pytest.fixture
def toy() -> tuple[torch.nn.Module, torch.Tensor, list]:
    model = SmallCNN().eval()
    x = small_cnn_inputs(4)
    specs = ranksearch.capture_layer_specs(model, x)
    return model, x, [c for c in SPACE.candidates(specs) if c.searchable]


def _flops(candidates: list, choices: dict) -> int:
    by_name = {c.spec.name: c.spec for c in candidates}
    return sum(get_method(m).cost(by_name[n], r).flops for n, (m, r) in choices.items())


def test_uniform_plan_uses_the_family_else_svd_and_grows_with_the_fraction(toy) -> None:
    _, _, candidates = toy
    small = uniform_choices(candidates, SPACE, "spatial", 0.2)
    large = uniform_choices(candidates, SPACE, "spatial", 0.6)
    kinds = {c.spec.name: (c.spec.kind, c.spec.kernel_size) for c in candidates}
    for name, (method, _rank) in large.items():
        if kinds[name] == ("conv2d", (3, 3)):
            assert method == "spatial"
        else:  # 1x1 convs and linear layers: spatial does not apply
            assert method == "svd"
    assert set(small) <= set(large)
    assert _flops(candidates, {n: large[n] for n in small}) > _flops(candidates, small)


def test_heuristic_plans_energy_grows_with_tau_and_vbmf_is_a_plan(toy) -> None:
    model, _, candidates = toy
    low = heuristic_choices(model, candidates, SPACE, heuristic="energy", tau=0.5)
    high = heuristic_choices(model, candidates, SPACE, heuristic="energy", tau=0.95)
    assert low, "an energy threshold of 0.5 compresses some layer of a random model"
    for name in low:
        if name in high:  # a layer can drop out of the high plan at break-even
            assert _flops(candidates, {name: high[name]}) >= _flops(candidates, {name: low[name]})
    vbmf = heuristic_choices(model, candidates, SPACE, heuristic="vbmf")
    ranksearch.apply_plan(model, make_plan(model, vbmf, "vbmf"))  # a valid plan, possibly empty on noise


def test_greedy_rule_is_aimets() -> None:
    scores = {1.0: 0.99, 0.9: 0.98, 0.8: 0.97, 0.7: 0.90, 0.6: 0.95}
    assert baselines._layer_ratio(scores, 1.0) is None  # above the uncompressed score: keep
    assert baselines._layer_ratio(scores, 0.96) == 0.8  # stops at the first drop below, not the 0.6 rebound
    assert baselines._layer_ratio(scores, 0.5) == 0.6  # below every score: the most aggressive ratio


def test_greedy_selection_on_a_toy_model(toy) -> None:
    model, x, candidates = toy
    with torch.no_grad():
        reference = model(x)

    def fidelity(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(1 - (m(x) - reference).norm() / reference.norm())

    analysis = greedy_layer_scores(model, candidates, SPACE, fidelity, ratios=(0.3, 0.6))
    assert set(analysis.scores) == {c.spec.name for c in candidates}
    assert all(per[1.0] == pytest.approx(1.0) for per in analysis.scores.values())
    low, high = analysis.score_range
    assert greedy_choices(analysis, candidates, SPACE, high + 1e-6) == {}
    everything = greedy_choices(analysis, candidates, SPACE, low - 1e-6)
    assert set(everything) == set(analysis.scores)
    for cand in candidates:
        method = analysis.methods[cand.spec.name]
        assert everything[cand.spec.name] == (method, SPACE.rank_for(cand.spec, method, 0.3))
    middle = greedy_choices(analysis, candidates, SPACE, (low + high) / 2)
    assert _flops(candidates, everything) <= _flops(candidates, middle) + sum(
        c.spec.flops for c in candidates if c.spec.name not in middle)


def test_timing_model_has_the_plan_structure(toy) -> None:
    model, x, candidates = toy
    choices = uniform_choices(candidates, SPACE, "tucker2", 0.3)
    timed = timing_model(model, choices)
    built = ranksearch.apply_plan(model, make_plan(model, choices, "test"))
    for name in choices:
        assert [type(m) for m in timed.get_submodule(name).modules()] == [
            type(m) for m in built.get_submodule(name).modules()]
    with torch.no_grad():
        assert torch.isfinite(timed(x)).all()
    assert choices_key(choices) == choices_key(dict(reversed(list(choices.items()))))


def test_tltorch_layers_replace_the_named_layers(toy) -> None:
    tltorch = pytest.importorskip("tltorch")
    model, x, _ = toy
    names = ["features.0", "features.3"]
    inner = torch.randn(2, 16, 8, 8)  # what features.3 sees
    with torch.no_grad():
        reference, layer_reference = model(x), model.features[3](inner)

    def layer_error(ratio: float) -> float:
        compressed = tltorch_model(model, names, ratio, factorization="tucker", implementation="factorized")
        assert all(isinstance(compressed.get_submodule(n), tltorch.FactorizedConv) for n in names)
        with torch.no_grad():
            out = compressed.get_submodule("features.3")(inner)
        return float((out - layer_reference).norm() / layer_reference.norm())

    assert layer_error(1.0) < 0.5 * layer_error(0.1)  # the decomposition is of this layer's weights
    timed = tltorch_model(model, names, 0.1, factorization="cp", implementation="reconstructed", decompose=False)
    with torch.no_grad():
        assert timed(x).shape == reference.shape


def test_fine_tune_candidates_picks_follow_the_package_order_before_and_after_the_sensitivity_seeds() -> None:
    from unittest import mock

    import optuna
    from bench_fine_tune_candidates import Tuned, picks

    from ranksearch import final_checks

    def trial(number: int, attrs: dict) -> optuna.trial.FrozenTrial:
        made = optuna.trial.create_trial(values=[0.5, 1.0], user_attrs=attrs)
        made.number = number
        return made

    # the best plan is a move from the energy seed; the Lagrangian seed scored lowest before the fine-tune
    trials = [trial(0, {"neighbour_of": 3, "move": "exchange"}), trial(1, {"seed": "seed:sensitivity-lagrangian"}),
              trial(2, {"seed": "seed:vbmf"}), trial(3, {"seed": "seed:energy-fit"}),
              trial(4, {"seed": "seed:uniform-tucker2-fit"})]
    by_number = {t.number: t for t in trials}
    tuned = [Tuned(by_number[n], before, after, after) for n, before, after in
             ((0, 0.37, 0.82), (3, 0.34, 0.79), (4, 0.33, 0.85), (2, 0.27, 0.78), (1, 0.12, 0.88))]
    assert [t.trial.number for t in picks(tuned, by_number, 2)] == [0, 1]
    assert [t.trial.number for t in picks(tuned, by_number, 4)] == [0, 1, 4, 2]  # the energy seed is the best's lineage
    with mock.patch.object(final_checks, "SENSITIVITY_SEEDS", ()):
        assert [t.trial.number for t in picks(tuned, by_number, 2)] == [0, 4]


def test_cuts_bench_cuts_an_answer_three_ways_and_counts_the_best() -> None:
    """bench_cuts.py on a toy: one search, its answer cut 5/10/15% under three ways, each cut scored
    (validation and test) and timed, or said not to fit; the best validation per headroom counted."""
    from types import SimpleNamespace

    from bench_cuts import CUTS, HEADROOMS, _wins, cut_rows, search_and_runner
    from bench_grow_order import sensitivity_table

    from ranksearch.cost import count_flops

    torch.manual_seed(0)  # the search's answer, and so which cuts apply, depends on the weights
    model, x = SmallCNN().eval(), small_cnn_inputs(4)
    labels = torch.arange(len(x)) % 10

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == labels).float().mean())

    task = SimpleNamespace(model=model, inputs={"batch 1": x}, val_score=accuracy,
                           test_scores=lambda m: SimpleNamespace(headline=accuracy(m)), calib_data=None)
    table = sensitivity_table(task, x, SPACE)
    # latency: FLOPs as ms, so that the search and the cuts' timings do not depend on this machine
    seen = search_and_runner(task, SPACE, "batch 1", 0.6, 8, table, latency_clock="wall",
                             latency_fn=lambda m, inputs: count_flops(m, inputs) / 1e6)
    assert seen is not None
    # an answer more than 15% under the target gets no cut (the search makes no spare for it) ...
    far_under = cut_rows(task, "toy", "batch 1", 0.6, {**seen, "target_ms": seen["verified_ms"] / 0.8}, table)
    assert len(far_under) == 1 and "more than 15% under" in far_under[0][0] and far_under[0][1] == {}
    # ... this one, less than 5% under, three
    rows = cut_rows(task, "toy", "batch 1", 0.6, seen, table)
    assert len(rows) == len(HEADROOMS)
    for text, scores in rows:
        cells = text.strip(" |").split(" | ")[-len(CUTS):]
        assert all(("val " in cell and "test " in cell) or cell == "no cut fits" for cell in cells)
        assert set(scores) == {label for label, cell in zip(CUTS, cells) if cell != "no cut fits"}
    assert any(scores for _, scores in rows)
    assert any("evaluations" in text.split(" | ")[-1] for text, scores in rows if "scored" in scores)
    assert _wins([{"shared factor": 0.5, "table": 0.7, "scored": 0.7}, {"shared factor": 0.9, "scored": 0.8}, {}]) \
        == "shared factor 1, table 1, scored 1"


def test_knob_scan_bench_fits_each_knob_and_reports_every_scan_setting() -> None:
    """bench_knob_scan.py on a toy: each knob fitted to a FLOP budget, the scan's pick at every window
    and level count within the window and never dearer than the fitted plan, and a report whose
    summary counts each setting's picks."""
    from types import SimpleNamespace

    from bench_knob_scan import CONFIGS, report, scan

    torch.manual_seed(0)
    model, x = SmallCNN().eval(), small_cnn_inputs(4)
    labels = torch.arange(len(x)) % 10

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == labels).float().mean())

    task = SimpleNamespace(name="toy", model=model, inputs={"batch 1": x}, val_score=accuracy,
                           test_scores=lambda m: SimpleNamespace(headline=accuracy(m)))
    rows = scan(task, "convnet", ("tucker2",), (0.5, 0.3))
    assert {row["knob"] for row in rows} == {"energy", "uniform-tucker2"} and len(rows) == 4
    for row in rows:
        assert row["fitted_excess"] <= 0 and set(row["picks"]) == set(CONFIGS)
        for (window, _), (moved, (val, _), at) in row["picks"].items():
            assert row["fitted_excess"] - window <= at <= row["fitted_excess"]
            assert (val > row["fitted"][0]) if moved else at == row["fitted_excess"]
    text = report(rows)
    assert text.count("| toy |") == len(rows)
    assert all(f"| {window:g}, {levels} | " in text for window, levels in CONFIGS)
