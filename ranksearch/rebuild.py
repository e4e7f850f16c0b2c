"""apply_plan(): a new model from an original model and a CompressionPlan.

The original is deep-copied first and never modified. Every choice is validated (layer exists,
method applies, rank in bounds, weights finite) before any decomposition work starts.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .batchnorm import recalibrate_batchnorm
from .decompose import get_method
from .decompose.base import DecompositionMethod, Rank
from .exceptions import InvalidWeightsError, PlanMismatchError, UnsupportedLayerError
from .layers import LayerSpec, check_module, layer_kind, spec_from_module
from .plan import CompressionPlan, LayerChoice

__all__ = ["apply_plan", "replace_modules", "module_names", "check_finite_parameters"]


def module_names(model: nn.Module, target: nn.Module) -> list[str]:
    """Every name under which ``target`` is registered in ``model`` (several when shared)."""
    return [name for name, module in model.named_modules(remove_duplicate=False) if module is target]


def replace_modules(model: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Swap ``target`` for ``replacement`` everywhere it is registered in ``model`` (in place)."""
    for name in module_names(model, target):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)


def _validated(model: nn.Module, plan: CompressionPlan) -> Iterator[tuple[LayerChoice, nn.Module, DecompositionMethod, Rank]]:
    """Check every choice against ``model`` and yield what is needed to build it."""
    plan.check_model(model)
    for choice in plan.replaced:
        module = model.get_submodule(choice.name)
        if layer_kind(module) is None:
            raise PlanMismatchError(
                f"plan layer {choice.name!r} is a {type(module).__name__}, which no method decomposes"
            )
        method = get_method(choice.method)
        spec = spec_from_module(choice.name, module)
        reason = method.unsupported_reason(spec)
        if reason is not None:
            raise UnsupportedLayerError(f"plan layer {choice.name!r}: {reason}")
        rank = method.normalize_rank(spec, choice.rank)  # type: ignore[arg-type]
        yield choice, module, method, rank


def check_finite_parameters(model: nn.Module) -> None:
    """Raise :class:`InvalidWeightsError` naming the first parameter that holds NaN or infinity."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise InvalidWeightsError(
                f"parameter {name!r} has NaN or infinite values; fix or retrain the model before compressing it"
            )


def check_finite_weights(name: str, module: nn.Module) -> None:
    weight = module.weight
    if not torch.isfinite(weight).all():
        raise InvalidWeightsError(
            f"layer {name!r} has NaN or infinite weights; fix or retrain the model before compressing it"
        )


def apply_plan(model: nn.Module, plan: CompressionPlan, *, load_weights: bool = True,
               calib_data: Iterable[Any] | None = None) -> nn.Module:
    """Return a copy of ``model`` with the plan's layers replaced; ``model`` is not modified.

    Args:
        model: the model the plan was made for.
        plan: the plan to apply.
        load_weights: if ``False``, build the structure only (no decomposition work, uninitialised
            weights): the model to ``load_state_dict`` a saved compressed model into.
        calib_data: for a plan whose search re-estimated BatchNorm statistics
            (``plan.metadata["batchnorm_recalibration"]``): the same calibration inputs, to re-estimate
            the same layers (``ranksearch.batchnorm``). Without them such a plan's model keeps the
            original's statistics, and scores lower, with a warning. Ignored for other plans.

    Raises:
        PlanMismatchError: if the plan was made for another model (naming the first mismatching
            layer), before anything is built.
        UnsupportedLayerError / InvalidRankError / UnknownMethodError: for an invalid choice.
        InvalidWeightsError: if a layer to decompose has NaN or infinite weights.

    Example:
        >>> compressed = ranksearch.apply_plan(model, CompressionPlan.load("plan.json"))
    """
    check_module(model)
    work = list(_validated(model, plan))  # every check before any building
    if load_weights:
        for choice, module, _method, _rank in work:
            check_finite_weights(choice.name, module)
    new_model = copy.deepcopy(model)
    for choice, original, method, rank in work:
        target = new_model.get_submodule(choice.name)
        if load_weights:
            # built from the original layer (same weights) so cached factorizations are reused
            replacement = method.build(original, rank, name=choice.name)
        else:
            spec: LayerSpec = spec_from_module(choice.name, target)
            replacement = method.structure(spec, rank).to(device=target.weight.device, dtype=target.weight.dtype)
        replacement.train(target.training)
        replace_modules(new_model, target, replacement)
    recalibration = plan.metadata.get("batchnorm_recalibration")
    if recalibration and load_weights:
        if calib_data is None:
            warnings.warn(
                "this plan's search re-estimated the statistics of BatchNorm layers on calibration data "
                f"({len(recalibration['layers'])} BatchNorm layers); pass the same calib_data= to apply_plan to do the same "
                "(without it the model keeps the original's statistics and scores lower)", stacklevel=2)
        else:
            modes = [(module, module.training) for module in new_model.modules()]
            recalibrate_batchnorm(new_model, calib_data, recalibration["layers"])
            for module, training in modes:  # the copy keeps the original's modes
                module.training = training
    return new_model
