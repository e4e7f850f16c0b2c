"""Reports of a search: a Markdown file and PNG figures, from a result, a plan file or a stored study.

:func:`write_report` writes to a folder:

* ``report.md``: the original against the result (measured latency, FLOPs, parameters, quality),
  the per-layer table (original cost, method, rank, cost after, share of the savings) and the
  search's history in numbers;
* ``pareto.png``: quality against latency (predicted, with measured checks overlaid) or FLOPs /
  parameters when no latency target was set, with the target marked - drawn with Optuna's
  ``plot_pareto_front``;
* ``layers.png``: per layer, the cost left after compression, coloured by method;
* ``history.png``: the best feasible score as trials went by.

Figures are drawn with matplotlib's Agg canvas and never shown. Everything is read from plain data
(the plan's JSON metadata, the study's user attributes); nothing is pickled.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write, atomic_write_text
from .decompose import get_method
from .exceptions import PlanError, RankSearchError, StudyMismatchError
from .layers import LayerSpec
from .plan import KEEP, CompressionPlan
from .result import SearchResult, spares_of, spares_text

__all__ = ["LayerRow", "layer_rows", "make_figures", "write_report"]

log = logging.getLogger("ranksearch.report")

_COST_LABELS = {
    "latency_ms": "latency (ms, predicted)",
    "flops": "FLOPs (multiply-adds)",
    "params": "parameters",
}


# --- per-layer table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    """One layer of the report's table.

    Attributes:
        name: module name.
        kind: layer kind (``linear``, ``conv2d``...).
        flops, params: cost of the original layer.
        method: the plan's method, ``"keep"`` when not replaced.
        rank: the plan's rank (``None`` for kept layers).
        flops_after, params_after: analytic cost of the replacement (the original's when kept;
            ``None`` when the method is not registered in this ranksearch).
        note: why a layer was kept, when the plan says.
    """

    name: str
    kind: str
    flops: int
    params: int
    method: str
    rank: Any
    flops_after: int | None
    params_after: int | None
    note: str = ""

    @property
    def flops_saved(self) -> int:
        return 0 if self.flops_after is None else self.flops - self.flops_after

    @property
    def params_saved(self) -> int:
        return 0 if self.params_after is None else self.params - self.params_after

    @property
    def cost_fraction(self) -> float | None:
        """Cost after / before: FLOPs, or parameters for layers without FLOPs (embeddings)."""
        if self.flops:
            return None if self.flops_after is None else self.flops_after / self.flops
        if self.params:
            return None if self.params_after is None else self.params_after / self.params
        return None


def layer_rows(specs: Sequence[LayerSpec], plan: CompressionPlan | None) -> list[LayerRow]:
    """The per-layer table of ``plan`` over the layers described by ``specs``."""
    rows = []
    for spec in specs:
        choice = plan.choice_for(spec.name) if plan is not None else None
        method = choice.method if choice is not None else KEEP
        rank = choice.rank if choice is not None else None
        note = (choice.reason or "") if choice is not None else ""
        flops_after: int | None = spec.flops
        params_after: int | None = spec.params
        if method != KEEP:
            try:
                cost = get_method(method).cost(spec, rank)  # type: ignore[arg-type]
                flops_after, params_after = cost.flops, cost.params
            except RankSearchError as exc:  # e.g. a plan from a ranksearch with more methods
                flops_after = params_after = None
                note = str(exc)
        rows.append(LayerRow(spec.name, spec.kind, spec.flops, spec.params, method, rank,
                             flops_after, params_after, note))
    return rows


# --- what a report is made of -------------------------------------------------------------------


@dataclass
class _Figures:
    """What the figures and tables of one report are drawn from."""

    title: str
    plan: CompressionPlan | None
    specs: list[LayerSpec]
    baseline: Mapping[str, Any] | None
    final: Mapping[str, Any] | None
    final_measured: bool
    targets: Mapping[str, float]
    cost_key: str
    chosen_trial: int | None
    study: Any = None
    notes: list[str] = field(default_factory=list)


def _cost_key(targets: Mapping[str, Any], study: Any) -> str:
    if study is not None:
        identity = study.user_attrs.get("ranksearch") or {}
        objectives = identity.get("objectives") or []
        if len(objectives) == 2 and objectives[1] in _COST_LABELS:
            return str(objectives[1])
    for key in ("latency_ms", "flops", "params"):
        if key in targets:
            return key
    return "flops"


def _feasible(trial: Any) -> bool:
    return all(v <= 0 for v in (getattr(trial, "constraints", None) or {}).values())


def _complete(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None and len(t.values) == 2]


def _best_trial(study: Any) -> Any | None:
    """The best feasible trial as ``optimize`` ranks them: quality, then cost, then trial number."""
    done = [t for t in _complete(study) if _feasible(t) and "plan" in t.user_attrs]
    return min(done, key=lambda t: (-t.values[0], t.values[1], t.number)) if done else None


def _gather(result: SearchResult | None, plan: CompressionPlan | None, study: Any) -> _Figures:
    if result is not None:
        plan = plan or result.plan
        study = study if study is not None else result.study
    if plan is None and study is None:
        raise PlanError("nothing to report: pass result=, plan= or study=")
    if study is not None and "ranksearch" not in study.user_attrs:
        raise StudyMismatchError(
            f"study {study.study_name!r} was not made by ranksearch (it has no 'ranksearch' user attribute); "
            "pass the study a ranksearch search wrote"
        )
    meta: Mapping[str, Any] = plan.metadata if plan is not None else {}
    study_attrs: Mapping[str, Any] = study.user_attrs if study is not None else {}
    spec_dicts = meta.get("layer_specs") or study_attrs.get("layer_specs") or []
    specs = [LayerSpec.from_dict(d) for d in spec_dicts]
    identity = study_attrs.get("ranksearch") or {}
    targets = dict(meta.get("targets") or identity.get("targets") or {})
    notes: list[str] = []
    chosen_trial = meta.get("trial") if isinstance(meta.get("trial"), int) else None
    final = meta.get("final")
    final_measured = final is not None
    if result is not None:
        baseline: Mapping[str, Any] | None = result.baseline.to_dict()
        final, final_measured = result.final.to_dict(), True
        targets = dict(result.targets) or targets
        if result.message:
            notes.append(result.message)
    else:
        baseline = meta.get("baseline") or study_attrs.get("baseline")
        notes += _fine_tune_notes(meta.get("fine_tune"))
    if plan is None and study is not None:
        best = _best_trial(study)
        if best is None:
            notes.append("the study has no feasible evaluated trial yet: no plan to report")
        else:
            plan = CompressionPlan.from_dict({"layers": best.user_attrs["plan"]})
            plan.fingerprint = study_attrs.get("fingerprint")
            chosen_trial = best.number
            final = {
                "latency_ms": best.user_attrs.get("measured_latency_ms", best.user_attrs.get("predicted_latency_ms")),
                "flops": best.user_attrs.get("flops"), "params": best.user_attrs.get("params"),
                "score": best.values[0],
            }
            final_measured = False
            notes.append(
                f"figures of the best feasible trial ({best.number}) as the study recorded them: FLOPs and "
                "parameters are analytic, latency is predicted unless the trial was measured; the final plan "
                "of `ranksearch optimize` is re-measured"
            )
    if not specs:
        notes.append("no layer descriptions were stored with this plan: per-layer costs are unknown")
    title = "ranksearch report"
    if study is not None and not study.study_name.startswith("no-name-"):  # Optuna's name for unnamed studies
        title += f": study {study.study_name!r}"
    return _Figures(title=title, plan=plan, specs=specs, baseline=baseline, final=final,
                    final_measured=final_measured, targets=targets, cost_key=_cost_key(targets, study),
                    chosen_trial=chosen_trial, study=study, notes=notes)


# --- Markdown -----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _ratio(after: Any, before: Any) -> str:
    if not isinstance(after, (int, float)) or not isinstance(before, (int, float)) or not before:
        return ""
    return f"{after / before:.2f}x"


def _rank_text(rank: Any) -> str:
    if rank is None:
        return ""
    return "x".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank)


def _targets_text(targets: Mapping[str, float]) -> str:
    parts = []
    if "latency_ms" in targets:
        parts.append(f"latency <= {targets['latency_ms']:.3f} ms")
    if "flops" in targets:
        parts.append(f"FLOPs <= {targets['flops']:,.0f}")
    if "params" in targets:
        parts.append(f"parameters <= {targets['params']:,.0f}")
    return ", ".join(parts) or "none recorded"


def _fine_tune_notes(fine_tune: Any) -> list[str]:
    """What ``optimize(finetune_fn=...)`` recorded in the plan: the quality score is after fine-tuning."""
    if not isinstance(fine_tune, Mapping) or not fine_tune.get("candidates"):
        return []
    tried = "; ".join(f"trial {c.get('trial')}: {_num(c.get('score'), 4)} -> {_num(c.get('score_after'), 4)}"
                      for c in fine_tune["candidates"])
    if fine_tune.get("fine_tuned") is False:  # plans saved before this key existed were always fine-tuned
        return [f"finetune_fn was tried on {len(fine_tune['candidates'])} plans and none scored above trial "
                f"{fine_tune.get('chosen_trial')} as decomposed (before -> after: {tried}): the model is not "
                "fine-tuned, and the plan alone rebuilds it"]
    return [f"the model was fine-tuned by finetune_fn: the quality score is after fine-tuning, and trial "
            f"{fine_tune.get('chosen_trial')} scored best of the candidates (before -> after: {tried}); the plan "
            "alone rebuilds the model before fine-tuning"]


def _comparison(fig: _Figures) -> list[str]:
    b, f = fig.baseline or {}, fig.final or {}
    after = "compressed (measured)" if fig.final_measured else "best trial (as recorded)"
    rows = [f"| | original | {after} | ratio |", "| --- | ---: | ---: | ---: |"]
    for label, key, digits in (("latency (ms)", "latency_ms", 3), ("FLOPs (multiply-adds)", "flops", 0),
                               ("parameters", "params", 0), ("quality score", "score", 4)):
        before_v, after_v = b.get(key), f.get(key)
        ratio = "" if key == "score" else _ratio(after_v, before_v)
        rows.append(f"| {label} | {_num(before_v, digits)} | {_num(after_v, digits)} | {ratio} |")
    return rows


def _layer_table(rows: Sequence[LayerRow]) -> list[str]:
    saved_flops = sum(max(0, r.flops_saved) for r in rows)
    saved_params = sum(max(0, r.params_saved) for r in rows)
    by_flops = saved_flops > 0
    share_title = "share of FLOP savings" if by_flops else "share of parameter savings"
    lines = [
        f"| layer | kind | FLOPs | params | method | rank | FLOPs after | params after | {share_title} |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        saved, total = (r.flops_saved, saved_flops) if by_flops else (r.params_saved, saved_params)
        share = f"{saved / total:.1%}" if total and r.method != KEEP else ""
        method = r.method if not r.note or r.method != KEEP else f"keep ({r.note})"
        lines.append(
            f"| `{r.name}` | {r.kind} | {_num(r.flops)} | {_num(r.params)} | {method} | {_rank_text(r.rank)} | "
            f"{_num(r.flops_after)} | {_num(r.params_after)} | {share} |"
        )
    before_f, before_p = sum(r.flops for r in rows), sum(r.params for r in rows)
    lines.append(
        f"| **all listed layers** | | {_num(before_f)} | {_num(before_p)} | {sum(r.method != KEEP for r in rows)} "
        f"replaced | | {_num(before_f - saved_flops)} | {_num(before_p - saved_params)} | 100% |"
    )
    return lines


def _study_lines(fig: _Figures) -> list[str]:
    import optuna

    from .study import pareto_points

    study = fig.study
    every = study.get_trials(deepcopy=False)
    trials = [t for t in every if t.state.is_finished()]
    states = {state: sum(t.state == state for t in every) for state in optuna.trial.TrialState}
    complete = _complete(study)
    seeds = sum("seed" in t.user_attrs for t in trials)
    measured = [t for t in complete if "measured_latency_ms" in t.user_attrs and "predicted_latency_ms" in t.user_attrs]
    front = len([t for t in study.best_trials if _feasible(t)]) if complete else 0
    lines = [
        (f"- trials: {len(trials)} ({states[optuna.trial.TrialState.COMPLETE]} evaluated, "
         f"{states[optuna.trial.TrialState.PRUNED]} over budget by their predicted cost and not evaluated, "
         f"{states[optuna.trial.TrialState.FAIL]} failed); {seeds} seeded from rank heuristics"),
        f"- feasible evaluated trials: {sum(_feasible(t) for t in complete)}; Pareto-optimal: {front}",
    ]
    waiting = states[optuna.trial.TrialState.WAITING] + states[optuna.trial.TrialState.RUNNING]
    if waiting:
        lines.append(f"- {waiting} more queued or running (e.g. seed plans beyond the trial count; a resumed "
                     "search or a worker runs them first)")
    evals = sorted(t.user_attrs["time_eval_s"] for t in complete if "time_eval_s" in t.user_attrs)
    if evals:
        lines.append(f"- median evaluation time per trial: {evals[len(evals) // 2]:.3f} s")
    if measured:
        errors = [abs(t.user_attrs["predicted_latency_ms"] / t.user_attrs["measured_latency_ms"] - 1) for t in measured]
        lines.append(f"- latency prediction checked on {len(measured)} trials: median error "
                     f"{sorted(errors)[len(errors) // 2]:.1%}")
    spares = spares_of(pareto_points(study, {}), fig.chosen_trial)
    if spares:
        lines.append("- headroom spares of this plan (cut under the target, for a device that times it slower; "
                     f"`ranksearch optimize` writes them as spare_plan_N.json, in this order): {spares_text(spares)}")
    return lines


def _markdown(fig: _Figures, rows: list[LayerRow], figures: Mapping[str, str]) -> str:
    out = [f"# {fig.title}", ""]
    out.append(f"Targets: {_targets_text(fig.targets)}.")
    if fig.chosen_trial is not None:
        out.append(f"Plan from trial {fig.chosen_trial}.")
    out.append("")
    for note in fig.notes:
        out.append(f"> {note}")
    if fig.notes:
        out.append("")
    out += ["## Original vs compressed", ""]
    if fig.baseline is None:
        out.append("No figures of the original model were stored with this plan.")
    else:
        out += _comparison(fig)
        spread = (fig.baseline or {}).get("latency_spread")
        if isinstance(spread, (int, float)):
            out += ["", (f"Latency is the median of timed runs on the search's device; the original's spread "
                         f"(IQR / median) was {spread:.1%}.")]
    error = fig.plan.metadata.get("latency_prediction_error") if fig.plan is not None else None
    if isinstance(error, Mapping) and {"checks", "median_rel_error", "worst_rel_error"} <= set(error):
        checks = f"{error['checks']} full-model measurement{'s' if error['checks'] != 1 else ''}"
        out += ["", (f"Predicted latency against {checks} during the search: "
                     f"median error {error['median_rel_error']:.1%}, worst {error['worst_rel_error']:.1%}.")]
    elif error:
        out += ["", f"Latency prediction error over full-model checks: `{error}`."]
    out += ["", "## Layers", ""]
    if rows:
        out += _layer_table(rows)
    elif fig.plan is not None:
        out.append(fig.plan.summary())
    else:
        out.append("No plan.")
    if fig.study is not None:
        out += ["", "## Search", ""] + _study_lines(fig)
    if figures:
        out += ["", "## Figures", ""]
        for caption, name in figures.items():
            out += [f"![{caption}]({name})", ""]
    return "\n".join(out).rstrip() + "\n"


# --- figures ------------------------------------------------------------------------------------


def _save_figure(figure: Any, path: Path) -> None:
    """PNG, written atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _new_figure(width: float, height: float) -> Any:
    # a bare Figure with the Agg canvas: no pyplot, no display, the user's backend untouched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


