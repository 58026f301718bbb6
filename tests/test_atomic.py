"""utils.atomic.atomic_write: complete files only, normal permissions, nothing left on failure."""
import os

import pytest

from utils.atomic import atomic_write


def test_atomic_write_creates_complete_file_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "sub" / "table.md", lambda tmp: open(tmp, "w").write("| a |\n"))
    finally:
        os.umask(old)
    assert path.read_text() == "| a |\n"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
