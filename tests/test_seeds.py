"""Seed plans on a small CNN trained on scikit-learn's digits, rank rounding, and the per-method
rules (several-integer ranks, methods without a matricization)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import ranksearch
from ranksearch import CompressionPlan, seed_plans
from ranksearch.decompose import get_method
from ranksearch.decompose.base import DecompositionMethod, LayerCost, Rank
from ranksearch.decompose.svd import SVD
from ranksearch.exceptions import (
    InvalidHeuristicError, InvalidWeightsError, PlanError, PlanMismatchError, UnknownMethodError,
)
from ranksearch.layers import capture_layer_specs, spec_from_module
from ranksearch.rank import default_method, round_rank, suggest

TAUS = (0.80, 0.90, 0.95, 0.99)


def _digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A CNN trained for a few seconds on 1400 digits; returns (model, test images, test labels)."""
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    model = _digits_cnn()
    with torch.no_grad():  # a small init lets what is learned dominate the weights, as in longer training
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        batch = torch.randint(0, 1400, (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert _accuracy(model, images[1400:], labels[1400:]) > 0.85  # training worked
    return model, images[1400:], labels[1400:]


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _cost(spec, cost: LayerCost) -> int:
    return cost.flops if spec.flops > 0 else cost.params


def test_seed_plans_apply_cleanly(trained) -> None:
    model, images, _ = trained
    plans = seed_plans(model, images[:2], weakening=0.5)
    origins = ["seed:vbmf", "seed:vbmf-weak-0.5", *(f"seed:energy-{tau:.2f}" for tau in TAUS)]
    assert [p.metadata["origin"] for p in plans] == origins
    specs = {s.name: s for s in capture_layer_specs(model, images[:2])}
    for plan in plans:
        assert [c.name for c in plan.layers] == list(specs)
        assert all(c.origin == plan.metadata["origin"] for c in plan.layers)
        assert all(c.reason for c in plan.layers if c.is_kept)
        for choice in plan.replaced:
            spec = specs[choice.name]
            method = get_method(choice.method)
            assert choice.method == default_method(spec)
            method.normalize_rank(spec, choice.rank)  # in bounds
            assert _cost(spec, method.cost(spec, choice.rank)) < _cost(spec, LayerCost(spec.flops, spec.params))
        compressed = ranksearch.apply_plan(model, plan)
        assert compressed(images[:5]).shape == (5, 10)
        assert CompressionPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert len(plans[0].replaced) >= 3  # VBMF finds structure in the trained weights
    assert not plans[0].choice_for("8").is_kept  # the big Linear


def test_accuracy_stays_close_at_tau_099(trained) -> None:
    model, images, labels = trained
    (plan,) = seed_plans(model, images[:2], taus=(0.99,))[1:]
    assert plan.metadata["origin"] == "seed:energy-0.99" and len(plan.replaced) >= 1
    compressed = ranksearch.apply_plan(model, plan)
    assert _accuracy(compressed, images, labels) >= _accuracy(model, images, labels) - 0.02


def test_energy_ranks_grow_with_tau(trained) -> None:
    model, images, _ = trained
    plans = seed_plans(model, images[:2])[1:]
    for name in [c.name for c in plans[0].layers]:
        ranks = [p.choice_for(name).rank for p in plans]  # None: kept, at or over break-even
        replaced = [r for r in ranks if r is not None]
        assert replaced == sorted(replaced)
        assert ranks == replaced + [None] * (len(ranks) - len(replaced))  # once kept, kept at larger tau


def test_round_to_8_stops_below_break_even(trained) -> None:
    model, images, _ = trained
    specs = {s.name: s for s in capture_layer_specs(model, images[:2])}
    plain = seed_plans(model, images[:2], taus=(0.9,))
    rounded = seed_plans(model, images[:2], taus=(0.9,), round_to=8)
    for before, after in zip(plain, rounded):
        assert after.metadata["round_to"] == 8
        for choice in before.replaced:
            spec = specs[choice.name]
            method = get_method(choice.method)
            if isinstance(choice.rank, tuple):  # tucker2: each rank rounded, or all left as they were
                got = after.choice_for(choice.name).rank
                assert got == choice.rank or all(r % 8 == 0 or r == full for r, full in zip(got, method.rank_bounds(spec)[1]))
                assert method.cost(spec, got).flops < spec.flops
                continue
            upper = method.break_even_rank(spec)
            expected = round_rank(choice.rank, 8, upper)
            assert after.choice_for(choice.name).rank == expected
            assert expected % 8 == 0 or math.ceil(choice.rank / 8) * 8 >= upper


def test_methods_per_kind(trained) -> None:
    model, images, _ = trained
    plan = seed_plans(model, images[:2], taus=(), methods={"conv2d": "spatial", "linear": "keep"})[0]
    assert plan.choice_for("0").method in ("spatial", "keep")
    assert plan.choice_for("2").method == "spatial"
    one_by_one = plan.choice_for("5")
    assert one_by_one.is_kept and "spatial" in one_by_one.reason and "one-dimensional" in one_by_one.reason
    assert plan.choice_for("8").is_kept and "linear layers are kept" in plan.choice_for("8").reason
    ranksearch.apply_plan(model, plan)


def test_specs_subset_and_mismatch(trained) -> None:
    model, images, _ = trained
    specs = [s for s in capture_layer_specs(model, images[:2]) if s.name == "8"]
    plans = seed_plans(model, None, taus=(0.9,), specs=specs)
    assert [[c.name for c in p.layers] for p in plans] == [["8"], ["8"]]
    other = spec_from_module("missing", nn.Linear(4, 4), (1, 4))
    with pytest.raises(PlanMismatchError, match="missing"):
        seed_plans(model, None, specs=[other])


def test_invalid_options(trained) -> None:
    model, images, _ = trained
    with pytest.raises(PlanError, match="conv3d"):
        seed_plans(model, images[:2], methods={"conv3d": "svd"})
    with pytest.raises(UnknownMethodError, match="valid methods"):
        seed_plans(model, images[:2], methods={"linear": "nope"})
    with pytest.raises(InvalidHeuristicError, match="tau"):
        seed_plans(model, images[:2], taus=(0.9, 0.0))
    with pytest.raises(InvalidHeuristicError, match="weakening"):
        seed_plans(model, images[:2], weakening=1.5)
    with pytest.raises(InvalidHeuristicError, match="round_to"):
        seed_plans(model, images[:2], round_to=0)


def test_depthwise_kept_and_nan_weights_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    plan = seed_plans(model, torch.randn(1, 4, 6, 6), taus=())[0]
    assert plan.choice_for("0").is_kept and "depthwise" in plan.choice_for("0").reason
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="'2'"):
        seed_plans(model, torch.randn(1, 4, 6, 6), taus=())


# --- rounding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank,multiple,upper,expected",
    [
        (13, 8, None, 16), (16, 8, None, 16), (1, 8, None, 8), (13, 1, None, 13),
        (13, 8, 20, 16), (13, 8, 16, 13), (13, 8, 14, 13), (13, 8, 13, None), (20, 8, 13, None),
    ],
)
def test_round_rank(rank: int, multiple: int, upper: int | None, expected: int | None) -> None:
    assert round_rank(rank, multiple, upper) == expected