_METHOD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#bcbd22"]


def _layers_figure(rows: Sequence[LayerRow]) -> Any | None:
    shown = [r for r in rows if r.cost_fraction is not None]
    if not shown:
        return None
    methods = sorted({r.method for r in shown if r.method != KEEP})
    colors = {m: _METHOD_COLORS[i % len(_METHOD_COLORS)] for i, m in enumerate(methods)}
    colors[KEEP] = "#bbbbbb"
    figure = _new_figure(7.5, max(2.5, 0.28 * len(shown) + 1.2))
    ax = figure.add_subplot()
    positions = list(range(len(shown)))[::-1]
    ax.barh(positions, [r.cost_fraction for r in shown], color=[colors[r.method] for r in shown])
    for pos, row in zip(positions, shown):
        label = f"{row.method} {_rank_text(row.rank)}".strip()
        ax.text(min(row.cost_fraction or 0, 1.0) + 0.01, pos, label, va="center", fontsize=7)
    ax.set_yticks(positions, [r.name for r in shown], fontsize=7)
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("cost after / before (FLOPs; parameters for layers without FLOPs)")
    ax.set_title("Per-layer choices")
    from matplotlib.patches import Patch

    shown_methods = [*methods, KEEP] if any(r.method == KEEP for r in shown) else methods
    ax.legend(handles=[Patch(color=colors[m], label=m) for m in shown_methods], fontsize=7, loc="lower right")
    return figure


