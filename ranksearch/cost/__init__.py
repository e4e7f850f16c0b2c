"""Cost models: FLOPs and parameters (fvcore) and latency measured on the target device."""

from __future__ import annotations

from .flops import FLOP_CONVENTION, count_flops, count_params, flops_by_module

__all__ = ["FLOP_CONVENTION", "count_flops", "count_params", "flops_by_module"]
