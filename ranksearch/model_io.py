"""Loading models and inputs for the command line, and saving what it produces.

Models come from a ``module:callable`` factory (a callable with no arguments that returns an
``nn.Module``) or from a file:

* a ``torch.export`` program (``.pt2``, written by ``torch.export.save``): loaded without running
  code from the file; its standard layers are turned back into ``nn.Linear`` / ``nn.Conv*d`` /
  ``nn.Embedding`` so that they can be decomposed;
* a ``state_dict`` (``torch.save(model.state_dict(), ...)``): read with ``weights_only=True``, and
  loaded into the model the factory builds;
* a whole pickled module (``torch.save(model, ...)``): unpickling runs code stored in the file, so
  it is refused unless the caller passes ``trust_model_file=True`` (``--trust-model-file``).

The compressed model is saved as a *bundle*: ``{"format", "plan", "state_dict"}`` written with
``torch.save`` but holding only tensors and JSON-like data, so ``torch.load(weights_only=True)``
reads it; :func:`load_compressed` rebuilds the model from the factory and the plan.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .exceptions import InvalidInputsError, ModelLoadError
from .plan import CompressionPlan
from .rebuild import apply_plan

__all__ = [
    "BUNDLE_FORMAT",
    "atomic_torch_save",
    "export_program",
    "load_calibration",
    "load_compressed",
    "load_inputs",
    "load_model",
    "parse_dtype",
    "parse_shape",
    "random_inputs",
    "resolve_callable",
    "save_compressed",
    "standard_layers",
]

log = logging.getLogger("ranksearch.model_io")

#: ``format`` value of the compressed-model bundle written by :func:`save_compressed`.
BUNDLE_FORMAT = "ranksearch.compressed"
_BUNDLE_VERSION = 1


# --- factories ----------------------------------------------------------------------------------


def resolve_callable(spec: str, *, what: str = "factory") -> Callable[..., Any]:
    """The object named by ``"package.module:attribute"`` (the attribute may be dotted).

    The current directory is searched too, as ``python -m`` would, so that a factory module next
    to the user's data is found when the ``ranksearch`` script runs.

    Raises:
        ModelLoadError: if the module cannot be imported or has no such callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelLoadError(
            f"{what} {spec!r} must be written module:callable, e.g. examples.digits_factory:trained_cnn"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {module_name!r} for {what} {spec!r} ({exc}); run from the folder that "
            "holds it or add that folder to PYTHONPATH"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"module {module_name!r} has no {attribute!r} (for {what} {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _call_factory(factory: str) -> nn.Module:
    model = resolve_callable(factory)()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"factory {factory!r} returned a {type(model).__name__}; it must return a torch.nn.Module"
        )
    return model


def _looks_like_factory(source: str) -> bool:
    module_name, sep, attribute = source.partition(":")
    return bool(sep) and bool(module_name) and bool(attribute) and not Path(source).exists() and "/" not in module_name


# --- model files --------------------------------------------------------------------------------


