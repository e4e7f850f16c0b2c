"""What ``optimize`` returns: the model, the plan, the study and the figures before and after."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .plan import CompressionPlan

if TYPE_CHECKING:
    from .finetune import FineTuned

__all__ = ["ModelStats", "ParetoPoint", "SearchResult"]


@dataclass(frozen=True)
class ModelStats:
    """Measured latency, FLOPs (multiply-adds, fvcore), parameters and quality score of a model."""

    latency_ms: float
    latency_spread: float
    flops: int
    params: int
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParetoPoint:
    """One plan on the quality / cost front of the study."""

    trial: int
    plan: CompressionPlan
    score: float
    latency_ms: float | None  # predicted (per-layer table, calibrated) unless measured is set
    measured_latency_ms: float | None
    flops: int
    params: int
    # the final check's latency (alternately with the original), for the plans the search checked at the
    # end: one over the target stays on the front (its trial met the target) but was not returned
    checked_latency_ms: float | None = None
    # for a headroom spare: the trial whose plan it cut to about 5% under that plan's final check
    spare_for: int | None = None

    @property
    def timed_latency_ms(self) -> float | None:
        """Its latency as last timed: the final check's, else its trial's measurement."""
        return self.checked_latency_ms or self.measured_latency_ms

    @property
    def trial_latency_ms(self) -> float | None:
        """Its latency in its trial: measured there, else predicted."""
        return self.measured_latency_ms or self.latency_ms


def spares_of(points: list[ParetoPoint], trial: int | None) -> list[ParetoPoint]:
    """The headroom spares among ``points`` cut from ``trial``'s plan, in their order."""
    return [p for p in points if p.spare_for is not None and p.spare_for == trial]


def spares_text(spares: list[ParetoPoint]) -> str:
    """Headroom spares in one line: each one's trial, latency in its trial and score."""
    return "; ".join(f"trial {p.trial}, {p.trial_latency_ms or math.nan:.3f} ms in its trial, "
                     f"score {p.score:.4f}" for p in spares)


def near_misses_text(points: list[ParetoPoint], target_ms: float) -> str:
    """Near misses in one line: each one's trial, latency (its final check, else its trial's timing)
    and how far over ``target_ms``, and score."""
    return "; ".join(f"trial {p.trial}, {p.timed_latency_ms or math.nan:.3f} ms "
                     f"({(p.timed_latency_ms or math.nan) / target_ms - 1:+.1%}), score {p.score:.4f}" for p in points)


@dataclass
class SearchResult:
    """The outcome of :func:`ranksearch.optimize`.

    Attributes:
        model: the compressed model (plain torch layers), ready to use.
        plan: the plan that built it from the original.
        study: the Optuna study behind the search.
        baseline: figures of the original model.
        final: figures of ``model``; its latency was measured again at the end.
        pareto: feasible plans on the quality / latency front, best quality first; those the final
            check timed carry its latency (``checked_latency_ms``). When the answer sits less than 5%
            under the latency target, the list also holds it cut to about 5% under that (``spare_for``
            is the answer's trial; see :meth:`headroom_spares`), for a device that times the answer
            slower, on the front or not (with ``finetune_fn``, the plan returned may be behind another
            on the front before fine-tuning, and so its spare).
        near_misses: plans timed at most 10% over the latency accepted (the target and its tolerance;
            their final check, else their trial's timing) that score far above the answer - at least
            half way from its score back to the original's - best first; usually empty. Not empty when
            the target sits near the fastest the space allows and the plans under it lost much more
            than those just over: what a slightly looser target would buy. Scores are as decomposed,
            compared with the answer's before any fine-tune.
        targets: the budgets, as absolute numbers.
        prediction_error: how far predicted model latency was from full-model measurements.
        message: a sentence on what happened (e.g. the original already met the target).
        sensitivity: the per-layer sensitivity table the search measured (or was given); pass it as
            ``optimize(..., sensitivity=result.sensitivity)`` to reuse it for another target.
        fine_tuned: with ``optimize(finetune_fn=...)``, each verified plan that was fine-tuned, best
            before fine-tuning first, with its scores before and after; ``model`` is then the
            fine-tuned model and ``final.score`` its score, unless no fine-tune scored above the best
            plan as decomposed (``plan.metadata["fine_tune"]["fine_tuned"]`` is then ``False``).
            ``None`` without ``finetune_fn``.
    """

    model: nn.Module
    plan: CompressionPlan
    study: Any
    baseline: ModelStats
    final: ModelStats
    pareto: list[ParetoPoint] = field(default_factory=list)
    near_misses: list[ParetoPoint] = field(default_factory=list)
    targets: dict[str, float] = field(default_factory=dict)
    prediction_error: dict[str, Any] | None = None
    message: str = ""
    sensitivity: Any = None
    fine_tuned: list[FineTuned] | None = None

    def headroom_spares(self) -> list[ParetoPoint]:
        """The returned plan cut to about 5% under its final check, best quality first: what to take
        when your own timing finds the answer a few percent over the target. When the search's own
        final checks came further over their trials' timings (a noisy machine), also a spare cut that
        much under (up to 15%). Empty when the answer had that much room already or no cut fitted.
        With ``finetune_fn`` a spare is a plan as decomposed: fine-tune it as the answer was; when the
        plan returned is not the best before fine-tuning, the front holds that one's spares too."""
        return spares_of(self.pareto, self.plan.metadata.get("trial"))

    def summary(self) -> str:
        """A before / after table, in Markdown."""

        def ratio(after: float | None, before: float | None) -> str:
            if after is None or before in (None, 0):
                return ""
            return f"{after / before:.2f}x"  # type: ignore[operator]

        def score(value: float | None) -> str:
            return "" if value is None else f"{value:.4f}"

        b, f = self.baseline, self.final
        rows = [
            "| | original | compressed | ratio |",
            "| --- | ---: | ---: | ---: |",
            f"| latency (ms, measured) | {b.latency_ms:.3f} | {f.latency_ms:.3f} | {ratio(f.latency_ms, b.latency_ms)} |",
            f"| FLOPs (multiply-adds) | {b.flops:,} | {f.flops:,} | {ratio(f.flops, b.flops)} |",
            f"| parameters | {b.params:,} | {f.params:,} | {ratio(f.params, b.params)} |",
            f"| quality score | {score(b.score)} | {score(f.score)} | |",
        ]
        lines = ["\n".join(rows), "", f"{len(self.plan)} layers decomposed:", self.plan.summary()]
        spares = self.headroom_spares()
        if spares:
            lines += ["", "Headroom spares (the plan cut under the target, for a device that times it slower; "
                      f"headroom_spares()): {spares_text(spares)}"]
        target_ms = self.targets.get("latency_ms")
        if self.near_misses and target_ms:
            lines += ["", ("Just over the latency target, winning back most of what the answer lost (near_misses; a "
                           f"looser target would allow them): {near_misses_text(self.near_misses, target_ms)}")]
        if self.message:
            lines.insert(0, self.message + "\n")
        return "\n".join(lines)
