"""Which plans to fine-tune: every plan of a search fine-tuned, and what each candidate order picks.

With ``optimize(finetune_fn=...)`` a search fine-tunes a few of its plans and returns the best after
the fine-tune (``ranksearch.finetune``). Which few matters where the cut is deep: there a plan's score
before a fine-tune says little about its score after it. This script runs searches as
``compare.py`` does (its real models, latency targets, trial budgets and one sensitivity table per
model), fine-tunes *every* distinct plan that met the target in its trial timing with the benchmark's
fine-tune, and reports per setting:

* how well the score before the fine-tune ranks the plans after it (Spearman);
* the score after the fine-tune of the best plan, of each seed the order can favour (sensitivity,
  energy, uniform) and of the best plan overall;
* the plan the candidate order picks with 2 and 4 candidates (``ranksearch.final_checks._fine_tune_order``),
  and with the order before the sensitivity seeds were put first (the same function with no
  sensitivity seeds named), by validation after the fine-tune, with its test score.

The picks leave out the final latency checks (every plan here met the target in its trial), so a
search may pick otherwise where a check rules a plan out.

Writes benchmarks/results/fine_tune_candidates.md and prints it. 6-15 minutes on 2 cores
(``--quick``: the CNN at batch 1, 0.5x only, about three).

    python benchmarks/bench_fine_tune_candidates.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import optuna
import torch
from scipy.stats import spearmanr

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's import

import ranksearch  # noqa: E402
from ranksearch import final_checks  # noqa: E402
from ranksearch.batchnorm import BatchNormRecalibration  # noqa: E402
from ranksearch.study import plan_of  # noqa: E402
from ranksearch.warmstart import ENERGY_FIT_SEED, is_uniform_fit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grow_order import compare_searches  # noqa: E402
from compare import SEARCH_TOLERANCE  # noqa: E402
from models import Task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fine_tune_candidates.md"
#: (model, space, trials as in compare.py, (batch, latency target as a ratio to the original) ...)
SETTINGS = (("cnn", "convnet", 24, (("batch 1", 0.7), ("batch 1", 0.5), ("batch 8", 0.5), ("batch 8", 0.35))),
            ("minilm", "transformer", 18, (("batch 1", 0.5), ("batch 8", 0.5))))
QUICK = (("cnn", "convnet", 24, (("batch 1", 0.5),)),)


@dataclass
class Tuned:
    trial: optuna.trial.FrozenTrial
    before: float
    after: float
    test_after: float


def fine_tune_every_plan(task: Task, space: ranksearch.SearchSpace, batch: str, target: float, trials: int,
                         table: ranksearch.SensitivityTable) -> tuple[list[Tuned], dict[int, optuna.trial.FrozenTrial]]:
    """One search as compare.py runs it, then each distinct plan under the target fine-tuned on a copy,
    in the search's order of plans (best first)."""
    result = ranksearch.optimize(
        task.model, task.inputs[batch], target_latency_ratio=target, eval_fn=task.val_score, n_trials=trials,
        search_space=space, seed=0, threads=1, latency_clock="cpu", show_progress_bar=False, sensitivity=table,
        latency_tolerance=SEARCH_TOLERANCE, timing_process=True, calib_data=task.calib_data)
    # each plan as the search scored it: BatchNorm statistics re-estimated where the search did that
    recalibration = (BatchNormRecalibration(task.model, task.inputs[batch], task.calib_data)
                     if "batchnorm_recalibration" in result.plan.metadata else None)
    limit_ms = result.baseline.latency_ms * target * (1 + SEARCH_TOLERANCE)
    by_number = {t.number: t for t in result.study.trials}
    plans = [t for t in final_checks._distinct_plans(final_checks.best_feasible(result.study.trials))
             if t.user_attrs.get("measured_latency_ms", float("inf")) <= limit_ms]
    tuned = []
    for trial in plans:
        plan = plan_of(trial, result.plan.fingerprint)
        model = ranksearch.apply_plan(task.model, plan).eval()
        if recalibration is not None:
            recalibration(model, [c.name for c in plan.replaced])
        torch.manual_seed(0)  # as compare.py's fine-tune of every row
        task.fine_tune(model)
        model.eval()
        tuned.append(Tuned(trial, trial.values[0], task.val_score(model), task.test_scores(model).headline))
    return tuned, by_number


