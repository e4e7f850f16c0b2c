"""The Optuna side of a search: storage, the study and its identity, reading results back from trials.

A study records what it was made for (model fingerprint, search space, budget) in its user
attributes, so resuming it with another model or space fails clearly instead of mixing trials.
Each trial stores its plan as plain JSON in ``user_attrs["plan"]``; :func:`plan_of` reads it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import optuna

from .exceptions import StorageError, StudyMismatchError
from .plan import CompressionPlan
from .result import ParetoPoint

__all__ = ["open_storage", "open_study", "is_feasible", "best_feasible", "plan_of", "pareto_points", "quiet_optuna"]


def open_storage(storage: Any) -> Any:
    """Validate an Optuna storage (URL or object) before any work is done.

    Raises:
        StorageError: for a malformed or unreachable URL.
    """
    if storage is None or not isinstance(storage, str):
        return storage
    try:
        return optuna.storages.RDBStorage(storage)
    except Exception as exc:  # sqlalchemy's errors vary by backend; all mean the same to the user
        raise StorageError(
            f"cannot open storage {storage!r} ({type(exc).__name__}: {exc}); use a database URL such as "
            "'sqlite:///study.db' or an optuna storage object"
        ) from exc


STUDY_KEY = "ranksearch"
# the ``move`` user attribute of the trials the final checks add: a near miss cut to fit, and an
# answer's spare cut under the target (``ranksearch.final_checks``; the Pareto front marks spares)
REPAIR_MOVE = "repair"
HEADROOM_MOVE = "headroom"


def open_study(
    storage: Any, study_name: str | None, *, directions: list[str], sampler: optuna.samplers.BaseSampler,
    identity: dict[str, Any],
) -> optuna.Study:
    """Create the study, or load it to resume; refuse one made for another model, space or budget."""
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=directions, sampler=sampler, load_if_exists=True,
    )
    recorded = study.user_attrs.get(STUDY_KEY)
    if recorded is None:
        if study.trials:
            raise StudyMismatchError(
                f"study {study.study_name!r} already has trials that ranksearch did not make; use another study_name"
            )
        study.set_user_attr(STUDY_KEY, identity)
        return study
    for key, what in (("model", "model"), ("space", "search space"), ("targets", "budget")):
        if recorded.get(key) != identity[key]:
            raise StudyMismatchError(
                f"study {study.study_name!r} was made for another {what} ({key}: {recorded.get(key)!r}, now "
                f"{identity[key]!r}); use a new study_name, or the same {what} to resume it"
            )
    return study


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def best_feasible(trials: Iterable[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and is_feasible(t)]
    return sorted(done, key=lambda t: (-t.values[0], t.values[1], t.number))


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # ranksearch logs failed trials itself, in one line
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def plan_of(trial: optuna.trial.FrozenTrial, fingerprint: dict[str, Any]) -> CompressionPlan:
    plan = CompressionPlan.from_dict({"layers": trial.user_attrs["plan"]})
    plan.fingerprint = fingerprint
    return plan


def pareto_points(study: optuna.Study, fingerprint: dict[str, Any]) -> list[ParetoPoint]:
    """The feasible plans on the study's front, and the headroom spares whether on it or not: a spare
    is cut from the plan returned, which with ``finetune_fn`` need not be the best before fine-tuning,
    and a faster plan that scored better before fine-tuning hides that plan's spare from the front."""
    checks = study.user_attrs.get("final_checks", {})  # trial number (str) -> ms, see final_checks.pick_answer
    front = {t.number for t in study.best_trials}
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not is_feasible(trial) or (trial.number not in front and trial.user_attrs.get("move") != HEADROOM_MOVE):
            continue
        points.append(ParetoPoint(
            trial=trial.number, plan=plan_of(trial, fingerprint), score=trial.values[0],
            latency_ms=trial.user_attrs.get("predicted_latency_ms"),
            measured_latency_ms=trial.user_attrs.get("measured_latency_ms"),
            flops=int(trial.user_attrs["flops"]), params=int(trial.user_attrs["params"]),
            checked_latency_ms=checks.get(str(trial.number)),
            spare_for=trial.user_attrs.get("neighbour_of") if trial.user_attrs.get("move") == HEADROOM_MOVE else None,
        ))
    return sorted(points, key=lambda p: -p.score)
