"""Re-estimating BatchNorm statistics after decomposition: data-aware, no training.

A decomposed layer's outputs are close to the original layer's, but their scale and mean drift a
little, and the BatchNorm layers after it still normalise with the statistics of the original's
activations. Deep cuts compound the drift layer after layer: most of what a CNN loses to a deep
cut is this mismatch, not the discarded rank. Running a few hundred real inputs through the
compressed model with those BatchNorm layers estimating their statistics afresh (no gradient, no
parameter changes) recovers it.

Evidence, on the benchmark's ResNet-style CNN (``benchmarks/models.py``; validation accuracy of 180
images, 0.989 for the original): uniform Tucker-2 at 0.2 of each layer's FLOPs 0.594 as decomposed,
0.989 with its statistics re-estimated on 128 training images, 0.983 after a one-epoch fine-tune
instead; the energy threshold at tau 0.5: 0.450, 0.983, 0.972; the VBMF plan: 0.444, 0.900, 0.872.
Across 23 plans (uniform Tucker-2 and spatial, energy thresholds, random mixed plans) every plan
scored at least as well re-estimated as decomposed, and re-estimation before the fine-tune raised
the mean after it from 0.976 to 0.986. Before re-estimation, a plan's score ranked the plans after a
fine-tune poorly (Spearman 0.02-0.76 in ``benchmarks/bench_fine_tune_candidates.py``): the search
was choosing by a mismatch the fine-tune removes.

Only the BatchNorm layers that run after the first decomposed layer are re-estimated; those before
it see unchanged inputs and keep the original's statistics (estimated on far more data than a
calibration set). The layers re-estimated are recorded in the plan
(``plan.metadata["batchnorm_recalibration"]``) so that ``apply_plan(model, plan, calib_data=...)``
rebuilds the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .exceptions import InvalidInputsError
from .layers import as_input_tuple

__all__ = ["BatchNormRecalibration", "MIN_CALIBRATION_ITEMS", "recalibrate_batchnorm", "tracked_batchnorms"]

#: fewer calibration items than this give statistics too noisy to trust: the search does not
#: re-estimate on its own (``recalibrate_batchnorm=None``) and refuses to when asked to (``True``).
#: On the benchmark's CNN, 32 images left uniform Tucker-2 at 0.2 at 0.961 validation accuracy and the
#: VBMF plan at 0.867; 64 to 1077 images, 0.989-0.994 and 0.878-0.900.
MIN_CALIBRATION_ITEMS = 32


def tracked_batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics (the ones inference uses), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}


def _items(batch: tuple[Any, ...]) -> int:
    """How many items a batch holds: the first dimension of its first tensor."""
    tensor = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 1


def recalibrate_batchnorm(model: nn.Module, calib_data: Iterable[Any], layers: Sequence[str] | None = None) -> nn.Module:
    """Re-estimate the running statistics of ``model``'s BatchNorm layers on ``calib_data``, in place.

    Args:
        model: the compressed model (e.g. from ``apply_plan``); left in eval mode.
        calib_data: an iterable of model inputs (each a tensor or a tuple of positional inputs), real
            data as the model sees it in use, e.g. a few hundred training items in batches.
        layers: the names of the BatchNorm layers to re-estimate (``apply_plan`` passes those its plan
            records: ``plan.metadata["batchnorm_recalibration"]["layers"]``); ``None``: every BatchNorm
            layer with running statistics.

    Returns:
        ``model``, with new running means and variances in those layers (the exact average over the
        batches) and nothing else changed.
    """
    found = tracked_batchnorms(model)
    names = list(found) if layers is None else list(layers)
    missing = [name for name in names if name not in found]
    if missing:
        raise InvalidInputsError(
            f"no BatchNorm layer with running statistics named {', '.join(missing[:5])} in this model; "
            "re-estimate the layers the plan records on the model apply_plan built from it")
    batches = [as_input_tuple(item) for item in calib_data]
    if not batches:
        raise InvalidInputsError("calib_data is empty: pass batches of real model inputs to re-estimate BatchNorm statistics")
    chosen = [found[name] for name in names]
    momenta = [bn.momentum for bn in chosen]
    model.eval()
    for bn in chosen:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: every batch counts alike, whatever the order
        bn.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for bn, momentum in zip(chosen, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    return model


class BatchNormRecalibration:
    """What a search re-estimates for each plan: the BatchNorm layers that run after its first
    decomposed layer, on the calibration batches.

    The order the layers run in is recorded once, on the reference model with the example inputs
    (a decomposed layer runs where the original did).
    """

    def __init__(self, reference: nn.Module, inputs: tuple[Any, ...], batches: Iterable[Any]) -> None:
        self.batches = [as_input_tuple(b) for b in batches]
        self.items = sum(_items(b) for b in self.batches)
        self._batchnorms = tracked_batchnorms(reference)
        self._first_run = _first_runs(reference, inputs)

    def layers_after(self, replaced: Iterable[str]) -> list[str]:
        """The BatchNorm layers that run after the first of the ``replaced`` layers (in run order)."""
        starts = [self._first_run[name] for name in replaced if name in self._first_run]
        if not starts:
            return []
        first = min(starts)
        return [name for name in self._batchnorms if self._first_run.get(name, -1) > first]

    def __call__(self, model: nn.Module, replaced: Iterable[str]) -> list[str]:
        """Re-estimate ``model``'s BatchNorm layers after the first ``replaced`` layer (the others keep
        the statistics they have: the reference's, in a model of ``apply_plan`` or the workbench), and
        return the names re-estimated."""
        layers = self.layers_after(replaced)
        if layers:
            recalibrate_batchnorm(model, self.batches, layers)
        return layers

    def record(self, layers: Sequence[str]) -> dict[str, Any]:
        """What a plan records about its re-estimation (``plan.metadata["batchnorm_recalibration"]``)."""
        return {"layers": list(layers), "calibration_items": self.items, "calibration_batches": len(self.batches)}


def _first_runs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, int]:
    """The position at which each named module first starts running in a forward pass on ``inputs``."""
    order: dict[str, int] = {}

    def note(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:  # returns None: the inputs pass unchanged
            order.setdefault(name, len(order))
        return hook

    handles = [module.register_forward_pre_hook(note(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order
