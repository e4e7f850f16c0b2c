"""Local moves against the sampler: every trial after the seeds a local move, or every other one.

Since e296eea every trial of a search after its seeds is a local move around the best plan so far
(``ranksearch.neighbours``); the sampler (Optuna's TPE) proposes a trial only while no plan meets the
budget. Before, the sampler proposed every other trial until the last 15% of the budget. This script
runs both on the benchmark's real models (``models.py``: the CNN on digits, MiniLM on the shipped
sentences) under FLOP budgets, so no timing noise enters, with the same sensitivity table (measured
once per model, as a search does) and the benchmark's trial budgets, and scores each answer on
validation (what the search sees) and test. The old schedule is rebuilt here as a subclass of the
callback that queues the moves (``Alternating``).

Writes benchmarks/results/local_moves.md and prints it. About ten minutes on 2 cores.

    python benchmarks/bench_local_moves.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from unittest import mock

import optuna
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's import

import ranksearch  # noqa: E402
from ranksearch.neighbours import NeighbourMoves  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grow_order import sensitivity_table  # noqa: E402
from compare import benchmark_space  # noqa: E402
from models import Task, cnn_task, minilm_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "local_moves.md"
#: (model, space, trials as in compare.py, FLOP budgets: fractions of the original's FLOPs)
SETTINGS = (("cnn", "convnet", 24, (0.45, 0.3, 0.15, 0.08)),
            ("minilm", "transformer", 18, (0.5, 0.35, 0.2)))


class Alternating(NeighbourMoves):
    """The schedule before e296eea: a local move after every trial that was not one, so the sampler
    proposes every other trial, and after every trial in the last 15% of the budget (at least 2)."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        endgame = len(study.get_trials(deepcopy=False)) >= self.total - max(2, round(0.15 * self.total))
        if "neighbour_of" in trial.user_attrs and not endgame:
            return
        super().__call__(study, trial)


def search(task: Task, space: ranksearch.SearchSpace, budget: float, trials: int, seed: int,
           table: ranksearch.SensitivityTable, schedule: type[NeighbourMoves]) -> tuple[float, float, str]:
    """(validation, test, where the answer came from) of one search with the moves queued by ``schedule``."""
    with mock.patch.object(sys.modules["ranksearch.search"], "NeighbourMoves", schedule):  # optimize's callback
        result = ranksearch.optimize(task.model, task.inputs["batch 1"], target_flops=budget, eval_fn=task.val_score,
                                     n_trials=trials, search_space=space, seed=seed, show_progress_bar=False,
                                     sensitivity=table)
    answer = result.study.trials[result.plan.metadata["trial"]].user_attrs
    origin = answer.get("seed") or answer.get("move") or "sampled"
    return result.final.score, task.test_scores(result.model.eval()).headline, origin


def compare(task: Task, space_name: str, trials: int, budgets: tuple, seeds: int) -> list[str]:
    space, _ = benchmark_space(space_name)
    table = sensitivity_table(task, task.inputs["batch 1"], space)
    rows = []
    for budget in budgets:
        runs = {name: [search(task, space, budget, trials, seed, table, schedule) for seed in range(seeds)]
                for name, schedule in (("alternating", Alternating), ("local moves", NeighbourMoves))}
        old, new = runs["alternating"], runs["local moves"]
        higher = sum(n[0] > o[0] for o, n in zip(old, new))
        lower = sum(n[0] < o[0] for o, n in zip(old, new))
        sampled = sum(origin == "sampled" for _, _, origin in old)
        rows.append(
            f"| {task.name} | {budget:g} | {statistics.mean(v for v, _, _ in old):.4f} / "
            f"{statistics.mean(t for _, t, _ in old):.4f} | {statistics.mean(v for v, _, _ in new):.4f} / "
            f"{statistics.mean(t for _, t, _ in new):.4f} | {higher} / {seeds - higher - lower} / {lower} | "
            f"{sampled} of {seeds} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="searches per budget and schedule (seeds 0..n-1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = {"cnn": lambda: cnn_task(log=lambda _: None), "minilm": lambda: minilm_task(log=lambda _: None)}
    rows = []
    for name, space_name, trials, budgets in SETTINGS:
        rows += compare(tasks[name](), space_name, trials, budgets, args.seeds)
    text = "\n".join([
        "# Local moves against the sampler",
        "",
        "`python benchmarks/bench_local_moves.py`: ranksearch under FLOP budgets (fractions of the original's",
        "FLOPs), the benchmark's trial budgets (CNN 24, MiniLM 18) and one sensitivity table per model, with",
        "every trial after the seeds a local move (the search since e296eea) and with the sampler proposing",
        f"every other trial (before). Seeds 0-{args.seeds - 1} per budget; scores: mean validation / test",
        "(CNN: accuracy; MiniLM: mean cosine to the original's embeddings).",
        "",
        "| model | FLOP budget | sampler every other trial | local moves only | local moves higher / equal / lower "
        "(validation) | answers from a sampled trial (before) |",
        "|---|---|---|---|---|---|",
        *rows, ""])
    RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
