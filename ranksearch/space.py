"""Search spaces: which methods to try on which layers, and how ranks are parametrised.

Spaces are declarative YAML files (``search_spaces/*.yaml`` ships ``default``, ``convnet`` and
``transformer``), read with ``yaml.safe_load`` - data only, never evaluated. Keys::

    name: my-space
    description: one line
    methods:                 # layer kind -> methods to try besides keeping the layer
      linear: [svd]
      conv2d: [channel, tucker2]
    cost_fraction: {low: 0.05, high: 0.9, step: 0.05}
    round_to: 8              # rank multiple
    min_flops_share: 0.01    # smaller layers are kept
    skip: ["classifier", "re:.*attention.*"]

Ranks are searched as a *cost fraction*: the replacement of a layer may cost that fraction of the
original layer's FLOPs (parameters for layers without FLOPs). The same value means comparable
compression on every layer, whatever its shape or method. Fractions move in ``step``s, so each
layer has a bounded number of distinct ranks: every one is factorized (and timed) once, then reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .decompose import get_method
from .decompose.base import Rank
from .exceptions import SearchSpaceError, UnknownMethodError
from .layers import LAYER_TYPES, LayerSpec

__all__ = ["SearchSpace", "LayerCandidates", "load_space", "list_spaces", "round_rank"]

_KEYS = {"name", "description", "methods", "cost_fraction", "round_to", "min_flops_share", "skip"}


def round_rank(method_name: str, spec: LayerSpec, rank: Rank, multiple: int) -> Rank:
    """Round each rank to the nearest multiple of ``multiple`` inside the method's bounds."""
    if multiple <= 1:
        return rank
    low, high = get_method(method_name).rank_bounds(spec)

    def one(r: int, lo: int, hi: int) -> int:
        rounded = max(multiple, int(round(r / multiple)) * multiple)
        return min(hi, max(lo, rounded))

    if isinstance(rank, tuple):
        return tuple(one(r, lo, hi) for r, lo, hi in zip(rank, low, high))  # type: ignore[arg-type]
    return one(int(rank), int(low), int(high))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerCandidates:
    """What the search may choose for one layer: ``keep`` or one of ``methods``."""

    spec: LayerSpec
    methods: tuple[str, ...]
    #: why methods were dropped or the layer is kept outright, for the report
    notes: tuple[str, ...] = ()

    @property
    def searchable(self) -> bool:
        return bool(self.methods)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search space."""

    name: str
    methods: Mapping[str, tuple[str, ...]]
    cost_fraction_low: float = 0.05
    cost_fraction_high: float = 0.9
    cost_fraction_step: float = 0.05
    round_to: int = 1
    min_flops_share: float = 0.0
    skip: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)

    # --- parsing -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> SearchSpace:
        """Validate and build a space; errors name the offending key.

        Raises:
            SearchSpaceError: for unknown keys, wrong types, unknown methods or layer kinds.
        """
        where = f"search space {source}"
        if not isinstance(data, Mapping):
            raise SearchSpaceError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise SearchSpaceError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_KEYS))}")
        methods_raw = data.get("methods")
        if not isinstance(methods_raw, Mapping) or not methods_raw:
            raise SearchSpaceError(f"{where}: key 'methods' must map layer kinds to lists of method names")
        methods: dict[str, tuple[str, ...]] = {}
        kinds = sorted(set(LAYER_TYPES.values()))
        for kind, names in methods_raw.items():
            if kind not in kinds:
                raise SearchSpaceError(f"{where}: key 'methods.{kind}' is not a layer kind; valid: {', '.join(kinds)}")
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise SearchSpaceError(f"{where}: key 'methods.{kind}' must be a list of method names")
            for name in names:
                try:
                    get_method(str(name))
                except UnknownMethodError as exc:
                    raise SearchSpaceError(f"{where}: key 'methods.{kind}': {exc}") from None
            methods[kind] = tuple(str(n).lower() for n in names)
        fraction = data.get("cost_fraction", {})
        if not isinstance(fraction, Mapping) or set(fraction) - {"low", "high", "step"}:
            raise SearchSpaceError(f"{where}: key 'cost_fraction' must be {{low: ..., high: ..., step: ...}}")
        low, high, step = fraction.get("low", 0.05), fraction.get("high", 0.9), fraction.get("step", 0.05)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, step)) or not 0 < low < high <= 1:
            raise SearchSpaceError(f"{where}: key 'cost_fraction' needs 0 < low < high <= 1, got low={low!r}, high={high!r}")
        if not 0 < step <= high - low:
            raise SearchSpaceError(f"{where}: key 'cost_fraction.step' must be in (0, high - low], got {step!r}")
        high = low + step * math.floor((high - low) / step + 1e-9)  # Optuna needs high on the grid
        round_to = data.get("round_to", 1)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise SearchSpaceError(f"{where}: key 'round_to' must be a positive int, got {round_to!r}")
        share = data.get("min_flops_share", 0.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise SearchSpaceError(f"{where}: key 'min_flops_share' must be a number in [0, 1), got {share!r}")
        skip = data.get("skip") or []
        if isinstance(skip, str) or not isinstance(skip, Sequence):
            raise SearchSpaceError(f"{where}: key 'skip' must be a list of names or 're:' patterns")
        for pattern in skip:
            if str(pattern).startswith("re:"):
                try:
                    re.compile(str(pattern)[3:])
                except re.error as exc:
                    raise SearchSpaceError(f"{where}: key 'skip': bad pattern {pattern!r} ({exc})") from None
        return cls(
            name=str(data.get("name", Path(source).stem)), methods=methods,
            cost_fraction_low=float(low), cost_fraction_high=round(float(high), 10), cost_fraction_step=float(step),
            round_to=round_to,
            min_flops_share=float(share), skip=tuple(str(s) for s in skip),
            description=str(data.get("description", "")), source=source,
        )

    @property
    def digest(self) -> str:
        """Short hash of the space's content (a resumed study must use the same space)."""
        content = {
            "methods": {k: list(v) for k, v in sorted(self.methods.items())},
            "cost_fraction": [self.cost_fraction_low, self.cost_fraction_high, self.cost_fraction_step],
            "round_to": self.round_to, "min_flops_share": self.min_flops_share, "skip": list(self.skip),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    # --- applying to a model -------------------------------------------------------------------

    def is_skipped(self, name: str) -> bool:
        for pattern in self.skip:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif pattern == name:
                return True
        return False

    def candidates(self, specs: Sequence[LayerSpec]) -> list[LayerCandidates]:
        """Per layer, the methods this space allows that apply to it, with notes on what was dropped."""
        total_flops = sum(spec.flops for spec in specs) or 1
        result = []
        for spec in specs:
            notes: list[str] = []
            allowed: list[str] = []
            if self.is_skipped(spec.name):
                notes.append("skipped by the search space")
            elif spec.kind not in self.methods:
                notes.append(f"the search space has no methods for {spec.kind} layers")
            elif spec.flops and spec.flops / total_flops < self.min_flops_share:
                notes.append(
                    f"{spec.flops / total_flops:.1%} of the model's FLOPs, under min_flops_share "
                    f"{self.min_flops_share:.1%}"
                )
            else:
                for name in self.methods[spec.kind]:
                    method = get_method(name)
                    reason = method.unsupported_reason(spec)
                    if reason is not None:
                        notes.append(f"{name}: {reason}")
                    elif self.rank_for(spec, name, self.cost_fraction_high) is None:
                        notes.append(f"{name}: no rank is cheaper than the original layer")
                    else:
                        allowed.append(name)
            result.append(LayerCandidates(spec=spec, methods=tuple(allowed), notes=tuple(notes)))
        return result

    def grid(self) -> list[float]:
        """The cost fractions a trial can sample, ``cost_fraction_low`` to ``cost_fraction_high`` by
        ``cost_fraction_step``, cheapest first."""
        steps = math.floor((self.cost_fraction_high - self.cost_fraction_low) / self.cost_fraction_step + 1e-9)
        return [round(self.cost_fraction_low + k * self.cost_fraction_step, 10) for k in range(steps + 1)]

    def snap(self, cost_fraction: float) -> float:
        """The nearest cost fraction on the space's grid."""
        steps = round((cost_fraction - self.cost_fraction_low) / self.cost_fraction_step)
        snapped = self.cost_fraction_low + self.cost_fraction_step * steps
        return round(min(self.cost_fraction_high, max(self.cost_fraction_low, snapped)), 10)

    def rank_for(self, spec: LayerSpec, method_name: str, cost_fraction: float) -> Rank | None:
        """The rounded rank of ``method_name`` on ``spec`` whose cost is about ``cost_fraction`` of the layer.

        The smallest rank when even that costs more than asked; ``None`` when no rank costs less than
        the original layer. Rounding never crosses the break-even rank.
        """
        method = get_method(method_name)
        rank = method.rank_for_cost_fraction(spec, cost_fraction)
        if rank is None:
            # even the smallest rank costs more than asked: it is still the most this method can save
            rank = method.rank_from_scale(spec, 0.0)
            if method.rank_for_cost_fraction(spec, 1.0) is None or _exceeds(rank, method.break_even_rank(spec)):
                return None
        rounded = round_rank(method_name, spec, rank, self.round_to)
        break_even = method.break_even_rank(spec)
        if break_even is None:
            return None
        if _exceeds(rounded, break_even):
            return rank  # rounding up would make the layer slower than the original
        return rounded

    def smallest_ranks(self, cand: LayerCandidates) -> list[tuple[str, Rank]]:
        """Each of the layer's methods with the smallest rank this space gives it (at ``cost_fraction_low``);
        methods with no rank that saves anything are left out."""
        ranks = ((method, self.rank_for(cand.spec, method, self.cost_fraction_low)) for method in cand.methods)
        return [(method, rank) for method, rank in ranks if rank is not None]

    @staticmethod
    def cost_fraction_of(spec: LayerSpec, method_name: str, rank: Rank) -> float:
        """The share of the layer's FLOPs (its parameters, for layers without FLOPs) ``rank`` costs:
        the inverse of :meth:`rank_for`, before snapping to the grid."""
        cost = get_method(method_name).cost(spec, rank)
        return cost.flops / spec.flops if spec.flops else cost.params / spec.params


def _exceeds(rank: Rank, limit: Rank) -> bool:
    if isinstance(rank, tuple):
        return any(r > lim for r, lim in zip(rank, limit))  # type: ignore[arg-type]
    return int(rank) > int(limit)  # type: ignore[arg-type]


def list_spaces() -> list[str]:
    """Names of the search spaces shipped with ranksearch."""
    folder = resources.files("ranksearch.search_spaces")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_space(space: str | Path | Mapping[str, Any] | SearchSpace | None = None) -> SearchSpace:
    """A shipped space by name, a YAML file by path, a dict, or ``None`` for ``default``.

    Raises:
        SearchSpaceError: if the name is unknown, the file unreadable or not valid YAML, or a key invalid.
    """
    if isinstance(space, SearchSpace):
        return space
    if space is None:
        space = "default"
    if isinstance(space, Mapping):
        return SearchSpace.from_dict(space)
    text_source = str(space)
    path = Path(text_source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SearchSpaceError(f"cannot read search space file {text_source!r}: {exc.strerror or exc}") from exc
    else:
        if text_source not in list_spaces():
            raise SearchSpaceError(
                f"unknown search space {text_source!r}; shipped spaces: {', '.join(list_spaces())} "
                "(or pass a path to a YAML file)"
            )
        text = resources.files("ranksearch.search_spaces").joinpath(f"{text_source}.yaml").read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space {text_source!r} is not valid YAML: {exc}") from exc
    return SearchSpace.from_dict(data, source=text_source)
