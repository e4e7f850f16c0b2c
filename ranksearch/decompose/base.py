"""The protocol every decomposition method follows, the registry, and what methods share.

A method is a small object: which layers it supports (and why not), its rank bounds, the analytic
cost of a rank, the module structure for a rank, and the replacement built from a layer's weights.
Adding a method means one new file with a subclass of :class:`DecompositionMethod` decorated with
:func:`register`, plus its line in ``decompose/__init__.py``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

import torch
from torch import nn

from ..exceptions import InvalidRankError, UnknownMethodError, UnsupportedLayerError
from ..layers import LayerSpec, layer_kind, spec_from_module
from .cache import factor_cache

__all__ = [
    "Rank",
    "LayerCost",
    "DecompositionMethod",
    "register",
    "get_method",
    "methods",
    "factor_cache",
    "make_conv",
    "weight_as_float",
    "split_singular_values",
]

Rank = Union[int, tuple[int, ...]]


@dataclass(frozen=True)
class LayerCost:
    """Analytic cost of a layer or replacement: multiply-adds (fvcore's flop) and parameters."""

    flops: int
    params: int


class DecompositionMethod(ABC):
    """One low-rank decomposition family.

    Subclasses set ``name`` and ``kinds`` and implement :meth:`rank_bounds`, :meth:`cost`,
    :meth:`structure` and :meth:`load_weights`. Ranks are ints, or tuples of ints for methods with
    several ranks (``rank_arity > 1``).
    """

    name: ClassVar[str]
    #: layer kinds (see ``ranksearch.layers.LAYER_TYPES``) this method can decompose
    kinds: ClassVar[tuple[str, ...]]
    #: how many integers make a rank
    rank_arity: ClassVar[int] = 1
    #: one line for ``ranksearch methods``
    summary: ClassVar[str] = ""

    # --- applicability -------------------------------------------------------------------------

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        """Why this method cannot decompose ``spec``, or ``None`` if it can."""
        if spec.kind not in self.kinds:
            return f"{self.name} decomposes {', '.join(self.kinds)} layers, not {spec.kind}"
        return None

    def supports(self, spec: LayerSpec) -> bool:
        return self.unsupported_reason(spec) is None

    # --- ranks ---------------------------------------------------------------------------------

    @abstractmethod
    def rank_bounds(self, spec: LayerSpec) -> tuple[Rank, Rank]:
        """Smallest and largest meaningful rank for ``spec`` (the largest reproduces it, if any)."""

    def normalize_rank(self, spec: LayerSpec, rank: Rank | Sequence[int]) -> Rank:
        """Check ``rank`` against the bounds and return it as an int or tuple of ints."""
        low, high = self.rank_bounds(spec)
        if isinstance(rank, bool):
            raise InvalidRankError(f"{self.name}: rank must be an int, got {rank!r}")
        if self.rank_arity == 1:
            if isinstance(rank, Sequence) and len(rank) == 1:
                rank = rank[0]
            if not isinstance(rank, int):
                raise InvalidRankError(f"{self.name}: rank must be one int, got {rank!r}")
            if not low <= rank <= high:  # type: ignore[operator]
                raise InvalidRankError(
                    f"{self.name} on {spec.name!r}: rank {rank} is outside [{low}, {high}]"
                )
            return int(rank)
        if isinstance(rank, int):
            raise InvalidRankError(
                f"{self.name}: rank must be a tuple of {self.rank_arity} ints, got {rank!r}"
            )
        rank = tuple(int(r) for r in rank)
        if len(rank) != self.rank_arity:
            raise InvalidRankError(
                f"{self.name}: rank must be a tuple of {self.rank_arity} ints, got {rank!r}"
            )
        for r, lo, hi in zip(rank, low, high):  # type: ignore[arg-type]
            if not lo <= r <= hi:
                raise InvalidRankError(
                    f"{self.name} on {spec.name!r}: rank {rank} is outside [{low}, {high}]"
                )
        return rank

    def rank_from_scale(self, spec: LayerSpec, scale: float) -> Rank:
        """Map ``scale`` in (0, 1] monotonically to a rank, 1 giving the largest rank.

        Multi-rank methods override this to scale every rank together.
        """
        low, high = self.rank_bounds(spec)
        return int(min(high, max(low, math.ceil(scale * high))))  # type: ignore[operator]

    def rank_for_cost_fraction(self, spec: LayerSpec, fraction: float) -> Rank | None:
        """The largest rank whose cost is at most ``fraction`` of the original layer's cost.

        Cost is FLOPs when the input shape is known and not zero, parameters otherwise. Returns
        ``None`` when even the smallest rank costs more. Remembered per layer and fraction:
        :meth:`cost` depends on the spec and rank alone, and a search asks for the same ranks
        thousands of times (5-8 s of a benchmark search's CPU time went to this bisection).
        """
        try:
            return _rank_for_cost_fraction(self, spec, float(fraction))
        except TypeError:  # a spec built by hand with lists in it cannot be a key
            return self._bisect_cost_fraction(spec, fraction)

    def _bisect_cost_fraction(self, spec: LayerSpec, fraction: float) -> Rank | None:
        """:meth:`rank_for_cost_fraction`, computed."""
        use_flops = spec.input_shape is not None and spec.flops > 0
        original = spec.flops if use_flops else spec.params

        def cost_of(rank: Rank) -> int:
            c = self.cost(spec, rank)
            return c.flops if use_flops else c.params

        # bisection over the scale; ranks are monotone in scale, so is cost
        low_rank = self.rank_from_scale(spec, 0.0)
        if cost_of(low_rank) > fraction * original:
            return None
        lo, hi = 0.0, 1.0
        if cost_of(self.rank_from_scale(spec, hi)) <= fraction * original:
            return self.rank_from_scale(spec, hi)
        for _ in range(30):
            mid = (lo + hi) / 2
            if cost_of(self.rank_from_scale(spec, mid)) <= fraction * original:
                lo = mid
            else:
                hi = mid
        return self.rank_from_scale(spec, lo)

    def rank_matrices(self, layer: nn.Module, spec: LayerSpec) -> list[torch.Tensor]:
        """The matrices whose ranks are this method's ranks, one per rank component.

        Rank heuristics (VBMF, energy) read these: for ``svd`` the weight matrix, for ``tucker2``
        the mode unfoldings. Each entry is ``(m, n)`` or, for grouped convs, ``(groups, m, n)``.
        An empty list means the method has no such matricization (heuristics then use a
        documented rule instead).
        """
        return []

    def break_even_rank(self, spec: LayerSpec) -> Rank | None:
        """The largest rank whose replacement is no more expensive than the original layer."""
        return self.rank_for_cost_fraction(spec, 1.0)

    # --- cost and construction -----------------------------------------------------------------

    @abstractmethod
    def cost(self, spec: LayerSpec, rank: Rank) -> LayerCost:
        """Analytic FLOPs (fvcore's convention) and parameters of the replacement at ``rank``."""

    @abstractmethod
    def structure(self, spec: LayerSpec, rank: Rank) -> nn.Module:
        """The replacement's modules with the right shapes and uninitialised weights."""

    @abstractmethod
    def load_weights(self, replacement: nn.Module, layer: nn.Module, spec: LayerSpec, rank: Rank) -> None:
        """Fill ``replacement`` (from :meth:`structure`) with the factorization of ``layer``."""

    def build(self, layer: nn.Module, rank: Rank | Sequence[int], *, name: str = "") -> nn.Module:
        """The replacement for ``layer`` at ``rank``, on the layer's device and dtype."""
        spec = spec_from_module(name or type(layer).__name__, layer)
        reason = self.unsupported_reason(spec)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot decompose {spec.name}: {reason}")
        rank = self.normalize_rank(spec, rank)
        replacement = self.structure(spec, rank)
        with torch.no_grad():
            self.load_weights(replacement, layer, spec, rank)
        weight = layer.weight
        replacement = replacement.to(device=weight.device, dtype=weight.dtype)
        if not weight.requires_grad:  # a frozen layer stays frozen
            replacement.requires_grad_(False)
        return replacement

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# --- registry ----------------------------------------------------------------------------------

_REGISTRY: dict[str, DecompositionMethod] = {}
M = TypeVar("M", bound=type[DecompositionMethod])


def register(cls: M) -> M:
    """Class decorator: make a method available under ``cls.name`` (lower case)."""
    key = cls.name.lower()
    if key in _REGISTRY and type(_REGISTRY[key]) is not cls:
        raise ValueError(f"a decomposition method named {key!r} is already registered")
    _REGISTRY[key] = cls()
    return cls


@functools.lru_cache(maxsize=1 << 16)
def _rank_for_cost_fraction(method: DecompositionMethod, spec: LayerSpec, fraction: float) -> Rank | None:
    # methods are stateless singletons (see register): keyed by identity, held for the process
    return method._bisect_cost_fraction(spec, fraction)


def get_method(name: str | DecompositionMethod) -> DecompositionMethod:
    """Look a method up by name (case-insensitive).

    Raises:
        UnknownMethodError: naming the valid methods.
    """
    if isinstance(name, DecompositionMethod):
        return name
    key = str(name).lower()
    if key not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown decomposition method {name!r}; valid methods: {', '.join(methods())}"
        )
    return _REGISTRY[key]


