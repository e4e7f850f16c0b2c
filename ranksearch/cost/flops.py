"""FLOPs and parameter counts through fvcore.

Convention (fvcore's): one multiply-add counts as one flop; biases, activations and normalisation
are not counted. Operators fvcore has no handle for are logged once per operator name, never
raised and never printed per call.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..layers import as_input_tuple, check_module
from .._modes import eval_mode

with warnings.catch_warnings():  # fvcore's import trips torch.jit deprecation warnings
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

__all__ = ["count_flops", "flops_by_module", "count_params", "FLOP_CONVENTION"]

log = logging.getLogger("ranksearch.cost")

FLOP_CONVENTION = "1 flop = 1 multiply-add (fvcore); biases, activations and norms not counted"

_reported_unsupported: set[str] = set()


def _conv_mode_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """fvcore lacks ``aten::_convolution_mode`` (convs with ``padding='same'``/``'valid'``)."""
    x_shape, w_shape, out_shape = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    return Counter({"conv": conv_flop_count(x_shape, w_shape, out_shape, transposed=False)})


_EXTRA_HANDLES = {"aten::_convolution_mode": _conv_mode_flop_jit}


def _analysis(model: nn.Module, example_inputs: Any) -> FlopCountAnalysis:
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**_EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _report_unsupported(analysis: FlopCountAnalysis) -> None:
    new = sorted(set(analysis.unsupported_ops()) - _reported_unsupported)
    if new:
        _reported_unsupported.update(new)
        log.info("fvcore does not count these operators (treated as 0 flops): %s", ", ".join(new))


def _run(model: nn.Module, example_inputs: Any) -> FlopCountAnalysis:
    analysis = _analysis(model, example_inputs)
    with eval_mode(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on data-dependent control flow
        analysis.total()
    _report_unsupported(analysis)
    return analysis


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_inputs``, counted by fvcore.

    One multiply-add counts as one flop (fvcore's convention, :data:`FLOP_CONVENTION`); biases,
    activations and normalisation are not counted. Operators fvcore cannot count add 0 and are
    logged once per process at INFO level on ``ranksearch.cost``. The model is traced in eval
    mode under ``torch.no_grad``; every submodule's train/eval mode is restored afterwards.

    Args:
        model: the model.
        example_inputs: a tensor or a tuple of positional arguments for ``model``.

    Raises:
        NotAModuleError: if ``model`` is not a ``torch.nn.Module``.
        InvalidInputsError: if ``example_inputs`` is ``None``.

    Example:
        >>> ranksearch.cost.count_flops(torch.nn.Linear(8, 4), torch.randn(2, 8))
        64
    """
    return int(_run(model, example_inputs).total())


def flops_by_module(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """FLOPs per module name (``""`` is the whole model), as fvcore attributes them.

    Same convention as :func:`count_flops`: one multiply-add is one flop.
    """
    return {name: int(v) for name, v in _run(model, example_inputs).by_module().items()}


def count_params(model: nn.Module | Iterable[nn.Parameter]) -> int:
    """Number of parameters, each shared tensor counted once."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
