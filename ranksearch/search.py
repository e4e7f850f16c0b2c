"""optimize(): search per-layer methods and ranks with Optuna under a latency, FLOP or parameter budget.

How a search runs:

1. The model is copied (the user's model is never touched), its decomposable layers are found
   with their real input shapes, and the search space decides which methods each may use.
2. The original is measured: latency on the target device, FLOPs (fvcore), parameters, quality.
   A budget no plan of the space can meet fails here: a FLOP or parameter budget by arithmetic, a
   latency target when the space's fastest plan, timed alternately with the original, is well over it.
3. Heuristic plans (VBMF, energy thresholds) and plans fitted to the budget (one knob each, tuned
   on predicted and then measured latency) are enqueued as the first trials.
4. Each trial picks, per layer, ``keep`` or a method and a *cost fraction* (the share of the
   layer's FLOPs its replacement may cost, mapped to a rounded rank). Its FLOPs, parameters and
   predicted latency (per-layer latency table) are computed first; a trial that clearly breaks a
   budget is recorded as infeasible (pruned, with its Optuna constraints set) without being built.
5. The others are rebuilt (only the changed layers are swapped in a working copy) and the whole
   model's latency is measured; that measurement decides feasibility and calibrates the latency
   predictor. Feasible trials are scored. After the seeds, every other trial is a neighbour of the
   best feasible plan so far, and the last trials all are (``ranksearch.neighbours``); the sampler
   proposes the others.
6. The best feasible plan is rebuilt from the original and its latency measured again, alternately
   with the original so that the machine's drift during the search cancels out (a close call is
   timed for more rounds); if it misses the target by a little, it is cut to fit - uniformly, and
   where the sensitivity table says it costs least - and the cuts are checked as more trials (the
   *repair*); the next best plans are tried in turn; if none meets it, TargetUnreachableError says
   so. An answer less than 5% under the target is also cut to about 5% under it, the same ways, as
   more trials: a spare on the Pareto front for a device that times it a little slower (*headroom*).
   With ``finetune_fn``, the plans fine-tuned are the best one, then the energy-threshold seed and
   the best uniform-ratio seed fitted to the budget, then the best of other lineages.

The study is multi-objective (maximise quality, minimise latency - or FLOPs / parameters when no
latency target is set), so its Pareto front answers other budgets too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import optuna
import torch
from torch import nn
from tqdm.auto import tqdm

from .cost import LatencyPredictor, LatencyTable, TimingProcess, count_flops, count_params, measure_latency
from .cost.latency import LatencyFn, resolve_device
from .decompose import get_method
from .exceptions import EvaluationError, InvalidInputsError, InvalidTargetError, NoDecomposableLayerError, TargetUnreachableError
from .finetune import DEFAULT_FINETUNE_CANDIDATES, FineTuneFn, check_finetune, pick_after_finetune
from .fitting import choices_key
from .layers import as_input_tuple, capture_layer_specs, check_module, layer_kind
from .neighbours import NeighbourMoves, tightened_choices, tried_plans
from .plan import KEEP, CompressionPlan, model_fingerprint
from .quality import FidelityScorer, calibration_batches, checked_score
from .rebuild import apply_plan, check_finite_parameters
from .result import ModelStats, SearchResult
from .sensitivity import SensitivityTable, least_loss_cut, measure_sensitivity
from .space import LayerCandidates, SearchSpace, load_space
from .study import best_feasible, is_feasible, open_storage, open_study, pareto_points, plan_of, quiet_optuna
from .targets import Targets
from .trials import EvalFn, TrialRunner
from .warmstart import ENERGY_FIT_SEED, FASTEST_SEED, Seed, is_uniform_fit
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
        calib_data: iterable of model inputs for the built-in fidelity.
        n_trials: total trials wanted in the study (a resumed study runs only the remainder).
        timeout: stop after this many seconds.
        search_space: a shipped space's name (``ranksearch.list_spaces()``), a YAML path, a dict or a SearchSpace.
        storage: an Optuna storage URL or object (e.g. ``"sqlite:///study.db"``) to make the search resumable.
        study_name: the study's name in ``storage``; rerunning with the same name continues it.
        device: where latency is measured and the search runs (default: where the model is).
        seed: makes sampling reproducible.
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
            layer when that would exceed 320); worth it unless evaluations are very expensive. The table
            does not depend on the budget: pass a previous result's ``result.sensitivity`` (same model,
            same quality measure and space) to reuse it for another target.
        finetune_fn: ``finetune_fn(model)``, the fine-tune you will give the compressed model, training
            it in place (parameters trainable; put it in train mode yourself). When given,
            ``finetune_candidates`` plans that meet the budget on measurement (the best, then the
            energy-threshold seed and the best uniform-ratio seed fitted to the budget, then the best
            of other lineages) are each fine-tuned on a copy and scored again, and the best after
            fine-tuning is returned, fine-tuned: plans that score best before a fine-tune are often not
            the ones that recover best (``ranksearch.finetune``). ``result.fine_tuned`` lists every
            candidate's scores.
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

        batches = calibration_batches(inputs, calib_data)
        batches = [_move(b, torch_device) for b in batches]
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
            latency_check_every=latency_check_every,
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

        finished = [t for t in study.trials if t.state.is_finished()]
        remaining = max(0, n_trials - len(finished))
        progress = _Progress(remaining, show_progress_bar, cost_key)
        try:
            with quiet_optuna():
                study.optimize(search.objective, n_trials=remaining, timeout=timeout, catch=(EvaluationError,),
                               callbacks=[progress, NeighbourMoves(search, n_trials, seed)])
        except KeyboardInterrupt:
            log.warning("search interrupted: %d trials are kept in the study; rerun with the same storage and "
                        "study_name to resume", len(study.trials))
            raise
        finally:
            progress.close()

        try:
            result = _finish(study, search, targets, baseline, latency_tolerance, finetune_fn, finetune_candidates,
                             sensitivity=table)
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
    """
    if targets.latency_ms is None or search.predictor is None or not search.latency_check_every:
        return None
    limit = targets.latency_ms * (1 + tolerance) * (1 + _OUT_OF_REACH)
    choices = search.fastest_choices()
    if not choices:
        return None
    plan = search.make_plan(choices, "fastest")
    model = search.workbench.apply(plan)
    fastest_ms = search.measure(model).ms / search.drift()
    if fastest_ms > limit:
        fastest_ms, _ = search.verified_latency(model, rounds=3, limit_ms=limit)
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
    raise TargetUnreachableError(
        f"the latency target {targets.latency_ms:.3f} ms ({targets.latency_ms / baseline_ms:.2f} of the original) is "
        f"out of reach: the fastest plan this search space allows (every layer at cost_fraction.low "
        f"{search.space.cost_fraction_low:g} with its fastest method, or kept) measured {fastest_ms:.3f} ms "
        f"({fastest_ms / baseline_ms:.2f} of the original), timed alternately with the original; relax the target "
        "or widen the space (lower cost_fraction.low, more methods, smaller min_flops_share)",
        best_plan=plan, best_latency_ms=fastest_ms, study=study,
    )


