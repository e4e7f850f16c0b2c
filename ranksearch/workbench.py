"""A working copy of the model whose layers are swapped per trial, without copying the model again.

Each trial of a search needs the model with some layers replaced. Deep-copying and rebuilding the
whole model per trial wastes most of a trial's time; instead one working copy is kept and only the
layers whose choice changed are swapped. Replacements are built from the reference model's layers
(so cached factorizations are reused) and kept in a small LRU cache for later trials.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .batchnorm import tracked_batchnorms
from .decompose import get_method
from .decompose.base import LayerCost, Rank
from .layers import LayerSpec
from .plan import CompressionPlan
from .rebuild import check_finite_weights, replace_modules
from .space import LayerCandidates

__all__ = ["ModelWorkbench", "plan_cost", "drop_unreplaceable"]


def plan_cost(specs: Sequence[LayerSpec], plan: CompressionPlan) -> LayerCost:
    """FLOPs and parameters the plan saves, from the methods' analytic costs (no model is built)."""
    by_name = {spec.name: spec for spec in specs}
    flops = params = 0
    for choice in plan.replaced:
        spec = by_name[choice.name]
        cost = get_method(choice.method).cost(spec, choice.rank)  # type: ignore[arg-type]
        flops += spec.flops - cost.flops
        params += spec.params - cost.params
    return LayerCost(flops=flops, params=params)


class ModelWorkbench:
    """One mutable copy of ``reference`` that takes on any plan over ``specs``."""

    def __init__(self, reference: nn.Module, specs: Sequence[LayerSpec], *, cache_size: int = 512) -> None:
        self.reference = reference
        self.specs = {spec.name: spec for spec in specs}
        self.model = copy.deepcopy(reference).eval()
        self._original = {name: self.model.get_submodule(name) for name in self.specs}
        self._current = dict(self._original)
        self._cache: OrderedDict[tuple[str, str, Rank], nn.Module] = OrderedDict()
        self._cache_size = cache_size
        self._checked: set[str] = set()
        # the reference's BatchNorm statistics, given back to the working copy with every plan: a
        # search may re-estimate them for the plan scored before (ranksearch.batchnorm)
        self._batchnorm_pairs = [(bn, reference.get_submodule(name)) for name, bn in tracked_batchnorms(self.model).items()]

    def replacement(self, name: str, method: str, rank: Rank) -> nn.Module:
        """The replacement of layer ``name``, built once and then reused."""
        key = (name, method, rank)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        layer = self.reference.get_submodule(name)
        if name not in self._checked:
            check_finite_weights(name, layer)
            self._checked.add(name)
        module = get_method(method).build(layer, rank, name=name).eval()
        self._cache[key] = module
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return module

    def apply(self, plan: CompressionPlan) -> nn.Module:
        """Make the working copy match ``plan`` (other layers back to the original, BatchNorm
        statistics the reference's) and return it."""
        with torch.no_grad():
            for bn, reference_bn in self._batchnorm_pairs:
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    getattr(bn, buffer).copy_(getattr(reference_bn, buffer))
        wanted = dict(self._original)
        for choice in plan.replaced:
            wanted[choice.name] = self.replacement(choice.name, choice.method, choice.rank)  # type: ignore[arg-type]
        for name, module in wanted.items():
            if self._current[name] is not module:
                replace_modules(self.model, self._current[name], module)
                self._current[name] = module
        return self.model


def drop_unreplaceable(reference: nn.Module, inputs: tuple, candidates: Sequence[LayerCandidates]) -> list[LayerCandidates]:
    """Keep, with the reason, layers whose replacement breaks the model's forward pass.

    That happens when code outside a layer reads its attributes (``F.linear(x, self.fc.weight)``
    after also calling ``self.fc``). Each probe swaps in replacement *structures* (no
    factorization) in a copy and runs the model once; the original is not touched.
    """

    def failure(probe: Sequence[LayerCandidates]) -> Exception | None:
        work = copy.deepcopy(reference)
        for cand in probe:
            method = get_method(cand.methods[0])
            target = work.get_submodule(cand.spec.name)
            stand_in = method.structure(cand.spec, method.rank_from_scale(cand.spec, 0.0))
            replace_modules(work, target, stand_in.to(device=target.weight.device, dtype=target.weight.dtype))
        try:
            with torch.inference_mode():
                work(*inputs)
        except Exception as exc:  # whatever the model's own code raises
            return exc
        return None

    searchable = [c for c in candidates if c.searchable]
    if not searchable or failure(searchable) is None:
        return list(candidates)
    checked = []
    for cand in candidates:
        exc = failure([cand]) if cand.searchable else None
        if exc is not None:
            note = f"replacing it breaks the model's forward ({type(exc).__name__}: {exc}); kept"
            cand = LayerCandidates(spec=cand.spec, methods=(), notes=(*cand.notes, note))
        checked.append(cand)
    return checked
