"""Atomic file writes: a temporary file beside the target, renamed into place when complete,
so an interrupted or failed write leaves neither a truncated file nor a stray temporary.

A process killed outright (SIGKILL, out of memory, a node failure) cannot remove its
temporary file. Such leftovers are recognised by their name,
``.tmp-<host>-<pid>-<random><suffixes>``, and ``remove_stale_temporaries`` deletes those
whose writer is gone: a temporary of this host whose process no longer runs, or any
temporary (another host's, or one named before host and PID were part of the name) not
modified for ``STALE_AFTER_S`` seconds. A temporary that a running process on this host is
still writing is never removed; one of another host is left alone for a day, as its PID
cannot be checked from here.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

PREFIX = ".tmp-"
#: age (seconds since the last modification) after which any temporary counts as abandoned
STALE_AFTER_S = 24 * 3600


def _host() -> str:
    """This host's name with every character but letters, digits and '.' replaced by '_'
    (so '-' separates the parts of a temporary's name)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporaries of process ``pid`` (default: this one) on this host."""
    return f"{PREFIX}{_host()}-{os.getpid() if pid is None else int(pid)}-"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then flush the temporary file to disk and rename it to
    ``path`` (mode 0644 less the umask, like a plainly created file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes: writers such as nibabel pick the format from them
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)  # the data reach the disk before the name does (a crash of the machine)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_running(pid: int) -> bool:
    """True unless this host has no process ``pid`` (an unknown answer counts as running)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user
        return True
    return True


def is_stale(path: str | Path, now: float | None = None, max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether ``path`` (a file named like atomic_write's temporaries) was abandoned by its
    writer (see the module docstring)."""
    path = Path(path)
    if not path.name.startswith(PREFIX):
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age > max_age_s:
        return True
    parts = path.name[len(PREFIX):].split("-", 2)
    if len(parts) == 3 and parts[0] == _host() and parts[1].isdigit():
        return int(parts[1]) != os.getpid() and not _process_running(int(parts[1]))
    return False


def remove_stale_temporaries(folder: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the abandoned atomic_write temporaries in ``folder`` (not its sub-folders);
    returns the removed paths. A missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for path in sorted(folder.glob(PREFIX + "*")):
        if path.is_file() and is_stale(path, now, max_age_s):
            try:
                path.unlink()
            except FileNotFoundError:  # another process cleaned it up first
                continue
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by a killed process in {folder}")
    return removed