def _history_figure(fig: _Figures) -> Any | None:
    import optuna
    from matplotlib.ticker import MaxNLocator

    trials = [t for t in fig.study.get_trials(deepcopy=False) if t.state.is_finished()]
    scored = sorted((t for t in _complete(fig.study) if _feasible(t)), key=lambda t: t.number)
    if not scored:
        return None
    figure = _new_figure(7.0, 4.0)
    ax = figure.add_subplot()
    ax.scatter([t.number for t in scored], [t.values[0] for t in scored], s=14, color="#1f77b4",
               label="feasible trial")
    best, xs, ys = -math.inf, [], []
    for t in scored:
        best = max(best, t.values[0])
        xs.append(t.number)
        ys.append(best)
    last = max(t.number for t in trials)
    ax.step(xs + [last], ys + [ys[-1]], where="post", color="#d62728", label="best feasible score")
    pruned = [t.number for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    if pruned:  # drawn in a band under the scores: they have none
        values = [t.values[0] for t in scored]
        if fig.baseline and isinstance(fig.baseline.get("score"), (int, float)):
            values.append(fig.baseline["score"])
        low, high = min(values), max(values)
        band = low - 0.08 * ((high - low) or 1.0)
        ax.scatter(pruned, [band] * len(pruned), marker="x", s=12, color="#999999",
                   label="over budget (not evaluated)")
    if fig.baseline and isinstance(fig.baseline.get("score"), (int, float)):
        ax.axhline(fig.baseline["score"], color="#555555", linestyle=":", linewidth=1, label="original")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("quality score")
    ax.set_title("Best feasible score over trials")
    ax.legend(fontsize=7, loc="best")
    return figure


def _pareto_figure(fig: _Figures) -> Any | None:
    import matplotlib.pyplot as plt
    import optuna

    complete = _complete(fig.study)
    if not complete:
        return None
    label = _COST_LABELS[fig.cost_key]
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna's own plot draws the trials and the front (greying infeasible ones from the trials'
        # constraints); cost on x, quality on y
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            fig.study, targets=lambda t: (t.values[1], t.values[0]), target_names=[label, "quality score"],
        )
        figure = ax.figure
        plt.close(figure)  # detached from pyplot: nothing is shown, the figure stays drawable
        target = fig.targets.get(fig.cost_key)  # targets use the same keys
        if target is not None:
            ax.axvline(target, color="#d62728", linestyle="--", linewidth=1.2, label="target")
        if fig.cost_key == "latency_ms":
            checked = [t for t in complete if "measured_latency_ms" in t.user_attrs]
            if checked:
                ax.scatter([t.user_attrs["measured_latency_ms"] for t in checked], [t.values[0] for t in checked],
                           facecolors="none", edgecolors="#2ca02c", s=40, label="measured latency")
        chosen = next((t for t in complete if t.number == fig.chosen_trial), None)
        if chosen is not None:
            ax.scatter([chosen.values[1]], [chosen.values[0]], marker="*", s=160, color="#ffbf00",
                       edgecolors="black", zorder=5, label=f"chosen (trial {chosen.number})")
        base = fig.baseline or {}
        base_x = base.get(fig.cost_key)
        if isinstance(base_x, (int, float)) and isinstance(base.get("score"), (int, float)):
            ax.scatter([base_x], [base["score"]], marker="D", s=40, color="black", label="original", zorder=5)
        ax.set_title("Quality vs cost (Pareto front)")
        ax.legend(fontsize=7, loc="lower right")
    return figure


