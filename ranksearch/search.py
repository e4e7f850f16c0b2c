"""optimize(): search per-layer methods and ranks with Optuna under a latency, FLOP or parameter budget.

How a search runs:

1. The model is copied (the user's model is never touched), its decomposable layers are found
   with their real input shapes, and the search space decides which methods each may use.
2. The original is measured: latency on the target device, FLOPs (fvcore), parameters, quality.
   A budget no plan of the space can meet fails here: a FLOP or parameter budget by arithmetic, a
   latency target when the space's fastest plan, timed alternately with the original, is well over it.
3. Heuristic plans (VBMF, energy thresholds) and plans fitted to the budget (one knob each, tuned
   on predicted and then measured latency; each followed by the knob's plan a little cheaper that
   scores above it, if one does) are enqueued as the first trials.
4. After the seeds, each trial is a neighbour of the best feasible plan so far (a local move:
   ``ranksearch.neighbours``); while no plan is feasible, the sampler proposes, per layer, ``keep``
   or a method and a *cost fraction* (the share of the layer's FLOPs its replacement may cost,
   mapped to a rounded rank). A trial's FLOPs, parameters and predicted latency (per-layer latency
   table) are computed first; a trial that clearly breaks a budget is recorded as infeasible
   (pruned, with its Optuna constraints set) without being built.
5. The others are rebuilt (only the changed layers are swapped in a working copy) and the whole
   model's latency is measured; that measurement decides feasibility and calibrates the latency
   predictor. Feasible trials are scored - with ``calib_data`` and BatchNorm layers, after the
   statistics of the BatchNorm layers that follow the plan's first decomposed layer are re-estimated
   on it (``ranksearch.batchnorm``), as every plan the search scores or returns.
6. The best feasible plan is rebuilt from the original and its latency measured again, alternately
   with the original so that the machine's drift during the search cancels out (a close call is
   timed for more rounds); if it misses the target by a little, it is cut to fit - uniformly, and
   where the plans' scores say it costs least, the steps tried in the sensitivity table's order
   (``ranksearch.scored_cut``) - and the cuts are checked as more trials (the
   *repair*); the next best plans are tried in turn; if none meets it, TargetUnreachableError says
   so. An answer less than 5% under the target is also cut to about 5% under it, the same ways, as
   more trials: a spare on the Pareto front for a device that times it a little slower (*headroom*).
   With ``finetune_fn``, the plans fine-tuned are the best one, then a sensitivity seed, the
   energy-threshold seed and the best uniform-ratio seed fitted to the budget (each unless the plans
   fine-tuned already descend from it), then the best of other lineages. All of step 6
   is ``ranksearch.final_checks``.

The study is multi-objective (maximise quality, minimise latency - or FLOPs / parameters when no
latency target is set), so its Pareto front answers other budgets too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import optuna
import torch
from torch import nn
from tqdm.auto import tqdm

from . import final_checks
from .cost import (LatencyPredictor, LatencyRatio, LatencyTable, TimingProcess, count_flops, count_params,
                   measure_latency, measure_ratio)
from .batchnorm import MIN_CALIBRATION_ITEMS, BatchNormRecalibration, tracked_batchnorms
from .cost.latency import LatencyFn, resolve_device
from .decompose import get_method
from .exceptions import EvaluationError, InvalidInputsError, InvalidTargetError, NoDecomposableLayerError, TargetUnreachableError
from .finetune import DEFAULT_FINETUNE_CANDIDATES, FineTuneFn, check_finetune
from .fitting import choices_key
from .layers import as_input_tuple, capture_layer_specs, check_module, layer_kind
from .neighbours import NeighbourMoves
from .plan import CompressionPlan, model_fingerprint
from .quality import FidelityScorer, calibration_batches, checked_score
from .rebuild import check_finite_parameters
from .result import ModelStats, SearchResult
from .sensitivity import SensitivityTable, measure_sensitivity
from .space import LayerCandidates, SearchSpace, load_space
from .study import best_feasible, open_storage, open_study, quiet_optuna
from .targets import Targets
from .trials import EvalFn, TrialRunner
from .warmstart import FASTEST_SEED, Seed, vbmf_choices
from .workbench import drop_unreplaceable

__all__ = ["optimize", "Targets"]

log = logging.getLogger("ranksearch.search")
timing_log = logging.getLogger("ranksearch.timing")  # every whole-model timing, for debugging the measurements


def _infer_example_inputs(model: nn.Module, calib_data: Iterable[Any] | None) -> tuple[Any, ...]:
    """Example inputs when the user gave none: the first calibration item, or a first Linear's size."""
    if calib_data is not None:
        for item in calib_data:
            return as_input_tuple(item)
    first = next((m for m in model.modules() if layer_kind(m) is not None or isinstance(m, nn.LayerNorm)), None)
    if isinstance(first, nn.Linear):
        return (torch.randn(1, first.in_features, dtype=first.weight.dtype, device=first.weight.device),)
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (1, 16), device=first.weight.device),)
    raise InvalidInputsError(
        "example_inputs cannot be inferred for this model; pass example_inputs=torch.randn(...) with the shape "
        "the model takes (for a conv net, e.g. torch.randn(1, 3, 224, 224)), or calib_data"
    )


