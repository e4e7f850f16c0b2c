"""optimize(finetune_fn=...): the final plan is chosen by its score after the user's fine-tune."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cost import count_flops
from ranksearch.finetune import DEFAULT_FINETUNE_CANDIDATES
from ranksearch.report import write_report
from ranksearch.final_checks import _distinct_plans
from examples.digits import accuracy, load_digits_tensors

from .training import train_full_batch


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    data = load_digits_tensors(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))
    train_full_batch(model, data.x_train, data.y_train, steps=60, lr=1e-2)
    return model.eval(), data


def _fine_tune(data, seen: list[nn.Module] | None = None):
    """Ten full-batch Adam steps on the training split: a real, short fine-tune."""

    def finetune_fn(model: nn.Module) -> None:
        if seen is not None:
            seen.append(model)
        params = [p for p in model.parameters()]
        assert params and all(p.requires_grad for p in params)  # the search's frozen copies are trainable again
        train_full_batch(model, data.x_train, data.y_train, steps=10, lr=3e-3)

    return finetune_fn


def _search(model, data, **kwargs):
    return ranksearch.optimize(model, data.x_test[:16], target_flops=0.3, n_trials=12, seed=0,
                               show_progress_bar=False, eval_fn=lambda m: accuracy(m, data.x_test, data.y_test),
                               **kwargs)


def test_the_best_plan_after_fine_tuning_is_returned_fine_tuned(digits_mlp, tmp_path) -> None:
    model, data = digits_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[nn.Module] = []
    result = _search(model, data, finetune_fn=_fine_tune(data, seen), finetune_candidates=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched

    records = result.fine_tuned
    assert records is not None and len(records) == 3 == len(seen)
    assert len({r.trial for r in records}) == 3
    assert records[0].score == max(r.score for r in records)  # the best verified plan first
    chosen = max(records, key=lambda r: r.score_after)
    assert chosen.score_after > records[0].score  # the fine-tune helped: the fine-tuned model is kept
    assert result.plan.metadata["trial"] == chosen.trial and result.plan.metadata["fine_tune"]["fine_tuned"] is True
    assert result.final.score == chosen.score_after == accuracy(result.model, data.x_test, data.y_test)
    assert all(r.latency_ms is not None and r.seconds > 0 for r in records)
    assert not result.model.training
    # the returned model is the fine-tuned one: the plan alone rebuilds it before fine-tuning
    rebuilt = ranksearch.apply_plan(model, result.plan).eval()
    assert accuracy(rebuilt, data.x_test, data.y_test) == chosen.score
    with torch.no_grad():
        assert not torch.allclose(rebuilt(data.x_test), result.model(data.x_test))
    assert result.final.flops <= 0.3 * result.baseline.flops
    # the plan file says what happened, in plain JSON
    saved = json.loads(result.plan.save(tmp_path / "plan.json").read_text())
    recorded = saved["metadata"]["fine_tune"]
    assert recorded["chosen_trial"] == chosen.trial
    assert [c["score_after"] for c in recorded["candidates"]] == [r.score_after for r in records]
    assert "fine-tuned" in result.summary()
    # a report from the plan file alone says the score is after fine-tuning
    report = write_report(tmp_path / "report", plan=ranksearch.CompressionPlan.load(tmp_path / "plan.json"))
    assert (f"the model was fine-tuned by finetune_fn: the quality score is after fine-tuning, and trial "
            f"{chosen.trial} scored best") in report.read_text()


def test_a_fine_tune_that_reverses_the_order_changes_the_pick(digits_mlp) -> None:
    model, data = digits_mlp

    def finetune_fn(m: nn.Module) -> None:
        m.fine_tuned_marker = True  # the eval below scores marked models in reverse, above any unmarked one

    def eval_fn(m: nn.Module) -> float:
        score = accuracy(m, data.x_test, data.y_test)
        return 2.0 - score if getattr(m, "fine_tuned_marker", False) else score

    result = ranksearch.optimize(model, data.x_test[:16], target_flops=0.3, n_trials=12, seed=0,
                                 show_progress_bar=False, eval_fn=eval_fn, finetune_fn=finetune_fn)
    records = result.fine_tuned
    assert records is not None and len(records) == DEFAULT_FINETUNE_CANDIDATES
    worst = min(records, key=lambda r: r.score)
    assert worst is not records[0] and worst.score < records[0].score  # distinct plans, distinct scores
    # the worst before fine-tuning is the best after it, and it is the one returned
    assert result.plan.metadata["trial"] == worst.trial
    assert result.final.score == pytest.approx(2.0 - worst.score)
    assert result.plan.metadata["fine_tune"]["fine_tuned"] is True

    plain = ranksearch.optimize(model, data.x_test[:16], target_flops=0.3, n_trials=12, seed=0,
                                show_progress_bar=False, eval_fn=eval_fn)
    assert plain.fine_tuned is None
    assert plain.plan.metadata["trial"] == records[0].trial  # without finetune_fn: the best before


def test_a_plan_the_fine_tunes_pick_over_the_best_gets_its_own_headroom_spare(digits_mlp) -> None:
    """A fine-tune under which the plan with the most FLOPs scores best: the pick is a plan at the
    latency budget (FLOPs as ms), not the best before fine-tuning (far under it). Its spare, cut under
    its final check, is handed over by ``headroom_spares`` although a faster plan that scored better
    before fine-tuning hides it from the front."""
    model, data = digits_mlp
    x = data.x_test[:16]

    def finetune_fn(m: nn.Module) -> None:
        m.fine_tuned_marker = True

    def eval_fn(m: nn.Module) -> float:
        if getattr(m, "fine_tuned_marker", False):
            return 1.0 + count_flops(m, x) / count_flops(model, x)
        return accuracy(m, data.x_test, data.y_test)

    result = ranksearch.optimize(model, x, target_latency_ratio=0.8, n_trials=12, seed=0, show_progress_bar=False,
                                 latency_fn=lambda m, inputs: count_flops(m, inputs) / 1e6, eval_fn=eval_fn,
                                 finetune_fn=finetune_fn, finetune_candidates=4, sensitivity=False)
    target = 0.8 * result.baseline.latency_ms
    records = result.fine_tuned
    picked = result.plan.metadata["trial"]
    assert picked != records[0].trial and result.plan.metadata["fine_tune"]["fine_tuned"] is True
    assert 0.95 * target <= result.final.latency_ms <= target and records[0].latency_ms < 0.95 * target
    spares = result.headroom_spares()
    assert spares and all(p.spare_for == picked for p in spares)
    assert all(0.85 * target <= p.measured_latency_ms <= 0.97 * target for p in spares)
    # off the front before fine-tuning: a plan there is faster and scored better
    best = next(p for p in result.pareto if p.trial == records[0].trial)
    assert all(best.score > p.score and best.measured_latency_ms < p.measured_latency_ms for p in spares)


@pytest.mark.parametrize("kind", ["harmful", "no-op"])
def test_a_fine_tune_that_does_not_raise_the_score_is_not_kept(digits_mlp, tmp_path, kind) -> None:
    model, data = digits_mlp

    def finetune_fn(m: nn.Module) -> None:
        if kind == "harmful":  # a learning rate far too high, say: every weight knocked off
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * p.abs().mean())

    result = _search(model, data, finetune_fn=finetune_fn, finetune_candidates=3)
    records = result.fine_tuned
    assert records is not None and len(records) == 3
    if kind == "harmful":
        assert all(r.score_after < records[0].score for r in records)
    else:  # the same model scored twice: a tie goes to the plan as decomposed
        assert all(r.score_after == r.score for r in records)
    # the best plan as decomposed, exactly what the plan alone rebuilds
    assert result.plan.metadata["trial"] == records[0].trial
    assert result.plan.metadata["fine_tune"]["fine_tuned"] is False
    assert result.final.score == records[0].score == accuracy(result.model, data.x_test, data.y_test)
    rebuilt = ranksearch.apply_plan(model, result.plan).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(data.x_test), result.model(data.x_test))
    assert "returned without fine-tuning" in result.summary()
    result.plan.save(tmp_path / "plan.json")
    report = write_report(tmp_path / "report", plan=ranksearch.CompressionPlan.load(tmp_path / "plan.json"))
    assert "the model is not fine-tuned, and the plan alone rebuilds it" in report.read_text()


def test_the_pick_weighs_every_candidate_as_decomposed_and_fine_tuned() -> None:
    from types import SimpleNamespace

    from ranksearch.finetune import pick_after_finetune

    def pick(before: list[float], after: list[float]) -> tuple[int, bool]:
        models = [nn.Linear(1, 1) for _ in before]
        scores = {id(m): b for m, b in zip(models, before)}
        verified = [(SimpleNamespace(number=i, values=[b]), None, m, 1.0)
                    for i, (m, b) in enumerate(zip(models, before))]
        tuned_count = iter(range(len(after)))

        def finetune_fn(m: nn.Module) -> None:
            scores[id(m)] = after[next(tuned_count)]

        index, model, records, kept = pick_after_finetune(verified, finetune_fn, lambda m: scores[id(m)])
        assert [r.score_after for r in records] == after
        assert (model is models[index]) == (not kept)
        return index, kept

    assert pick([0.9, 0.5], [0.95, 0.97]) == (1, True)  # the best after fine-tuning
    assert pick([0.9, 0.5], [0.85, 0.88]) == (0, False)  # no fine-tune beat the best as decomposed
    assert pick([0.9, 0.5], [0.9, 0.9]) == (0, False)  # ties go to the plan as decomposed
    assert pick([0.9, 0.5], [0.95, 0.95]) == (0, True)  # then to the earlier candidate
    assert pick([0.5, 0.9], [0.6, 0.9]) == (1, False)  # any candidate may win as decomposed


def test_further_candidates_come_from_other_lineages_first(digits_mlp, monkeypatch) -> None:
    import ranksearch.final_checks

    model, data = digits_mlp
    plain = _search(model, data, finetune_fn=_fine_tune(data), finetune_candidates=3).fine_tuned
    assert plain is not None and len(plain) == 3
    best, second = plain[0].trial, plain[1].trial
    # the same search, with the second plan made a descendant of the best (as a neighbour would be)
    lineage = ranksearch.final_checks._lineage
    monkeypatch.setattr(ranksearch.final_checks, "_lineage",
                        lambda t, by_number: best if t.number == second else lineage(t, by_number))
    records = _search(model, data, finetune_fn=_fine_tune(data), finetune_candidates=3).fine_tuned
    assert records is not None and len(records) == 3
    # the best; then the third, of another lineage, before the second; then the second
    assert [r.trial for r in records] == [best, plain[2].trial, second]


def test_the_energy_seed_fitted_to_the_budget_is_fine_tuned_after_the_best_plan(digits_mlp) -> None:
    model, data = digits_mlp
    result = _search(model, data, finetune_fn=_fine_tune(data), finetune_candidates=2)
    energy = [t for t in result.study.trials if t.user_attrs.get("seed") == "seed:energy-fit"]
    assert len(energy) == 1 and energy[0].values is not None  # fitted to the FLOP budget, and met it
    best_score = max(t.values[0] for t in result.study.trials if t.values and t.number != energy[0].number)
    assert energy[0].values[0] < best_score  # not the best before fine-tuning
    assert result.fine_tuned is not None and [r.trial for r in result.fine_tuned][1] == energy[0].number


def test_the_best_uniform_seed_fitted_to_the_budget_is_fine_tuned_after_the_energy_seed(digits_mlp) -> None:
    from ranksearch.warmstart import is_uniform_fit

    model, data = digits_mlp
    result = _search(model, data, finetune_fn=_fine_tune(data), finetune_candidates=3)
    uniform = [t for t in result.study.trials if is_uniform_fit(t.user_attrs.get("seed")) and t.values]
    assert uniform  # one per family (svd, tt) fitted to the FLOP budget, those that met it scored
    best_uniform = max(uniform, key=lambda t: t.values[0])
    assert result.fine_tuned is not None
    trials = [r.trial for r in result.fine_tuned]
    assert trials[2] == best_uniform.number and best_uniform.number != trials[0]
    assert not any(is_uniform_fit(t.user_attrs.get("seed")) for t in result.study.trials if t.number in trials[:2])


def test_lineage_follows_neighbours_and_repairs_to_their_root() -> None:
    from ranksearch.final_checks import _fine_tune_order, _lineage

    def trial(number: int, parent: int | None = None, seed: str | None = None) -> optuna.trial.FrozenTrial:
        attrs = {} if parent is None else {"neighbour_of": parent, "move": "exchange"}
        made = optuna.trial.create_trial(values=[0.5, 1.0], user_attrs=attrs if seed is None else {"seed": seed})
        made.number = number
        return made

    trials = [trial(0), trial(1), trial(2, parent=0), trial(3, parent=2), trial(4, parent=1), trial(5)]
    by_number = {t.number: t for t in trials}
    assert [_lineage(t, by_number) for t in trials] == [0, 1, 0, 0, 1, 5]
    queue = [by_number[n] for n in (3, 2, 4, 5, 1)]
    _fine_tune_order(queue, {0}, by_number)
    assert [t.number for t in queue] == [4, 5, 1, 3, 2]  # lineage 0 last, each group in its order
    _fine_tune_order(queue, {0, 1}, by_number)
    assert [t.number for t in queue] == [5, 4, 1, 3, 2]

    # the energy-threshold seed fitted to the budget goes first, however it scored before the fine-tune
    energy = trial(6, seed="seed:energy-fit")
    by_number[6] = energy
    queue = [by_number[n] for n in (3, 4, 5, 6)]
    _fine_tune_order(queue, {0}, by_number)
    assert [t.number for t in queue] == [6, 4, 5, 3]
    # unless a verified plan descends from it: then it is one more plan of that lineage
    _fine_tune_order(queue, {0, 6}, by_number)
    assert [t.number for t in queue] == [4, 5, 6, 3]

    # then the uniform-ratio seeds fitted to the budget, best first, until a verified plan comes from one
    by_number[7], by_number[8] = trial(7, seed="seed:uniform-svd-fit"), trial(8, seed="seed:uniform-tt-fit")
    queue = [by_number[n] for n in (3, 4, 8, 7, 6)]
    _fine_tune_order(queue, {0}, by_number)
    assert [t.number for t in queue] == [6, 8, 7, 4, 3]
    queue = [by_number[n] for n in (4, 7, 3)]
    _fine_tune_order(queue, {0, 6}, by_number)
    assert [t.number for t in queue] == [7, 4, 3]
    _fine_tune_order(queue, {0, 6, 8}, by_number)  # one uniform seed is enough: the other is one more lineage
    assert [t.number for t in queue] == [7, 4, 3]
    queue = [by_number[n] for n in (4, 7, 3)]
    _fine_tune_order(queue, {0, 6, 8}, by_number)
    assert [t.number for t in queue] == [4, 7, 3]

    # the sensitivity seeds come before all of those, the better first, until a verified plan comes from one
    by_number[9] = trial(9, seed="seed:sensitivity-lagrangian")
    by_number[10] = trial(10, seed="seed:sensitivity-threshold")
    by_number[11] = trial(11, parent=9)
    queue = [by_number[n] for n in (4, 8, 7, 6, 10, 9, 3)]
    _fine_tune_order(queue, {0}, by_number)
    assert [t.number for t in queue] == [10, 9, 6, 8, 7, 4, 3]
    queue = [by_number[n] for n in (4, 8, 6, 10, 3)]
    _fine_tune_order(queue, {0, _lineage(by_number[11], by_number)}, by_number)  # a move from the Lagrangian seed
    assert [t.number for t in queue] == [6, 8, 4, 10, 3]


def test_a_failing_fine_tune_is_reported_with_what_to_fix(digits_mlp) -> None:
    model, data = digits_mlp

    def broken(m: nn.Module) -> None:
        raise RuntimeError("out of data")

    with pytest.raises(ranksearch.EvaluationError, match="finetune_fn raised RuntimeError: out of data"):
        _search(model, data, finetune_fn=broken)

    def diverging(m: nn.Module) -> None:
        with torch.no_grad():
            next(m.parameters()).fill_(float("nan"))

    with pytest.raises(ranksearch.EvaluationError, match="finetune_fn left weights that are not finite"):
        _search(model, data, finetune_fn=diverging)


@pytest.mark.parametrize("kwargs, message", [
    ({"finetune_fn": "train"}, "finetune_fn must be a callable"),
    ({"finetune_fn": lambda m: None, "finetune_candidates": 0}, "finetune_candidates must be a positive int"),
    ({"finetune_fn": lambda m: None, "finetune_candidates": True}, "finetune_candidates must be a positive int"),
])
def test_bad_fine_tune_arguments_fail_before_any_work(digits_mlp, kwargs, message) -> None:
    model, data = digits_mlp
    calls = []
    with pytest.raises(ranksearch.InvalidInputsError, match=message):
        ranksearch.optimize(model, data.x_test[:16], target_flops=0.3, n_trials=12, show_progress_bar=False,
                            eval_fn=lambda m: calls.append(1) or 1.0, **kwargs)
    assert not calls


def test_a_plan_found_twice_is_verified_once() -> None:
    def trial(number: int, plan: list[dict]) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(values=[1.0 - number / 10, 1.0], user_attrs={"plan": plan})

    a = [{"name": "fc1", "method": "svd", "rank": 4, "origin": "seed:vbmf"}]
    b = [{"name": "fc1", "method": "svd", "rank": 8, "origin": "trial:1"}]
    a_again = [{"name": "fc1", "method": "svd", "rank": 4, "origin": "trial:2"},  # found by another route
               {"name": "fc2", "method": "keep", "origin": "trial:2"}]
    trials = [trial(0, a), trial(1, b), trial(2, a_again)]
    assert _distinct_plans(trials) == [trials[0], trials[1]]
