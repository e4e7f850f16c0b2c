"""Factories for the command line: the digits CNN, trained once and cached, and its accuracy.

The ``ranksearch`` command takes a model as ``module:callable`` (a callable with no arguments
that returns the trained ``nn.Module``) and a quality as ``--eval-fn module:callable``::

    ranksearch optimize examples.digits_factory:trained_cnn --input-shape 1,1,16,16 \\
        --eval-fn examples.digits_factory:validation_accuracy --target-flops 0.5 ...

Training takes a few seconds the first time; the weights are cached in ``examples/.cache``
(the same file ``examples/digits_cnn.py --size 16 --width 16 --epochs 4`` uses).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from examples.digits import Digits, DigitsCNN, accuracy, load_digits_tensors, train

SIZE, WIDTH, EPOCHS = 16, 16, 4
CACHE = Path(__file__).resolve().parent / ".cache"

__all__ = ["trained_cnn", "validation_accuracy", "held_out_accuracy", "example_batch", "SIZE"]


@functools.lru_cache(maxsize=1)
def _data() -> Digits:
    return load_digits_tensors(SIZE)


def trained_cnn() -> nn.Module:
    """The digits CNN (16x16 inputs, width 16), trained for 4 epochs; cached weights when present."""
    torch.manual_seed(0)
    model = DigitsCNN(WIDTH)
    weights = CACHE / f"digits_cnn_{SIZE}px_w{WIDTH}_e{EPOCHS}.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval()
    train(model, _data(), epochs=EPOCHS)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights)  # a half-written cache file is never read
    return model.eval()


def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = _data()
    half = len(data.y_test) // 2
    return data.x_test[:half], data.y_test[:half], data.x_test[half:], data.y_test[half:]


def validation_accuracy(model: nn.Module) -> float:
    """Accuracy on the validation half of the held-out digits: the score the search maximises."""
    x_val, y_val, _, _ = _split()
    return accuracy(model, x_val, y_val)


def held_out_accuracy(model: nn.Module) -> float:
    """Accuracy on the other half, which the search never sees."""
    _, _, x_test, y_test = _split()
    return accuracy(model, x_test, y_test)


def example_batch(batch: int = 1) -> torch.Tensor:
    """Real digits as example inputs (``torch.save(example_batch(), "inputs.pt")`` for ``--inputs``)."""
    x_val, _, _, _ = _split()
    return x_val[:batch].clone()
