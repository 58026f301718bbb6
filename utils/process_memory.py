"""Memory of this process and its children (DataLoader workers, conversion processes), read
from Linux's /proc: resident (RSS, shared pages counted in every process that maps them) and
proportional (PSS, a shared page split between the processes sharing it, so the PSS of a
process tree is what it really occupies). Elsewhere the functions return None."""
from __future__ import annotations

import os
import threading
from pathlib import Path

GIB = 2**30


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what new allocations can take without swapping; None
    where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tree_pids(pid: int | None = None) -> list[int]:
    """``pid`` (default: this process) and all its descendants alive now."""
    out, todo = [], [os.getpid() if pid is None else int(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def process_memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) bytes of one process from /proc/<pid>/smaps_rollup; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            values[parts[0][:-1]] = int(parts[1]) * 1024
    return (values["Rss"], values["Pss"]) if len(values) == 2 else None


def tree_memory(pid: int | None = None) -> dict | None:
    """{"processes", "rss", "pss"} summed over ``pid``'s process tree (bytes); None off Linux."""
    found = [m for m in (process_memory(p) for p in tree_pids(pid)) if m is not None]
    if not found:
        return None
    return {"processes": len(found), "rss": sum(m[0] for m in found), "pss": sum(m[1] for m in found)}


class MemorySampler:
    """Samples ``tree_memory`` every ``interval`` seconds in a thread while in a ``with`` block;
    ``peak`` is then {"processes", "rss", "pss"} at the sample of largest PSS (None off Linux)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = float(interval), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = tree_memory()
        if now is not None and (self.peak is None or now["pss"] > self.peak["pss"]):
            self.peak = now

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def peak_rss_bytes() -> tuple[int, int]:
    """(this process's peak RSS, the largest peak RSS of its waited-for children) in bytes
    (``resource.getrusage``; ru_maxrss is in KiB on Linux)."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)

