"""ranksearch.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from ranksearch.atomic import atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path) -> None:
    path = atomic_write_text(tmp_path / "new" / "plan.json", "old\n")  # the folder is created
    assert path.read_text() == "old\n"

    def half_then_crash(tmp) -> None:
        tmp.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["plan.json"]

    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"), suffix=".pt2")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["plan.json"]


def test_the_file_gets_the_permissions_a_plain_open_gives(tmp_path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
