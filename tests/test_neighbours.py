"""ranksearch.neighbours: local moves around the best plan, every trial after the seeds once a plan
meets the budget."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.layers import capture_layer_specs
from ranksearch import neighbours
from ranksearch.neighbours import grown_choices, neighbour_choices, tightened_choices
from ranksearch.space import load_space
from ranksearch.study import best_feasible


@pytest.fixture(scope="module")
def conv_candidates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    space = load_space("convnet")
    specs = capture_layer_specs(model, (torch.randn(1, 3, 8, 8),))
    return [c for c in space.candidates(specs) if c.searchable], space


def test_moves_change_few_layers_and_stay_in_the_space(conv_candidates) -> None:
    searchable, space = conv_candidates
    choices = {c.spec.name: (c.methods[0], space.rank_for(c.spec, c.methods[0], 0.5)) for c in searchable[1:]}
    original = dict(choices)
    rng = np.random.default_rng(0)
    for _ in range(200):
        moved = neighbour_choices(choices, searchable, space, rng)
        assert moved != choices
        changed = {n for n in set(moved) | set(choices) if moved.get(n) != choices.get(n)}
        assert 1 <= len(changed) <= 5  # two exchanges and a switch at most
        for cand in searchable:
            if cand.spec.name in moved:
                method, rank = moved[cand.spec.name]
                assert method in cand.methods
                assert space.cost_fraction_of(cand.spec, method, rank) < 1.0
    assert choices == original  # the input is not modified


def test_every_trial_after_the_seeds_is_a_neighbour_of_the_best_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                          nn.Linear(96, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    result = ranksearch.optimize(model, x, target_flops=0.5, n_trials=30, seed=0, show_progress_bar=False,
                                 sensitivity=False)
    trials = result.study.trials
    assert len(trials) == 30  # the neighbours are part of the trial budget, not extra
    kinds = ["seed" if "seed" in t.user_attrs else "neighbour" if "neighbour_of" in t.user_attrs else "sampled"
             for t in trials]
    first_other = kinds.index("neighbour")
    assert set(kinds[:first_other]) == {"seed"} and set(kinds[first_other:]) == {"neighbour"}
    for t in trials[first_other:]:
        parent = trials[t.user_attrs["neighbour_of"]]
        assert parent.state == optuna.trial.TrialState.COMPLETE and parent.number < t.number
        assert all(v <= 0 for v in parent.constraints.values())
        # the best feasible plan when the move was queued (its trials finished by then)
        assert parent.number == best_feasible(trials[:t.number])[0].number
        assert t.params != parent.params


def test_the_sampler_proposes_while_no_plan_meets_the_budget() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))

    def over_budget(trial: optuna.Trial) -> tuple[float, float]:
        trial.suggest_float("layer.cost_fraction", 0.05, 1.0)
        trial.set_constraint("flops", 0.2)
        return 0.5, 1.0

    # no feasible parent: nothing is queued, so the runner (which queues moves) is never asked
    study.optimize(over_budget, n_trials=4, callbacks=[neighbours.NeighbourMoves(runner=None, total=10)])
    assert len(study.trials) == 4
    assert all("neighbour_of" not in t.user_attrs for t in study.trials)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # none left waiting


def test_grow_spends_the_slack_and_no_more(conv_candidates) -> None:
    searchable, space = conv_candidates
    choices = {c.spec.name: (c.methods[0], space.rank_for(c.spec, c.methods[0], 0.3)) for c in searchable}
    original = dict(choices)

    def flops(plan: dict) -> float:
        return sum(space.cost_fraction_of(c.spec, *plan[c.spec.name]) * c.spec.flops if c.spec.name in plan
                   else c.spec.flops for c in searchable)

    budget = flops(choices) * 1.3

    def fits(plan: dict) -> bool:
        return flops(plan) <= budget

    for seed in range(5):
        grown = grown_choices(choices, searchable, space, np.random.default_rng(seed), fits)
        assert choices == original  # the input is not modified
        assert fits(grown) and flops(grown) > flops(choices)
        for cand in searchable:  # no layer loses rank, kept layers stay kept
            name = cand.spec.name
            if name in grown:
                assert space.cost_fraction_of(cand.spec, *grown[name]) >= space.cost_fraction_of(cand.spec, *choices[name])
        # saturated: no compressed layer can take one more step within the budget
        assert grown_choices(grown, searchable, space, np.random.default_rng(seed + 10), fits) == grown

def test_tighten_cuts_every_compressed_layer_by_the_least_that_fits(conv_candidates) -> None:
    searchable, space = conv_candidates
    # the first layer kept, the others compressed at 0.6 of their cost
    choices = {c.spec.name: (c.methods[-1], space.rank_for(c.spec, c.methods[-1], 0.6)) for c in searchable[1:]}
    original = dict(choices)

    def flops(plan: dict) -> float:
        return sum(space.cost_fraction_of(c.spec, *plan[c.spec.name]) * c.spec.flops if c.spec.name in plan
                   else c.spec.flops for c in searchable)

    budget = flops(choices) * 0.9  # the plan is 11% over: a cut must take it under

    def fits(plan: dict) -> bool:
        return flops(plan) <= budget

    cut = tightened_choices(choices, searchable, space, fits)
    assert choices == original  # the input is not modified
    assert cut is not None and fits(cut)
    assert set(cut) == set(choices)  # kept layers stay kept, compressed ones keep their method
    fractions = {n: space.cost_fraction_of(c.spec, *choices[n]) for c in searchable if (n := c.spec.name) in choices}
    for cand in searchable[1:]:
        name = cand.spec.name
        assert cut[name][0] == choices[name][0]
        assert space.cost_fraction_of(cand.spec, *cut[name]) <= fractions[name]
    # the least cut that fits: a looser budget is met by a smaller cut
    looser = tightened_choices(choices, searchable, space, lambda plan: flops(plan) <= flops(choices) * 0.97)
    assert looser is not None and flops(cut) < flops(looser) < flops(choices)
    assert tightened_choices(choices, searchable, space, lambda plan: False) is None  # nothing fits


def test_plans_under_budget_are_grown_towards_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    result = ranksearch.optimize(model, torch.randn(32, 1, 8, 8), target_flops=0.3, n_trials=10, seed=0,
                                 show_progress_bar=False, sensitivity=False)
    trials = result.study.trials
    grows = [t for t in trials if t.user_attrs.get("move") == "grow"]
    assert grows, "a plan well under the FLOP budget was never grown"
    for grow in grows:
        parent = trials[grow.user_attrs["neighbour_of"]]
        slack = -parent.constraints["flops"]
        assert slack > 0.03  # it had slack
        # spent, but at most half of it beyond the 1% margin (the next grow takes the rest)
        assert -slack < grow.constraints["flops"] <= -slack + 0.5 * (slack - 0.01) + 1e-9
        before = {c["name"]: c for c in parent.user_attrs["plan"] if c["method"] != "keep"}
        after = {c["name"]: c for c in grow.user_attrs["plan"] if c["method"] != "keep"}
        assert set(after) <= set(before)
        assert all(after[n]["rank"] >= before[n]["rank"] for n in after)  # svd ranks: ints


def test_a_grow_with_step_values_raises_the_layer_worth_most_first_then_spends_the_rest(conv_candidates) -> None:
    searchable, space = conv_candidates
    choices = {c.spec.name: (c.methods[0], space.rank_for(c.spec, c.methods[0], 0.3)) for c in searchable}
    favoured = searchable[1].spec.name

    def flops(plan: dict) -> float:
        return sum(space.cost_fraction_of(c.spec, *plan[c.spec.name]) * c.spec.flops if c.spec.name in plan
                   else c.spec.flops for c in searchable)

    def value(name, method, rank, raised) -> float:
        return 1.0 if name == favoured else 0.0  # only the favoured layer gains anything

    def fraction(plan: dict, name: str) -> float:  # a layer's cost fraction in the plan (1: kept)
        cand = next(c for c in searchable if c.spec.name == name)
        return space.cost_fraction_of(cand.spec, *plan[name]) if name in plan else 1.0

    # room for one step of the favoured layer and no more
    one_step = dict(choices)
    one_step[favoured] = (choices[favoured][0], neighbours._next_rank_up(
        searchable[1].spec, *choices[favoured], space))
    tight = flops(one_step)
    for seed in range(5):  # at random, another layer's step would often come first
        grown = grown_choices(choices, searchable, space, np.random.default_rng(seed),
                              lambda plan: flops(plan) <= tight, value)
        assert grown == one_step
    # with room to spare, the favoured layer first, then the rest in random order
    roomy = flops(choices) * 1.3
    for seed in range(5):
        grown = grown_choices(choices, searchable, space, np.random.default_rng(seed),
                              lambda plan: flops(plan) <= roomy, value)
        assert flops(grown) <= roomy and flops(grown) > flops(one_step)
        assert fraction(grown, favoured) >= fraction(one_step, favoured)
        # saturated, as a random grow is
        assert grown_choices(grown, searchable, space, np.random.default_rng(seed), lambda plan: flops(plan) <= roomy) == grown


def test_step_values_follow_the_sensitivity_table_per_unit_of_cost() -> None:
    from ranksearch.sensitivity import SensitivityTable, step_value

    # layers whose cost is their rank (ms), 16 kept ("d": 1 kept, its dense layer is the fastest);
    # the table scored ranks 8, 4 and 2
    losses = {"a": (("svd", 8, 0.0), ("svd", 4, 0.01), ("svd", 2, 0.3)),
              "b": (("svd", 8, 0.0), ("svd", 4, 0.2), ("svd", 2, 0.5)),
              "c": (("svd", 8, 0.0), ("svd", 2, 0.0)),
              "d": (("svd", 8, 0.05), ("svd", 2, 0.4))}

    def cost(name: str, method: str, rank: int | None) -> float:
        return (1.0 if name == "d" else 16.0) if rank is None else float(rank)

    value = step_value(SensitivityTable(losses, fingerprint="x", evaluations=7, seconds=0.0), cost)
    assert value("a", "svd", 2, 4) == pytest.approx(0.29 / 2)
    assert value("b", "svd", 4, 6) == pytest.approx(0.1 / 2)  # halfway to rank 8, by cost
    assert value("a", "svd", 4, 6) == pytest.approx(0.005 / 2)
    assert value("b", "svd", 8, None) == 0.0  # nothing left to gain by keeping it
    assert value("c", "svd", 2, 4) == 0.0  # the table sees no loss at any rank
    assert value("d", "svd", 8, None) == math.inf  # a gain that costs nothing comes first
    assert value("a", "channel", 2, 4) == 0.0  # a method the table did not score


def test_a_plans_first_grow_follows_the_sensitivity_table() -> None:
    import dataclasses

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    try:  # the table this search measures (one trial rarely meets the budget)
        measured = ranksearch.optimize(model, x, target_flops=0.3, n_trials=1, seed=0, show_progress_bar=False).sensitivity
    except ranksearch.TargetUnreachableError as exc:
        measured = exc.sensitivity
    # a table that says only the first layer loses anything, and less the higher its rank
    favoured = "1"
    losses = {name: tuple((m, r, (1.0 / (1 + r) if name == favoured else 0.0)) for m, r, _ in entries)
              for name, entries in measured.losses.items()}
    table = dataclasses.replace(measured, losses=losses)
    result = ranksearch.optimize(model, x, target_flops=0.3, n_trials=10, seed=0, show_progress_bar=False,
                                 sensitivity=table)
    trials = result.study.trials
    first_grows = {}
    for t in trials:
        if t.user_attrs.get("move") == "grow":
            first_grows.setdefault(t.user_attrs["neighbour_of"], t)
    assert first_grows, "a plan well under the FLOP budget was never grown"
    specs = {s.name: s for s in capture_layer_specs(model, x)}

    def layer_flops(choice: dict) -> int:
        spec = specs[choice["name"]]
        return spec.flops if choice["method"] == "keep" else ranksearch.get_method(choice["method"]).cost(spec, choice["rank"]).flops

    def flops_per_layer(trial) -> dict[str, int]:  # a layer the plan does not list is kept
        listed = {c["name"]: layer_flops(c) for c in trial.user_attrs["plan"]}
        return {name: listed.get(name, spec.flops) for name, spec in specs.items() if name in measured.losses}

    space, budget = load_space(None), 0.3 * result.baseline.flops
    raised_favoured = 0
    for parent_number, grow in first_grows.items():
        parent = trials[parent_number]
        before, after = flops_per_layer(parent), flops_per_layer(grow)
        added = {name: after[name] - before[name] for name in before}
        if added[favoured] > 0:
            # the favoured layer takes the steps until its next one does not fit; the others, the rest
            # of the slack, less than that step
            raised_favoured += 1
            assert added[favoured] >= sum(v for name, v in added.items() if name != favoured)
            continue
        # not raised: it is kept, or its first step is more than a grow spends (half the slack, less 1%)
        choice = next((c for c in parent.user_attrs["plan"] if c["name"] == favoured), {"method": "keep"})
        if choice["method"] != "keep":
            raised = neighbours._next_rank_up(specs[favoured], choice["method"], choice["rank"], space)
            step = (specs[favoured].flops if raised is None
                    else ranksearch.get_method(choice["method"]).cost(specs[favoured], raised).flops) - before[favoured]
            slack = -max(parent.constraints.values())
            assert step > neighbours._GROW_SHARE * (slack - 0.01) * budget
    assert raised_favoured >= 1