def load_model(source: str | os.PathLike[str] | None, *, factory: str | None = None,
               trust_model_file: bool = False) -> nn.Module:
    """Load the model to compress, in eval mode on the CPU.

    Args:
        source: a ``module:callable`` factory, a file (``.pt2`` export program, state_dict or pickled
            module), or ``None`` to call ``factory``.
        factory: ``module:callable`` that builds the model; needed for a state_dict file.
        trust_model_file: allow unpickling a whole module (this runs code stored in the file).

    Raises:
        ModelLoadError: for a missing or unreadable file, a state_dict without a factory, weights that
            do not fit the factory's model, or a pickled module without ``trust_model_file``.
    """
    if source is None:
        if factory is None:
            raise ModelLoadError("no model given: pass a model file or a module:callable factory")
        return _call_factory(factory).eval()
    text = str(source)
    if _looks_like_factory(text):
        return _call_factory(text).eval()
    path = Path(text)
    if not path.is_file():
        raise ModelLoadError(
            f"model file {text!r} does not exist; pass a saved model (.pt2, .pt) or a module:callable factory"
        )
    if path.suffix == ".pt2":
        return _load_exported(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_model_file:
            raise ModelLoadError(
                f"{text!r} is a pickled Python object (torch.save(model)); loading it runs code stored in the "
                "file, so it is refused. Pass --trust-model-file only if you trust where the file came from; "
                "otherwise save model.state_dict() and pass --factory, or save a torch.export program (.pt2)"
            ) from exc
        return _load_pickled(path)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model file {text!r}: {exc}") from exc
    if isinstance(content, Mapping) and content.get("format") == BUNDLE_FORMAT:
        if factory is None:
            raise ModelLoadError(
                f"{text!r} is a compressed ranksearch model; pass --factory with the original model's "
                "module:callable to rebuild it"
            )
        return load_compressed(path, factory=factory).eval()
    state = _state_dict_of(content)
    if state is None:
        raise ModelLoadError(
            f"{text!r} holds a {type(content).__name__}, not a model: expected a state_dict (a mapping of "
            "parameter names to tensors), a torch.export program (.pt2) or a pickled module"
        )
    if factory is None:
        raise ModelLoadError(
            f"{text!r} holds only weights (a state_dict); pass --factory module:callable that builds the model "
            "they belong to"
        )
    model = _call_factory(factory)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(
            f"the weights in {text!r} do not fit the model built by {factory!r}: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from exc
    return model.eval()


def _state_dict_of(content: Any) -> Mapping[str, torch.Tensor] | None:
    """``content`` as a state_dict, looking inside the usual checkpoint keys."""
    if not isinstance(content, Mapping):
        return None
    if content and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        return content
    for key in ("state_dict", "model_state_dict", "model"):
        inner = content.get(key)
        if isinstance(inner, Mapping):
            return _state_dict_of(inner)
    return None


def _load_pickled(path: Path) -> nn.Module:
    log.warning("unpickling %s: this runs code stored in the file (--trust-model-file)", path)
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling can raise anything the stored code raises
        raise ModelLoadError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        state = _state_dict_of(model)
        what = "a state_dict; pass --factory to load it" if state is not None else f"a {type(model).__name__}"
        raise ModelLoadError(f"{str(path)!r} holds {what}, not a torch.nn.Module")
    return model.eval()


def _load_exported(path: Path) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export raises many types for a corrupt archive
        raise ModelLoadError(
            f"cannot load {str(path)!r} as a torch.export program ({type(exc).__name__}: {exc})"
        ) from exc
    # unflatten keeps the module hierarchy, so layer names match the original model's
    module = torch.export.unflatten(program)
    recovered = standard_layers(module)
    log.info("loaded export program %s: %d standard layers recovered", path, recovered)
    return module


# --- export programs: recover standard layers ---------------------------------------------------


def _single_call(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The one ``call_function`` node of a graph that only fetches attributes and calls it, else None."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    others = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output", "call_function")]
    if len(calls) != 1 or others:
        return None
    return calls[0]


def _attr(module: nn.Module, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise ValueError("not an attribute")
    value = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _as_layer(module: nn.Module) -> nn.Module | None:
    """A standard layer equal to an unflattened submodule that only calls linear / conv / embedding."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    node = _single_call(graph)
    if node is None:
        return None
    target, args = node.target, list(node.args)
    aten = torch.ops.aten
    try:
        if target == aten.linear.default:
            weight, bias = _attr(module, args[1]), _attr(module, args[2] if len(args) > 2 else None)
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        elif target in (aten.conv1d.default, aten.conv2d.default):
            weight, bias = _attr(module, args[1]), _attr(module, args[2] if len(args) > 2 else None)
            dims = 1 if target == aten.conv1d.default else 2
            # aten.convNd(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
            stride, padding, dilation, groups = (args[i] if len(args) > i else default
                                                 for i, default in ((3, 1), (4, 0), (5, 1), (6, 1)))
            conv = nn.Conv1d if dims == 1 else nn.Conv2d
            layer = conv(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        elif target == aten.embedding.default:
            weight, bias = _attr(module, args[0]), None
            padding_idx = args[2] if len(args) > 2 else -1
            layer = nn.Embedding(weight.shape[0], weight.shape[1],
                                 padding_idx=None if padding_idx == -1 else padding_idx)
            if any(isinstance(a, bool) and a for a in args[3:]):  # scale_grad_by_freq / sparse
                return None
        else:
            return None
    except (ValueError, AttributeError, IndexError, TypeError):
        return None
    with torch.no_grad():
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer.to(weight.device)


def standard_layers(model: nn.Module) -> int:
    """Replace, in place, unflattened export submodules that are plain Linear / Conv / Embedding calls.

    ``torch.export.unflatten`` rebuilds the module tree with graph interpreters instead of the
    original layer classes; ranksearch only decomposes real ``nn.Linear`` / ``nn.Conv1d`` /
    ``nn.Conv2d`` / ``nn.Embedding`` modules, so those whose graph is exactly one such call on
    their own weight (and bias) are swapped for the equivalent layer. Returns how many were.
    """
    replaced = 0
    for name, child in list(model.named_modules()):
        if not name:
            continue
        layer = _as_layer(child)
        if layer is None:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, layer)
        replaced += 1
    return replaced


# --- inputs -------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
    "bool": torch.bool,
}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``1x3x32x32``) -> ``(1, 3, 32, 32)``.

    Raises:
        ValueError: for an empty shape or a size that is not a positive integer.
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if not text.strip() or any(not p.isdigit() or int(p) < 1 for p in parts):
        raise ValueError(f"bad shape {text!r}: write positive sizes separated by commas, e.g. 1,3,32,32")
    return tuple(int(p) for p in parts)


def parse_dtype(text: str) -> torch.dtype:
    """A dtype name (``float32``, ``int64``, ``bool``...) -> ``torch.dtype``.

    Raises:
        ValueError: naming the accepted names.
    """
    key = text.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def random_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype] = (),
                  model: nn.Module | None = None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs of the given shapes: Gaussian floats, token ids below the smallest vocabulary, True masks.

    Args:
        shapes: one shape per positional input.
        dtypes: one dtype for all inputs, or one per input (default float32).
        model: used to keep integer inputs inside its embeddings' vocabulary.
        seed: for reproducible inputs.

    Raises:
        InvalidInputsError: if the number of dtypes fits neither one nor every shape.
    """
    if len(dtypes) not in (0, 1, len(shapes)):
        raise InvalidInputsError(
            f"{len(dtypes)} dtypes for {len(shapes)} input shapes: give one dtype for all or one per shape"
        )
    kinds = list(dtypes) * len(shapes) if len(dtypes) == 1 else list(dtypes) or [torch.float32] * len(shapes)
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=2) if model else 2
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, dtype in zip(shapes, kinds):
        if dtype == torch.bool:
            inputs.append(torch.ones(shape, dtype=torch.bool))
        elif dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, vocab, shape, generator=generator, dtype=dtype))
    return tuple(inputs)


