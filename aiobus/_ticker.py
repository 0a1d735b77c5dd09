"""The main ticker: a task that publishes ``main`` on a drift-free schedule."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio


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
        start = anyio.current_time()
        due = 1
        while True:
            if self._wanted is not None and not self._wanted():
                while not self._wanted() and not self._stopping.is_set():
                    self._wake = anyio.Event()
                    await self._wake.wait()
                due = max(due, math.floor((anyio.current_time() - start) / self.interval) + 1)
            with anyio.CancelScope(deadline=start + due * self.interval):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            await self._tick()
            # The first schedule point still ahead of us; the ones between are skipped.
            elapsed = anyio.current_time() - start
            following = max(due + 1, math.floor(elapsed / self.interval) + 1)
            if following > due + 1:
                self._skipped(following - due - 1)
            due = following

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