def methods() -> list[str]:
    """Names of the registered decomposition methods, in registration order."""
    return list(_REGISTRY)


# --- helpers shared by methods -----------------------------------------------------------------


def weight_as_float(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a detached float64 CPU tensor (accurate factorizations, any dtype)."""
    return layer.weight.detach().to(device="cpu", dtype=torch.float64)


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate an SVD to ``rank`` and split sqrt(s) into both factors so both stay well scaled.

    Returns ``(left, right)`` with ``left @ right`` the best rank-``rank`` approximation;
    ``left`` is (m, rank), ``right`` is (rank, n).
    """
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def cached_svd(weight: torch.Tensor, matrix: torch.Tensor, key: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD of ``matrix`` (derived from ``weight``), computed once per weight and key."""
    return factor_cache.get(weight, ("svd", key), lambda: torch.linalg.svd(matrix, full_matrices=False))


def make_conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    bias: bool = False,
    padding_mode: str = "zeros",
) -> nn.Module:
    """A plain ``nn.Conv1d`` or ``nn.Conv2d``."""
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    return conv_cls(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
    )


def conv_dims(spec: LayerSpec) -> int:
    return len(spec.kernel_size)


def copy_bias(target: nn.Module, layer: nn.Module) -> None:
    """Copy ``layer``'s bias into ``target`` (which must have one exactly when ``layer`` does)."""
    if getattr(layer, "bias", None) is not None:
        target.bias.copy_(layer.bias.detach().to(target.bias.dtype))


def is_supported_module(module: nn.Module) -> bool:
    return layer_kind(module) is not None