def _move(inputs: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in inputs)


class _Progress:
    """tqdm bar: trials done, best feasible score and its latency (or FLOPs)."""

    def __init__(self, total: int, enabled: bool, unit_key: str) -> None:
        self.bar = tqdm(total=total, desc="ranksearch", unit="trial", disable=not enabled, leave=False)
        self.unit_key = unit_key

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.bar.update(1)
        best = best_feasible(study.trials)
        if best:
            top = best[0]
            self.bar.set_postfix(best_score=f"{top.values[0]:.4f}", **{self.unit_key: f"{top.values[1]:.4g}"})

    def close(self) -> None:
        self.bar.close()


def optimize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    target_latency_ms: float | None = None,
    target_latency_ratio: float | None = None,
    target_flops: float | int | None = None,
    target_params: float | int | None = None,
    eval_fn: EvalFn | None = None,
    calib_data: Iterable[Any] | None = None,
    recalibrate_batchnorm: bool | None = None,
    n_trials: int = 100,
    timeout: float | None = None,
    search_space: str | SearchSpace | Mapping[str, Any] | None = None,
    storage: Any = None,
    study_name: str | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    latency_fn: LatencyFn | None = None,
    threads: int | None = None,
    latency_clock: str = "wall",
    show_progress_bar: bool = True,
    latency_check_every: int = 1,
    latency_tolerance: float = 0.05,
    vbmf_weakening: float | None = None,
    sensitivity: bool | SensitivityTable = True,
    finetune_fn: FineTuneFn | None = None,
    finetune_candidates: int = DEFAULT_FINETUNE_CANDIDATES,
    timing_process: bool | TimingProcess = False,
) -> SearchResult:
    """Find the per-layer decomposition plan that meets the budget with the best quality.

    Args:
        model: the trained model; never modified (parameters, buffers, mode and device stay as they are).
        example_inputs: a tensor or tuple of tensors the model takes; inferred from ``calib_data`` or a
            first ``Linear``/``Embedding`` layer when omitted, otherwise required.
        target_latency_ms: latency budget, measured on ``device`` (or by ``latency_fn``).
        target_latency_ratio: latency budget as a fraction in (0, 1] of the original's latency, as this
            search times it at its start (e.g. 0.5 for a 2x speed-up). Use it instead of
            ``target_latency_ms`` when the budget is a speed-up: a millisecond target taken from another
            timing of the original inherits that timing's noise.
        target_flops: FLOP budget: a float in (0, 1] is a fraction of the original, an int an absolute count
            (multiply-adds, fvcore's convention).
        target_params: parameter budget, same convention.
        eval_fn: ``eval_fn(model) -> float``, higher is better. Without it, the built-in output fidelity to
            the original on the calibration inputs (see ``ranksearch.quality``).
        calib_data: iterable of model inputs (each a batch: a tensor or a tuple of positional inputs),
            real data as the model sees it: the built-in fidelity is measured on them, and BatchNorm
            statistics are re-estimated on them (``recalibrate_batchnorm``).
        recalibrate_batchnorm: re-estimate the running statistics of the BatchNorm layers after each
            plan's first decomposed layer on ``calib_data`` before the plan is scored, and return the
            model so (``ranksearch.batchnorm``): no training, and most of what a deep cut costs a
            CNN comes back (the benchmark's CNN: a plan at 0.594 validation accuracy decomposed, 0.989
            re-estimated, 0.983 after a one-epoch fine-tune instead). ``None`` (default): when
            ``calib_data`` holds at least 32 items and the model has BatchNorm layers with running
            statistics. ``True``: always (an error without enough ``calib_data``). ``False``: never.
            The plan records the layers (``plan.metadata["batchnorm_recalibration"]``): rebuild it
            with ``apply_plan(model, plan, calib_data=...)``.
        n_trials: total trials wanted in the study (a resumed study runs only the remainder).
        timeout: stop after this many seconds.
        search_space: a shipped space's name (``ranksearch.list_spaces()``), a YAML path, a dict or a SearchSpace.
        storage: an Optuna storage URL or object (e.g. ``"sqlite:///study.db"``) to make the search resumable.
        study_name: the study's name in ``storage``; rerunning with the same name continues it.
        device: where latency is measured and the search runs (default: where the model is).
        seed: makes the local moves and the sampler reproducible.
        latency_fn: ``latency_fn(model, example_inputs) -> ms`` for devices reached some other way.
        threads: torch threads latency is measured with (default: ``torch.get_num_threads()``); use the
            count the model will run with.
        latency_clock: ``"wall"`` (default): elapsed time. ``"cpu"``: CPU time of the timing thread (CPU,
            ``threads=1`` only); on a machine shared with other work it leaves out the time the process
            waits for a core, so plans are compared on what they cost, not on what else ran meanwhile.
        show_progress_bar: show trials done, best feasible score and its latency.
        latency_check_every: 1 (default): measure every plan that is built, and let the measurement decide
            whether it meets a latency target. N > 1: measure the first three and every N-th, and trust
            the calibrated prediction for the others (for targets where measuring is slow, e.g. a
            remote ``latency_fn``). 0: predictions only, until the final answer is measured.
        latency_tolerance: relative measurement tolerance when verifying the final latency.
        vbmf_weakening: also seed a weakened-VBMF plan keeping this fraction of what VBMF discards.
        sensitivity: before the trials, score each layer compressed alone at seven cost fractions and
            seed the plans that spend the budget where it costs the least quality
            (``ranksearch.sensitivity``). Costs seven evaluations per layer and method (one method per
            layer when that would exceed 320); worth it unless evaluations are very expensive. Under a
            latency target the table also steers the cuts of the answer's repairs and spares, 12-74
            evaluations each (``ranksearch.scored_cut``). The table does not depend on the budget:
            pass a previous result's ``result.sensitivity`` (same model, same quality measure and
            space) to reuse it for another target.
        finetune_fn: ``finetune_fn(model)``, the fine-tune you will give the compressed model, training
            it in place (parameters trainable; put it in train mode yourself). When given,
            ``finetune_candidates`` plans that meet the budget on measurement (the best, then a
            sensitivity seed, the energy-threshold seed and the best uniform-ratio seed fitted to the
            budget, then the best of other lineages) are each fine-tuned on a copy and scored again,
            and the best after fine-tuning is returned, fine-tuned: plans that score best before a
            fine-tune are often not the ones that recover best (``ranksearch.finetune``). A fine-tune
            is kept only where it helps: when no fine-tuned candidate scores above the best one as
            decomposed, that one is returned without fine-tuning
            (``result.plan.metadata["fine_tune"]["fine_tuned"]`` says which). ``result.fine_tuned``
            lists every candidate's scores.
        finetune_candidates: how many verified plans ``finetune_fn`` is tried on (default 4).
        timing_process: ``True``: time whole models in a fresh process on this CPU, started for the search
            and ended with it, as a deployed model runs, not in this process, whose heap the search
            fragments (``ranksearch.cost.timing_process``: a plan timed at 0.69 of the original here
            timed 0.68 there, and 0.73 here after the search). A :class:`~ranksearch.cost.TimingProcess`:
            time in that one (left running), e.g. to time other models in the same conditions. The
            per-layer latency table is still timed here (the whole-model timings calibrate it). CPU only.

    Returns:
        A :class:`~ranksearch.result.SearchResult` (``model``, ``plan``, ``study``, ``baseline``, ``final``,
        ``pareto``, ``fine_tuned``).

    Raises:
        NotAModuleError, InvalidInputsError, InvalidTargetError, NoDecomposableLayerError, StorageError,
        StudyMismatchError, DeviceUnavailableError, SearchSpaceError: for bad input, before any search work.
        TargetUnreachableError: when no plan meets the budget (it carries the best achievable plan);
            before any trial when even the space's smallest ranks cannot meet it.
        EvaluationError: when every trial's evaluation failed.

    Example:
        >>> result = ranksearch.optimize(model, torch.randn(1, 3, 32, 32), target_latency_ms=2.0, n_trials=50)
        >>> result.plan.save("plan.json"); print(result.summary())
    """
    check_module(model)
    if target_latency_ratio is not None:
        if target_latency_ms is not None:
            raise InvalidTargetError("give target_latency_ms or target_latency_ratio, not both")
        if (isinstance(target_latency_ratio, bool) or not isinstance(target_latency_ratio, (int, float))
                or not 0 < target_latency_ratio <= 1):
            raise InvalidTargetError(
                f"target_latency_ratio must be a fraction in (0, 1] of the original's latency, got {target_latency_ratio!r}"
            )
    Targets.require_one(target_latency_ms if target_latency_ratio is None else target_latency_ratio,
                        target_flops, target_params)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise InvalidTargetError(f"n_trials must be a positive int, got {n_trials!r}")
    space = load_space(search_space)
    torch_device = resolve_device(device, model)
    _check_clock(latency_clock, latency_fn, torch_device, threads)
    check_finetune(finetune_fn, finetune_candidates)
    storage = open_storage(storage)
    inputs = as_input_tuple(example_inputs) if example_inputs is not None else _infer_example_inputs(model, calib_data)

    with _timing_worker(timing_process, torch_device, latency_fn) as worker:
        # Everything below works on a copy: the user's model keeps its parameters, mode and device.
        reference = copy.deepcopy(model).to(torch_device).eval()
        check_finite_parameters(reference)
        fingerprint = model_fingerprint(reference)
        _check_sensitivity(sensitivity, fingerprint)
        inputs = _move(inputs, torch_device)
        specs = capture_layer_specs(reference, inputs)
        candidates = drop_unreplaceable(reference, inputs, space.candidates(specs))
        if not any(c.searchable for c in candidates):
            reasons = "; ".join(f"{c.spec.name}: {', '.join(c.notes)}" for c in candidates[:5]) or "no Linear, Conv1d, Conv2d or Embedding layer is used in forward"
            raise NoDecomposableLayerError(
                f"nothing in this model can be decomposed under search space {space.name!r} ({reasons}); "
                "check the model and the space's 'methods', 'skip' and 'min_flops_share'"
            )

        def measure(m: nn.Module, max_attempts: int = 3) -> Any:
            return measure_latency(m, inputs, torch_device, latency_fn=latency_fn, threads=threads, clock=latency_clock,
                                   max_attempts=max_attempts, timing_process=worker)

        def measure_pair(first: nn.Module, second: nn.Module, seconds: float, chunks: int) -> LatencyRatio:
            return measure_ratio(first, second, inputs, torch_device, threads=threads, clock=latency_clock,
                                 seconds=seconds, chunks=chunks, timing_process=worker)

        batches = calibration_batches(inputs, calib_data)
        batches = [_move(b, torch_device) for b in batches]
        recalibration = _batchnorm_recalibration(recalibrate_batchnorm, reference, inputs,
                                                 batches if calib_data is not None else None)
        _check_sensitivity_recalibration(sensitivity, recalibration)
        scorer = None if eval_fn is not None else FidelityScorer(reference, batches)
        # every later latency is judged against this one (targets, drift, the final ratio): the median of three
        base_timings = sorted((measure(reference) for _ in range(3)), key=lambda m: m.ms)
        base_latency = base_timings[1]
        base_flops, base_params = count_flops(reference, inputs), count_params(reference)
        base_score = checked_score(eval_fn, reference) if eval_fn is not None else scorer(reference).score  # type: ignore[misc]
        baseline = ModelStats(base_latency.ms, base_latency.spread, base_flops, base_params, base_score)
        if target_latency_ratio is not None:
            target_latency_ms = target_latency_ratio * baseline.latency_ms
        targets = Targets.parse(latency_ms=target_latency_ms, flops=target_flops, params=target_params,
                                baseline_flops=base_flops, baseline_params=base_params)

        with warnings.catch_warnings():  # `group` is marked experimental; it is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
        cost_key = "latency_ms" if targets.latency_ms is not None else ("flops" if targets.flops is not None else "params")
        budget = targets.as_dict()
        if target_latency_ratio is not None:  # a resumed search times the original again: keep the ratio
            budget = {**budget, "latency_ms": None, "latency_ratio": float(target_latency_ratio)}
        identity = {"model": fingerprint["digest"], "space": space.digest, "targets": budget,
                    "objectives": ["quality", cost_key]}
        with quiet_optuna():
            study = open_study(storage, study_name, directions=["maximize", "minimize"], sampler=sampler, identity=identity)
        # what a report needs to read the study on its own (e.g. `ranksearch report --storage ...`)
        study.set_user_attr("baseline", baseline.to_dict())
        study.set_user_attr("layer_specs", [spec.to_dict() for spec in specs])
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("space_name", space.name)

        already = targets.violations(latency_ms=baseline.latency_ms, flops=base_flops, params=base_params)
        if all(v <= 0 for v in already.values()):
            message = "the original model already meets the target; returned it unchanged with an empty plan"
            log.info(message)
            plan = CompressionPlan(layers=[], fingerprint=fingerprint, metadata={"targets": targets.as_dict()})
            return SearchResult(model=copy.deepcopy(reference), plan=plan, study=study, baseline=baseline,
                                final=baseline, targets=targets.as_dict(), message=message)

        searchable = [c for c in candidates if c.searchable]
        _check_reachable(targets, searchable, space, baseline)

        predictor = None
        if targets.latency_ms is not None:
            table = LatencyTable(reference, inputs, [c.spec for c in searchable], device=torch_device,
                                 latency_fn=latency_fn, threads=threads, clock=latency_clock)
            table.prepare({c.spec.name: c.methods for c in searchable})
            # one check's worth of prior: the table is often off by a consistent factor, learn it fast
            predictor = LatencyPredictor(table, baseline.latency_ms, prior_checks=1.0)

        search = TrialRunner(
            reference=reference, inputs=inputs, candidates=candidates, space=space, targets=targets, baseline=baseline,
            eval_fn=eval_fn, scorer=scorer, predictor=predictor, measure=measure,
            measure_round=lambda m: measure(m, max_attempts=1), fingerprint=fingerprint,
            measure_pair=measure_pair if latency_fn is None else None,
            latency_check_every=latency_check_every, recalibration=recalibration,
        )
        table = None
        if not study.trials:
            search.calibrate_latency()
            floor = _check_latency_reachable(search, targets, latency_tolerance, study)
            table = sensitivity if isinstance(sensitivity, SensitivityTable) else (
                measure_sensitivity(search) if sensitivity else None)
            # at the space's floor, its fastest plan is the one most likely to meet the target
            seeds = search.seeds(weakening=vbmf_weakening, sensitivity=table, first=[floor] if floor else [])
            for seed_plan in seeds[:n_trials]:
                search.enqueue(study, seed_plan, seed=seed_plan.origin)
            # evaluations outside the trials, besides the sensitivity table's (best_cheaper_plan)
            study.set_user_attr("seed_scan_evaluations", search.scan_evaluations)

        finished = [t for t in study.trials if t.state.is_finished()]
        remaining = max(0, n_trials - len(finished))
        progress = _Progress(remaining, show_progress_bar, cost_key)
        try:
            with quiet_optuna():
                study.optimize(search.objective, n_trials=remaining, timeout=timeout, catch=(EvaluationError,),
                               callbacks=[progress, NeighbourMoves(search, n_trials, seed, sensitivity=table)])
        except KeyboardInterrupt:
            log.warning("search interrupted: %d trials are kept in the study; rerun with the same storage and "
                        "study_name to resume", len(study.trials))
            raise
        finally:
            progress.close()

        try:
            result = final_checks.pick_answer(study, search, targets, baseline, latency_tolerance, finetune_fn,
                                              finetune_candidates, sensitivity=table)
        except TargetUnreachableError as exc:
            exc.sensitivity = table  # still reusable for a looser target
            raise
        result.sensitivity = table
        return result


