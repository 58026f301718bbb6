"""Paths in configs: relative ones are taken from the repository root, not the cwd."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """Absolute path; a relative ``path`` (``~`` expanded) is joined to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