def _as_positional(value: Any, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise InvalidInputsError(
        f"{where} must hold a tensor or a tuple/list of tensors (the model's positional inputs), "
        f"got {type(value).__name__}"
    )


def _load_tensors(path: str | os.PathLike[str], what: str) -> Any:
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InvalidInputsError(f"{what} file {str(path)!r} does not exist") from exc
    except pickle.UnpicklingError as exc:
        raise InvalidInputsError(
            f"{what} file {str(path)!r} holds Python objects, not only tensors; save a tensor or a tuple of "
            "tensors with torch.save"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise InvalidInputsError(f"cannot read {what} file {str(path)!r}: {exc}") from exc


def load_inputs(path: str | os.PathLike[str]) -> tuple[torch.Tensor, ...]:
    """Example inputs saved with ``torch.save``: a tensor or a tuple / list of tensors (read weights-only).

    Raises:
        InvalidInputsError: for a missing or unreadable file, or other content.
    """
    return _as_positional(_load_tensors(path, "inputs"), f"inputs file {str(path)!r}")


def load_calibration(path: str | os.PathLike[str]) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches saved with ``torch.save``: a list of tensors or of tuples of tensors.

    Raises:
        InvalidInputsError: for a missing or unreadable file, or other content.
    """
    content = _load_tensors(path, "calibration data")
    if isinstance(content, torch.Tensor) or not isinstance(content, (list, tuple)) or not content:
        raise InvalidInputsError(
            f"calibration data file {str(path)!r} must hold a non-empty list of batches (tensors or tuples of tensors)"
        )
    return [_as_positional(item, f"batch {i} of {str(path)!r}") for i, item in enumerate(content)]


# --- writing ------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through a temporary file and a rename (a crash never leaves half a file)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_compressed(model: nn.Module, plan: CompressionPlan, path: str | os.PathLike[str]) -> Path:
    """Save a compressed model as a weights-only bundle: its plan (JSON data) and its state_dict.

    Read it back with :func:`load_compressed` and the factory of the original model.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bundle = {"format": BUNDLE_FORMAT, "version": _BUNDLE_VERSION, "plan": plan.to_dict(), "state_dict": state}
    return atomic_torch_save(bundle, path)


def load_compressed(path: str | os.PathLike[str], *, factory: str | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`: the factory's model, the plan, then the weights.

    Args:
        path: the bundle file.
        factory: ``module:callable`` or a callable building the *original* (uncompressed) model.

    Raises:
        ModelLoadError: if the file is not a bundle or its weights do not fit.
        PlanError, PlanMismatchError: if the plan inside does not fit the factory's model.
    """
    try:
        bundle = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot read compressed model {str(path)!r}: {exc}") from exc
    if not isinstance(bundle, Mapping) or bundle.get("format") != BUNDLE_FORMAT:
        raise ModelLoadError(f"{str(path)!r} is not a compressed model written by ranksearch")
    original = _call_factory(factory) if isinstance(factory, str) else factory()
    with warnings.catch_warnings():  # re-estimated BatchNorm statistics come with the saved state_dict
        warnings.filterwarnings("ignore", message=".*re-estimated the statistics of BatchNorm", category=UserWarning)
        model = apply_plan(original, CompressionPlan.from_dict(bundle["plan"]))
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadError(f"the weights in {str(path)!r} do not fit the rebuilt model: {exc}") from exc
    return model.eval()


def export_program(model: nn.Module, example_inputs: tuple[Any, ...], path: str | os.PathLike[str]) -> Path:
    """Export ``model`` with ``torch.export`` and save the program atomically (``.pt2``).

    Raises:
        Exception: whatever ``torch.export`` raises for a model it cannot trace; callers decide
            whether that matters.
    """
    program = torch.export.export(model.eval(), tuple(example_inputs))
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".pt2")  # it wants .pt2

