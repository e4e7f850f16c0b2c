"""The plans ranksearch is compared with: one-shot heuristics, AIMET's greedy selection, tensorly-torch.

Each builder returns *choices* (``layer name -> (method, rank)``; layers left out are kept) for
the candidate layers of a search space, so that every baseline touches exactly the layers the
search may touch, with ranks rounded the same way (:meth:`ranksearch.SearchSpace.rank_for`).
The benchmark (``compare.py``) tunes each builder's one knob to the measured latency target.

* :func:`uniform_choices` - one cost fraction for every layer, per family (Tucker-2, spatial,
  SVD...): the "same ratio everywhere" plan most papers compare with.
* :func:`heuristic_choices` - VBMF (Kim et al., ICLR 2016: Tucker-2 ranks from VBMF of the
  unfoldings, SVD for linear layers) or an energy threshold ``tau``, through
  :func:`ranksearch.seed_plans`.
* :func:`greedy_layer_scores` / :func:`greedy_choices` - AIMET's *greedy compression-ratio
  selection* (Qualcomm AIMET user guide, "Greedy Compression Ratio Selection"): each layer alone
  is compressed at the candidate ratios 0.1, 0.2, ... 0.9 (1.0 = kept) and the model scored; for
  a shared quality level, each layer takes the most aggressive ratio before its score falls below
  that level; the level is then searched so that the whole model meets the budget. AIMET
  compresses k x k convs by spatial SVD; 1x1 convs and linear layers, which spatial SVD cannot
  split, get AIMET's other scheme for them, weight SVD (``svd`` here).
* :func:`tltorch_model` - tensorly-torch's ``FactorizedConv.from_conv`` /
  ``FactorizedLinear.from_linear`` on the same layers, at one parameter ratio for all, as the
  package ships them.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

import ranksearch
from ranksearch import CompressionPlan, LayerChoice, SearchSpace
from ranksearch.decompose.base import Rank
from ranksearch.plan import KEEP
from ranksearch.rebuild import replace_modules
from ranksearch.space import LayerCandidates

__all__ = [
    "GREEDY_RATIOS",
    "Choices",
    "GreedyAnalysis",
    "choices_key",
    "greedy_choices",
    "greedy_layer_scores",
    "greedy_method",
    "heuristic_choices",
    "make_plan",
    "timing_model",
    "tltorch_model",
    "uniform_choices",
]

#: layer name -> (method, rank); layers not listed are kept
Choices = dict[str, tuple[str, Rank]]

#: AIMET's default candidates (``num_comp_ratio_candidates=10``): 0.1 ... 0.9, and 1.0 = no compression
GREEDY_RATIOS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))


# --- plans -------------------------------------------------------------------------------------


def make_plan(model: nn.Module, choices: Mapping[str, tuple[str, Rank]], origin: str) -> CompressionPlan:
    """A :class:`~ranksearch.CompressionPlan` for ``model`` from ``choices``."""
    layers = [LayerChoice(name, method, rank, origin=origin) for name, (method, rank) in choices.items()
              if method != KEEP]
    return CompressionPlan.for_model(model, layers, metadata={"origin": origin})


def choices_key(choices: Mapping[str, tuple[str, Rank]]) -> str:
    """A stable text key of a set of choices (two baselines that land on the same plan share it)."""
    return ";".join(f"{name}={method}:{rank}" for name, (method, rank) in sorted(choices.items()))


def timing_model(model: nn.Module, choices: Mapping[str, tuple[str, Rank]]) -> nn.Module:
    """The compressed model's structure with random weights, for timing only.

    Latency does not depend on the values, and skipping the factorizations keeps a bisection of
    ten or more steps cheap; the final plan is always rebuilt with real weights.
    """
    plan = make_plan(model, choices, "timing")
    compressed = ranksearch.apply_plan(model, plan, load_weights=False)
    with torch.no_grad():
        for name in choices:  # structure() may leave weights uninitialised (NaN, denormals distort timing)
            for param in compressed.get_submodule(name).parameters():
                param.normal_(0.0, 0.02)
    return compressed.eval()


# --- uniform ratio, heuristics -----------------------------------------------------------------


def _fallback(cand: LayerCandidates, family: str) -> str | None:
    """The method a family plan uses on a layer the family does not apply to (1x1 convs, linear
    layers for spatial / Tucker-2): SVD where the space allows it, else the layer is kept."""
    if family in cand.methods:
        return family
    return "svd" if "svd" in cand.methods else None


def uniform_choices(candidates: Sequence[LayerCandidates], space: SearchSpace, family: str,
                    fraction: float) -> Choices:
    """Every candidate layer at ``fraction`` of its FLOPs with ``family`` (SVD where it does not apply).

    Args:
        candidates: the search space's candidates for the model (``space.candidates(specs)``).
        space: the space, for its rank rounding.
        family: a method name, e.g. ``"tucker2"``, ``"spatial"``, ``"svd"``.
        fraction: the cost fraction in (0, 1] given to every layer.
    """
    choices: Choices = {}
    for cand in candidates:
        method = _fallback(cand, family)
        if method is None:
            continue
        rank = space.rank_for(cand.spec, method, fraction)
        if rank is not None:
            choices[cand.spec.name] = (method, rank)
    return choices


def heuristic_choices(model: nn.Module, candidates: Sequence[LayerCandidates], space: SearchSpace, *,
                      heuristic: str, tau: float | None = None) -> Choices:
    """The VBMF plan (``heuristic="vbmf"``) or the energy-threshold plan at ``tau``, from
    :func:`ranksearch.seed_plans` (Tucker-2 for k x k convs where registered, SVD otherwise)."""
    specs = [c.spec for c in candidates if c.searchable]
    taus = () if heuristic == "vbmf" else (float(tau),)  # type: ignore[arg-type]
    plans = ranksearch.seed_plans(model, None, taus=taus, specs=specs, round_to=space.round_to)
    plan = plans[0] if heuristic == "vbmf" else plans[-1]
    return {c.name: (c.method, c.rank) for c in plan.replaced}  # type: ignore[misc]


# --- AIMET greedy compression-ratio selection --------------------------------------------------


def greedy_method(cand: LayerCandidates) -> str | None:
    """Spatial SVD on k x k convs, weight SVD on the rest (AIMET's two SVD schemes)."""
    return _fallback(cand, "spatial")


@dataclass
class GreedyAnalysis:
    """AIMET's eval-scores dictionary: each layer's score when it alone is compressed at each ratio.

    Attributes:
        scores: layer name -> {ratio: score}; ratio 1.0 (the layer kept) scores as the original.
        baseline: the original model's score.
        seconds: wall time of the analysis.
        evaluations: how many models were scored.
    """

    scores: dict[str, dict[float, float]]
    baseline: float
    seconds: float
    evaluations: int
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def score_range(self) -> tuple[float, float]:
        """Lowest and highest score in the dictionary (the search range of the quality level)."""
        values = [s for per_layer in self.scores.values() for s in per_layer.values()]
        return min(values), max(values)


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    original = model.get_submodule(name)
    replace_modules(model, original, replacement)
    try:
        yield
    finally:
        replace_modules(model, replacement, original)


def greedy_layer_scores(model: nn.Module, candidates: Sequence[LayerCandidates], space: SearchSpace,
                        score: Callable[[nn.Module], float], *,
                        ratios: Sequence[float] = GREEDY_RATIOS) -> GreedyAnalysis:
    """Score the model with each candidate layer alone compressed at each ratio (AIMET's analysis).

    The ratio is the layer's cost fraction (MACs, as AIMET's default cost metric), mapped to a
    rank by ``space.rank_for``; a ratio no rank reaches is scored at the smallest rank.
    """
    started = time.perf_counter()
    work = copy.deepcopy(model).eval()
    baseline = float(score(work))
    scores: dict[str, dict[float, float]] = {}
    methods: dict[str, str] = {}
    evaluations = 1
    for cand in candidates:
        method = greedy_method(cand)
        if method is None:
            continue
        layer = work.get_submodule(cand.spec.name)
        per_ratio: dict[float, float] = {1.0: baseline}
        done: dict[Any, float] = {}
        for ratio in ratios:
            rank = space.rank_for(cand.spec, method, ratio)
            if rank is None:  # even the smallest rank costs more than this ratio
                rank = ranksearch.get_method(method).rank_bounds(cand.spec)[0]
            key = str(rank)
            if key not in done:  # rounding can map two ratios to one rank: score it once
                replacement = ranksearch.decompose(layer, method, rank, name=cand.spec.name).eval()
                with _swapped(work, cand.spec.name, replacement):
                    done[key] = float(score(work))
                evaluations += 1
            per_ratio[ratio] = done[key]
        scores[cand.spec.name] = per_ratio
        methods[cand.spec.name] = method
    return GreedyAnalysis(scores, baseline, time.perf_counter() - started, evaluations, methods)


def _layer_ratio(per_ratio: Mapping[float, float], level: float) -> float | None:
    """AIMET's rule: walking from the least to the most compression, the last ratio before the
    score falls below ``level`` (``None``: keep the layer)."""
    ordered = sorted(per_ratio, reverse=True)  # 1.0 first
    if level > per_ratio[ordered[0]]:
        return None
    if level < per_ratio[ordered[-1]]:
        return ordered[-1]
    for previous, ratio in pairwise(ordered):
        if level > per_ratio[ratio]:
            return previous
    return ordered[-1]


def greedy_choices(analysis: GreedyAnalysis, candidates: Sequence[LayerCandidates], space: SearchSpace,
                   level: float) -> Choices:
    """Per-layer ratios for a shared quality ``level`` (higher level: less compression)."""
    choices: Choices = {}
    for cand in candidates:
        per_ratio = analysis.scores.get(cand.spec.name)
        if per_ratio is None:
            continue
        ratio = _layer_ratio(per_ratio, level)
        if ratio is None or ratio >= 1.0:
            continue
        method = analysis.methods[cand.spec.name]
        rank = space.rank_for(cand.spec, method, ratio)
        if rank is None:
            rank = ranksearch.get_method(method).rank_bounds(cand.spec)[0]
        choices[cand.spec.name] = (method, rank)
    return choices


# --- tensorly-torch ----------------------------------------------------------------------------


def tltorch_model(model: nn.Module, names: Sequence[str], ratio: float, *, factorization: str,
                  implementation: str, decompose: bool = True) -> nn.Module:
    """A copy of ``model`` with the named Conv2d / Linear layers replaced by tensorly-torch layers.

    Args:
        model: the original (not modified).
        names: the layers to replace.
        ratio: tensorly-torch's ``rank`` as a float: the share of the layer's parameters to keep.
        factorization: ``"tucker"``, ``"cp"``...
        implementation: ``"factorized"`` (contract the factors with the input) or
            ``"reconstructed"`` (rebuild the full weight at every call; what ``from_conv`` /
            ``from_linear`` default to).
        decompose: ``False`` for random factors (timing only: no decomposition is run).

    Raises:
        ImportError: when tensorly-torch is not installed.
    """
    import tltorch
    from tltorch.utils import get_tensorized_shape

    compressed = copy.deepcopy(model)
    for name in names:
        layer = compressed.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            new: nn.Module = tltorch.FactorizedConv.from_conv(
                layer, rank=ratio, factorization=factorization, implementation=implementation,
                decompose_weights=decompose)
        elif isinstance(layer, nn.Linear):
            if decompose:
                new = tltorch.FactorizedLinear.from_linear(
                    layer, rank=ratio, factorization=factorization, implementation=implementation)
            else:  # from_linear always decomposes; the constructor gives the same structure, random
                shape_in, shape_out = get_tensorized_shape(layer.in_features, layer.out_features, order=3,
                                                           min_dim=2, verbose=False)
                new = tltorch.FactorizedLinear(shape_in, shape_out, bias=layer.bias is not None,
                                               factorization=factorization, rank=ratio,
                                               implementation=implementation)
        else:
            continue
        if not decompose:
            with torch.no_grad():
                for param in new.parameters():
                    param.normal_(0.0, 0.02)
        replace_modules(compressed, layer, new)
    return compressed.eval()