# --- entry point --------------------------------------------------------------------------------


def make_figures(
    *, result: SearchResult | None = None, plan: CompressionPlan | None = None, study: Any = None,
) -> dict[str, Any]:
    """The report's figures as matplotlib ``Figure`` objects, e.g. to show them in a notebook.

    Keys: ``"pareto"`` (quality against cost, the target as a dashed vertical line), ``"layers"``
    (cost after / before per layer, coloured by method) and ``"history"`` (best feasible score over
    trials); a figure is left out when there is nothing to draw (no study, no evaluated trial, no
    layer descriptions). Arguments as for :func:`write_report`.

    Raises:
        PlanError: if none of ``result``, ``plan``, ``study`` is given.
        StudyMismatchError: if ``study`` was not written by ranksearch.
    """
    return _draw(_gather(result, plan, study))


def _draw(fig: _Figures) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    rows = layer_rows(fig.specs, fig.plan) if fig.specs else []
    drawn = {
        "pareto": _pareto_figure(fig) if fig.study is not None else None,
        "layers": _layers_figure(rows) if rows else None,
        "history": _history_figure(fig) if fig.study is not None else None,
    }
    for key, figure in drawn.items():
        if figure is not None:
            figures[key] = figure
    return figures


_CAPTIONS = {
    "pareto": "Quality vs cost, Pareto front",
    "layers": "Per-layer choices",
    "history": "Best feasible score over trials",
}


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    result: SearchResult | None = None,
    plan: CompressionPlan | None = None,
    study: Any = None,
) -> Path:
    """Write ``report.md`` and its PNG figures to ``out_dir``.

    Give the :class:`SearchResult` of :func:`ranksearch.optimize`, or a plan (its metadata holds
    the original's and the result's figures when ``optimize`` wrote it), or a study ranksearch
    searched (e.g. ``optuna.load_study(study_name=..., storage=...)``), or a plan and its study.
    Without a study there is no Pareto or history figure; without a plan the study's best feasible
    trial is reported with the figures it recorded.

    Args:
        out_dir: folder to write to (created if needed); existing files of the same names are replaced.
        result: what ``optimize`` returned.
        plan: a plan, e.g. ``CompressionPlan.load("plan.json")``.
        study: an Optuna study written by ``optimize``.

    Returns:
        The path of ``report.md``.

    Raises:
        PlanError: if none of ``result``, ``plan``, ``study`` is given.
        StudyMismatchError: if ``study`` was not written by ranksearch.

    Example:
        >>> result = ranksearch.optimize(model, x, target_flops=0.5, n_trials=30)
        >>> ranksearch.report.write_report("runs/report", result=result)
        PosixPath('runs/report/report.md')
    """
    fig = _gather(result, plan, study)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = layer_rows(fig.specs, fig.plan) if fig.specs else []
    files: dict[str, str] = {}
    for key, figure in _draw(fig).items():
        _save_figure(figure, out / f"{key}.png")
        files[_CAPTIONS[key]] = f"{key}.png"
    if fig.study is None:
        fig.notes.append("no study given: the Pareto front and the search history are not drawn")
    path = atomic_write_text(out / "report.md", _markdown(fig, rows, files))
    log.info("report written to %s (%d figures)", path, len(files))
    return path
