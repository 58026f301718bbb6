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


def test_temporaries_carry_host_and_process(tmp_path):
    from utils.atomic import temp_prefix

    seen = []
    atomic_write(tmp_path / "a.ckpt", lambda tmp: seen.append(tmp) or open(tmp, "w").write("x"))
    assert os.path.basename(seen[0]).startswith(temp_prefix()) and seen[0].endswith(".ckpt")


def test_only_temporaries_of_finished_writers_are_removed(tmp_path):
    """A dead process's temporary goes; a running process's stays, whatever its age on this
    host; another host's (or an unnamed writer's) goes once untouched for STALE_AFTER_S."""
    import subprocess
    import sys
    import time

    from utils.atomic import STALE_AFTER_S, remove_stale_temporaries, temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = time.time() - STALE_AFTER_S - 60
    try:
        files = {
            f"{temp_prefix(dead.pid)}abcdefgh.h5": True,
            f"{temp_prefix(running.pid)}abcdefgh.h5": False,
            f"{temp_prefix()}abcdefgh.ckpt": False,  # this process is writing it
            ".tmp-otherhost-1-abcdefgh.h5": False,  # another host: its PID cannot be checked
            ".tmp-otherhost-2-abcdefgh.h5": True,  # ... unless untouched for a day
            ".tmp-k2j3h4g5.h5": False,  # named before host and PID were
            ".tmp-k2j3h4g6.h5": True,
            "cache.h5": False,
        }
        for name in files:
            (tmp_path / name).write_text("partial")
        for name in (".tmp-otherhost-2-abcdefgh.h5", ".tmp-k2j3h4g6.h5", "cache.h5"):
            os.utime(tmp_path / name, (old, old))
        removed = remove_stale_temporaries(tmp_path)
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in removed) == sorted(n for n, gone in files.items() if gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in files.items() if not gone)
    assert remove_stale_temporaries(tmp_path / "missing") == []