def test_round_rank_rejects() -> None:
    with pytest.raises(InvalidHeuristicError):
        round_rank(0, 8)
    with pytest.raises(InvalidHeuristicError):
        round_rank(4, 0)


# --- the rules for other rank shapes ---------------------------------------------------------------


class _TwoRank(DecompositionMethod):
    """Test double with a Tucker-2 shaped rank (r_in, r_out): its unfoldings and parameter cost only."""

    name = "two-rank-test"
    kinds = ("conv2d",)
    rank_arity = 2

    def rank_bounds(self, spec):
        return (1, 1), (spec.in_features, spec.out_features)

    def cost(self, spec, rank: Rank) -> LayerCost:
        r_in, r_out = rank  # type: ignore[misc]
        k = math.prod(spec.kernel_size)
        return LayerCost(flops=0, params=spec.in_features * r_in + r_in * r_out * k + r_out * spec.out_features)

    def rank_matrices(self, layer, spec):
        weight = layer.weight.detach().double()
        return [weight.transpose(0, 1).reshape(spec.in_features, -1), weight.reshape(spec.out_features, -1)]

    def structure(self, spec, rank):
        raise NotImplementedError("test double: rank suggestions only")

    def load_weights(self, replacement, layer, spec, rank):
        raise NotImplementedError("test double: rank suggestions only")


