"""The scan under a fitted seed: does a cheaper plan of the same knob that scores higher on
validation also score higher on test? Side by side for a few scan windows and level counts.

A search fits each one-knob seed (the energy threshold; one cost fraction shared by every layer) to
the budget, then scores the knob's plans a little cheaper and queues the best-scoring one after the
fitted plan where it scores above it (``ranksearch.fitting.best_cheaper_plan``, ``SCAN_WINDOW`` and
``SCAN_LEVELS``). Validation has 180 images on the CNN and 64 sentences on MiniLM: a scan that picks
by validation alone could be picking noise. This script measures that on the benchmark's real
models (``models.py``), with no timing noise:

* budgets: ratios to the candidate layers' FLOPs (counted analytically, as a FLOP budget is), from
  shallow to deep cuts; knobs: the energy threshold and the uniform cost fraction of each family the benchmark's
  rows use (Tucker-2 and spatial on the CNN, SVD on MiniLM);
* the fitted plan: the knob bisected to the budget (``ranksearch.fitting.boundary``);
* rows: for each window and level count, the plan ``best_cheaper_plan`` picks (by validation), with
  its validation and test scores beside the fitted plan's; the summary counts the picks that moved
  off the fitted plan and how their test scores moved.

Writes benchmarks/results/knob_scan.md and prints it. About seven minutes on 2 cores.

    python benchmarks/bench_knob_scan.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's import

import ranksearch  # noqa: E402
from ranksearch.fitting import SCAN_LEVELS, SCAN_WINDOW, best_cheaper_plan, boundary  # noqa: E402
from ranksearch.plan import KEEP  # noqa: E402
from ranksearch.warmstart import ENERGY_FIT_RANGE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import Choices, choices_key, heuristic_choices, make_plan, uniform_choices  # noqa: E402
from compare import benchmark_space  # noqa: E402
from models import Task, cnn_task, minilm_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "knob_scan.md"
#: (model, space, uniform families, FLOP budgets as ratios to the candidate layers' FLOPs)
SETTINGS = (("cnn", "convnet", ("tucker2", "spatial"), (0.6, 0.45, 0.3, 0.2, 0.15, 0.1)),
            ("minilm", "transformer", ("svd",), (0.7, 0.5, 0.35)))
QUICK = (("cnn", "convnet", ("tucker2",), (0.3, 0.15)),)
#: (window, levels) pairs compared; the search's own first
CONFIGS = ((SCAN_WINDOW, SCAN_LEVELS), (0.04, 2), (0.04, 4), (0.08, 2), (0.08, 8), (0.12, 4), (0.12, 6))


def knobs(task: Task, candidates: list, space: ranksearch.SearchSpace,
          families: tuple[str, ...]) -> dict[str, tuple[Callable[[float], Choices], float, float]]:
    """Each knob's plan maker with its cheap and dear ends, as ``ranksearch.warmstart`` fits them."""
    energy = partial(heuristic_choices, task.model, candidates, space, heuristic="energy")
    found = {"energy": (lambda tau: energy(tau=tau), *ENERGY_FIT_RANGE)}
    for family in families:
        found[f"uniform-{family}"] = (partial(uniform_choices, candidates, space, family),
                                      space.cost_fraction_low, space.cost_fraction_high)
    return found


