"""Temporary eval mode that gives every submodule its own mode back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own mode.

    ``model.train(was_training)`` would not do: it sets one mode on every submodule, and a model
    may mix them (a frozen, eval-mode backbone inside a training model).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