def _multilinear(c: int, n: int, r_in: int, r_out: int, k: int = 3) -> nn.Conv2d:
    gen = torch.Generator().manual_seed(r_in * 100 + r_out)
    core = torch.randn(r_out, r_in, k, k, generator=gen, dtype=torch.float64)
    u_out, _ = torch.linalg.qr(torch.randn(n, r_out, generator=gen, dtype=torch.float64))
    u_in, _ = torch.linalg.qr(torch.randn(c, r_in, generator=gen, dtype=torch.float64))
    layer = nn.Conv2d(c, n, k)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("oikl,no,ci->nckl", core, u_out, u_in))
    return layer


def test_several_integer_rank_rounds_each_and_falls_back_below_break_even() -> None:
    method = _TwoRank()
    layer = _multilinear(32, 48, 3, 5)
    spec = spec_from_module("conv", layer)  # no input shape: the cost is in parameters
    assert suggest(layer, spec, method).rank == (3, 5)
    assert suggest(layer, spec, method, round_to=4).rank == (4, 8)
    # (9, 12) costs 1308 of the layer's 2304 parameters; rounded to (16, 16) it would cost 2816
    layer = _multilinear(16, 16, 9, 12)
    spec = spec_from_module("conv", layer)
    assert suggest(layer, spec, method).rank == (9, 12)
    assert suggest(layer, spec, method, round_to=8).rank == (9, 12)
    full = suggest(layer, spec, method, heuristic="energy", tau=1.0, weakening=1.0)
    assert full.rank is None and "break-even" in full.reason


class _NoMatrixSVD(SVD):
    """SVD's cost and structure, but no matricization: its rank must come from the cost-match rule."""

    name = "svd-no-matrix-test"

    def rank_matrices(self, layer, spec):
        return []


def test_method_without_matricization_matches_the_reference_cost() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(96, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 6, generator=gen) @ torch.randn(6, 96, generator=gen)
                           + 0.01 * torch.randn(64, 96, generator=gen))
    spec = spec_from_module("fc", layer, (8, 96))
    reference = suggest(layer, spec, "svd")
    matched = suggest(layer, spec, _NoMatrixSVD())
    assert matched.rule == "cost-match:svd"
    assert matched.rank == reference.rank == 6  # same cost function: the same rank
    weak = suggest(layer, spec, _NoMatrixSVD(), weakening=0.25, round_to=8)
    assert weak.rank == suggest(layer, spec, "svd", weakening=0.25, round_to=8).rank


def test_of_the_uniform_seeds_only_the_best_family_on_the_prediction_is_fitted_on_timings(trained, tmp_path,
                                                                                           monkeypatch, caplog) -> None:
    """A fit on measured latency takes several whole-model timings: of the uniform-ratio seeds (one per
    family), only the family whose plan fitted on the prediction scores best is fitted and queued.
    Under a FLOP budget the fits are free, and every family gets its seed."""
    from ranksearch.cost import count_flops
    from ranksearch.trials import TrialRunner
    from ranksearch.warmstart import is_uniform_fit

    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path))
    model, images, labels = trained
    rankings: list[list[str]] = []
    ranked_by_score = TrialRunner.by_predicted_score

    def recorded(self, plans, cheap, dear):
        rankings.append(ranked_by_score(self, plans, cheap, dear))
        return rankings[-1]

    monkeypatch.setattr(TrialRunner, "by_predicted_score", recorded)
    kwargs = dict(n_trials=8, seed=0, show_progress_bar=False, sensitivity=False,
                  eval_fn=lambda m: _accuracy(m, images, labels))

    def uniform_seeds(result) -> list[str]:
        return [t.user_attrs["seed"] for t in result.study.trials if is_uniform_fit(t.user_attrs.get("seed"))]

    with caplog.at_level("DEBUG", logger="ranksearch.search"):
        timed = ranksearch.optimize(model, images[:8], target_latency_ratio=0.6,
                                    latency_fn=lambda m, inputs: count_flops(m, inputs) / 1e6, **kwargs)
    assert len(rankings) == 1 and {"channel", "spatial", "tucker2"} <= set(rankings[0])
    (line,) = [r.getMessage() for r in caplog.records if "by their score" in r.getMessage()]
    scores = [float(entry.split()[1]) for entry in line.split(": ", 1)[1].split(", ")]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]  # best first, and they differ
    assert uniform_seeds(timed) == [f"seed:uniform-{rankings[0][0]}-fit"]

    counted = ranksearch.optimize(model, images[:8], target_flops=0.6, **kwargs)
    assert len(rankings) == 1  # no timings to save: no shortlist
    assert len(uniform_seeds(counted)) >= 3


