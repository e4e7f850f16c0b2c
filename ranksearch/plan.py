"""CompressionPlan: which layer is replaced by which method at which rank, as plain versioned JSON.

A plan is data only. It is written with ``json`` and read back with ``json`` (nothing pickled),
records where each choice came from (a heuristic seed, a trial, the user) and the fingerprint of
the model it was made for, so that applying it to another model fails before anything is built.

The JSON form, for writing plans by hand::

    {
      "schema_version": 1,
      "layers": [
        {"name": "features.3", "method": "tucker2", "rank": [16, 24]},
        {"name": "classifier", "method": "svd", "rank": 8}
      ]
    }

Layers not listed are kept. ``"fingerprint"``, ``"origin"`` and ``"metadata"`` are optional.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_write_text
from .exceptions import PlanError, PlanMismatchError

__all__ = ["SCHEMA_VERSION", "KEEP", "LayerChoice", "CompressionPlan", "model_fingerprint", "atomic_write_text"]

#: Version of the JSON layout written by :meth:`CompressionPlan.to_dict`.
SCHEMA_VERSION = 1
#: The method name that means "leave this layer as it is".
KEEP = "keep"
_FORMAT = "ranksearch.plan"


@dataclass(frozen=True)
class LayerChoice:
    """The choice for one layer.

    Attributes:
        name: fully qualified module name (``model.get_submodule(name)``).
        method: a decomposition method name, or ``"keep"``.
        rank: an int, a tuple of ints for multi-rank methods, ``None`` for ``"keep"``.
        origin: where the choice came from: ``"user"``, ``"seed:vbmf"``, ``"seed:energy-0.90"``,
            ``"trial:12"``...
        reason: for kept layers, why (e.g. why no method applies).
    """

    name: str
    method: str
    rank: int | tuple[int, ...] | None = None
    origin: str = "user"
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "method": self.method}
        if self.rank is not None:
            d["rank"] = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        d["origin"] = self.origin
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, index: int = 0) -> LayerChoice:
        if not isinstance(d, Mapping):
            raise PlanError(f"plan layer #{index} must be an object with 'name', 'method', 'rank'; got {d!r}")
        missing = [key for key in ("name", "method") if key not in d]
        if missing:
            raise PlanError(f"plan layer #{index} lacks {', '.join(repr(k) for k in missing)}: {dict(d)!r}")
        unknown = set(d) - {"name", "method", "rank", "origin", "reason"}
        if unknown:
            raise PlanError(f"plan layer #{index} ({d['name']!r}) has unknown keys {sorted(unknown)}")
        method = str(d["method"]).lower()
        rank = d.get("rank")
        if method != KEEP:
            if rank is None:
                raise PlanError(f"plan layer {d['name']!r}: method {method!r} needs a 'rank'")
            rank = _parse_rank(rank, d["name"])
        return cls(
            name=str(d["name"]), method=method, rank=rank if method != KEEP else None,
            origin=str(d.get("origin", "user")), reason=d.get("reason"),
        )

    @property
    def is_kept(self) -> bool:
        return self.method == KEEP


def _parse_rank(rank: Any, name: str) -> int | tuple[int, ...]:
    def as_int(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
            raise PlanError(f"plan layer {name!r}: rank must be a positive int or a list of them, got {rank!r}")
        return int(value)

    if isinstance(rank, (list, tuple)):
        if not rank:
            raise PlanError(f"plan layer {name!r}: rank list is empty")
        return tuple(as_int(r) for r in rank)
    return as_int(rank)


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Names, types and parameter shapes of every module that owns parameters, plus their digest."""
    entries = []
    for name, module in model.named_modules():
        shapes = [list(p.shape) for p in module.parameters(recurse=False)]
        if shapes:
            entries.append([name, type(module).__name__, shapes])
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"digest": digest, "layers": entries}


