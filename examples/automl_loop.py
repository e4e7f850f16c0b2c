"""ranksearch inside an outer loop that picks the budget: the smallest FLOP budget that keeps accuracy.

    python examples/automl_loop.py                              # budgets 0.9, 0.8, 0.7, 0.5 of the FLOPs
    python examples/automl_loop.py --budgets 0.8,0.6 --tolerance 0.02 --trials 40

For each FLOP budget, from the largest down, one search runs on the digits CNN (validation
accuracy as the score), in its own study of one SQLite storage: rerunning the script resumes each
study instead of starting over, and more --trials extends them. The loop stops at the first budget
whose best plan loses more than --tolerance accuracy (smaller budgets only get worse), and keeps
the smallest budget that passed. Its plan, report and held-out accuracy are written to --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in a checkout

import ranksearch  # noqa: E402
from examples.digits_factory import example_batch, held_out_accuracy, trained_cnn, validation_accuracy  # noqa: E402
from ranksearch.report import write_report  # noqa: E402


@dataclass
class Outcome:
    budget: float
    result: ranksearch.SearchResult | None
    note: str = ""

    @property
    def accuracy(self) -> float | None:
        return None if self.result is None else self.result.final.score


def search(model: torch.nn.Module, budget: float, *, trials: int, storage: str, seed: int) -> Outcome:
    """One budget's search, in the study named after it (resumed when it already exists)."""
    try:
        result = ranksearch.optimize(
            model, example_batch(), target_flops=budget, eval_fn=validation_accuracy, n_trials=trials,
            search_space="convnet", storage=storage, study_name=f"digits-flops-{budget:g}", seed=seed,
            show_progress_bar=False,
        )
    except ranksearch.TargetUnreachableError as exc:
        return Outcome(budget, None, f"unreachable: {exc}")
    return Outcome(budget, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.5", help="FLOP fractions to try, comma-separated")
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy a budget may lose (0.01: 1 point)")
    parser.add_argument("--trials", type=int, default=25, help="trials per budget (a study's total)")
    parser.add_argument("--out", type=Path, default=Path("runs/automl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(1)  # FLOPs decide here, but timing is steadier on one thread

    budgets = sorted((float(b) for b in args.budgets.split(",")), reverse=True)
    args.out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(args.out / 'studies.db').resolve()}"
    model = trained_cnn()
    original = validation_accuracy(model)
    floor = original - args.tolerance
    print(f"original: validation accuracy {original:.4f}; a budget passes at >= {floor:.4f}")

    outcomes: list[Outcome] = []
    for budget in budgets:
        outcome = search(model, budget, trials=args.trials, storage=storage, seed=args.seed)
        outcomes.append(outcome)
        if outcome.result is None:
            print(f"  FLOPs <= {budget:.0%}: {outcome.note}")
            break
        r = outcome.result
        passed = r.final.score >= floor
        finished = sum(t.state.is_finished() for t in r.study.trials)
        print(f"  FLOPs <= {budget:.0%}: accuracy {r.final.score:.4f} with {r.final.flops / r.baseline.flops:.0%} "
              f"of the FLOPs, {r.final.latency_ms / r.baseline.latency_ms:.2f}x the latency, "
              f"{finished} trials -> {'pass' if passed else 'fails the tolerance'}")
        if not passed:
            break

    kept = [o for o in outcomes if o.result is not None and o.accuracy >= floor]  # type: ignore[operator]
    if not kept:
        print("no budget keeps the accuracy: ship the original model")
        return 0
    best = kept[-1]
    result = best.result
    assert result is not None
    result.plan.save(args.out / "plan.json")
    report = write_report(args.out, result=result)
    print(f"\nchosen budget: FLOPs <= {best.budget:.0%}")
    print(result.summary())
    print(f"\nheld-out accuracy (never seen by the search): original {held_out_accuracy(model):.4f}, "
          f"compressed {held_out_accuracy(result.model):.4f}")
    print(f"plan and report: {args.out / 'plan.json'}, {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
