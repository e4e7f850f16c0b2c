"""Cost models: FLOPs and parameters (fvcore) and latency measured on the target device.

One flop is one multiply-add (fvcore's convention); see :data:`FLOP_CONVENTION`.
"""

from __future__ import annotations

from .flops import FLOP_CONVENTION, count_flops, count_params, flops_by_module
from .latency import LatencyMeasurement, LatencyRatio, measure_latency, measure_ratio
from .predictor import LatencyPredictor
from .table import LatencyTable
from .timing_process import TimingProcess

__all__ = [
    "FLOP_CONVENTION",
    "LatencyMeasurement",
    "LatencyPredictor",
    "LatencyRatio",
    "LatencyTable",
    "TimingProcess",
    "count_flops",
    "count_params",
    "flops_by_module",
    "measure_latency",
    "measure_ratio",
]
