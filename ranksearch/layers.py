"""Find the layers of a model that low-rank methods could replace, and describe them as plain data.

A :class:`LayerSpec` holds everything a method needs to decide whether it applies and what a
replacement would cost: the layer's kind, shapes, stride, padding, groups, and the real shape of
the input it sees in the model (captured with forward hooks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._modes import eval_mode
from .exceptions import InvalidInputsError, NotAModuleError

__all__ = [
    "LayerSpec",
    "LAYER_TYPES",
    "layer_kind",
    "spec_from_module",
    "iter_candidate_layers",
    "capture_layer_specs",
    "conv_output_size",
    "as_input_tuple",
    "check_module",
]

#: The layer types any method may decompose, by the kind name used in plans and search spaces.
LAYER_TYPES: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
}


def layer_kind(module: nn.Module) -> str | None:
    """The kind name of ``module`` (exact type match, so subclasses with custom forwards are skipped)."""
    return LAYER_TYPES.get(type(module))


@dataclass(frozen=True)
class LayerSpec:
    """Plain description of one decomposable layer.

    Attributes:
        name: fully qualified module name in the model (``"features.0"``).
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"embedding"``.
        in_features: input channels / features (embedding: vocabulary size).
        out_features: output channels / features (embedding: embedding dim).
        kernel_size: spatial kernel, ``()`` for linear and embedding.
        stride, dilation: per spatial dim.
        padding: per spatial dim, or the string ``"same"`` / ``"valid"``.
        padding_mode: conv padding mode (``"zeros"``, ``"reflect"``, ...).
        groups: conv groups (1 otherwise).
        bias: whether the layer has a bias.
        dtype: weight dtype name (``"float32"``).
        input_shape: shape of the input the layer saw in the model, ``None`` if not captured.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    groups: int = 1
    bias: bool = False
    dtype: str = "float32"
    input_shape: tuple[int, ...] | None = None

    @property
    def is_conv(self) -> bool:
        return self.kind in ("conv1d", "conv2d")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @property
    def params(self) -> int:
        """Parameter count of the original layer (weight + bias)."""
        return math.prod(self.weight_shape) + (self.out_features if self.bias else 0)

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Output spatial size of a conv, from the captured input shape."""
        if not self.is_conv:
            return ()
        if self.input_shape is None:
            raise ValueError(f"layer {self.name!r}: input shape was not captured")
        spatial_in = self.input_shape[-len(self.kernel_size):]
        return tuple(
            conv_output_size(size, k, s, p, d)
            for size, k, s, p, d in zip(
                spatial_in, self.kernel_size, self.stride, self._padding_tuple(), self.dilation
            )
        )

    @property
    def positions(self) -> int:
        """How many times the layer's weight is applied per forward pass (batch x tokens x pixels).

        Analytic FLOPs are ``positions x multiply-adds per position``; this matches fvcore, which
        counts one multiply-add as one flop and does not count biases.
        """
        if self.input_shape is None:
            raise ValueError(f"layer {self.name!r}: input shape was not captured")
        if self.kind == "embedding":
            return math.prod(self.input_shape)
        if self.kind == "linear":
            return math.prod(self.input_shape[:-1])
        batch = math.prod(self.input_shape[: -len(self.kernel_size) - 1])
        return batch * math.prod(self.output_spatial)

    def _padding_tuple(self) -> tuple[int, ...]:
        """Total padding per side as integers (``"same"`` resolved for the output-size formula)."""
        if self.padding == "valid":
            return tuple(0 for _ in self.kernel_size)
        if self.padding == "same":
            # 'same' keeps the input size (torch only allows it with stride 1); return a padding
            # that makes conv_output_size give exactly that.
            return tuple(d * (k - 1) / 2 for k, d in zip(self.kernel_size, self.dilation))  # type: ignore[misc]
        return self.padding  # type: ignore[return-value]

    @property
    def flops(self) -> int:
        """Multiply-adds of the original layer for the captured input (fvcore's convention)."""
        if self.kind == "embedding":
            return 0  # a table lookup, no multiply-adds; fvcore does not count it either
        per_position = self.out_features * (self.in_features // self.groups) * math.prod(self.kernel_size)
        return self.positions * per_position

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("kernel_size", "stride", "dilation", "input_shape"):
            if d[key] is not None:
                d[key] = list(d[key])
        if not isinstance(d["padding"], str):
            d["padding"] = list(d["padding"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        d = dict(d)
        for key in ("kernel_size", "stride", "dilation"):
            d[key] = tuple(d.get(key, ()))
        if not isinstance(d.get("padding", ()), str):
            d["padding"] = tuple(d.get("padding", ()))
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def conv_output_size(size: int, kernel: int, stride: int, padding: float, dilation: int) -> int:
    """Output length of a convolution along one dimension (``padding`` is per side)."""
    return int((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_from_module(name: str, module: nn.Module, input_shape: Sequence[int] | None = None) -> LayerSpec:
    """Describe one supported layer as a :class:`LayerSpec`."""
    kind = layer_kind(module)
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
    if kind == "linear":
        assert isinstance(module, nn.Linear)
        return LayerSpec(
            name=name, kind=kind, in_features=module.in_features, out_features=module.out_features,
            bias=module.bias is not None, dtype=_dtype_name(module.weight.dtype), input_shape=shape,
        )
    if kind == "embedding":
        assert isinstance(module, nn.Embedding)
        return LayerSpec(
            name=name, kind=kind, in_features=module.num_embeddings, out_features=module.embedding_dim,
            dtype=_dtype_name(module.weight.dtype), input_shape=shape,
        )
    if kind in ("conv1d", "conv2d"):
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return LayerSpec(
            name=name, kind=kind, in_features=module.in_channels, out_features=module.out_channels,
            kernel_size=tuple(module.kernel_size), stride=tuple(module.stride), padding=padding,
            dilation=tuple(module.dilation), padding_mode=module.padding_mode, groups=module.groups,
            bias=module.bias is not None, dtype=_dtype_name(module.weight.dtype), input_shape=shape,
        )
    raise TypeError(f"{type(module).__name__} at {name!r} is not a layer ranksearch can describe")


def check_module(model: Any) -> nn.Module:
    """Raise :class:`NotAModuleError` unless ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself "
            "(for a saved file, load it first, e.g. with torch.load)"
        )
    return model


def iter_candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every supported layer, once per module object.

    A module registered under two names (shared weights) is yielded under its first name only; the
    rebuild replaces it everywhere it is used.
    """
    seen: set[int] = set()
    for name, module in model.named_modules():
        if layer_kind(module) is None or id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs to the positional-argument tuple the model is called with."""
    if example_inputs is None:
        raise InvalidInputsError(
            "example_inputs is required here: pass a tensor or a tuple of tensors the model accepts, "
            "e.g. torch.randn(1, 3, 32, 32)"
        )
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def capture_layer_specs(model: nn.Module, example_inputs: Any) -> list[LayerSpec]:
    """Run ``model`` once on ``example_inputs`` and describe every supported layer it used.

    Layers the forward pass never reaches are left out: nothing is known of their inputs and
    replacing them would not change the model's speed. A layer called several times with
    different shapes keeps its first input shape.

    Raises:
        InvalidInputsError: if the model rejects the inputs.
    """
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    shapes: dict[int, tuple[int, ...]] = {}
    handles = []
    for _name, module in iter_candidate_layers(model):
        def hook(mod: nn.Module, args: tuple[Any, ...], _key: int = id(module)) -> None:
            if _key not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[_key] = tuple(args[0].shape)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.inference_mode():
            model(*inputs)
    except Exception as exc:  # the model's own error, re-raised with what to do
        raise InvalidInputsError(
            f"the model rejected the example inputs ({type(exc).__name__}: {exc}); pass inputs of the "
            "shape, dtype and device the model expects, as a tensor or a tuple of positional tensors"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return [
        spec_from_module(name, module, shapes[id(module)])
        for name, module in iter_candidate_layers(model)
        if id(module) in shapes
    ]
