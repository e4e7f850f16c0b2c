"""Seed plans: the one-shot answers of the rank heuristics, made before the search spends a trial.

:func:`seed_plans` returns the VBMF plan (Kim et al. 2016 for Tucker-2; Nakajima et al. 2013), an
optional weakened-VBMF plan (MUSCO, Gusak et al. 2019) and one energy-threshold plan per ``tau``.
Each is a :class:`~ranksearch.plan.CompressionPlan` whose choices carry their origin
(``"seed:vbmf"``, ``"seed:vbmf-weak-0.5"``, ``"seed:energy-0.90"``), so a search that starts from
them reports where its best plan came from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .decompose import get_method
from .exceptions import PlanError, PlanMismatchError
from .layers import LAYER_TYPES, LayerSpec, capture_layer_specs, check_module
from .plan import KEEP, CompressionPlan, LayerChoice
from .rank.energy import check_tau
from .rank.suggest import check_round_to, check_weakening, default_method, suggest

__all__ = ["DEFAULT_TAUS", "seed_plans"]

logger = logging.getLogger("ranksearch.seeds")

#: energy fractions of the default energy-threshold seeds
DEFAULT_TAUS: tuple[float, ...] = (0.80, 0.90, 0.95, 0.99)


def seed_plans(
    model: nn.Module,
    example_inputs: Any,
    *,
    taus: Iterable[float] = DEFAULT_TAUS,
    weakening: float | None = None,
    round_to: int = 1,
    methods: Mapping[str, str] | None = None,
    specs: Sequence[LayerSpec] | None = None,
) -> list[CompressionPlan]:
    """The heuristic seed plans for ``model``: VBMF, weakened VBMF (optional), energy per tau.

    Args:
        model: the trained model (read, not modified).
        example_inputs: inputs the model is called with, to capture each layer's input shape
            (FLOPs decide the break-even rank); may be ``None`` when ``specs`` is given.
        taus: energy fractions, one energy plan each, in (0, 1].
        weakening: if given, a weakened-VBMF plan too, keeping this fraction in [0, 1] of the
            components VBMF discards.
        round_to: round ranks up to a multiple of this (e.g. 8), never to or past break-even.
        methods: method per layer kind (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``),
            ``"keep"`` to keep that kind; kinds not listed use
            :func:`~ranksearch.rank.default_method` (svd; tucker2 or channel for k x k conv2d;
            channel for k x k conv1d). A layer its method does not support is kept, with the reason.
        specs: the layer specs to use instead of capturing them (e.g. to seed only some layers).

    Returns:
        The plans, in order: VBMF, weakened VBMF (if ``weakening`` is given), then one per tau.
        Kept layers appear as ``LayerChoice(method="keep", reason=...)``.

    Raises:
        InvalidHeuristicError: for a tau outside (0, 1], a weakening outside [0, 1] or a bad
            ``round_to``.
        UnknownMethodError: for an unknown method name in ``methods``.
        PlanError: for an unknown layer kind in ``methods``.
        InvalidInputsError: if the model rejects ``example_inputs``.
        InvalidWeightsError: if a layer's weights contain NaN or infinity.

    Example:
        >>> plans = ranksearch.seed_plans(model, torch.randn(1, 3, 32, 32), round_to=8)
        >>> [p.metadata["origin"] for p in plans]
        ['seed:vbmf', 'seed:energy-0.80', 'seed:energy-0.90', 'seed:energy-0.95', 'seed:energy-0.99']
    """
    check_module(model)
    tau_values = [check_tau(tau) for tau in taus]
    if weakening is not None:
        weakening = check_weakening(weakening)
    check_round_to(round_to)
    by_kind = _check_methods(methods)
    if specs is None:
        specs = capture_layer_specs(model, example_inputs)

    modules = dict(model.named_modules())
    layers: list[tuple[LayerSpec, nn.Module, str | None, str | None]] = []
    for spec in specs:
        if spec.name not in modules:
            raise PlanMismatchError(
                f"layer spec {spec.name!r} is not a module of this model; pass specs made from this model "
                "(ranksearch.capture_layer_specs) or leave specs out"
            )
        layers.append((spec, modules[spec.name], *_method_for(spec, by_kind)))

    configs: list[tuple[str, dict[str, Any]]] = [("seed:vbmf", {"heuristic": "vbmf"})]
    if weakening is not None:
        configs.append((f"seed:vbmf-weak-{weakening:g}", {"heuristic": "vbmf", "weakening": weakening}))
    for tau in tau_values:
        configs.append((f"seed:energy-{_tau_label(tau)}", {"heuristic": "energy", "tau": tau}))

    plans = []
    for origin, options in configs:
        choices = []
        for spec, module, method, reason in layers:
            if method is None:
                choices.append(LayerChoice(spec.name, KEEP, origin=origin, reason=reason))
                continue
            suggestion = suggest(module, spec, method, round_to=round_to, **options)
            if suggestion.rank is None:
                choices.append(LayerChoice(spec.name, KEEP, origin=origin, reason=f"{method}: {suggestion.reason}"))
            else:
                choices.append(LayerChoice(spec.name, method, suggestion.rank, origin=origin))
        metadata = {"origin": origin, **options, "round_to": round_to}
        plan = CompressionPlan.for_model(model, choices, metadata=metadata)
        logger.info("%s: %d of %d layers replaced", origin, len(plan.replaced), len(choices))
        plans.append(plan)
    return plans


def _tau_label(tau: float) -> str:
    """``0.9 -> "0.90"``, ``0.995 -> "0.995"``: two decimals unless that would merge two taus."""
    return f"{tau:.2f}" if math.isclose(round(tau, 2), tau, abs_tol=1e-12) else f"{tau:g}"


def _check_methods(methods: Mapping[str, str] | None) -> dict[str, str]:
    kinds = sorted(set(LAYER_TYPES.values()))
    by_kind: dict[str, str] = {}
    for kind, name in (methods or {}).items():
        if kind not in kinds:
            raise PlanError(f"methods: unknown layer kind {kind!r}; valid kinds: {', '.join(kinds)}")
        name = str(name).lower()
        if name != KEEP:
            name = get_method(name).name  # raises UnknownMethodError listing the valid names
        by_kind[kind] = name
    return by_kind


def _method_for(spec: LayerSpec, by_kind: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(method, None)`` for a layer to decompose, ``(None, reason)`` for one to keep."""
    name = by_kind.get(spec.kind)
    if name == KEEP:
        return None, f"{spec.kind} layers are kept (methods={{{spec.kind!r}: 'keep'}})"
    if name is None:
        name = default_method(spec)
        if name is None:
            return None, "no default method applies to this layer (e.g. a depthwise conv has no channel mixing)"
        return name, None
    reason = get_method(name).unsupported_reason(spec)
    if reason is not None:
        return None, f"{name}: {reason}"
    return name, None