@dataclass
class CompressionPlan:
    """Per-layer choices for one model, plus its fingerprint and free-form metadata.

    Example:
        >>> plan = CompressionPlan.from_dict({"layers": [{"name": "fc1", "method": "svd", "rank": 8}]})
        >>> compressed = ranksearch.apply_plan(model, plan)
    """

    layers: list[LayerChoice] = field(default_factory=list)
    fingerprint: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # --- views ---------------------------------------------------------------------------------

    @property
    def replaced(self) -> list[LayerChoice]:
        """The choices that replace a layer (not ``keep``)."""
        return [c for c in self.layers if not c.is_kept]

    def choice_for(self, name: str) -> LayerChoice | None:
        for choice in self.layers:
            if choice.name == name:
                return choice
        return None

    def __len__(self) -> int:
        return len(self.replaced)

    # --- model checks --------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls, model: nn.Module, choices: Iterable[LayerChoice], *, metadata: Mapping[str, Any] | None = None
    ) -> CompressionPlan:
        """A plan of ``choices`` stamped with ``model``'s fingerprint."""
        return cls(layers=list(choices), fingerprint=model_fingerprint(model), metadata=dict(metadata or {}))

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` naming the first layer where ``model`` differs from the plan's."""
        if self.fingerprint is not None:
            current = model_fingerprint(model)
            if current["digest"] != self.fingerprint.get("digest"):
                expected = self.fingerprint.get("layers", [])
                for index in range(max(len(expected), len(current["layers"]))):
                    want = expected[index] if index < len(expected) else None
                    have = current["layers"][index] if index < len(current["layers"]) else None
                    if want != have:
                        raise PlanMismatchError(
                            "this plan was made for another model: first mismatch at "
                            f"{_describe(want)} in the plan vs {_describe(have)} in the model; "
                            "make a plan for this model (ranksearch.optimize or seed_plans)"
                        )
                raise PlanMismatchError("this plan was made for another model (fingerprint differs)")
        modules = dict(model.named_modules())
        for choice in self.layers:
            if choice.name not in modules:
                raise PlanMismatchError(
                    f"plan layer {choice.name!r} is not a module of this model; "
                    "names are fully qualified, as in model.named_modules()"
                )

    # --- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "schema_version": self.schema_version,
            "layers": [c.to_dict() for c in self.layers],
            "fingerprint": self.fingerprint,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionPlan:
        """Read a plan from its dictionary form (see the module docstring).

        Raises:
            PlanError: if the dictionary is malformed or of an unknown schema version.
        """
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported by this ranksearch (it reads version "
                f"{SCHEMA_VERSION}); upgrade ranksearch or re-create the plan"
            )
        if "format" in d and d["format"] != _FORMAT:
            raise PlanError(f"not a ranksearch plan (format {d['format']!r})")
        layers = d.get("layers")
        if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
            raise PlanError("a plan needs a 'layers' list of {'name', 'method', 'rank'} objects")
        choices = [LayerChoice.from_dict(entry, index=i) for i, entry in enumerate(layers)]
        names = [c.name for c in choices]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PlanError(f"plan lists layers more than once: {duplicates}")
        fingerprint = d.get("fingerprint")
        if fingerprint is not None and not (isinstance(fingerprint, Mapping) and "digest" in fingerprint):
            raise PlanError("plan 'fingerprint' must be an object with a 'digest'")
        metadata = d.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise PlanError("plan 'metadata' must be an object")
        return cls(layers=choices, fingerprint=dict(fingerprint) if fingerprint else None, metadata=dict(metadata))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically (a crash never leaves a half-written file)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionPlan:
        """Read a plan written by :meth:`save` (or by hand).

        Raises:
            PlanError: if the file is missing, not JSON, or not a valid plan.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"plan file {str(path)!r} is corrupt (not valid JSON: {exc.msg} at line {exc.lineno}); "
                "re-create it or restore it from the study"
            ) from exc
        return cls.from_dict(data)

    def summary(self) -> str:
        """One line per replaced layer."""
        if not self.replaced:
            return "empty plan: every layer is kept"
        return "\n".join(f"{c.name}: {c.method} rank {c.rank} ({c.origin})" for c in self.replaced)


def _describe(entry: Any) -> str:
    if entry is None:
        return "nothing"
    name, type_name, shapes = entry
    return f"layer {name!r} ({type_name} {' '.join('x'.join(map(str, s)) for s in shapes)})"
