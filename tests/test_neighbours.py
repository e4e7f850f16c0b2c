"""ranksearch.neighbours: local moves around the best plan, alternating with the sampler's trials
and taking the last trials of the budget."""

from __future__ import annotations

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


def test_neighbours_alternate_with_sampled_trials_then_take_the_endgame() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                          nn.Linear(96, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    result = ranksearch.optimize(model, x, target_flops=0.5, n_trials=40, seed=0, show_progress_bar=False,
                                 sensitivity=False)
    trials = result.study.trials
    assert len(trials) == 40  # the endgame's neighbours are part of the trial budget, not extra
    kinds = ["seed" if "seed" in t.user_attrs else "neighbour" if "neighbour_of" in t.user_attrs else "sampled"
             for t in trials]
    first_other = next(i for i, k in enumerate(kinds) if k != "seed")
    assert all(k == "seed" for k in kinds[:first_other]) and "seed" not in kinds[first_other:]
    endgame = max(neighbours._ENDGAME_MIN, round(neighbours._ENDGAME_SHARE * 40))
    middle, last = kinds[first_other:40 - endgame], kinds[40 - endgame:]
    assert middle.count("neighbour") >= len(middle) // 2 - 1
    assert all(not (a == b == "neighbour") for a, b in zip(middle, middle[1:]))
    assert endgame == 6 and last == ["neighbour"] * endgame  # the last trials only refine the best plan
    for t in trials:
        if "neighbour_of" in t.user_attrs:
            parent = trials[t.user_attrs["neighbour_of"]]
            assert parent.state == optuna.trial.TrialState.COMPLETE and parent.number < t.number
            assert t.params != parent.params


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
