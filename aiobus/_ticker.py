"""The main ticker: a task that publishes ``main`` on a drift-free schedule (:class:`Schedule`, which
Monitor follows too)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio

from ._seconds import check_seconds


class Schedule:
    """The points ``start + k * interval`` for k = 1, 2, ...: a drift-free schedule.

    Each point is computed from the start, not from the previous one, so the schedule
    never drifts with the time the work between points takes. :attr:`due` is the
    next point; once its work is done, :meth:`advance` moves to the first point still
    ahead (at least the one after), so work that overran its period causes no burst of
    catch-up work: the points it overran are skipped, and counted. After a pause (no
    work wanted), :meth:`resume` goes on at the first point ahead.

    Args:
        interval: seconds between two points (a finite number > 0).
        start: the schedule's origin on anyio's clock; now (``anyio.current_time()``) if None.

    Raises:
        ValueError: ``interval`` is not a finite number of seconds > 0.
    """

    def __init__(self, interval: float, start: float | None = None) -> None:
        self.interval = check_seconds("interval", interval, positive=True)
        self.start = anyio.current_time() if start is None else start
        self._point = 1

    @property
    def due(self) -> float:
        """When the next point is due, on anyio's clock."""
        return self.start + self._point * self.interval

    def advance(self) -> int:
        """Move to the first point after now, and at least to the one after :attr:`due`.

        Returns:
            How many points were skipped: those between the old :attr:`due` and the new one.
        """
        following = max(self._point + 1, self._ahead())
        skipped = following - self._point - 1
        self._point = following
        return skipped

    def resume(self) -> None:
        """After a pause: move to the first point after now, if :attr:`due` has passed.

        The points passed are not counted as skipped: no work was due at them.
        """
        self._point = max(self._point, self._ahead())

    def _ahead(self) -> int:
        """The number of the first point after now."""
        return math.floor((anyio.current_time() - self.start) / self.interval) + 1


class Ticker:
    """Calls ``tick`` at ``start + k * interval`` for k = 1, 2, ... until stopped.

    A tick slower than the interval delays the next one but causes no burst of
    catch-up ticks: the schedule points it overran are skipped and counted in
    ``skipped(n)``. The schedule never drifts, since each point is computed from the
    start and not from the previous tick.

    Given ``wanted``, the ticker sleeps while ``wanted()`` is false (nobody listens),
    with no wake-up at all, until :meth:`wake` is called; it then goes on at the next
    point of its schedule. The points it slept through are not ticks, nor skipped.
    """

    def __init__(
        self,
        interval: float,
        tick: Callable[[], Awaitable[None]],
        skipped: Callable[[int], None],
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        self.interval = interval
        self._skipped = skipped
        self._wanted = wanted
        self._wake = anyio.Event()
        self.task_id: int | None = None
        self._tick = tick
        self._stopping = anyio.Event()
        self._done = anyio.Event()
        self._scope: anyio.CancelScope | None = None

    async def run(self) -> None:
        """Tick until :meth:`stop` is called; cancellation ends it at once."""
        self.task_id = anyio.get_current_task().id
        try:
            with anyio.CancelScope() as self._scope:
                await self._loop()
        finally:
            self._done.set()

    async def _loop(self) -> None:
        schedule = Schedule(self.interval)
        while True:
            if self._wanted is not None and not self._wanted():
                while not self._wanted() and not self._stopping.is_set():
                    self._wake = anyio.Event()
                    await self._wake.wait()
                schedule.resume()
            with anyio.CancelScope(deadline=schedule.due):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            await self._tick()
            skipped = schedule.advance()
            if skipped:
                self._skipped(skipped)

    @property
    def running(self) -> bool:
        """Whether the ticker's task has started and not yet ended."""
        return self.task_id is not None and not self._done.is_set()

    def wake(self) -> None:
        """Say that ``wanted()`` may have become true: a sleeping ticker looks again."""
        self._wake.set()

    def stop(self) -> None:
        """Ask the ticker to end after the tick in progress, if any."""
        self._stopping.set()
        self._wake.set()

    def cancel(self) -> None:
        """End the ticker now, cancelling the tick in progress."""
        self._stopping.set()
        self._wake.set()
        if self._scope is not None:
            self._scope.cancel()

    async def wait_done(self) -> None:
        """Wait until the ticker's task has ended.

        Cancelled: nothing changes for the ticker. No timeout.
        """
        await self._done.wait()
