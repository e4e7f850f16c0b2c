"""A cut that scores the plans it passes through: spares and repairs for plans at the budget.

A plan at the latency budget is cut when its final check finds it over the target (a repair) and,
once it is the answer, to a little under the target for a device or a later timing that finds it
slower (a headroom spare; ``ranksearch.final_checks``). ``least_loss_cut``
(``ranksearch.sensitivity``) lowers ranks where the sensitivity table says they lose least, but the
table scores each layer compressed *alone*, from the original; beside the plan's other compressed
layers the losses compound, and the table's order can be far off.

:func:`scored_cut` takes the same steps down the same ladders, but lets the model's score choose
them: a few rounds, each trying the few layers the table ranks first, each cut by a share of what
the whole cut must save, and taking the one that loses the least per unit of cost saved by the
search's own evaluation; the table's own cut where that scores higher. It costs about ``rounds x
tried`` evaluations (36 by default, at most twice that, and two more), and no timing.
``benchmarks/bench_cuts.py`` compares it with the table's cut and a uniform one (12-72 evaluations
a cut there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .fitting import Choices
from .plan import KEEP
from .sensitivity import (Option, SensitivityTable, budget_cost, cut_ladders, least_loss_cut, loss_per_cost_saved,
                          open_ladders)

if TYPE_CHECKING:
    from .trials import TrialRunner

__all__ = ["scored_cut"]

log = logging.getLogger("ranksearch.scored_cut")


def scored_cut(runner: TrialRunner, table: SensitivityTable, choices: Choices, fits: Callable[[Choices], bool],
               score_of: Callable[[Choices], float], score: float, *, rounds: int = 6, tried: int = 6,
               step: float = 0.02) -> Choices | None:
    """``choices`` (scoring ``score``) with ranks lowered until ``fits`` accepts, each cut picked by
    ``score_of`` (the search's evaluation of a plan); ``None`` when nothing fits.

    Each round, every layer that can be cut is stepped down its ladder (``cut_ladders``) until it
    saves a ``rounds``-th of what the table's own cut (``least_loss_cut``) saves, or until the plan
    fits; the ``tried`` layers whose move the table says loses least per cost saved are scored, and
    the move that lost least per cost saved, by its score, is taken. After ``2 x rounds x tried``
    evaluations the rest of the cut follows the table alone. The table's own cut is returned instead
    where it scores higher (one more evaluation): the greedy steps can lead where no single step
    showed the loss. (In ``benchmarks/results/cuts.md`` at 4ec774c, the table's cut scored above this
    one in 4 of 18 cuts, by 0.001-0.010; in a rerun at a weaker answer by 0.056.)
    """
    goal = least_loss_cut(runner, table, choices, fits, step)
    if goal is None:
        return None
    cost = budget_cost(runner)

    def total(plan: Choices) -> float:
        return sum(cost(c.spec.name, *plan.get(c.spec.name, (KEEP, None))) for c in runner.searchable)

    chunk = (total(choices) - total(goal)) / rounds
    now, ladders = cut_ladders(runner, table, choices, step)
    cut, evaluations, scored_to_the_end = dict(choices), 0, True
    while not fits(cut):
        moves = [_move(name, now[name], ladder, chunk) for name, ladder in open_ladders(ladders, choices).items()]
        if not moves:
            return None
        moves.sort(key=lambda m: m.table_loss_per_cost)
        if evaluations >= 2 * rounds * tried:  # enough scoring: the table's order for the rest
            best, scored_to_the_end = moves[0].trimmed(cut, fits), False
        else:
            scored = []
            for move in moves[:tried]:
                move = move.trimmed(cut, fits)
                after = _score_or_none(score_of, move.applied(cut))
                if after is None:  # a plan the evaluation cannot score is not taken
                    continue
                evaluations += 1
                scored.append(((score - after) / move.saved, -move.saved, move, after))
            if not scored:
                return None
            _, _, best, score = min(scored, key=lambda s: s[:2])
        now[best.name] = ladders[best.name][best.steps - 1]
        ladders[best.name] = ladders[best.name][best.steps:]
        cut[best.name] = (now[best.name].method, now[best.name].rank)  # type: ignore[assignment]
    if goal != cut:
        cut_score = score if scored_to_the_end else _score_or_none(score_of, cut)
        goal_score = _score_or_none(score_of, goal)
        evaluations += 1 + (not scored_to_the_end)
        if goal_score is not None and (cut_score is None or goal_score > cut_score):
            log.debug("scored cut: the table's cut scores higher (%.4f against %s)", goal_score, cut_score)
            cut = goal
    log.debug("scored cut: %d evaluations", evaluations)
    return cut


def _score_or_none(score_of: Callable[[Choices], float], choices: Choices) -> float | None:
    """``score_of(choices)``, or ``None`` where the evaluation fails on that plan."""
    try:
        return score_of(choices)
    except Exception as exc:
        log.debug("scored cut: scoring %s failed: %s", choices, exc)
        return None


class _Move:
    """One layer stepped ``steps`` down its ladder."""

    def __init__(self, name: str, now: Option, ladder: list[Option], steps: int) -> None:
        self.name, self.now, self.ladder, self.steps = name, now, ladder, steps
        to = ladder[steps - 1]
        self.saved = now.cost - to.cost
        self.table_loss_per_cost = loss_per_cost_saved(now, to)

    def applied(self, cut: Choices) -> Choices:
        to = self.ladder[self.steps - 1]
        return {**cut, self.name: (to.method, to.rank)}  # type: ignore[dict-item]

    def trimmed(self, cut: Choices, fits: Callable[[Choices], bool]) -> _Move:
        """The fewest of its steps with which the plan fits, if any does (no deeper than needed)."""
        for steps in range(1, self.steps):
            shorter = _Move(self.name, self.now, self.ladder, steps)
            if fits(shorter.applied(cut)):
                return shorter
        return self


def _move(name: str, now: Option, ladder: list[Option], chunk: float) -> _Move:
    """``name`` stepped down its ladder until it saves ``chunk``, or to the ladder's end."""
    steps = next((i + 1 for i, o in enumerate(ladder) if now.cost - o.cost >= chunk), len(ladder))
    return _Move(name, now, ladder, steps)
