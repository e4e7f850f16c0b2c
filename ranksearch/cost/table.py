"""Per-layer latency table: each candidate layer and its replacements timed in isolation.

Every layer is timed alone on a random input of the shape it sees in the model (captured with
forward hooks, :attr:`LayerSpec.input_shape`); so is each replacement, built from
``method.structure(spec, rank)`` with random weights (timing does not need the factorization).
Only a few *anchor* ranks per (layer, method) are measured; the ranks in between are filled by a
monotone fit of latency against the replacement's analytic FLOPs (scikit-learn's
``IsotonicRegression``), which also covers methods whose rank is a tuple.

Measurements are cached on disk as JSON, keyed by device name, torch version, thread count and,
per entry, the layer's configuration (kind, shapes, stride, groups, dtype, input shape...),
method and rank, so a second table for the same model measures nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from torch import nn

from ..atomic import atomic_write_text
from ..decompose import get_method
from ..decompose.base import DecompositionMethod, Rank
from ..exceptions import InvalidInputsError, PlanMismatchError, UnsupportedLayerError
from ..layers import LayerSpec, capture_layer_specs, check_module
from ..plan import KEEP
from .latency import LatencyFn, _positive_int, measure_latency, resolve_device

__all__ = ["LatencyTable", "default_cache_dir"]

log = logging.getLogger("ranksearch.cost")

_CACHE_FORMAT = "ranksearch.latency-cache"
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$RANKSEARCH_CACHE_DIR``, else ``~/.cache/ranksearch``."""
    env = os.environ.get("RANKSEARCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ranksearch"


def _cpu_name() -> str:
    """The CPU model name (``platform.processor()`` is often just ``x86_64`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _device_label(device: torch.device | None, latency_fn: LatencyFn | None, device_name: str | None) -> str:
    if latency_fn is not None:
        qualname = getattr(latency_fn, "__qualname__", type(latency_fn).__name__)
        return f"custom:{device_name or getattr(latency_fn, '__module__', '') + '.' + qualname}"
    assert device is not None
    if device_name:
        return f"{device.type}:{device_name}"
    if device.type == "cpu":
        return f"cpu:{_cpu_name()}"
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _rank_key(rank: Rank) -> int | list[int]:
    return list(rank) if isinstance(rank, tuple) else int(rank)


@dataclass(frozen=True)
class _Fit:
    """A monotone fit of latency (ms) against cost for one (layer, method)."""

    regression: IsotonicRegression
    x_low: float
    x_high: float
    slope: float  # ms per cost unit, for ranks above the highest anchor
    points: tuple[tuple[Rank, float, float], ...]  # (rank, cost, measured ms)
    use_flops: bool

    def __call__(self, x: float) -> float:
        if x > self.x_high:
            return float(self.regression.predict([self.x_high])[0] + self.slope * (x - self.x_high))
        return float(self.regression.predict([x])[0])


class LatencyTable:
    """Latency of each candidate layer and of its replacements, measured in isolation.

    Args:
        model: the model the layers belong to (the original layers are copied out of it; it is
            not modified).
        example_inputs: inputs of ``model``; used to capture input shapes missing from ``specs``.
        specs: the candidate layers (from :func:`ranksearch.capture_layer_specs`).
        device: where to time; ``None`` means where the model is.
        threads: torch intra-op threads; default ``torch.get_num_threads()`` now.
        latency_fn: ``latency_fn(module, example_inputs) -> ms`` to time layers on a remote
            device instead (see :func:`ranksearch.cost.measure_latency`).
        cache_dir: where the JSON cache lives; default :func:`default_cache_dir`.
        anchors: measured ranks per (layer, method), spread from the smallest rank to the
            break-even rank (the largest no more expensive than the layer, in FLOPs).
        device_name: names the device in the cache key instead of the detected name (e.g. the
            phone behind ``latency_fn``).
        cache: ``False`` to neither read nor write the disk cache.
        min_run_time, max_spread, max_attempts, clock: passed to :func:`measure_latency` per layer
            (the clock is part of the cache key: CPU time and wall time differ).

    Attributes:
        measurements: how many real measurements this object took (0 on a warm disk cache).

    Example:
        >>> specs = ranksearch.capture_layer_specs(model, x)
        >>> table = LatencyTable(model, x, specs, threads=1)
        >>> table.saving_ms("features.3", "channel", 16)
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        specs: list[LayerSpec],
        *,
        device: str | torch.device | None = None,
        threads: int | None = None,
        latency_fn: LatencyFn | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        anchors: int = 5,
        device_name: str | None = None,
        cache: bool = True,
        min_run_time: float = 0.05,
        max_spread: float = 0.10,
        max_attempts: int = 2,
        clock: str | Callable[[], float] = "wall",
    ) -> None:
        self._model = check_module(model)
        if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 2:
            raise InvalidInputsError(f"anchors must be an int >= 2 (the ends of the fitted range), got {anchors!r}")
        self.anchors = anchors
        self._specs = self._with_shapes(model, example_inputs, specs)
        self._latency_fn = latency_fn
        self._device = None if latency_fn is not None else resolve_device(device, model)
        self.threads = _positive_int(torch.get_num_threads() if threads is None else threads, "threads")
        self._timing = {
            "min_run_time": min_run_time, "max_spread": max_spread, "max_attempts": max_attempts, "clock": clock,
        }
        self.context = {
            "device": _device_label(self._device, latency_fn, device_name),
            "torch": torch.__version__,
            "threads": self.threads,
            "clock": clock if isinstance(clock, str) else getattr(clock, "__qualname__", type(clock).__name__),
        }
        digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._cache_path = root / "latency" / f"{digest}.json"
        self._use_cache = cache
        self._entries: dict[str, dict[str, Any]] = self._load() if cache else {}
        self._new: dict[str, dict[str, Any]] = {}
        self._fits: dict[tuple[str, str], _Fit] = {}
        self._known_ms: dict[tuple[str, str, Rank | None], float] = {}
        self.measurements = 0

    # --- layers ----------------------------------------------------------------------------------

    @staticmethod
    def _with_shapes(model: nn.Module, example_inputs: Any, specs: list[LayerSpec]) -> dict[str, LayerSpec]:
        """``specs`` by name, with input shapes captured from the model where they are missing."""
        if any(s.input_shape is None for s in specs):
            captured = {s.name: s for s in capture_layer_specs(model, example_inputs)}
            filled = []
            for spec in specs:
                if spec.input_shape is None:
                    if spec.name not in captured:
                        raise InvalidInputsError(
                            f"layer {spec.name!r} is not reached by a forward pass on the example inputs, "
                            "so its input shape is unknown; leave it out of the specs"
                        )
                    spec = captured[spec.name]
                filled.append(spec)
            specs = filled
        return {s.name: s for s in specs}

    @property
    def names(self) -> list[str]:
        """The layers this table covers."""
        return list(self._specs)

    def spec(self, name: str) -> LayerSpec:
        """The :class:`LayerSpec` of layer ``name``.

        Raises:
            PlanMismatchError: if the table has no such layer.
        """
        try:
            return self._specs[name]
        except KeyError:
            raise PlanMismatchError(
                f"layer {name!r} is not in this latency table; it covers the candidate layers given "
                f"as specs ({len(self._specs)} layers, e.g. {', '.join(list(self._specs)[:3])})"
            ) from None

    # --- public queries ----------------------------------------------------------------------------

    def original_ms(self, name: str) -> float:
        """Latency of layer ``name`` alone, on a random input of its captured input shape."""
        return self._remembered((name, KEEP, None), lambda: self._measure(self.spec(name), KEEP, None))

    def layer_ms(self, name: str, method: str, rank: Rank | None) -> float:
        """Latency of layer ``name`` replaced by ``method`` at ``rank`` (``"keep"``: the original).

        Ranks that were not measured come from the monotone fit over the anchors; ranks above the
        highest anchor are extrapolated along the fit's mean slope.

        Raises:
            PlanMismatchError: unknown layer. UnknownMethodError / UnsupportedLayerError /
            InvalidRankError: for a method or rank that does not apply to this layer.
        """
        if str(method).lower() == KEEP:
            return self.original_ms(name)
        spec = self.spec(name)
        m = self._method(spec, method)
        rank = m.normalize_rank(spec, rank)  # type: ignore[arg-type]

        def from_fit() -> float:
            fit = self._fit(spec, m)
            return fit(self._cost(spec, m, rank, fit.use_flops))

        return self._remembered((name, m.name, rank), from_fit)

    def _remembered(self, key: tuple[str, str, Rank | None], compute: Callable[[], float]) -> float:
        """``compute()``, once per layer, method and rank: measurements and fits never change once
        made, and a search asks for the same layers' latencies tens of thousands of times (each
        answer builds a cache key and runs the isotonic fit: 4-6 s of a benchmark search)."""
        if key not in self._known_ms:
            try:
                self._known_ms[key] = compute()
            finally:
                self._flush()
        return self._known_ms[key]

    def saving_ms(self, name: str, method: str, rank: Rank | None) -> float:
        """``original_ms(name) - layer_ms(name, method, rank)``; negative when the replacement is slower."""
        return self.original_ms(name) - self.layer_ms(name, method, rank)

    def prepare(self, candidates: Mapping[str, Iterable[str]]) -> None:
        """Measure now, for each layer name, the original and the anchors of each listed method.

        Raises:
            UnsupportedLayerError: if a listed method does not apply to its layer.
        """
        try:
            for name, method_names in candidates.items():
                spec = self.spec(name)
                self._measure(spec, KEEP, None)
                for method in method_names:
                    if str(method).lower() != KEEP:
                        self._fit(spec, self._method(spec, method))
        finally:
            self._flush()

    def measured_points(self, name: str, method: str) -> list[tuple[Rank, float, float]]:
        """The anchors of (``name``, ``method``): ``(rank, cost, ms)``, cost in FLOPs (params when
        the replacement has no FLOPs), measuring them first if needed."""
        spec = self.spec(name)
        return list(self._fit(spec, self._method(spec, method)).points)

    # --- fits --------------------------------------------------------------------------------------

    @staticmethod
    def _method(spec: LayerSpec, method: str) -> DecompositionMethod:
        m = get_method(method)
        reason = m.unsupported_reason(spec)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot time {m.name} on {spec.name!r}: {reason}")
        return m

    @staticmethod
    def _cost(spec: LayerSpec, method: DecompositionMethod, rank: Rank, use_flops: bool) -> float:
        cost = method.cost(spec, rank)
        return float(cost.flops if use_flops else cost.params)

    def anchor_ranks(self, name: str, method: str) -> list[Rank]:
        """The ranks measured for (``name``, ``method``): ``anchors`` ranks evenly spread in cost
        from the smallest rank to the break-even rank (the whole range if none breaks even)."""
        spec = self.spec(name)
        m = self._method(spec, method)
        low = m.rank_from_scale(spec, 0.0)
        high = m.break_even_rank(spec) or m.rank_from_scale(spec, 1.0)
        use_flops = spec.input_shape is not None and spec.flops > 0
        original = spec.flops if use_flops else spec.params
        lo_frac = self._cost(spec, m, low, use_flops) / original
        hi_frac = self._cost(spec, m, high, use_flops) / original
        ranks: list[Rank] = [low]
        # rank_for_cost_fraction bisects over rank_from_scale, so tuple ranks are spread too
        for fraction in np.linspace(lo_frac, hi_frac, self.anchors)[1:-1]:
            rank = m.rank_for_cost_fraction(spec, float(fraction))
            if rank is not None and rank not in ranks:
                ranks.append(rank)
        if high not in ranks:
            ranks.append(high)
        return ranks

    def _fit(self, spec: LayerSpec, method: DecompositionMethod) -> _Fit:
        key = (spec.name, method.name)
        if key in self._fits:
            return self._fits[key]
        ranks = self.anchor_ranks(spec.name, method.name)
        use_flops = all(method.cost(spec, r).flops > 0 for r in ranks)
        points = []
        try:
            for rank in ranks:
                points.append((rank, self._cost(spec, method, rank, use_flops), self._measure(spec, method.name, rank)))
        finally:
            self._flush()
        points.sort(key=lambda p: p[1])
        xs = np.array([p[1] for p in points])
        ys = np.array([p[2] for p in points])
        regression = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(xs, ys)
        fitted = regression.predict(xs)
        slope = float((fitted[-1] - fitted[0]) / (xs[-1] - xs[0])) if xs[-1] > xs[0] else 0.0
        fit = _Fit(regression, float(xs[0]), float(xs[-1]), max(slope, 0.0), tuple(points), use_flops)
        self._fits[key] = fit
        return fit

    # --- measuring -----------------------------------------------------------------------------------

    def _entry_key(self, spec: LayerSpec, method: str, rank: Rank | None) -> str:
        layer = spec.to_dict()
        del layer["name"]  # two layers of the same configuration share their timings
        return json.dumps(
            {"layer": layer, "method": method, "rank": None if rank is None else _rank_key(rank)}, sort_keys=True
        )

    def _module(self, spec: LayerSpec, method: str, rank: Rank | None) -> nn.Module:
        dtype = getattr(torch, spec.dtype)
        if method == KEEP:
            module = copy.deepcopy(self._model.get_submodule(spec.name))
        else:
            module = get_method(method).structure(spec, rank)  # type: ignore[arg-type]
            with torch.no_grad():
                # structure() may leave weights uninitialised; garbage (NaN, denormals) distorts timing
                for param in module.parameters():
                    param.normal_(0.0, 0.02)
        return module.to(device=self._device, dtype=dtype).eval()

    def _input(self, spec: LayerSpec) -> torch.Tensor:
        assert spec.input_shape is not None  # filled in __init__
        device = self._device or torch.device("cpu")
        if spec.kind == "embedding":
            return torch.randint(0, spec.in_features, spec.input_shape, device=device)
        return torch.randn(spec.input_shape, device=device, dtype=getattr(torch, spec.dtype))

    def _measure(self, spec: LayerSpec, method: str, rank: Rank | None) -> float:
        key = self._entry_key(spec, method, rank)
        entry = self._entries.get(key)
        if entry is not None:
            return float(entry["ms"])
        result = measure_latency(
            self._module(spec, method, rank), self._input(spec), self._device, threads=self.threads,
            latency_fn=self._latency_fn, **self._timing,  # type: ignore[arg-type]
        )
        self.measurements += 1
        entry = {"ms": result.ms, "spread": result.spread, "runs": result.runs}
        self._entries[key] = entry
        self._new[key] = entry
        log.debug("%s %s %s: %.4f ms (spread %.1f%%)", spec.name, method, rank, result.ms, 100 * result.spread)
        return result.ms

    # --- disk cache ----------------------------------------------------------------------------------

    def _read_file(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._cache_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable latency cache %s (%s); it will be rewritten", self._cache_path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or data.get("version") != _CACHE_VERSION:
            log.warning("ignoring latency cache %s of another format or version", self._cache_path)
            return {}
        entries = data.get("entries", {})
        return {
            k: v for k, v in entries.items()
            if isinstance(v, dict) and isinstance(v.get("ms"), (int, float)) and math.isfinite(v["ms"]) and v["ms"] > 0
        }

    def _load(self) -> dict[str, dict[str, Any]]:
        entries = self._read_file()
        if entries:
            log.debug("latency cache %s: %d entries", self._cache_path, len(entries))
        return entries

    def _flush(self) -> None:
        """Write new measurements, merged with what other processes wrote meanwhile."""
        if not self._new or not self._use_cache:
            self._new.clear()
            return
        entries = self._read_file()
        entries.update(self._new)
        data = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "context": self.context, "entries": entries}
        try:
            atomic_write_text(self._cache_path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning(
                "cannot write the latency cache %s (%s); measurements are kept in memory only", self._cache_path, exc
            )
        self._new.clear()
