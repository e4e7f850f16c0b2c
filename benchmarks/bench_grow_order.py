"""The order of a grow: the sensitivity table's against random, side by side, with no timing noise.

A grow (``ranksearch.neighbours``) spends a plan's slack by raising ranks one step at a time. A plan's
first grow takes the layers in the order of ``ranksearch.sensitivity.step_value`` (quality the table
says a step saves per unit of cost); its later grows take them at random. This script compares the
two on the benchmark's real models (``models.py``: the CNN on digits, MiniLM on the shipped
sentences):

* parents: the energy-threshold plans at a few thresholds (``baselines.heuristic_choices``, the plans
  a search's energy seeds start from);
* budget: the parent's FLOPs plus half the way to the plan at a higher threshold (a grow spends half
  of a plan's slack), counted analytically, so no timing noise enters;
* the table: measured by ``ranksearch.optimize`` on the validation split, as a search does;
* rows: the table's order (one plan) and eight random orders (seeds 0-7), scored on validation
  (what the search sees) and on test.

Writes benchmarks/results/grow_order.md and prints it. About four minutes on 2 cores.

    python benchmarks/bench_grow_order.py [--random-orders 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's import

import ranksearch  # noqa: E402
from ranksearch.neighbours import grown_choices  # noqa: E402
from ranksearch.plan import KEEP  # noqa: E402
from ranksearch.sensitivity import step_value  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import Choices, heuristic_choices, make_plan  # noqa: E402
from compare import benchmark_space  # noqa: E402
from models import Task, cnn_task, minilm_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "grow_order.md"
#: (model, space, [(parent threshold, the higher threshold half-way to which the budget lies)])
SETTINGS = (("cnn", "convnet", ((0.45, 0.55), (0.5, 0.6), (0.566, 0.612), (0.65, 0.75))),
            ("minilm", "transformer", ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9))))


def sensitivity_table(task: Task, inputs: tuple, space: ranksearch.SearchSpace,
                      calib_data: list | None = None) -> ranksearch.SensitivityTable:
    """The table a search measures first (one trial under a FLOP budget: no latency timing); with
    ``calib_data``, scored with BatchNorm statistics re-estimated, as compare.py's searches score."""
    try:
        result = ranksearch.optimize(task.model, inputs, target_flops=0.5, eval_fn=task.val_score, n_trials=1,
                                     search_space=space, seed=0, show_progress_bar=False, calib_data=calib_data)
        return result.sensitivity
    except ranksearch.TargetUnreachableError as exc:
        return exc.sensitivity


#: compare.py's models by name, trained (or read from the cache) quietly
TASKS: dict[str, Callable[[], Task]] = {"cnn": lambda: cnn_task(log=lambda _: None),
                                        "minilm": lambda: minilm_task(log=lambda _: None)}


def compare_searches(settings: Sequence[tuple[str, str, int, Sequence[tuple[str, float]]]]
                     ) -> Iterator[tuple[str, Task, ranksearch.SearchSpace, ranksearch.SensitivityTable, int, str, float]]:
    """For each ``(model, space, trials, ((batch, target) ...))`` of ``settings``: the model's task, its
    search space, its sensitivity table (measured once per model), the trials, and each batch and
    target in turn - the searches of compare.py that the scripts beside it rerun."""
    for name, space_name, trials, batches in settings:
        task = TASKS[name]()
        space, _ = benchmark_space(space_name)
        table = sensitivity_table(task, task.inputs["batch 1"], space, calib_data=task.calib_data)
        for batch, target in batches:
            yield name, task, space, table, trials, batch, target


def compare(task: Task, space_name: str, pairs: tuple, orders: int) -> list[str]:
    space, _ = benchmark_space(space_name)
    inputs = task.inputs["batch 1"]
    specs = ranksearch.capture_layer_specs(task.model, inputs)
    candidates = [c for c in space.candidates(specs) if c.searchable]
    table = sensitivity_table(task, inputs, space)
    by_name = {c.spec.name: c.spec for c in candidates}

    def layer_flops(name: str, method: str, rank: object) -> float:  # what a FLOP budget counts per layer
        spec = by_name[name]
        return float(spec.flops if rank is None else ranksearch.get_method(method).cost(spec, rank).flops)

    value = step_value(table, layer_flops)

    def flops(choices: Choices) -> float:
        return sum(layer_flops(name, *choices.get(name, (KEEP, None))) for name in by_name)

    def scores(choices: Choices) -> tuple[float, float]:
        model = ranksearch.apply_plan(task.model, make_plan(task.model, choices, "grow-order")).eval()
        return task.val_score(model), task.test_scores(model).headline

    rows = []
    for low, high in pairs:
        parent = heuristic_choices(task.model, candidates, space, heuristic="energy", tau=low)
        dearer = heuristic_choices(task.model, candidates, space, heuristic="energy", tau=high)
        budget = flops(parent) + 0.5 * (flops(dearer) - flops(parent))

        def fits(choices: Choices, budget: float = budget) -> bool:
            return flops(choices) <= budget

        by_table = grown_choices(parent, candidates, space, np.random.default_rng(0), fits, value)
        at_random = [grown_choices(parent, candidates, space, np.random.default_rng(seed), fits)
                     for seed in range(orders)]
        random_scores = [scores(c) for c in at_random]
        (parent_val, parent_test), (table_val, table_test) = scores(parent), scores(by_table)
        random_val = [v for v, _ in random_scores]
        rows.append(
            f"| {task.name} | {low:g} -> {high:g} | {parent_val:.4f} / {parent_test:.4f} | "
            f"{table_val:.4f} / {table_test:.4f} | {statistics.median(random_val):.4f} / "
            f"{statistics.median(t for _, t in random_scores):.4f} | {min(random_val):.4f}-{max(random_val):.4f} | "
            f"{sum(v < table_val for v in random_val)} of {orders} | "
            f"{flops(parent) / 1e6:.1f} / {flops(by_table) / 1e6:.1f} / "
            f"{statistics.median(flops(c) for c in at_random) / 1e6:.1f} / {budget / 1e6:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-orders", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = {"cnn": lambda: cnn_task(log=lambda _: None), "minilm": lambda: minilm_task(log=lambda _: None)}
    rows = []
    for name, space_name, pairs in SETTINGS:
        rows += compare(tasks[name](), space_name, pairs, args.random_orders)
    text = "\n".join([
        "# The order of a grow: sensitivity table vs random",
        "",
        "`python benchmarks/bench_grow_order.py`: each parent is the energy-threshold plan at the first",
        "threshold; the grow may spend the parent's FLOPs plus half the way to the plan at the second.",
        "Scores: validation / test (CNN: accuracy; MiniLM: mean cosine to the original's embeddings). Random: "
        f"{args.random_orders} orders (seeds 0-{args.random_orders - 1}).",
        "",
        "| model | thresholds | parent | table's order | random, median | random validation range | "
        "random orders under the table's (validation) | MFLOPs: parent / table / random median / budget |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
