"""The process-wide cache of factorizations, keyed by what a weight holds.

Sweeping the ranks of a layer needs one SVD (or one HOOI fit per rank), not one per rank; and a second
``optimize`` of the same model (another target, another batch size, the next step of a pipeline)
works on a fresh copy of it whose weights hold the same numbers. So entries are keyed by a digest of
the weight's contents (with its dtype, shape and device), computed once per tensor and in-place
version: an update in place gives another digest, and copies share their factorizations.

Entries stay while a tensor holding those contents is alive. When the last one goes, they are kept
a while longer, up to ``keep_bytes`` in all, the most recently orphaned first: each ``optimize`` of
the benchmark's CNN (six in a run) used to factorize every layer again (a profiled run: 664
Tucker-2 HOOI fits, 62 s).

A key names what was computed from the weight; a computation that depends on more than the weight
(how a grouped conv splits it) says so in its key.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FactorCache", "factor_cache", "weight_digest"]

#: bytes of factorizations kept after the last tensor holding their weight is gone
DEFAULT_KEEP_BYTES = 512 * 2**20


def weight_digest(weight: torch.Tensor) -> str:
    """A digest of ``weight``'s dtype, shape, device and values (equal tensors, equal digests)."""
    data = weight.detach()
    raw = data.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    head = f"{data.dtype}|{tuple(data.shape)}|{data.device.type}|".encode()
    return hashlib.blake2b(head + raw.tobytes(), digest_size=20).hexdigest()


def _nbytes(value: Any) -> int:
    """The tensor bytes ``value`` holds (tensors, and tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class FactorCache:
    """Factorizations per (weight contents, key); see the module docstring."""

    def __init__(self, keep_bytes: int = DEFAULT_KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._lock = threading.RLock()  # a weak reference's callback may fire inside a locked section
        # id(tensor) -> (weak reference to it, its version when digested, digest)
        self._digests: dict[int, tuple[weakref.ref[torch.Tensor], int, str]] = {}
        self._slots: dict[str, dict[Any, Any]] = {}  # digest -> {key: value}
        self._holders: dict[str, set[int]] = {}  # digest -> ids of live tensors holding those contents
        self._orphans: OrderedDict[str, int] = OrderedDict()  # digests no live tensor holds -> bytes, oldest first
        self.misses = 0

    def get(self, weight: torch.Tensor, key: Any, compute: Callable[[], Any]) -> Any:
        """The cached value for ``(weight's contents, key)``, computing it with ``compute()`` on a miss."""
        with self._lock:
            slot = self._slot(weight)
            if key in slot:
                return slot[key]
        value = compute()
        with self._lock:
            self.misses += 1
            self._slot(weight)[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._digests.clear()
            self._slots.clear()
            self._holders.clear()
            self._orphans.clear()
            self.misses = 0

    def _slot(self, weight: torch.Tensor) -> dict[Any, Any]:
        """The entries of ``weight``'s contents (digested once per tensor and in-place version)."""
        known = self._digests.get(id(weight))
        if known is not None and known[0]() is weight and known[1] == weight._version:
            return self._slots[known[2]]
        if known is not None:  # updated in place, or another tensor at a reused id
            self._let_go(id(weight), known[2])
        digest = weight_digest(weight)
        ref = weakref.ref(weight, lambda _ref, key=id(weight): self._forget(key))
        self._digests[id(weight)] = (ref, weight._version, digest)
        self._holders.setdefault(digest, set()).add(id(weight))
        self._orphans.pop(digest, None)  # held again
        return self._slots.setdefault(digest, {})

    def _forget(self, tensor_id: int) -> None:
        """A digested tensor was freed."""
        with self._lock:
            known = self._digests.get(tensor_id)
            if known is not None and known[0]() is None:
                del self._digests[tensor_id]
                self._let_go(tensor_id, known[2])

    def _let_go(self, tensor_id: int, digest: str) -> None:
        """``tensor_id`` no longer holds ``digest``'s contents; with no holder left, its entries are orphans,
        kept while the orphans' bytes stay within ``keep_bytes`` (the most recently orphaned first)."""
        holders = self._holders.get(digest)
        if holders is None:
            return
        holders.discard(tensor_id)
        if holders:
            return
        del self._holders[digest]
        self._orphans[digest] = sum(_nbytes(v) for v in self._slots.get(digest, {}).values())
        total = sum(self._orphans.values())
        while self._orphans and total > self.keep_bytes:
            oldest, size = self._orphans.popitem(last=False)
            self._slots.pop(oldest, None)
            total -= size


#: the process-wide cache all built-in methods use
factor_cache = FactorCache()
