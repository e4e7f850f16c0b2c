"""Atomic file writes: a temporary file beside the target, then a rename.

A crash or Ctrl-C while a plan, model, report or latency cache is written never leaves half a file
where the user's file was: the target is either the old file or the complete new one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a new temporary file next to ``path``, flush it to disk, rename it to ``path``.

    ``suffix`` is the temporary file's suffix, for writers that insist on one (``torch.export.save``
    wants ``.pt2``). The temporary file gets the permissions a plain ``open`` gives
    (``tempfile.mkstemp`` would make it readable by its owner only, whatever the umask), and is
    removed if ``write`` fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(target, suffix)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_file_beside(target: Path, suffix: str) -> Path:
    while True:
        tmp = target.parent / f".{target.stem}.{secrets.token_hex(6)}{suffix}"
        try:
            with open(tmp, "xb"):
                return tmp
        except FileExistsError:
            continue