def test_at_the_space_s_floor_the_uniform_family_whose_cheapest_plan_is_predicted_fastest_is_fitted_first() -> None:
    """No family's plan predicted within the budget: the fits on timings go in the order of each
    family's cheapest plan, predicted fastest first (not the order of the names); a family with a
    plan within the budget still comes before them, by its score."""
    from types import SimpleNamespace

    from ranksearch.trials import TrialRunner

    def family(cheapest_ms: float, fits_from: float | None = None):
        # the family's plan at cost fraction f: predicted to take cheapest_ms at the cheap end, more above
        return lambda fraction: {"ms": cheapest_ms + 10 * (fraction - 0.05), "fits": fits_from is not None
                                 and fraction <= fits_from}

    runner = SimpleNamespace(
        feasible=lambda choices: choices["fits"],
        predictor=SimpleNamespace(predict=lambda choices: choices["ms"]),
        make_plan=lambda choices, origin: choices,
        workbench=SimpleNamespace(apply=lambda plan: plan),
        score=lambda model, plan: 0.5,
    )
    floor = {"channel": family(12.1), "spatial": family(11.1), "tucker2": family(7.6)}
    assert TrialRunner.by_predicted_score(runner, floor, 0.05, 0.9) == ["tucker2", "spatial", "channel"]
    within = {**floor, "channel": family(12.1, fits_from=0.3)}
    assert TrialRunner.by_predicted_score(runner, within, 0.05, 0.9) == ["channel", "tucker2", "spatial"]


def test_a_cheaper_plan_of_a_fitted_knob_that_scores_higher_is_queued_after_its_fitted_seed(trained) -> None:
    """Each budget-fitted seed (energy threshold, uniform ratio per family) is followed by the knob's
    plan a little cheaper that scored above it, if one did: with a score that rewards cheaper plans,
    every fitted seed whose knob has a plan up to 8% under it gets one; with one that rewards dearer
    plans, none does. Either way the plans scored to find out are counted on the study."""
    from ranksearch.cost import count_flops
    from ranksearch.warmstart import SCAN_SUFFIX

    model, images, _ = trained
    x = images[:8]
    base = count_flops(model, x)

    def search(cheaper_is_better: bool):
        def eval_fn(m: nn.Module) -> float:
            ratio = count_flops(m, x) / base
            return 1 - ratio if cheaper_is_better else ratio
        return ranksearch.optimize(model, x, target_flops=0.5, n_trials=12, seed=0, show_progress_bar=False,
                                   sensitivity=False, eval_fn=eval_fn)

    result = search(cheaper_is_better=True)
    seeds = {t.user_attrs["seed"]: t for t in result.study.trials if "seed" in t.user_attrs}
    fitted = [origin for origin in seeds if origin.endswith("-fit")]
    assert "seed:energy-fit" in fitted and len(fitted) >= 2
    budget = 0.5 * base
    order = list(seeds)
    scanned = [origin for origin in fitted if origin + SCAN_SUFFIX in seeds]
    assert "seed:energy-fit" in scanned and len(scanned) >= 2
    for origin in scanned:
        scan = seeds[origin + SCAN_SUFFIX]
        assert order.index(origin + SCAN_SUFFIX) == order.index(origin) + 1
        assert scan.values[0] > seeds[origin].values[0]
        assert seeds[origin].user_attrs["flops"] - 0.08 * budget <= scan.user_attrs["flops"] \
            < seeds[origin].user_attrs["flops"]
    assert result.study.user_attrs["seed_scan_evaluations"] >= len(fitted) + len(scanned)

    dearer = search(cheaper_is_better=False)
    assert not [t for t in dearer.study.trials if t.user_attrs.get("seed", "").endswith(SCAN_SUFFIX)]
    assert dearer.study.user_attrs["seed_scan_evaluations"] > len(fitted)  # cheaper plans scored, none kept
