"""Atomic file writes: a temporary file beside the target, renamed into place when complete,
so an interrupted or failed write leaves neither a truncated file nor a stray temporary."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file to ``path`` (mode 0644
    less the umask, like a plainly created file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes: writers such as nibabel pick the format from them
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
