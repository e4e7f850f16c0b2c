"""Every error ranksearch raises on purpose derives from :class:`RankSearchError`.

Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "RankSearchError",
    "NotAModuleError",
    "NoDecomposableLayerError",
    "InvalidInputsError",
    "InvalidTargetError",
    "TargetUnreachableError",
    "EvaluationError",
    "InvalidWeightsError",
    "DeviceUnavailableError",
    "StorageError",
    "StudyMismatchError",
    "PlanError",
    "PlanMismatchError",
    "SearchSpaceError",
    "UnknownMethodError",
    "InvalidRankError",
    "UnsupportedLayerError",
    "InvalidHeuristicError",
    "ModelLoadError",
]


class RankSearchError(Exception):
    """Root of all ranksearch errors."""


class NotAModuleError(RankSearchError, TypeError):
    """The object given as a model is not a ``torch.nn.Module``."""


class NoDecomposableLayerError(RankSearchError):
    """The model has no layer any registered method can decompose."""


class InvalidInputsError(RankSearchError):
    """The example inputs are missing or the model rejects them."""


class InvalidTargetError(RankSearchError, ValueError):
    """A budget (latency, FLOPs, params) is not a positive number or is missing."""


class TargetUnreachableError(RankSearchError):
    """No plan found meets the budget; carries the best achievable plan and cost."""

    def __init__(self, message: str, *, best_plan=None, best_latency_ms=None, best_flops=None, study=None) -> None:
        super().__init__(message)
        self.best_plan = best_plan
        self.best_latency_ms = best_latency_ms
        self.best_flops = best_flops
        self.study = study  # the Optuna study, when a search ran
        self.sensitivity = None  # the search's per-layer sensitivity table, reusable for a looser target


class EvaluationError(RankSearchError):
    """``eval_fn`` raised or returned something that is not a finite number."""


class InvalidWeightsError(RankSearchError, ValueError):
    """A layer's weights contain NaN or infinity."""


class DeviceUnavailableError(RankSearchError):
    """The requested device does not exist on this machine."""


class StorageError(RankSearchError):
    """The Optuna storage URL is malformed or cannot be reached."""


class StudyMismatchError(RankSearchError):
    """An existing study was made for another model or search space."""


class PlanError(RankSearchError, ValueError):
    """A plan file or dictionary is corrupt, malformed or of an unknown schema version."""


class PlanMismatchError(PlanError):
    """A plan is applied to a model it was not made for."""


class SearchSpaceError(RankSearchError, ValueError):
    """A search-space file is invalid; the message names the key."""


class UnknownMethodError(RankSearchError, KeyError):
    """A decomposition method name is not registered; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRankError(RankSearchError, ValueError):
    """A rank is out of the bounds a method accepts for a layer."""


class UnsupportedLayerError(RankSearchError):
    """A method cannot decompose this layer; the message says why."""


class InvalidHeuristicError(RankSearchError, ValueError):
    """A rank heuristic got invalid input (tau outside (0, 1], weakening outside [0, 1], a non-2-D matrix)."""


class ModelLoadError(RankSearchError):
    """A model file or ``module:callable`` factory cannot be loaded (missing, wrong format, untrusted pickle)."""
