"""Tensor-train (TT-matrix) decomposition of fully connected layers (Novikov et al. 2015), and of
2-D convolutions' kernels (``ranksearch.decompose._tt_conv``: four plain convs).

``in_features = i_1 * ... * i_d`` and ``out_features = o_1 * ... * o_d`` are factored into
balanced modes; the weight, as a tensor over the pairs ``(o_k, i_k)``, is decomposed by TT-SVD
(``tensorly.decomposition.tensor_train_matrix``) into cores ``G_k[r_{k-1}, o_k, i_k, r_k]`` with
``r_0 = r_d = 1``. The replacement contracts one core at a time: step ``k`` is an
``nn.Linear(r_{k-1} * i_k, o_k * r_k)`` over the last dim, with a parameter-free
:class:`~ranksearch.decompose._reshape.Regroup` before it bringing ``(r_{k-1}, i_k)`` together.

The rank is one int ``r``: the internal TT ranks are ``r_k = min(r, L_k, R_k)`` where ``L_k`` and
``R_k`` are the sizes of the modes left and right of bond ``k`` (TT-SVD cannot use more). The
largest rank, ``max_k min(L_k, R_k)``, reproduces the layer exactly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix
from torch import nn

from ..exceptions import UnsupportedLayerError
from ..layers import LayerSpec
from . import _tt_conv
from ._reshape import ChainStep, build_chain, chain_flops_per_position, chain_params
from .base import DecompositionMethod, LayerCost, Rank, factor_cache, register, weight_as_float

__all__ = [
    "TensorLayout", "TensorTrain", "TensorizedChain", "balanced_factors", "choose_layout", "load_tt_cores", "tt_ranks",
    "tt_steps",
]

#: most modes a layer is split into (more modes compress more but add steps, each a copy)
MAX_MODES = 3
#: smallest mode size allowed when splitting into more than two modes: below it a further mode
#: saves little and costs one more step
MIN_MODE_DEEP = 4


@dataclass(frozen=True)
class TensorLayout:
    """How a ``(out_features, in_features)`` weight is viewed as a tensor over mode pairs.

    Attributes:
        in_modes: ``(i_1, ..., i_d)``, product ``in_features`` (``i_1`` the slowest-varying).
        out_modes: ``(o_1, ..., o_d)``, product ``out_features``.
    """

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]

    @property
    def order(self) -> int:
        """``d``, the number of cores."""
        return len(self.in_modes)

    @property
    def pair_sizes(self) -> tuple[int, ...]:
        """``o_k * i_k``: the sizes of the tensor the cores decompose."""
        return tuple(o * i for o, i in zip(self.out_modes, self.in_modes))

    def bond_bounds(self) -> tuple[int, ...]:
        """``min(L_k, R_k)`` for the ``d - 1`` internal bonds: the largest useful rank of each."""
        sizes = self.pair_sizes
        total = math.prod(sizes)
        bounds = []
        left = 1
        for n in sizes[:-1]:
            left *= n
            bounds.append(min(left, total // left))
        return tuple(bounds)

    def weight_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in) as the tensor ``T[(o_1, i_1), ..., (o_d, i_d)]`` (``o_k`` major)."""
        d = self.order
        t = weight.reshape(*self.out_modes, *self.in_modes)
        interleaved = [axis for k in range(d) for axis in (k, d + k)]
        return t.permute(*interleaved).reshape(self.pair_sizes)


