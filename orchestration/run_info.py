"""What goes with every run besides its config: the git commit of the code (and whether the
work tree had uncommitted changes) and the versions that ran it, written to
``<run>/run_info.yaml`` and logged with the hyper-parameters under ``run_info``."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning
import torch
from omegaconf import OmegaConf

from utils.atomic import atomic_write
from utils.paths import REPO_ROOT

UNKNOWN = "unknown"


def code_version(repo: str | Path = REPO_ROOT) -> dict:
    """``{"git_commit": <sha> | "unknown", "git_dirty": bool | None}`` of the checkout whose
    top folder is ``repo`` (the code's own root by default). ``git_dirty`` is true when
    tracked files differ from the commit or untracked, not ignored files exist. Outside a
    git checkout (an installed copy, no git, a folder inside another repository): "unknown"
    and None, never an error."""
    repo = Path(repo).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo:
            return {"git_commit": UNKNOWN, "git_dirty": None}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, no commit yet, ...
        return {"git_commit": UNKNOWN, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def write_run_info(run_dir: Path, repo: str | Path = REPO_ROOT) -> dict:
    """Write ``run_dir/run_info.yaml`` (atomically) and return what it holds: code_version(),
    the start time and the Python, torch and Lightning versions and the command line."""
    info = {**code_version(repo), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(), "torch": str(torch.__version__),
            "lightning": str(lightning.__version__), "command": " ".join(sys.argv)}
    atomic_write(Path(run_dir) / "run_info.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(info), tmp))
    return info
