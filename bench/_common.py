"""Helpers shared by the benchmarks: tables, percentiles, and what /proc says about processes (Linux)."""

from __future__ import annotations

import os
import signal
import statistics
import sys
from collections.abc import Iterable, Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank, no interpolation)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a table: the first column left-aligned, the others right-aligned; floats with 2 decimals."""
    cells = [[str(h) for h in headers]]
    for row in rows:
        cells.append([f"{value:.2f}" if isinstance(value, float) else str(value) for value in row])
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    for line in cells:
        first, *rest = line
        parts = [first.ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        sys.stdout.write("  ".join(parts).rstrip() + "\n")
    sys.stdout.flush()


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# -- processes, from /proc --------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def is_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process itself (not of its children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``, found through the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of the process in KiB, from /proc/<pid>/smaps_rollup; (0, 0) if it is gone."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                key, _, rest = line.partition(" ")
                if key in values:
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values["Rss:"], values["Pss:"]


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL every process of ``pids`` that still runs (cleanup after a failure)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
