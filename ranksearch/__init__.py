"""ranksearch: compress trained PyTorch models by low-rank decomposition under a measured budget.

Public API::

    ranksearch.methods()                          # registered decomposition methods
    ranksearch.decompose(layer, "svd", 8)         # one layer's replacement
    ranksearch.apply_plan(model, plan)            # a compressed copy of a model
    ranksearch.recalibrate_batchnorm(model, data) # BatchNorm statistics re-estimated
    ranksearch.CompressionPlan                    # the plan: plain, versioned JSON
    ranksearch.seed_plans(model, inputs)          # VBMF / energy-threshold plans
    ranksearch.optimize(model, inputs, target_latency_ms=...)   # the search
"""

from __future__ import annotations

import logging
import warnings

# fvcore (imported by the cost models) triggers torch.jit.script deprecation warnings on import.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")

from .decompose import decompose, get_method, methods  # noqa: E402
from .exceptions import *  # noqa: E402,F401,F403
from .exceptions import RankSearchError  # noqa: E402
from .exceptions import __all__ as _exception_names  # noqa: E402
from .layers import LayerSpec, capture_layer_specs  # noqa: E402
from .plan import CompressionPlan, LayerChoice, model_fingerprint  # noqa: E402
from .rebuild import apply_plan  # noqa: E402
from .batchnorm import recalibrate_batchnorm  # noqa: E402
from . import rank  # noqa: E402
from .seeds import seed_plans  # noqa: E402
from .space import SearchSpace, list_spaces, load_space  # noqa: E402
from .result import ModelStats, ParetoPoint, SearchResult  # noqa: E402
from .search import optimize  # noqa: E402
from .finetune import FineTuned  # noqa: E402
from .sensitivity import SensitivityTable  # noqa: E402

__version__ = "0.1.0"

logging.getLogger("ranksearch").addHandler(logging.NullHandler())

__all__ = [
    "CompressionPlan",
    "FineTuned",
    "LayerChoice",
    "LayerSpec",
    "ModelStats",
    "ParetoPoint",
    "RankSearchError",
    "SearchResult",
    "SearchSpace",
    "SensitivityTable",
    "apply_plan",
    "capture_layer_specs",
    "decompose",
    "get_method",
    "list_spaces",
    "load_space",
    "methods",
    "model_fingerprint",
    "optimize",
    "recalibrate_batchnorm",
    "rank",
    "seed_plans",
    *_exception_names,
]
