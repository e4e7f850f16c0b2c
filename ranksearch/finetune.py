"""Choosing the final plan by its quality after the user's fine-tune.

The search scores plans as they come out of the decomposition. A user who fine-tunes the
compressed model afterwards cares about the score after that fine-tune, and the two orders
disagree: on the benchmark's CNN at 0.35x latency, the plans one search found scored 0.22-0.44
validation accuracy before a one-epoch fine-tune and 0.76-0.98 test accuracy after it, in another
order (one at 0.22 before reached 0.96 after; one at 0.28 before, 0.76). Fine-tuning every
trial would multiply the search's cost, so only the last step changes: with
``optimize(finetune_fn=...)`` a few plans whose latency was verified are each fine-tuned on a copy
and scored again, and the one that scores best after fine-tuning is returned, fine-tuned (unless
no fine-tune helped: below). The candidates are the best plan, then a sensitivity seed, the
energy-threshold seed and the best uniform-ratio seed fitted to the budget (plans that recover better
than their score before the fine-tune says), then the best plans of other lineages: a plan and the
local moves made from it recover alike (``ranksearch.final_checks._fine_tune_order``).

A fine-tune is kept only where it helps: each candidate competes as decomposed too, and when no
fine-tuned copy scores above the best of them as decomposed (a plan close to the original often
gains nothing from a short fine-tune), that plan is returned as decomposed - the model its plan
alone rebuilds. In the benchmark's runs, the CNN at 0.7x latency fine-tuned from validation
accuracy 0.9889 to 0.9889 (at batch 8; 0.9833 to 0.9833 at batch 1) and lost 0.011 and 0.006 on
the test split by it (``benchmarks/RESULTS.md`` at 4313532).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .exceptions import EvaluationError, InvalidInputsError, InvalidWeightsError
from .plan import CompressionPlan
from .rebuild import check_finite_parameters

__all__ = ["DEFAULT_FINETUNE_CANDIDATES", "FineTuneFn", "FineTuned", "check_finetune", "fine_tuned",
           "pick_after_finetune"]

log = logging.getLogger("ranksearch.finetune")

FineTuneFn = Callable[[nn.Module], Any]

#: the best plan, then a sensitivity seed, the energy and uniform-ratio seeds fitted to the budget, the
#: best of other lineages (those the best plan does not descend from)
DEFAULT_FINETUNE_CANDIDATES = 4


@dataclass(frozen=True)
class FineTuned:
    """One verified plan, scored before and after ``finetune_fn``."""

    trial: int
    plan: CompressionPlan
    latency_ms: float  # verified: timed alternately with the original (for FLOP or parameter budgets too)
    score: float  # before fine-tuning: what the search ranked it by
    score_after: float
    seconds: float  # the fine-tune and the scoring after it

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "plan"}


def check_finetune(finetune_fn: Any, candidates: Any) -> None:
    """Refuse a ``finetune_fn`` or ``finetune_candidates`` that cannot work, before any search work."""
    if finetune_fn is not None and not callable(finetune_fn):
        raise InvalidInputsError(
            f"finetune_fn must be a callable that trains the model it is given in place, got {type(finetune_fn).__name__}"
        )
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InvalidInputsError(f"finetune_candidates must be a positive int, got {candidates!r}")


def fine_tuned(model: nn.Module, finetune_fn: FineTuneFn) -> nn.Module:
    """A fine-tuned copy of ``model``: every parameter trainable, ``finetune_fn`` run on it, back in eval mode.

    ``finetune_fn`` trains the model in place; if it returns a module instead, that module is taken.

    Raises:
        EvaluationError: if ``finetune_fn`` raises or leaves NaN or infinite weights.
    """
    tuned = copy.deepcopy(model)
    for parameter in tuned.parameters():  # the search's copies are frozen; a fine-tune needs gradients
        parameter.requires_grad_(True)
    try:
        returned = finetune_fn(tuned)
    except Exception as exc:
        raise EvaluationError(f"finetune_fn raised {type(exc).__name__}: {exc}") from exc
    if isinstance(returned, nn.Module):
        tuned = returned
    try:
        check_finite_parameters(tuned)
    except InvalidWeightsError as exc:
        raise EvaluationError(f"finetune_fn left weights that are not finite ({exc}); lower its learning rate") from exc
    return tuned.eval()


def pick_after_finetune(verified: list[tuple[Any, CompressionPlan, nn.Module, float]],
                        finetune_fn: FineTuneFn, score: Callable[[nn.Module], float]
                        ) -> tuple[int, nn.Module, list[FineTuned], bool]:
    """Fine-tune each verified ``(trial, plan, model, latency_ms)``, score it again, and pick the best
    of the candidates, each as decomposed or fine-tuned.

    Returns:
        The index in ``verified`` of the pick, its model, every candidate's record, and whether that
        model is the fine-tuned one. Ties go to the model as decomposed (a fine-tune that does not
        raise the score is not kept), then to the earlier candidate (the better before fine-tuning).
    """
    records: list[FineTuned] = []
    best: tuple[float, bool, int] | None = None
    best_model: nn.Module | None = None
    for index, (trial, plan, model, latency_ms) in enumerate(verified):
        started = time.perf_counter()
        before = trial.values[0] if trial.values else score(model)  # a plan re-checked after a miss was never scored
        tuned = fine_tuned(model, finetune_fn)
        after = score(tuned)
        records.append(FineTuned(trial.number, plan, latency_ms, before, after, time.perf_counter() - started))
        log.info("trial %d: score %.4f before fine-tuning, %.4f after", trial.number, before, after)
        for value, is_tuned, candidate in ((before, False, model), (after, True, tuned)):
            option = (value, not is_tuned, -index)  # the larger wins: score, then as decomposed, then earlier
            if best is None or option > best:
                best, best_model = option, candidate
    assert best is not None and best_model is not None
    _, as_decomposed, minus_index = best
    return -minus_index, best_model, records, not as_decomposed
