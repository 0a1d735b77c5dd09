"""Liveness checks of the Subprocess plugin: whether a running program still answers.

The same checks as readiness, repeated while the program runs: :class:`PortReady` (its port
answers, held by its process group) or :class:`LineReady` (a line of output matching since
the previous check: a heartbeat). One check every ``interval`` seconds, each bounded by that
interval; ``failures`` failures in a row and the program counts as not live.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ._readiness import LineReady, PortReady


async def wait_not_live(
    check: PortReady | LineReady, pgid: int | None, interval: float, failures: int, lines: Callable[[], int]
) -> str:
    """Check every ``interval`` seconds; return why, in words, once ``failures`` checks in a row failed.

    Args:
        check: the check to repeat.
        pgid: the program's process group (its listening socket must belong to it).
        interval: seconds between two checks, and the bound on each.
        failures: how many failed checks in a row make the program not live.
        lines: how many lines matching a LineReady the program has written so far.

    Cancelled: it stops checking, and changes nothing for the program. It never times out.
    """
    misses = 0
    seen = lines()
    while True:
        await anyio.sleep(interval)
        if isinstance(check, PortReady):
            live = False
            with anyio.move_on_after(interval):
                await check.wait(pgid)
                live = True
            why = f"port {check.port} did not answer within {interval:g} s"
        else:
            now = lines()
            live, seen = now > seen, now
            why = f"no line matching {check.regex.pattern!r} within {interval:g} s"
        misses = 0 if live else misses + 1
        if misses >= failures:
            return f"liveness check failed {misses} times in a row: {why}"
