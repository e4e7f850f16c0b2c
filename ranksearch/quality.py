"""How good a compressed model is: the user's ``eval_fn``, or the built-in output fidelity.

Built-in fidelity (used when no ``eval_fn`` is given): the compressed model and the original are
run on the same calibration inputs, and every floating-point tensor in their outputs (tensors,
tuples, lists, dicts and Hugging Face ``ModelOutput`` alike) is compared::

    fidelity = 1 - sum ||y_compressed - y_original||^2 / sum ||y_original||^2

1.0 means identical outputs; 0.0 means errors as large as the outputs themselves (it can go below
zero). For outputs that look like class logits (2-D), top-1 agreement is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .exceptions import EvaluationError, InvalidInputsError
from .layers import as_input_tuple

__all__ = ["Fidelity", "FidelityScorer", "calibration_batches", "checked_score"]


def _float_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a (nested) model output, in a stable order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for key in output for t in _float_tensors(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _float_tensors(item)]
    if hasattr(output, "to_tuple"):  # transformers.ModelOutput without importing transformers
        return _float_tensors(output.to_tuple())
    return []


def calibration_batches(
    example_inputs: Any, calib_data: Iterable[Any] | None, *, extra: int = 3, seed: int = 0
) -> list[tuple[Any, ...]]:
    """The inputs fidelity is measured on.

    ``calib_data`` when given (each item a tensor or tuple of positional inputs). Otherwise the
    example inputs plus ``extra`` copies whose floating-point tensors get Gaussian noise of 10% of
    their standard deviation, so that fidelity is not judged on a single point.
    """
    if calib_data is not None:
        batches = [as_input_tuple(item) for item in calib_data]
        if not batches:
            raise InvalidInputsError("calib_data is empty: pass an iterable of model inputs, or leave it out")
        return batches
    base = as_input_tuple(example_inputs)
    generator = torch.Generator().manual_seed(seed)
    batches = [base]
    for _ in range(extra):
        noisy = []
        for value in base:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.device, value.dtype)
                noisy.append(value + 0.1 * value.float().std().nan_to_num(1.0).to(value.dtype) * noise)
            else:
                noisy.append(value)
        if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in base):
            batches.append(tuple(noisy))
    return batches


@dataclass(frozen=True)
class Fidelity:
    """Fidelity of a model's outputs to the original's on the calibration inputs."""

    score: float
    relative_error: float
    top1_agreement: float | None


class FidelityScorer:
    """Scores models against the reference outputs of the original, computed once."""

    def __init__(self, reference: nn.Module, batches: Sequence[tuple[Any, ...]]) -> None:
        self.batches = list(batches)
        with torch.inference_mode():
            self.reference_outputs = [_float_tensors(reference(*batch)) for batch in self.batches]
        if not any(self.reference_outputs):
            raise InvalidInputsError(
                "the model's outputs hold no floating-point tensor to compare; pass an eval_fn that scores "
                "the compressed model"
            )

    def __call__(self, model: nn.Module) -> Fidelity:
        error = total = 0.0
        agree = count = 0
        with torch.inference_mode():
            for batch, reference in zip(self.batches, self.reference_outputs):
                outputs = _float_tensors(model(*batch))
                for out, ref in zip(outputs, reference):
                    out64, ref64 = out.double(), ref.double()
                    error += float((out64 - ref64).pow(2).sum())
                    total += float(ref64.pow(2).sum())
                    if ref.dim() == 2 and ref.shape[-1] > 1:
                        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
                        count += ref.shape[0]
        relative = error / total if total > 0 else (0.0 if error == 0 else math.inf)
        score = 1.0 - relative if math.isfinite(relative) else -math.inf
        return Fidelity(score=score, relative_error=relative, top1_agreement=agree / count if count else None)


def checked_score(eval_fn: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """Call ``eval_fn(model)`` and insist on a finite number.

    Raises:
        EvaluationError: if ``eval_fn`` raises or returns NaN, infinity or a non-number (the
            search records the reason on the trial and carries on).
    """
    try:
        value = eval_fn(model)
    except Exception as exc:
        raise EvaluationError(f"eval_fn raised {type(exc).__name__}: {exc}") from exc
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvaluationError(
            f"eval_fn returned {type(value).__name__} {value!r}; it must return one finite number, higher is better"
        )
    if not math.isfinite(value):
        raise EvaluationError(f"eval_fn returned {value}; it must return a finite number, higher is better")
    return float(value)
