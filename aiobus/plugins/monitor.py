"""Monitor: call a function every few seconds while the bus is started.

CherryPy's ``Monitor`` ran its callback in a thread whose timer could only be
stopped after its current sleep: a monitor with a long period held up every stop
(cherrypy#1209). Here the monitor is a task of the bus with a cancel scope of its
own, and ``stop`` cancels it at once, whatever is left of the wait.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from aiobus import Bus, Priority, Schedule, SimplePlugin, check_seconds, priority


@dataclass(frozen=True)
class MonitorStatistics:
    """A snapshot of a monitor's counters, from :meth:`Monitor.statistics`.

    Attributes:
        running: whether the monitor's task is scheduled or running.
        runs: calls of the callback that ended, with or without an error.
        failures: calls that raised an exception.
        skipped: scheduled calls dropped because a call overran its period.
    """

    running: bool
    runs: int
    failures: int
    skipped: int


@dataclass(eq=False)
class _Run:
    """One run of the monitor's task, from a start (or graceful) to a stop."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    task_id: int | None = None  # set once the task runs


def _callback_name(callback: object) -> str:
    while isinstance(callback, functools.partial):
        callback = callback.func
    return str(getattr(callback, "__qualname__", None) or type(callback).__qualname__)


class Monitor(SimplePlugin):
    """Calls ``callback()`` every ``frequency`` seconds while the bus is started.

    The calls follow an :class:`aiobus.Schedule`, as the bus's main tick does: the
    first comes ``frequency`` seconds after ``start``, then at ``start + k * frequency``
    for k = 2, 3...: the schedule does not drift with the time the calls take. A call
    that overruns its period delays the next one but causes no burst of catch-up
    calls; the dropped points are counted as ``skipped`` in :meth:`statistics`.

    The callback may be sync or async (or return an awaitable). A sync callback runs
    in the event loop and must be quick; wrap blocking work as
    ``functools.partial(anyio.to_thread.run_sync, fn)``. A callback that raises an
    Exception is logged at ERROR with its traceback (field ``monitor``) and the
    monitor goes on with the next call. The callback may stop, exit or restart the
    bus: its own monitor then stops without waiting for the call to return.

    Channels: ``start`` (``Priority.START_CHILD_USERS``, 85: after the children have
    started at 80 and after the default-priority plugins it may rely on) runs the
    monitor as a task of the bus; ``stop`` (``Priority.STOP_CHILD_USERS``, 10: before
    the children stop at 20, and before those plugins) cancels that task at once and
    returns when it has ended: an async callback in progress is cancelled at its next
    checkpoint, a sync one cannot be interrupted and ends first. So a callback that
    uses a child never meets it starting, stopping or gone. ``graceful`` restarts a
    running monitor: its schedule starts over from the graceful.

    Args:
        bus: the bus to attach to.
        callback: called with no arguments.
        frequency: seconds between two calls, a positive finite number.
        name: names the monitor in log lines and its task; the callback's name by default.

    Raises:
        TypeError: ``callback`` is not callable, or ``name`` is not a str.
        ValueError: ``frequency`` is not a positive finite number.
    """

    def __init__(self, bus: Bus, callback: Callable[[], Any], frequency: float, name: str | None = None) -> None:
        if not callable(callback):
            raise TypeError(f"a Monitor's callback must be callable, not {callback!r}")
        self.frequency = check_seconds("a Monitor's frequency", frequency, positive=True)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a Monitor's name must be a str, not {name!r}")
        super().__init__(bus)
        self.callback = callback
        self.name = _callback_name(callback) if name is None else name
        self._run: _Run | None = None
        self._runs = 0
        self._failures = 0
        self._skipped = 0

    def __repr__(self) -> str:
        return f"<Monitor {self.name!r} every {self.frequency:g} s>"

    # -- channels -------------------------------------------------------------------

    @priority(Priority.START_CHILD_USERS)
    async def start(self) -> None:
        """Run the monitor as a task of the bus; a no-op if it runs already.

        Cancelled: the monitor is not started. No timeout.
        """
        if self._run is None or self._run.scope.cancel_called:
            self._launch()

    @priority(Priority.STOP_CHILD_USERS)
    async def stop(self) -> None:
        """Cancel the monitor's task and wait until it has ended.

        Cancelled itself (say by the bus's ``stop_timeout``), it stops waiting; the
        task is cancelled all the same.
        """
        await self._halt()

    async def graceful(self) -> None:
        """Restart a running monitor (its schedule starts over); a stopped one stays stopped.

        Cancelled while waiting for the old task, it does not start a new one.
        """
        if self._run is not None and not self._run.scope.cancel_called:
            await self._halt()
            self._launch()

    def unsubscribe(self) -> None:
        """Unsubscribe from the bus and cancel the monitor's task, without waiting for it to end."""
        super().unsubscribe()
        if self._run is not None:
            self._run.scope.cancel()

    def statistics(self) -> MonitorStatistics:
        """The monitor's counters since it was created."""
        running = self._run is not None and not self._run.done.is_set() and not self._run.scope.cancel_called
        return MonitorStatistics(running=running, runs=self._runs, failures=self._failures, skipped=self._skipped)

    # -- the task ---------------------------------------------------------------------

    def _launch(self) -> None:
        run = _Run()
        self._run = run
        self.bus.start_soon(self._task, run, name=f"monitor {self.name}")

    async def _halt(self) -> None:
        run = self._run
        if run is None:
            return
        run.scope.cancel()
        # A task that never ran has nothing to wait for; nor does the callback itself
        # when it stops the bus (it would wait for its own end).
        if run.task_id is not None and run.task_id != anyio.get_current_task().id:
            await run.done.wait()
        if self._run is run:
            self._run = None

    async def _task(self, run: _Run) -> None:
        run.task_id = anyio.get_current_task().id
        try:
            with run.scope:
                await self._loop()
        finally:
            run.done.set()

    async def _loop(self) -> None:
        schedule = Schedule(self.frequency)
        while True:
            await anyio.sleep_until(schedule.due)
            await self._call()
            self._skipped += schedule.advance()

    async def _call(self) -> None:
        try:
            result = self.callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._failures += 1
            self.bus.log(f"Monitor {self.name} failed", logging.ERROR, traceback=True, monitor=self.name)
        self._runs += 1
