"""Checking the keys and value types of a config section (a plain dict), naming the path.

A misspelt key names the close matches and the known keys; a value of the wrong type names
the key and the expected types. Used by ``orchestration.config_checks`` for the sections
the orchestration reads and by ``SamplingOptions`` for ``sampling``.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping

from utils.initialize_configs import ConfigError

NUMBER = (int, float)


def type_names(types) -> str:
    """``(int, None)`` -> "int or null"."""
    return " or ".join("null" if t is None else t.__name__ for t in types)


def check_keys(section: Mapping, allowed: Iterable[str], types: Mapping, path: str) -> None:
    """ConfigError ``<path>.<key>: ...`` for the first key of ``section`` not in ``allowed``,
    or whose value is none of ``types[key]`` (None in the tuple allows null; a bool is no
    number). Keys without an entry in ``types`` take any value."""
    allowed = list(allowed)
    for key, value in section.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key{hint} (known: {', '.join(sorted(allowed))})")
        accepted = types.get(key)
        if accepted is None:
            continue
        ok = (value is None and None in accepted) or any(
            t is not None and isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
            for t in accepted)
        if not ok:
            raise ConfigError(f"{path}.{key}: expected {type_names(accepted)}, got {value!r} "
                              f"({type(value).__name__})")