def _distinct_plans(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The first trial of each plan (samplers repeat plans; one verification per plan is enough).

    Plans are compared by their choices only: the same plan reached by a seed and by a sampled
    trial records different origins.
    """
    seen: set[str] = set()
    distinct = []
    for trial in trials:
        key = choices_key({layer["name"]: (layer["method"], layer.get("rank"))
                           for layer in trial.user_attrs.get("plan", []) if layer["method"] != KEEP})
        if key not in seen:
            seen.add(key)
            distinct.append(trial)
    return distinct


# plans that missed the latency target in the trials, checked again when none met it (see _finish)
_RECHECKS = 3
# a plan that misses the latency target in its final check by at most this much (relative to the
# accepted limit) is repaired: cut to fit (one or two ways, a trial each) and checked in turn; at most
# _REPAIRS per search (each costs a trial and a check, a few seconds)
_REPAIRABLE = 0.25
_REPAIRS = 2
# Two careful timings of one plan minutes apart differ by 3-6% on a shared CPU (the benchmark, MiniLM at
# batch 1, 0.5x: plans its final check put at the target measured 4-6% over it a minute later, and the
# next plan under the target on the front was far worse). An answer less than this much under the
# target gets a spare cut about this much under it (see _headroom_cut).
_HEADROOM = 0.05


def _closest_latency_misses(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials ruled out by their latency alone (every other budget met), closest to the target first."""
    misses = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
              and "plan" in t.user_attrs and _missed_latency_only(t)]
    return _distinct_plans(sorted(misses, key=lambda t: (t.constraints["latency"], t.number)))


def _missed_latency_only(trial: optuna.trial.FrozenTrial) -> bool:
    return (trial.constraints.get("latency", 0.0) > 0
            and all(v <= 0 for k, v in trial.constraints.items() if k != "latency"))


