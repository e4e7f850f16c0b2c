"""How to cut a plan at the budget a little deeper: the three cuts of repairs and headroom spares.

A search repairs a plan whose final check finds it over the latency target, and cuts its answer to
a little under the target as a spare for a device that times it slower (``ranksearch.final_checks``).
This script runs searches as ``compare.py`` does (its real models, latency targets, trial budgets
and one sensitivity table per model), then cuts each answer 5%, 10% and 15% under its final check
(unless it is that far under the target already) in each of three ways, side by side:

* *shared factor*: every compressed layer's cost fraction by one factor (``tightened_choices``);
* *table*: ranks lowered where the sensitivity table, each layer scored alone, says it costs least
  (``least_loss_cut``);
* *scored*: the same steps, picked by the model's validation score, or the table's cut where that
  scores higher (``scored_cut``).

Per cut: validation and test score, the latency ratio the search predicts for it and a timing of
it (one, beside the original, as the search's trials time plans: noisy at batch 1), and the
seconds the cut took (and how many plans it scored). Writes benchmarks/results/cuts.md and prints
it. About eight minutes on 2 cores (``--quick``: the CNN at batch 1, 0.5x only, about two).

    python benchmarks/bench_cuts.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's import

import ranksearch  # noqa: E402
from ranksearch import final_checks  # noqa: E402
from ranksearch.fitting import Choices  # noqa: E402
from ranksearch.neighbours import tightened_choices  # noqa: E402
from ranksearch.scored_cut import scored_cut  # noqa: E402
from ranksearch.sensitivity import least_loss_cut  # noqa: E402
from ranksearch.study import plan_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grow_order import compare_searches  # noqa: E402
from compare import SEARCH_TOLERANCE  # noqa: E402
from models import Task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cuts.md"
#: (model, space, trials as in compare.py, (batch, latency target as a ratio to the original) ...)
SETTINGS = (("cnn", "convnet", 24, (("batch 1", 0.7), ("batch 1", 0.5), ("batch 8", 0.5), ("batch 8", 0.35))),
            ("minilm", "transformer", 18, (("batch 1", 0.5), ("batch 8", 0.5), ("batch 8", 0.35))))
QUICK = (("cnn", "convnet", 24, (("batch 1", 0.5),)),)
HEADROOMS = (0.05, 0.10, 0.15)
CUTS = ("shared factor", "table", "scored")


def search_and_runner(task: Task, space: ranksearch.SearchSpace, batch: str, target: float, trials: int,
                      table: ranksearch.SensitivityTable, **overrides: Any) -> dict[str, Any] | None:
    """One search as compare.py runs it (no fine-tune; ``overrides``: other ``optimize`` arguments);
    its runner, answer, the answer's final check and the target, as the search hands them to its
    headroom cut. ``None`` when no plan met the target (no answer to cut)."""
    seen: dict[str, Any] = {}
    headroom_cut = final_checks._headroom_cut

    def capture(study, search, trial, verified_ms, target_ms, *args):  # type: ignore[no-untyped-def]
        seen.update(search=search, trial=trial, verified_ms=verified_ms, target_ms=target_ms)
        return headroom_cut(study, search, trial, verified_ms, target_ms, *args)

    try:
        with mock.patch.object(final_checks, "_headroom_cut", capture):
            ranksearch.optimize(task.model, task.inputs[batch], **{
                **dict(target_latency_ratio=target, eval_fn=task.val_score, n_trials=trials, search_space=space,
                       seed=0, threads=1, latency_clock="cpu", show_progress_bar=False, sensitivity=table,
                       latency_tolerance=SEARCH_TOLERANCE, calib_data=task.calib_data), **overrides})
    except ranksearch.TargetUnreachableError:
        return None
    return seen or None


def cut_rows(task: Task, name: str, batch: str, target: float, seen: dict[str, Any],
             table: ranksearch.SensitivityTable) -> list[tuple[str, dict[str, float]]]:
    """Per headroom: the table row, and each cut's validation score (where a cut fits). A headroom the
    answer's final check is already under gets no cut (the search makes no such spare)."""
    search, trial, verified_ms, target_ms = seen["search"], seen["trial"], seen["verified_ms"], seen["target_ms"]
    parent: Choices = {c.name: (c.method, c.rank) for c in plan_of(trial, search.fingerprint).replaced}
    base_ms = search.baseline.latency_ms
    predicted_parent = search.predictor.predict(search.make_plan(parent, "bench"))

    def predicted_ratio(choices: Choices) -> float:  # scaled as the cuts' own fit scales it
        return search.predictor.predict(search.make_plan(choices, "bench")) * verified_ms / predicted_parent / base_ms

    answer = f"trial {trial.number}: val {trial.values[0]:.3f}, {verified_ms / base_ms:.3f}"
    evaluations = 0

    def counted_score(choices: Choices) -> float:
        nonlocal evaluations
        evaluations += 1
        return search.score_choices(choices)

    rows = []
    for headroom in HEADROOMS:
        if verified_ms < target_ms * (1 - headroom):
            continue
        fits = search.fits_beside(parent, verified_ms * (1 + headroom))
        makers: dict[str, Callable[[], Choices | None]] = {
            "shared factor": lambda: tightened_choices(parent, search.searchable, search.space, fits),
            "table": lambda: least_loss_cut(search, table, parent, fits),
            "scored": lambda: scored_cut(search, table, parent, fits, counted_score, trial.values[0])}
        cells, scores = [], {}
        for label in CUTS:
            started, evaluations = time.perf_counter(), 0
            choices = makers[label]()
            seconds = time.perf_counter() - started
            if choices is None:
                cells.append("no cut fits")
                continue
            model = search.workbench.apply(search.make_plan(choices, "bench"))
            val, test = search.score(model), task.test_scores(model).headline
            scores[label] = val
            measured = search.measured_latency(search.make_plan(choices, "bench"), model) / base_ms
            cells.append(f"val {val:.3f}, test {test:.3f}; {predicted_ratio(choices):.3f} / {measured:.3f}; "
                         f"{seconds:.1f} s" + (f", {evaluations} evaluations" if evaluations else ""))
        row = f"| {name} | {batch} | {target:g} | {answer} | {100 * headroom:.0f}% | " + " | ".join(cells) + " |"
        rows.append((row, scores))
        print(row, flush=True)
    search.workbench.apply(search.make_plan({}, "bench"))
    return rows or [(f"| {name} | {batch} | {target:g} | {answer} | none: the answer is more than "
                     f"{100 * HEADROOMS[-1]:.0f}% under the target | | | |", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CNN at batch 1, 0.5x only")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[tuple[str, dict[str, float]]] = []
    started = time.perf_counter()
    for name, task, space, table, trials, batch, target in compare_searches(QUICK if args.quick else SETTINGS):
        seen = search_and_runner(task, space, batch, target, trials, table)
        if seen is None:
            rows.append((f"| {name} | {batch} | {target:g} | no plan met the target | | | | |", {}))
            continue
        rows.extend(cut_rows(task, name, batch, target, seen, table))
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join([
        "# Cutting a plan at the budget: shared factor, table, scored",
        "",
        "`python benchmarks/bench_cuts.py`: searches as `compare.py` runs them (latency targets as ratios",
        "to the original, its trial budgets, one sensitivity table per model, no fine-tune), then each",
        "answer cut 5, 10 and 15% under its final check (unless the check is that far under the target",
        "already: the search makes no such spare), three ways: every compressed layer's cost fraction by one",
        "*shared factor*; ranks lowered where the sensitivity *table* (each layer scored alone) says it costs",
        "least; the same steps picked by the plans' validation *scores*, or the table's cut where that scores",
        "higher (`ranksearch.scored_cut`).",
        "Each cell: validation and test score (CNN: accuracy; MiniLM: mean cosine to the original's",
        "embeddings); latency ratio to the original as the search predicts it / one timing beside the",
        "original; the seconds the cut took (and the plans it scored). *answer*: its trial, validation score",
        "and final check.",
        "",
        "| model | batch | target | answer | cut under its check | shared factor | table | scored |",
        "|---|---|---|---|---|---|---|---|",
        *(row for row, _ in rows),
        "",
        f"Best validation score among the three cuts (a tie counts for each): {_wins([s for _, s in rows])}. "
        f"Run time {minutes:.1f} min.",
        ""])
    if not args.quick:
        RESULTS.write_text(text, encoding="utf-8")
    print(text)


def _wins(scores: list[dict[str, float]]) -> str:
    """How often each cut scored best on validation among the cuts that fit (a tie counts for each)."""
    counts = {label: sum(bool(s) and s.get(label) == max(s.values()) for s in scores) for label in CUTS}
    return ", ".join(f"{label} {n}" for label, n in counts.items())


if __name__ == "__main__":
    main()
