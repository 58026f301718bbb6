"""The error boundary of every entry point in ``run_scripts/``.

A user error (a bad config key, a missing or unreadable file, a value out of range, a
refused checkpoint) is one line on stderr naming the input, and exit status 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

#: Exceptions that mean "the input is wrong", not "the code is wrong". ConfigError and
#: CheckpointError are ValueErrors; OSError covers missing, unreadable and unwritable paths.
USER_ERRORS = (ValueError, OSError)

#: Exit status of a refused input (argparse uses 2 for a bad command line as well).
USER_ERROR_STATUS = 2

T = TypeVar("T")


class UserErrorExit(SystemExit):
    """The SystemExit of a refused input: exit status 2 (``code``), and ``str()`` is the
    line printed on stderr, so a caller (or a test) in the same process can read it."""

    def __init__(self, line: str):
        super().__init__(USER_ERROR_STATUS)
        self.line = line

    def __str__(self) -> str:
        return self.line


def user_error_boundary(script: str, main: Callable[[], T]) -> T:
    """Run ``main()``; a user error becomes ``<script>: <message>`` on stderr and exit 2
    (a UserErrorExit). Other exceptions, and SystemExit itself, pass unchanged."""
    try:
        return main()
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        line = f"{script}: {message}"
        print(line, file=sys.stderr)
        raise UserErrorExit(line) from err


def checked_device(device: str | None, flag: str = "--device") -> str | None:
    """``device`` unchanged if this machine has it (None: the caller's default); else a
    ValueError naming ``flag``: an unparsable name, CUDA without a usable GPU (or a CUDA
    build of torch), a GPU index past the last one, MPS where there is none."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{flag} {device!r}: not a device name (cpu, cuda, cuda:N): {err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ValueError(f"{flag} {device}: no CUDA GPU is usable on this machine ({build}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device}: unsupported device type {dev.type!r} (cpu, cuda, cuda:N, mps)")
    return device


def check_writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a Path once a file could be created in it; else an OSError naming
    ``flag``. Folders made for the probe are removed again, so nothing is left behind."""
    path = Path(path)
    missing, existing = [], path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is not a folder, so the output cannot be written there")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise type(err)(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return path