def _repair(study: optuna.Study, search: TrialRunner, trial: optuna.trial.FrozenTrial, measured_ms: float,
            sensitivity: SensitivityTable | None, move: str = "repair") -> list[optuna.trial.FrozenTrial]:
    """``trial``'s plan cut to meet the latency target as if it took ``measured_ms`` (its final check's
    measurement; more, for a spare under the target), each cut run as one more trial of the study
    (``neighbour_of`` the plan, ``move``); none when no cut fits.

    Two cuts: every layer's cost fraction by one shared factor (``tightened_choices``), and, with a
    sensitivity table, ranks lowered where the table says it costs the least quality
    (``least_loss_cut``). Their trials score them, and the final checks take them in turn by score.

    Why: the plans checked first are the best ones, and they sit at the budget; a final check that
    disagrees with the trials by a few percent (the machine's speed moves that much between two
    phases of one process) would otherwise hand the answer to the next plan, often a much worse one.
    """
    assert search.predictor is not None
    if any(t.state == optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return []  # a queued plan the search did not reach (timeout) would run instead of the repair
    parent = {c.name: (c.method, c.rank) for c in plan_of(trial, search.fingerprint).replaced}
    fits = search.fits_beside(parent, measured_ms)
    cuts = [tightened_choices(parent, search.searchable, search.space, fits)]
    if sensitivity is not None:
        cuts.append(least_loss_cut(search, sensitivity, parent, fits))
    tried = tried_plans(study.get_trials(deepcopy=False), search.fingerprint)
    distinct = list({choices_key(c): c for c in cuts if c is not None and choices_key(c) not in tried}.values())
    if not distinct:
        return []  # no cut fits, or each is a plan already tried (and in the queue by its score)
    log.info("trial %d (%s): cutting its plan to fit the target by a latency of %.3f ms (%d cut(s)); running them "
             "as more trials", trial.number, move, measured_ms, len(distinct))
    for choices in distinct:
        search.enqueue(study, Seed(move, choices), neighbour_of=trial.number, move=move)
    with quiet_optuna():
        study.optimize(search.objective, n_trials=len(distinct), catch=(EvaluationError,))
    # the final check decides, not a repair's own trial timing (its parent's was off)
    return [t for t in study.trials[-len(distinct):] if "plan" in t.user_attrs
            and ((t.state == optuna.trial.TrialState.COMPLETE and is_feasible(t)) or _missed_latency_only(t))]


def _headroom_cut(study: optuna.Study, search: TrialRunner, trial: optuna.trial.FrozenTrial, verified_ms: float,
                  target_ms: float | None, sensitivity: SensitivityTable | None) -> None:
    """When the answer's final check puts it less than ``_HEADROOM`` under the latency target (or over
    it, within the tolerance), its plan cut to about ``_HEADROOM`` under that measurement, as more
    trials (``move="headroom"``): a spare on the Pareto front (``result.pareto``) for a device, or a
    later timing, that finds the answer a few percent slower. A search spends its trials at the
    budget, so without it the next plan there under the target is often much worse. The answer
    itself is unchanged.
    """
    if target_ms is None or search.predictor is None or verified_ms < target_ms * (1 - _HEADROOM):
        return
    _repair(study, search, trial, verified_ms * (1 + _HEADROOM), sensitivity, move="headroom")


def _lineage(trial: optuna.trial.FrozenTrial, by_number: dict[int, optuna.trial.FrozenTrial]) -> int:
    """The trial a plan descends from by local moves and repairs (``neighbour_of``), or its own number."""
    while (parent := trial.user_attrs.get("neighbour_of")) is not None and parent in by_number:
        trial = by_number[parent]
    return trial.number


def _fine_tune_order(queue: list[optuna.trial.FrozenTrial], verified_lineages: set[int],
                     by_number: dict[int, optuna.trial.FrozenTrial]) -> None:
    """Reorder ``queue`` in place for the fine-tune candidates after the best plan: the energy
    threshold seed fitted to the budget first, unless a verified plan descends from it; then the
    uniform-ratio seed fitted to the budget that scores best, unless a verified plan descends from
    one; then plans of a lineage no verified plan comes from; each group in its order so far (by score).

    Why those seeds: they compress every layer alike (the same share of each layer's spectrum, the
    same share of its cost), and such plans recover from a fine-tune better than their score
    before it says. In the benchmark's last six full runs (at 0.7x and 0.5x latency, batch 1 and 8),
    the baseline that scored best after the fine-tune on the CNN was always one of them: uniform
    Tucker-2, uniform spatial or energy threshold (24 of 24). In two searches as the benchmark runs
    them on its CNN at 0.5x latency, with every plan under the target fine-tuned, the energy seed
    scored 0.34 and 0.40 validation accuracy before a one-epoch fine-tune, ninth and fifth of the
    plans, and after it test accuracy 0.941 and 0.961, second and first; the best plans before it
    reached 0.918 and 0.930. In two more such searches, the uniform Tucker-2 seed was eighth of nine
    plans before the fine-tune at batch 1 (0.35) and first after it, on validation (0.950) and test
    (0.969); at batch 8, seventh of eight before and fourth on test after (0.948; the best 0.957).

    Why other lineages: the best plans are mostly neighbours of one another (a move or two apart)
    and recover alike from a fine-tune, so fine-tuning several of them tells little. On the
    benchmark's CNN at 0.7x latency, the four best plans before fine-tuning all descended from one
    seed (validation accuracy 0.978-0.989 after a fine-tune, test 0.981-0.991); the best plan of
    another lineage, fifth before, tied the best of them on validation after it (0.989) and had the
    best test accuracy (0.994).
    """
    uniform_verified = any(is_uniform_fit(by_number[n].user_attrs.get("seed")) for n in verified_lineages
                           if n in by_number)

    def rank(trial: optuna.trial.FrozenTrial) -> tuple[bool, bool, bool]:
        new_lineage = _lineage(trial, by_number) not in verified_lineages
        seed = trial.user_attrs.get("seed")
        energy = new_lineage and seed == ENERGY_FIT_SEED
        uniform = new_lineage and not uniform_verified and is_uniform_fit(seed)
        return not energy, not uniform, not new_lineage

    queue.sort(key=rank)


# A plan is left unchecked only when its expected check (``_expected_check_ms``) is more than this over
# the accepted limit: checks scatter that much around their expectation. In the benchmark's last twelve
# runs, 367 checks after a search's first measured more than 3% under it in 17%, more than 5% under it
# in 6%. Skips within 2% of the limit left better plans unchecked: on MiniLM at batch 1, 0.35x, after
# one check 5.6% over its trial's timing, five plans were expected 0.4-1.6% over the limit, the
# sensitivity seed among them (validation 0.442), and the answer was a repair scoring 0.330.
_CHECK_SCATTER = 0.05


def _expected_check_ms(trial: optuna.trial.FrozenTrial, checked: list[tuple[float, optuna.trial.FrozenTrial]],
                       predict: Callable[[optuna.trial.FrozenTrial], float]) -> float:
    """What ``trial``'s final check would likely measure, so that plans bound to miss (by more than
    ``_CHECK_SCATTER``) are not checked: its trial timing times the median ratio of the final checks
    so far (``checked``: ``(measured ms, trial)``) to their trials' timings; without both (a plan its
    trial did not time), the predictor's estimate.

    A plan's own timing beats the estimate, which is off by 10% for some plans even after the
    checks calibrated it. In a search as the benchmark runs it on its CNN at batch 1, 0.7x, the
    energy-threshold seed was timed at 0.68 of the original in its trial and predicted at 0.75 at
    the final checks, over the 0.72 limit: it was skipped as a fine-tune candidate. Checked, it
    passed, and after the fine-tune it scored best of the three candidates (validation accuracy
    0.989, against 0.983 and 0.972).
    """
    in_trial = trial.user_attrs.get("measured_latency_ms")
    ratios = [ms / t.user_attrs["measured_latency_ms"] for ms, t in checked if t.user_attrs.get("measured_latency_ms")]
    if in_trial is None or not ratios:
        return predict(trial)
    return in_trial * statistics.median(ratios)


def _place_by_score(queue: list[optuna.trial.FrozenTrial], score: float,
                    score_of: Callable[[optuna.trial.FrozenTrial], float | None]) -> int:
    """Where a plan scoring ``score`` goes in ``queue`` (best score first): before the first plan it
    outscores or that has no score (plans rechecked after a miss in the trials)."""
    return next((i for i, t in enumerate(queue) if (s := score_of(t)) is None or s < score), len(queue))


def _result(
    study: optuna.Study, search: TrialRunner, targets: Targets, baseline: ModelStats,
    verified: list[tuple[optuna.trial.FrozenTrial, CompressionPlan, nn.Module, float, float]],
    finetune_fn: FineTuneFn | None,
) -> SearchResult:
    """The result for the best verified plan, or, with ``finetune_fn``, the best after fine-tuning."""
    index, model, records, message = 0, verified[0][2], None, ""
    if finetune_fn is not None:
        index, model, records = pick_after_finetune([(t, p, m, ms) for t, p, m, ms, _ in verified], finetune_fn,
                                                    search.score)
        chosen = records[index]
        message = (f"fine-tuned {len(records)} verified plans with finetune_fn and kept the best after "
                   f"fine-tuning: trial {chosen.trial}, score {chosen.score:.4f} before, {chosen.score_after:.4f} after "
                   "(the plan rebuilds the model before fine-tuning)")
        log.info(message)
    trial, plan, _, measured_ms, spread = verified[index]
    score = records[index].score_after if records is not None else search.score(model)
    final = ModelStats(measured_ms, spread, count_flops(model, search.inputs), count_params(model), score)
    plan.metadata.update({"targets": targets.as_dict(), "trial": trial.number, "study": study.study_name,
                          "baseline": baseline.to_dict(), "final": final.to_dict(),
                          "layer_specs": [c.spec.to_dict() for c in search.candidates]})
    if records is not None:
        plan.metadata["fine_tune"] = {"chosen_trial": trial.number, "candidates": [r.to_dict() for r in records]}
    if search.predictor is not None:
        plan.metadata["latency_prediction_error"] = search.predictor.error_summary()
    return SearchResult(
        model=model, plan=plan, study=study, baseline=baseline, final=final,
        pareto=pareto_points(study, search.fingerprint), targets=targets.as_dict(),
        prediction_error=search.predictor.error_summary() if search.predictor is not None else None,
        message=message, fine_tuned=records,
    )


def _finish(
    study: optuna.Study, search: TrialRunner, targets: Targets, baseline: ModelStats, tolerance: float,
    finetune_fn: FineTuneFn | None = None, finetune_candidates: int = 1, max_verifications: int = 10,
    sensitivity: SensitivityTable | None = None,
) -> SearchResult:
    """Pick the best feasible plan whose measured latency really meets the target.

    Candidates are tried best quality first, each rebuilt from the original and timed alternately
    with it (``TrialRunner.verified_latency``). Each measurement also calibrates the latency
    predictor; after the first check, a candidate whose check would likely miss by more than checks
    scatter (``_expected_check_ms``: its trial timing scaled as the checks so far scaled theirs;
    ``_CHECK_SCATTER``) is skipped without being measured. A plan that misses by a little is
    repaired (``_repair``), and the repair is checked in its turn by score. When no trial met a
    latency target, the ``_RECHECKS`` plans that missed it by the least are checked the same way
    before giving up. An answer at the target also gets a spare cut under it on the Pareto front
    (``_headroom_cut``). With ``finetune_fn``, ``finetune_candidates`` plans that pass are fine-tuned
    - the best one, then the energy-threshold seed and the best uniform-ratio seed fitted to the
    budget, then the best of other lineages (``_fine_tune_order``) - and the best after fine-tuning is
    returned (``ranksearch.finetune``).
    """
    trials = study.trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    if failed and not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        reasons = {t.user_attrs.get("error", "unknown error") for t in failed}
        raise EvaluationError(
            f"every trial failed to evaluate ({len(failed)} failed, the others broke the budget): "
            f"{'; '.join(sorted(reasons))[:500]}; fix eval_fn so it returns a finite number for any model"
        )
    want = finetune_candidates if finetune_fn is not None else 1
    checked: list[tuple[float, optuna.trial.FrozenTrial]] = []
    verified: list[tuple[optuna.trial.FrozenTrial, CompressionPlan, nn.Module, float, float]] = []
    limit = targets.latency_ms * (1 + tolerance) if targets.latency_ms is not None else None
    repairs = 0
    unmeasured: dict[int, float] = {}  # scores of repairs their trial did not score, by trial number

    def score_of(trial: optuna.trial.FrozenTrial) -> float | None:
        return trial.values[0] if trial.values else unmeasured.get(trial.number)

    def check_in_turn(queue: list[optuna.trial.FrozenTrial], skip_predicted_misses: bool) -> None:
        """Check ``queue``'s plans in order until enough pass; a near miss queues its repair. After the
        first plan passes, further fine-tune candidates come in ``_fine_tune_order``."""
        nonlocal repairs
        while queue and len(checked) < max_verifications + want - 1 and len(verified) < want:
            if verified:
                by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
                _fine_tune_order(queue, {_lineage(t, by_number) for t, *_ in verified}, by_number)
            trial = queue.pop(0)
            if (skip_predicted_misses and search.predictor is not None and checked and limit is not None
                    and trial.user_attrs.get("move") != "repair"):
                expected_ms = _expected_check_ms(trial, checked,
                                                 lambda t: search.predictor.predict(plan_of(t, search.fingerprint)))
                if expected_ms > limit * (1 + _CHECK_SCATTER):
                    timing_log.debug("trial %d not checked: its check would measure about %.3f ms, over the %.3f ms "
                                     "limit by more than its checks scatter", trial.number, expected_ms, limit)
                    continue
            measured_ms = check(trial)
            if (limit is None or measured_ms <= limit or search.predictor is None or repairs >= _REPAIRS
                    or measured_ms > limit * (1 + _REPAIRABLE)):
                continue
            repairs += 1
            for repaired in _repair(study, search, trial, measured_ms, sensitivity):
                if repaired.values is None:  # ruled out by its own trial timing: score it to place it
                    unmeasured[repaired.number] = search.score(
                        apply_plan(search.reference, plan_of(repaired, search.fingerprint)).eval())
                queue.insert(_place_by_score(queue, score_of(repaired), score_of), repaired)

    def check(trial: optuna.trial.FrozenTrial) -> float:
        plan = plan_of(trial, search.fingerprint)
        model = apply_plan(search.reference, plan).eval()
        measured_ms, spread = search.verified_latency(model, limit_ms=limit)
        in_trial = trial.user_attrs.get("measured_latency_ms")
        timing_log.debug("final check of trial %d (%s): %.3f ms (spread %.2f); its trial timed it at %s",
                         trial.number, trial.user_attrs.get("seed") or trial.user_attrs.get("move", "sampled"),
                         measured_ms, spread, "no time" if in_trial is None else f"{in_trial:.3f} ms")
        if search.predictor is not None:
            search.predictor.record(plan, measured_ms)
        checked.append((measured_ms, trial))
        # kept in the study, so result.pareto (and a report) can tell which plans failed this check
        study.set_user_attr("final_checks", {**study.user_attrs.get("final_checks", {}), str(trial.number): measured_ms})
        if limit is None or measured_ms <= limit:
            verified.append((trial, plan, model, measured_ms, spread))
        else:
            log.info("trial %d: measured %.3f ms misses the %.3f ms target; trying the next best plan",
                     trial.number, measured_ms, targets.latency_ms)
        return measured_ms

    # up to max_verifications checks, and one more per extra plan wanted
    check_in_turn(_distinct_plans(best_feasible(trials)), skip_predicted_misses=True)
    if not verified and limit is not None:
        # A slow spell on the machine while the trials were timed (a noisy neighbour, another job)
        # makes every plan miss, and a predictor calibrated on those timings then rules out the rest
        # unmeasured. Before giving up, the plans that missed by the least get the interleaved check,
        # which cancels such a spell.
        checked_numbers = {t.number for _, t in checked}
        closest = [t for t in _closest_latency_misses(study.trials) if t.number not in checked_numbers][:_RECHECKS]
        if closest:
            log.info("no plan met the latency target in the trials; checking the %d that missed it by the least "
                     "again, alternately with the original", len(closest))
        check_in_turn(closest, skip_predicted_misses=False)
    if verified:
        answer, _, _, verified_ms, _ = verified[0]
        _headroom_cut(study, search, answer, verified_ms, targets.latency_ms, sensitivity)
        return _result(study, search, targets, baseline, verified, finetune_fn)
    # nothing met the budget: report the best achievable
    best_plan, best_ms = None, None
    if checked:
        best_ms, best_trial = min(checked, key=lambda item: item[0])
        best_plan = plan_of(best_trial, search.fingerprint)
    else:
        candidates = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                      and "plan" in t.user_attrs]
        if candidates:
            key = "predicted_latency_ms" if targets.latency_ms is not None else "flops"
            best_trial = min(candidates, key=lambda t: t.user_attrs.get(key, math.inf))
            best_plan = plan_of(best_trial, search.fingerprint)
            best_ms = best_trial.user_attrs.get("predicted_latency_ms")
    achievable = f"; the fastest plan found runs in {best_ms:.3f} ms" if best_ms is not None else ""
    raise TargetUnreachableError(
        f"no plan met the budget {json.dumps(targets.as_dict())} in {len(study.trials)} trials{achievable}; relax the "
        "target, run more trials, or widen the search space",
        best_plan=best_plan, best_latency_ms=best_ms, study=study,
    )
