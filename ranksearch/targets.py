"""Budgets: latency, FLOPs and parameters as absolute numbers, and how far a plan is over them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidTargetError

__all__ = ["Targets"]


@dataclass(frozen=True)
class Targets:
    """Budgets as absolute numbers (``None`` where not set)."""

    latency_ms: float | None = None
    flops: float | None = None
    params: float | None = None

    @staticmethod
    def _positive(name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidTargetError(f"{name} must be a positive number, got {value!r}")

    @classmethod
    def parse(cls, *, latency_ms: Any, flops: Any, params: Any, baseline_flops: int, baseline_params: int) -> Targets:
        """Validate the user's targets; floats in (0, 1] for FLOPs / params are fractions of the original."""
        for name, value in (("target_latency_ms", latency_ms), ("target_flops", flops), ("target_params", params)):
            cls._positive(name, value)

        def absolute(value: Any, baseline: int) -> float | None:
            if value is None:
                return None
            if isinstance(value, float) and value <= 1.0:
                return value * baseline
            return float(value)

        return cls(
            latency_ms=float(latency_ms) if latency_ms is not None else None,
            flops=absolute(flops, baseline_flops),
            params=absolute(params, baseline_params),
        )

    @classmethod
    def require_one(cls, latency_ms: Any, flops: Any, params: Any) -> None:
        if latency_ms is None and flops is None and params is None:
            raise InvalidTargetError(
                "give at least one budget: target_latency_ms=..., target_flops=... (a fraction in (0, 1] "
                "or an absolute count) or target_params=..."
            )
        for name, value in (("target_latency_ms", latency_ms), ("target_flops", flops), ("target_params", params)):
            cls._positive(name, value)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("latency_ms", self.latency_ms), ("flops", self.flops), ("params", self.params)) if v is not None}

    def violations(self, *, latency_ms: float | None, flops: float, params: float) -> dict[str, float]:
        """Relative excess per target: ``(value - target) / target``; <= 0 means met."""
        out: dict[str, float] = {}
        if self.latency_ms is not None and latency_ms is not None:
            out["latency"] = (latency_ms - self.latency_ms) / self.latency_ms
        if self.flops is not None:
            out["flops"] = (flops - self.flops) / self.flops
        if self.params is not None:
            out["params"] = (params - self.params) / self.params
        return out
