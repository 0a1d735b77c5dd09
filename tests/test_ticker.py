"""The main channel: an anyio task ticking on a drift-free schedule (aiobus.Schedule) while STARTED."""

from __future__ import annotations

import math

import anyio
import pytest
from helpers import wait_for_ticks

from aiobus import Bus, Schedule, State


class TestMainTicker:
    async def test_main_is_published_while_started(self) -> None:
        """Once STARTED, main is published again and again, in the STARTED state."""
        states: list[State] = []
        async with Bus(main_interval=0.01) as bus:
            bus.subscribe("main", lambda: states.append(bus.state))
            await bus.start()
            await wait_for_ticks(bus, 5)
        assert len(states) >= 5
        assert set(states) == {State.STARTED}

    async def test_no_tick_before_start_or_after_stop(self) -> None:
        """main is not published before start() nor after stop()."""
        async with Bus(main_interval=0.01) as bus:
            await anyio.sleep(0.05)
            assert bus.statistics().ticks == 0
            await bus.start()
            await wait_for_ticks(bus, 2)
            await bus.stop()
            ticks = bus.statistics().ticks
            await anyio.sleep(0.05)
            assert bus.statistics().ticks == ticks

    async def test_ticks_are_due_at_start_plus_k_intervals(self) -> None:
        """No tick comes early, and ticks plus skipped ticks keep up with the clock (no drift).

        Each listener takes 60% of the interval: a loop that sleeps one interval after
        each tick would fall behind by that much every tick.
        """
        interval = 0.02
        times: list[float] = []
        async with Bus(main_interval=interval) as bus:

            @bus.subscribe("main")
            async def busy() -> None:
                times.append(anyio.current_time())
                await anyio.sleep(interval * 0.6)

            started = anyio.current_time()
            await bus.start()
            await wait_for_ticks(bus, 25)
            await bus.stop()
            elapsed = anyio.current_time() - started
            stats = bus.statistics()
        slots = math.floor(elapsed / interval)
        assert stats.ticks + stats.ticks_skipped >= slots - 2
        assert stats.ticks + stats.ticks_skipped <= slots
        # never early: the k-th tick comes no sooner than k intervals after start
        for k, when in enumerate(times, start=1):
            assert when - started >= k * interval - 0.001

    async def test_a_slow_listener_causes_skipped_ticks_not_a_burst(self) -> None:
        """A listener slower than the interval skips the ticks it overran and counts them."""
        interval = 0.02
        async with Bus(main_interval=interval) as bus:

            @bus.subscribe("main")
            async def slow_first() -> None:
                if bus.statistics().ticks == 1:
                    await anyio.sleep(interval * 4.5)

            await bus.start()
            await wait_for_ticks(bus, 4)
            await bus.stop()
            stats = bus.statistics()
        assert stats.ticks_skipped >= 4  # a catch-up ticker would have skipped none

    async def test_a_failing_main_listener_does_not_stop_the_ticker(self) -> None:
        """A main listener that raises is counted as a failure and the ticks go on."""
        async with Bus(main_interval=0.01) as bus:

            @bus.subscribe("main")
            def broken() -> None:
                raise ValueError("bad tick")

            await bus.start()
            await wait_for_ticks(bus, 3)
            stats = bus.statistics()
            assert stats.failures["main"] >= 2
            assert bus.state is State.STARTED

    async def test_stop_waits_for_the_tick_in_progress(self) -> None:
        """stop() lets the main listener that is running finish before the stop listeners run."""
        events: list[str] = []
        entered = anyio.Event()
        async with Bus(main_interval=0.01) as bus:

            @bus.subscribe("main")
            async def long_tick() -> None:
                if "tick in" not in events:
                    events.append("tick in")
                    entered.set()
                    await anyio.sleep(0.05)
                    events.append("tick out")

            bus.subscribe("stop", lambda: events.append("stop"))
            await bus.start()
            await entered.wait()
            await bus.stop()
        assert events == ["tick in", "tick out", "stop"]

    async def test_main_ticks_are_counted_as_publishes(self) -> None:
        """Every tick is a publish of main."""
        async with Bus(main_interval=0.01) as bus:
            await bus.start()
            await wait_for_ticks(bus, 3)
            await bus.stop()
            stats = bus.statistics()
        assert stats.publishes["main"] == stats.ticks


class TestSchedule:
    async def test_points_are_start_plus_k_intervals(self) -> None:
        """The points are start + k * interval, each from the start: work done on time skips none."""
        schedule = Schedule(100.0)
        assert schedule.due == schedule.start + 100.0
        assert schedule.advance() == 0
        assert schedule.due == schedule.start + 200.0
        assert schedule.advance() == 0
        assert schedule.due == schedule.start + 300.0

    async def test_an_overrun_skips_the_points_it_passed_and_counts_them(self) -> None:
        """Work that ran past two more points goes on at the first point ahead, and says two were skipped."""
        schedule = Schedule(10.0, start=anyio.current_time() - 35.0)  # point 1 was due 25 s ago
        assert schedule.advance() == 2  # points 2 and 3 passed too
        assert schedule.due == schedule.start + 40.0

    async def test_resume_after_a_pause_goes_on_at_the_first_point_ahead(self) -> None:
        """After a pause past three points, resume() moves to the first point ahead; a due point still ahead stays."""
        schedule = Schedule(10.0, start=anyio.current_time() - 35.0)
        schedule.resume()
        assert schedule.due == schedule.start + 40.0
        schedule.resume()
        assert schedule.due == schedule.start + 40.0

    async def test_the_start_defaults_to_now_on_anyio_s_clock(self) -> None:
        """Without a start, the schedule starts at anyio.current_time()."""
        before = anyio.current_time()
        schedule = Schedule(1.0)
        assert before <= schedule.start <= anyio.current_time()

    @pytest.mark.parametrize("interval", [0, -1, math.inf, math.nan])
    def test_an_interval_that_is_not_positive_and_finite_is_a_value_error(self, interval: float) -> None:
        """A schedule needs a finite interval > 0."""
        with pytest.raises(ValueError, match="interval must be a finite number of seconds > 0"):
            Schedule(interval, start=0.0)