def scan(task: Task, space_name: str, families: tuple[str, ...], budgets: tuple[float, ...]) -> list[dict]:
    space, _ = benchmark_space(space_name)
    inputs = task.inputs["batch 1"]
    specs = ranksearch.capture_layer_specs(task.model, inputs)
    candidates = [c for c in space.candidates(specs) if c.searchable]
    by_name = {c.spec.name: c.spec for c in candidates}
    original = sum(spec.flops for spec in by_name.values())
    scores: dict[str, tuple[float, float]] = {}

    def flops(choices: Choices) -> float:
        def layer(name: str, method: str, rank: object) -> float:
            spec = by_name[name]
            return float(spec.flops if method == KEEP else ranksearch.get_method(method).cost(spec, rank).flops)
        return sum(layer(name, *choices.get(name, (KEEP, None))) for name in by_name)

    def scored(choices: Choices) -> tuple[float, float]:
        key = choices_key(choices)
        if key not in scores:
            model = ranksearch.apply_plan(task.model, make_plan(task.model, choices, "scan")).eval()
            scores[key] = task.val_score(model), task.test_scores(model).headline
        return scores[key]

    rows = []
    for knob_name, (make, cheap, dear) in knobs(task, candidates, space, families).items():
        for ratio in budgets:
            budget = ratio * original  # over the candidate layers' FLOPs, as the search's excess is relative

            def excess(choices: Choices, budget: float = budget) -> float:
                return flops(choices) / budget - 1

            knob = boundary(make, lambda c: excess(c) <= 0, cheap, dear, steps=14)
            if knob is None:
                continue
            fitted = make(knob)
            row = {"model": task.name, "knob": knob_name, "budget": ratio, "fitted": scored(fitted),
                   "fitted_excess": excess(fitted), "picks": {}}
            for window, levels in CONFIGS:
                pick, _ = best_cheaper_plan(make, knob, cheap, excess=excess, score=lambda c: scored(c)[0],
                                            window=window, levels=levels)
                row["picks"][(window, levels)] = (pick != fitted, scored(pick), excess(pick))
            rows.append(row)
            own = row["picks"][CONFIGS[0]]
            print(f"{task.name} {knob_name} {ratio:g}: fitted {row['fitted'][0]:.4f} / {row['fitted'][1]:.4f}; "
                  f"scan {own[1][0]:.4f} / {own[1][1]:.4f} at {own[2]:+.1%}", flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        "# The scan under a fitted seed: validation picks against test",
        "",
        "`python benchmarks/bench_knob_scan.py`: each knob fitted to a FLOP budget (a ratio to the candidate",
        "layers' FLOPs), then `ranksearch.fitting.best_cheaper_plan` at each window and level count, picking by",
        "validation. Scores: validation / test (CNN: accuracy; MiniLM: mean cosine to the original's",
        f"embeddings). The search's own setting is window {SCAN_WINDOW:g}, {SCAN_LEVELS} levels (first column).",
        "",
        "## Summary",
        "",
        "| window, levels | picks off the fitted plan | their validation gain, mean | their test gain, mean | "
        "test higher / equal / lower | cost given up, mean |",
        "|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        moved = [(row["fitted"], row["picks"][config][1], row["picks"][config][2] - row["fitted_excess"])
                 for row in rows if row["picks"][config][0]]
        val_gain = [pick[0] - fitted[0] for fitted, pick, _ in moved]
        test_gain = [pick[1] - fitted[1] for fitted, pick, _ in moved]
        given_up = [-shift for _, _, shift in moved]
        lines.append(
            f"| {config[0]:g}, {config[1]} | {len(moved)} of {len(rows)} | "
            f"{statistics.mean(val_gain) if moved else 0:+.4f} | {statistics.mean(test_gain) if moved else 0:+.4f} | "
            f"{sum(g > 0 for g in test_gain)} / {sum(g == 0 for g in test_gain)} / {sum(g < 0 for g in test_gain)} | "
            f"{statistics.mean(given_up) if moved else 0:.1%} |")
    lines += ["", "## Per knob and budget (the search's setting, and the others' test scores)", "",
              "| model | knob | FLOP budget | fitted: val / test | "
              + " | ".join(f"{w:g}, {n}" for w, n in CONFIGS) + " |",
              "|---|---|---|---|" + "---|" * len(CONFIGS)]
    for row in rows:
        cells = []
        for config in CONFIGS:
            moved, (val, test), at = row["picks"][config]
            cells.append(f"{val:.4f} / {test:.4f} at {at:+.1%}" if moved else "fitted")
        lines.append(f"| {row['model']} | {row['knob']} | {row['budget']:g} | "
                     f"{row['fitted'][0]:.4f} / {row['fitted'][1]:.4f} at {row['fitted_excess']:+.1%} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CNN's Tucker-2 and energy knobs at two budgets")
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = {"cnn": lambda: cnn_task(log=lambda _: None), "minilm": lambda: minilm_task(log=lambda _: None)}
    rows = []
    for name, space_name, families, budgets in (QUICK if args.quick else SETTINGS):
        rows += scan(tasks[name](), space_name, families, budgets)
    text = report(rows)
    if not args.quick:
        RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