@contextlib.contextmanager
def _timing_worker(timing_process: Any, device: torch.device, latency_fn: LatencyFn | None) -> Iterator[TimingProcess | None]:
    """The process the search times whole models in: ``None`` (this one), the caller's
    :class:`TimingProcess`, or one started here and ended with the search."""
    if timing_process is False or timing_process is None:
        yield None
        return
    if timing_process is not True and not isinstance(timing_process, TimingProcess):
        raise InvalidInputsError(f"timing_process must be True, False or a ranksearch.cost.TimingProcess, got {timing_process!r}")
    if latency_fn is not None or device.type != "cpu":
        raise InvalidInputsError("timing_process times on this machine's CPU: leave it out with latency_fn or on "
                                 f"another device (got device={str(device)!r})")
    if isinstance(timing_process, TimingProcess):
        yield timing_process
        return
    with TimingProcess() as worker:
        yield worker


def _check_clock(clock: Any, latency_fn: LatencyFn | None, device: torch.device, threads: int | None) -> None:
    """Refuse a ``latency_clock`` that cannot time this search, before any work."""
    if clock not in ("wall", "cpu"):
        raise InvalidInputsError(f"latency_clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu":
        if latency_fn is not None:
            raise InvalidInputsError("latency_clock='cpu' times the model here; with latency_fn your function "
                                     "does the timing: leave latency_clock='wall'")
        if device.type != "cpu" or threads != 1:
            raise InvalidInputsError("latency_clock='cpu' measures one thread's CPU time: pass threads=1 and run on "
                                     f"the CPU (got device={str(device)!r}, threads={threads!r}), or use 'wall'")


def _batchnorm_recalibration(wanted: Any, reference: nn.Module, inputs: tuple[Any, ...],
                             batches: list[tuple[Any, ...]] | None) -> BatchNormRecalibration | None:
    """What ``recalibrate_batchnorm`` asks for, given the model and ``calib_data``'s ``batches``
    (``None`` without calib_data); refused before any search work when it cannot be done."""
    if not (wanted is None or isinstance(wanted, bool)):
        raise InvalidInputsError(f"recalibrate_batchnorm must be True, False or None, got {wanted!r}")
    if wanted is False or not tracked_batchnorms(reference):
        if wanted:
            log.info("recalibrate_batchnorm=True: the model has no BatchNorm layer with running statistics; "
                     "nothing to re-estimate")
        return None
    recalibration = BatchNormRecalibration(reference, inputs, batches or [])
    if recalibration.items >= MIN_CALIBRATION_ITEMS:
        log.info("BatchNorm statistics after each plan's first decomposed layer are re-estimated on calib_data "
                 "(%d items) before the plan is scored", recalibration.items)
        return recalibration
    if wanted:
        held = "is not given" if batches is None else f"holds {recalibration.items} items"
        raise InvalidInputsError(
            f"recalibrate_batchnorm=True re-estimates BatchNorm statistics on calib_data, which {held}; pass at "
            f"least {MIN_CALIBRATION_ITEMS} real inputs (e.g. a few hundred training items in batches) as calib_data")
    if batches:
        log.info("calib_data holds %d items, fewer than the %d that BatchNorm statistics are re-estimated on; "
                 "plans are scored with the original's statistics", recalibration.items, MIN_CALIBRATION_ITEMS)
    return None


def _check_sensitivity_recalibration(sensitivity: Any, recalibration: BatchNormRecalibration | None) -> None:
    """Refuse a sensitivity table scored with BatchNorm re-estimation on or off when this search has it the other way."""
    if isinstance(sensitivity, SensitivityTable) and sensitivity.batchnorm_recalibrated != (recalibration is not None):
        raise InvalidInputsError(
            f"sensitivity= is a table scored with BatchNorm re-estimation {'on' if sensitivity.batchnorm_recalibrated else 'off'}, "
            f"and this search has it {'on' if recalibration is not None else 'off'}; pass the same calib_data and "
            "recalibrate_batchnorm as the search that measured it, or sensitivity=True to measure it again")


def _check_sensitivity(sensitivity: Any, fingerprint: dict[str, Any]) -> None:
    """Refuse a ``sensitivity=`` that is neither a flag nor a table measured on this model."""
    if isinstance(sensitivity, SensitivityTable):
        if sensitivity.fingerprint != fingerprint["digest"]:
            raise InvalidInputsError(
                "sensitivity= is a table measured on another model (its fingerprint differs); pass "
                "sensitivity=True to measure it for this one"
            )
    elif not (sensitivity is None or isinstance(sensitivity, bool)):
        raise InvalidInputsError(
            f"sensitivity must be True, False or a SensitivityTable (result.sensitivity), got {type(sensitivity).__name__}"
        )


def _check_reachable(targets: Targets, searchable: list[LayerCandidates], space: SearchSpace, baseline: ModelStats) -> None:
    """Fail early when even the smallest ranks on every layer cannot meet a FLOP or parameter budget."""
    saved_flops = saved_params = 0
    for cand in searchable:
        best_flops = best_params = 0
        for method, rank in space.smallest_ranks(cand):
            cost = get_method(method).cost(cand.spec, rank)
            best_flops = max(best_flops, cand.spec.flops - cost.flops)
            best_params = max(best_params, cand.spec.params - cost.params)
        saved_flops += best_flops
        saved_params += best_params
    for name, target, best in (("FLOPs", targets.flops, baseline.flops - saved_flops),
                               ("parameters", targets.params, baseline.params - saved_params)):
        if target is not None and best > target:
            raise TargetUnreachableError(
                f"the {name} target {target:,.0f} is out of reach: the smallest ranks this search space allows "
                f"give {best:,.0f} ({best / (baseline.flops if name == 'FLOPs' else baseline.params):.1%} of the "
                "original); relax the target or widen the space (lower cost_fraction.low, more methods, smaller "
                "min_flops_share)",
                best_flops=best if name == "FLOPs" else None,
            )


# A latency target that the fastest plan of the space misses by more than this (relative to the
# accepted limit, in a timing alternated with the original) is reported out of reach before the
# trials. Its margin covers the timing's noise and plans of the space the predictor did not rate
# fastest; a target just out of reach is left to the search, which reports its fastest plan. (The
# benchmark's CNN at 0.35x, 18 searches in 9 runs: that plan timed 1.00-1.16 of the target, no search
# found a faster one, and each of the 13 left to the search by a margin of 10% ended without a plan,
# after 35-41 s in the last run; 9 of them had timed it more than 5% over the accepted limit.)
_OUT_OF_REACH = 0.05


def _check_latency_reachable(search: TrialRunner, targets: Targets, tolerance: float,
                             study: optuna.Study) -> Seed | None:
    """Fail before the trials when even the fastest plan the space allows (``fastest_choices``) is
    measured well over the latency target: no trial could meet it, and the search would take all its
    trials and final checks to say so (the benchmark's CNN at 0.35x, on a machine where no method
    reached it: 85 s, every trial ruled out, then three rechecks).

    Returns that plan as a seed (``"seed:fastest"``) when it measured over the target but within
    reach: the target is at the space's floor, where the fitted seeds' cheapest plans (one threshold
    or one family for every layer) miss it, and the trials would not find the floor themselves. (The
    benchmark's CNN at 0.35x, 24 searches in 16 runs: the fastest plan a search measured in its
    trials was 3-15% slower than this one, once 1.15 of the target against 1.00.) The final
    rechecks accept a plan within ``latency_tolerance``. The timing also calibrates the predictor.

    One timing decides when the plan is within reach; one over it is confirmed alternately with the
    original, as a final check, so that a slow spell now does not end the search. The prediction
    cannot stand in for the timing: calibrated on plans at cost fractions 0.3 and 0.6, it put that
    CNN's fastest plan at 0.27 of the original (batch 1) and 0.13 (batch 8); timed, they measured 0.39 and 0.38.

    When that plan times over the target, the VBMF plan is timed too, and the faster of the two is the
    space's floor: the predictor rates each layer timed alone, and in the model a plan of higher ranks
    can run faster. (The benchmark's CNN at batch 1, 0.35x, on a 2-core AVX-512 machine: the
    predictor's fastest plan measured 0.38 of the original and the search gave up before its trials,
    while the VBMF baseline's plan measured 0.33 and met the target.)
    """
    if targets.latency_ms is None or search.predictor is None or not search.latency_check_every:
        return None
    limit = targets.latency_ms * (1 + tolerance) * (1 + _OUT_OF_REACH)
    choices = search.fastest_choices()
    if not choices:
        return None
    plan, floor_is_vbmf = search.make_plan(choices, "fastest"), False
    fastest_ms, _, _ = search.latency_now(search.workbench.apply(plan))
    vbmf = vbmf_choices(search.reference, search.searchable, search.space) if fastest_ms > targets.latency_ms else {}
    if vbmf and choices_key(vbmf) != choices_key(choices):
        # the predictor rates each layer timed alone; in the model, the VBMF plan can run faster
        vbmf_plan = search.make_plan(vbmf, "fastest")
        vbmf_ms, _, _ = search.latency_now(search.workbench.apply(vbmf_plan))
        search.predictor.record(vbmf_plan, vbmf_ms)
        timing_log.debug("the VBMF plan: %.3f ms, the predictor's fastest %.3f ms", vbmf_ms, fastest_ms)
        if vbmf_ms < fastest_ms:
            search.predictor.record(plan, fastest_ms)
            choices, plan, fastest_ms, floor_is_vbmf = vbmf, vbmf_plan, vbmf_ms, True
    if fastest_ms > limit:
        fastest_ms, _ = search.verified_latency(search.workbench.apply(plan), rounds=3, limit_ms=limit)
    search.workbench.apply(search.make_plan({}, "fastest"))  # the working copy back to the original
    timing_log.debug("the fastest plan of the space: %.3f ms against the %.3f ms target", fastest_ms,
                     targets.latency_ms)
    # the calibration plans sit at cost fractions 0.3 and 0.6: this timing teaches the predictor the
    # space's cheap end, where the fits of tight budgets start (the benchmark's models, ten uniform and
    # energy-threshold plans from the cheapest to 0.7 of the original: the median prediction error
    # fell from 39% to 10% on the CNN at batch 8, 13% to 5% at batch 1; MiniLM 21% to 9%, 7% to 6%)
    search.predictor.record(plan, fastest_ms)
    if fastest_ms <= limit:
        return Seed(FASTEST_SEED, choices) if fastest_ms > targets.latency_ms else None
    baseline_ms = search.baseline.latency_ms
    floor = (f"every layer at cost_fraction.low {search.space.cost_fraction_low:g} with its fastest method, "
             "or kept")
    if floor_is_vbmf:
        floor = f"the VBMF plan, faster than {floor}"
    raise TargetUnreachableError(
        f"the latency target {targets.latency_ms:.3f} ms ({targets.latency_ms / baseline_ms:.2f} of the original) is "
        f"out of reach: the fastest plan of this search space ({floor}) measured {fastest_ms:.3f} ms "
        f"({fastest_ms / baseline_ms:.2f} of the original), timed alternately with the original; relax the target "
        "or widen the space (lower cost_fraction.low, more methods, smaller min_flops_share)",
        best_plan=plan, best_latency_ms=fastest_ms, study=study,
    )