def picks(tuned: list[Tuned], by_number: dict[int, optuna.trial.FrozenTrial], candidates: int) -> list[Tuned]:
    """The plans ``_fine_tune_order`` would fine-tune: the best, then in its order, a plan at a time."""
    chosen, queue = [tuned[0]], [t.trial for t in tuned[1:]]
    by_trial = {t.trial.number: t for t in tuned}
    while queue and len(chosen) < candidates:
        final_checks._fine_tune_order(queue, {final_checks._lineage(t.trial, by_number) for t in chosen}, by_number)
        chosen.append(by_trial[queue.pop(0).number])
    return chosen


def origin(tuned: Tuned, by_number: dict[int, optuna.trial.FrozenTrial]) -> str:
    """The seed a plan is, or its move and the seed its lineage starts from."""
    seed = tuned.trial.user_attrs.get("seed")
    if seed:
        return seed.removeprefix("seed:")
    root = by_number[final_checks._lineage(tuned.trial, by_number)]
    root_name = (root.user_attrs.get("seed") or f"trial {root.number}").removeprefix("seed:")
    return f"{tuned.trial.user_attrs.get('move', 'sampled')} from {root_name}"


def report(name: str, batch: str, target: float, tuned: list[Tuned],
           by_number: dict[int, optuna.trial.FrozenTrial]) -> str:
    def seed_cell(test: Callable[[str | None], bool]) -> str:
        hits = [t for t in tuned if test(t.trial.user_attrs.get("seed"))]
        return " / ".join(f"{t.before:.3f} -> **{t.after:.3f}**" for t in hits) or "-"

    def pick_cell(candidates: int, before_change: bool) -> str:
        with mock.patch.object(final_checks, "SENSITIVITY_SEEDS", () if before_change else
                               final_checks.SENSITIVITY_SEEDS):
            best = max(picks(tuned, by_number, candidates), key=lambda t: t.after)
        return f"trial {best.trial.number} ({origin(best, by_number)}): {best.after:.3f}, test {best.test_after:.3f}"

    rho = spearmanr([t.before for t in tuned], [t.after for t in tuned]).statistic if len(tuned) > 2 else float("nan")
    best_after = max(tuned, key=lambda t: t.after)
    return (f"| {name} | {batch} | {target:g} | {len(tuned)} | {rho:.2f} | {tuned[0].before:.3f} -> "
            f"**{tuned[0].after:.3f}** ({origin(tuned[0], by_number)}) | "
            f"{seed_cell(lambda s: s in final_checks.SENSITIVITY_SEEDS)} | {seed_cell(lambda s: s == ENERGY_FIT_SEED)} | "
            f"{seed_cell(is_uniform_fit)} | {best_after.before:.3f} -> **{best_after.after:.3f}**, test "
            f"{best_after.test_after:.3f} ({origin(best_after, by_number)}) | {pick_cell(2, True)} | "
            f"{pick_cell(2, False)} | {pick_cell(4, True)} | {pick_cell(4, False)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CNN at batch 1, 0.5x only")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, task, space, table, trials, batch, target in compare_searches(QUICK if args.quick else SETTINGS):
        tuned, by_number = fine_tune_every_plan(task, space, batch, target, trials, table)
        rows.append(report(name, batch, target, tuned, by_number))
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Which plans to fine-tune",
        "",
        "`python benchmarks/bench_fine_tune_candidates.py`: searches as `compare.py` runs them (latency targets",
        "as ratios to the original, its trial budgets, one sensitivity table per model), then every distinct",
        "plan that met the target in its trial fine-tuned with the benchmark's fine-tune (CNN: one epoch of",
        "Adam on the training split; MiniLM: one epoch of distillation). Scores: validation before -> after",
        "the fine-tune (CNN: accuracy; MiniLM: mean cosine to the original's embeddings); *test* after it.",
        "*Spearman*: how well the score before ranks the plans after. *picked*: the best after the fine-tune",
        "of the plans `_fine_tune_order` fine-tunes (the best plan first), with 2 candidates (the",
        "benchmark's ranksearch-ft) and 4 (optimize's default), in the order before the sensitivity seeds",
        "came second and now; final latency checks left out.",
        "",
        "| model | batch | target | plans | Spearman | best plan before | sensitivity seeds | energy seed | "
        "uniform seed | best after | picked, 2, before | picked, 2, now | picked, 4, before | picked, 4, now |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    if not args.quick:
        RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