def balanced_factors(n: int, parts: int, *, minimum: int = 2) -> tuple[int, ...] | None:
    """The most balanced way to write ``n`` as a product of ``parts`` factors, each ``>= minimum``.

    Balanced means the largest factor is as small as possible (ties: the smallest as large as
    possible). Returns the factors in ascending order, or ``None`` if there is no such product.

    Example:
        >>> balanced_factors(24, 3)
        (2, 3, 4)
    """
    best: tuple[int, ...] | None = None

    def search(rest: int, k: int, low: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= low:
                candidate = (*acc, rest)
                if best is None or (candidate[-1], -candidate[0]) < (best[-1], -best[0]):
                    best = candidate
            return
        f = low
        while f ** k <= rest:  # factors ascend, so this one is at most the k-th root of the rest
            if rest % f == 0:
                search(rest // f, k - 1, f, (*acc, f))
            f += 1

    search(int(n), int(parts), max(2, int(minimum)), ())
    return best


def choose_layout(in_features: int, out_features: int) -> TensorLayout:
    """The modes a ``Linear(in_features, out_features)`` is tensorized into.

    Three modes when both sizes split into three factors of at least ``MIN_MODE_DEEP``, otherwise
    two. Input modes descend and output modes ascend, which keeps the pair sizes ``o_k * i_k``
    balanced and makes the first step (over all inputs) and the last step (over all outputs)
    the narrowest.

    Raises:
        UnsupportedLayerError: if either size is prime or below 4, so it has no two factors.

    Example:
        >>> choose_layout(512, 256)
        TensorLayout(in_modes=(8, 8, 8), out_modes=(4, 8, 8))
    """
    for parts in range(MAX_MODES, 1, -1):
        minimum = MIN_MODE_DEEP if parts > 2 else 2
        ins = balanced_factors(in_features, parts, minimum=minimum)
        outs = balanced_factors(out_features, parts, minimum=minimum)
        if ins is not None and outs is not None:
            return TensorLayout(in_modes=tuple(reversed(ins)), out_modes=outs)
    bad = [f"{name}={n}" for name, n in (("in_features", in_features), ("out_features", out_features))
           if balanced_factors(n, 2) is None]
    raise UnsupportedLayerError(
        f"{' and '.join(bad)} cannot be split into two factors >= 2 (prime or too small), so the "
        "layer has no tensorization; use svd for this layer"
    )


def tt_ranks(layout: TensorLayout, rank: int) -> tuple[int, ...]:
    """``(r_0, ..., r_d)`` for a uniform rank: ``1`` at the ends, ``min(rank, bound)`` inside."""
    return (1, *(min(rank, b) for b in layout.bond_bounds()), 1)


@contextlib.contextmanager
def tensorly_torch() -> Iterator[None]:
    """Run tensorly on torch tensors in this thread only, whatever backend others chose."""
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # tensorly warns about "the trivial case of a matrix" for two-mode tensors; that is fine here
        warnings.simplefilter("ignore", UserWarning)
        yield


def tt_steps(layout: TensorLayout, ranks: Sequence[int]) -> list[ChainStep]:
    """The chain that contracts TT-matrix cores with ``ranks`` one by one, first core first.

    Before step ``k`` the trailing dims are ``(i_k, ..., i_d, o_1, ..., o_{k-1}, r_{k-1})``; the
    regroup moves ``i_k`` last and merges the rest into one row dim, so the linear layer maps
    ``(r_{k-1}, i_k) -> (o_k, r_k)``.
    """
    ins, outs, d = layout.in_modes, layout.out_modes, layout.order
    steps = []
    for k in range(d):
        if k == 0:
            n_in, view = 1, ins
        else:
            n_in, view = 2, (*ins[k:], *outs[:k], ranks[k])
        rows = math.prod(ins[k + 1:]) * math.prod(outs[:k])
        in_dim = ranks[k] * ins[k]
        steps.append(ChainStep(
            n_in=n_in, view=tuple(view), perm=(*range(1, len(view)), 0), out=(rows, in_dim),
            in_dim=in_dim, out_dim=outs[k] * ranks[k + 1],
        ))
    return steps


def layout_unsupported_reason(spec: LayerSpec) -> str | None:
    """Why a Linear layer's sizes cannot be tensorized (a prime or too small size), or ``None``."""
    try:
        choose_layout(spec.in_features, spec.out_features)
    except UnsupportedLayerError as exc:
        return str(exc)
    return None


class TensorizedChain(DecompositionMethod):
    """What tensor train and tensor ring share: a Linear's weight tensorized by :func:`choose_layout`,
    replaced by a chain of small Linears (:func:`~ranksearch.decompose._reshape.build_chain`) whose
    weights are the decomposition's cores. A subclass says which chain (``_steps``), how the cores
    are computed (``cores``) and how they fill the chain (``load_cores``)."""

    kinds = ("linear",)

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        return super().unsupported_reason(spec) or layout_unsupported_reason(spec)

    @abstractmethod
    def _steps(self, spec: LayerSpec, rank: Rank) -> list[ChainStep]:
        """The chain of steps for this rank."""

    @abstractmethod
    def cores(self, layer: nn.Module, spec: LayerSpec, rank: int) -> list[torch.Tensor]:
        """The decomposition's cores of ``layer``'s weight."""

    @abstractmethod
    def load_cores(self, replacement: nn.Module, cores: Sequence[torch.Tensor]) -> None:
        """Write ``cores`` into a chain built by :meth:`structure`."""

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        steps = self._steps(spec, rank)
        params = chain_params(steps) + (spec.out_features if spec.bias else 0)
        flops = spec.positions * chain_flops_per_position(steps) if spec.input_shape is not None else 0
        return LayerCost(flops=flops, params=params)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        return build_chain(self._steps(spec, rank), spec.out_features, bias=spec.bias)

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        self.load_cores(replacement, self.cores(layer, spec, int(rank)))  # type: ignore[arg-type]
        if spec.bias:
            replacement.bias.copy_(layer.bias.detach())  # type: ignore[union-attr]


@register
class TensorTrain(TensorizedChain):
    """Tensor train; a Conv2d's kernel goes to ``_tt_conv``, a Linear's weight to the chain."""

    name = "tt"
    kinds = ("linear", "conv2d")
    summary = ("tensor train: Linear -> chain of small Linears over tensorized modes (Novikov 2015); "
               "kh x kw Conv2d -> 1x1, kh x 1, 1 x kw, 1x1 convs")

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.kind == "conv2d":
            return _tt_conv.unsupported_reason(spec)
        return super().unsupported_reason(spec)

    def rank_bounds(self, spec: LayerSpec) -> tuple[int, int]:
        if spec.kind == "conv2d":
            return _tt_conv.rank_bounds(spec)
        return 1, max(choose_layout(spec.in_features, spec.out_features).bond_bounds())

    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        if spec.kind == "conv2d":
            return _tt_conv.cost(spec, int(rank))  # type: ignore[arg-type]
        return super().cost(spec, rank)

    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        if spec.kind == "conv2d":
            return _tt_conv.structure(spec, int(rank))  # type: ignore[arg-type]
        return super().structure(spec, rank)

    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        if spec.kind == "conv2d":
            _tt_conv.load_weights(replacement, layer, spec, int(rank))  # type: ignore[arg-type]
        else:
            super().load_weights(replacement, layer, spec, rank)

    def _steps(self, spec: LayerSpec, rank: Rank) -> list[ChainStep]:
        layout = choose_layout(spec.in_features, spec.out_features)
        return tt_steps(layout, tt_ranks(layout, int(rank)))  # type: ignore[arg-type]

    def rank_matrices(self, layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
        """The unfolding at the bond with the largest bound (the one the top rank is set by)."""
        if spec.kind == "conv2d":
            return _tt_conv.rank_matrices(layer, spec)
        layout = choose_layout(spec.in_features, spec.out_features)
        bounds = layout.bond_bounds()
        k = bounds.index(max(bounds)) + 1
        sizes = layout.pair_sizes
        tensor = layout.weight_tensor(weight_as_float(layer))
        return [tensor.reshape(math.prod(sizes[:k]), math.prod(sizes[k:]))]

    def cores(self, layer: nn.Module, spec: LayerSpec, rank: int) -> list[torch.Tensor]:
        """TT-matrix cores ``G_k[r_{k-1}, o_k, i_k, r_k]`` of ``layer``'s weight (float64, cached).

        TT-SVD at rank ``r`` is not a truncation of the full-rank result (each core is fitted to
        what the truncated ones before it left), so the cache is keyed by the rank.
        """
        layout = choose_layout(spec.in_features, spec.out_features)
        ranks = tt_ranks(layout, rank)

        def compute() -> list[torch.Tensor]:
            weight = weight_as_float(layer).reshape(*layout.out_modes, *layout.in_modes)
            with tensorly_torch():
                tt_matrix = tensor_train_matrix(weight, rank=list(ranks))
            return [torch.as_tensor(core) for core in tt_matrix.factors]

        return factor_cache.get(layer.weight, ("tt", layout, ranks), compute)

    def load_cores(self, replacement: nn.Module, cores: Sequence[torch.Tensor]) -> None:
        load_tt_cores(replacement, cores)


def load_tt_cores(replacement: nn.Module, cores: Sequence[torch.Tensor]) -> None:
    """Write TT-matrix cores ``G_k[r_{k-1}, o_k, i_k, r_k]`` into a chain from :func:`tt_steps`."""
    linears = [m for m in replacement.steps if isinstance(m, nn.Linear)]  # type: ignore[union-attr]
    with torch.no_grad():
        for linear, core in zip(linears, cores, strict=True):
            # weight[(o_k, r_k), (r_{k-1}, i_k)]
            linear.weight.copy_(core.permute(1, 3, 0, 2).reshape(linear.weight.shape))
