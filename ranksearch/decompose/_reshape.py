"""The modules the tensor-network methods (``tt``, ``tr``) build their replacements from.

A tensor-network replacement of ``nn.Linear`` is a chain of small plain ``nn.Linear`` layers, each
acting on the last dimension, with parameter-free :class:`Regroup` steps between them that move
the next input mode next to the carried rank index. :class:`TensorChain` holds the chain and the
layer's bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Regroup", "TensorChain", "ChainStep", "chain_params", "chain_flops_per_position", "build_chain"]


class Regroup(nn.Module):
    """Reshape the last ``n_in`` dims to ``view``, permute those by ``perm``, reshape to ``out``.

    Leading (batch, token, ...) dims pass through untouched, so the chain works for inputs of any
    leading shape. No parameters and no multiply-adds: only ``reshape`` and ``permute``, which
    fvcore and ``torch.export`` both handle.

    Args:
        n_in: how many trailing dims of the input are regrouped.
        view: sizes the trailing dims are split into.
        perm: a permutation of ``range(len(view))``.
        out: sizes of the trailing dims of the output (same product as ``view``).
    """

    def __init__(self, n_in: int, view: Sequence[int], perm: Sequence[int], out: Sequence[int]) -> None:
        super().__init__()
        if sorted(perm) != list(range(len(view))) or math.prod(view) != math.prod(out):
            raise ValueError(f"Regroup: inconsistent view {tuple(view)}, perm {tuple(perm)}, out {tuple(out)}")
        self.n_in = int(n_in)
        self.view = tuple(int(v) for v in view)
        self.perm = tuple(int(p) for p in perm)
        self.out = tuple(int(o) for o in out)
        self._permutes = self.perm != tuple(range(len(self.perm)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - self.n_in]
        x = x.reshape(*lead, *self.view)
        if self._permutes:
            k = len(lead)
            x = x.permute(*range(k), *(k + p for p in self.perm))
        return x.reshape(*lead, *self.out)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, view={self.view}, perm={self.perm}, out={self.out}"


class TensorChain(nn.Module):
    """A chain of plain layers followed by the original layer's bias.

    The bias lives here rather than on the last ``nn.Linear`` because that layer only produces
    the last output mode (it runs once per combination of the other output modes), so it cannot
    carry a general bias over all ``out_features``. Adding it is not a multiply-add, so fvcore
    counts it as it counts the original layer's bias: not at all.

    Args:
        steps: the layers, applied in order.
        out_features: size of the output's last dim.
        bias: whether to hold a bias of ``out_features`` entries.
    """

    def __init__(self, steps: Sequence[nn.Module], out_features: int, *, bias: bool) -> None:
        super().__init__()
        self.steps = nn.Sequential(*steps)
        self.out_features = int(out_features)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.steps(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"


@dataclass(frozen=True)
class ChainStep:
    """One contraction of a chain: a :class:`Regroup`, then ``nn.Linear(in_dim, out_dim)``.

    Attributes:
        n_in, view, perm, out: the :class:`Regroup` before the linear layer.
        in_dim, out_dim: the linear layer's features.
    """

    n_in: int
    view: tuple[int, ...]
    perm: tuple[int, ...]
    out: tuple[int, ...]
    in_dim: int
    out_dim: int

    @property
    def rows(self) -> int:
        """How many times the linear layer runs per position of the original layer."""
        return math.prod(self.out) // self.in_dim


def chain_params(steps: Sequence[ChainStep]) -> int:
    """Weights of the chain's linear layers (no bias)."""
    return sum(s.in_dim * s.out_dim for s in steps)


def chain_flops_per_position(steps: Sequence[ChainStep]) -> int:
    """Multiply-adds of the chain per position of the original layer (fvcore's convention)."""
    return sum(s.rows * s.in_dim * s.out_dim for s in steps)


def build_chain(steps: Sequence[ChainStep], out_features: int, *, bias: bool) -> TensorChain:
    """The :class:`TensorChain` for ``steps``: each step's regroup and linear, then a flatten."""
    modules: list[nn.Module] = []
    for s in steps:
        modules.append(Regroup(s.n_in, s.view, s.perm, s.out))
        modules.append(nn.Linear(s.in_dim, s.out_dim, bias=False))
    modules.append(nn.Flatten(-2))  # (..., rest of the output modes, last output mode) -> (..., out)
    return TensorChain(modules, out_features, bias=bias)
