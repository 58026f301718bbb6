"""Paths in configs: relative ones are taken from the repository root, not the cwd; names
that become file or folder names are checked so that they stay inside their folder."""
from __future__ import annotations

from pathlib import Path

from utils.initialize_configs import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """Absolute path; a relative ``path`` (``~`` expanded) is joined to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def check_name(name, key: str) -> str:
    """``name`` if it is safe as one file or folder name inside a folder of ours: a non-empty
    string without ``/``, ``\\``, ``..`` or a NUL byte, not starting with ``.``. Otherwise a
    ConfigError (a ValueError) naming ``key``, the config key or argument it came from
    (``logging.name``, ``data.params.volumes[0].name``, ``datasetname``, ...)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: expected a non-empty name, got {name!r}")
    bad = [part for part in ("/", "\\", "..", "\0") if part in name]
    if bad or name.startswith("."):
        why = f"contains {bad[0]!r}" if bad else "starts with '.'"
        raise ConfigError(f"{key}: {name!r} {why}; it becomes a file or folder name, so it may not contain "
                          "'/', '\\' or '..' nor start with '.'")
    return name
