"""The same bus on trio, through anyio."""

from __future__ import annotations

import anyio
import anyio.lowlevel
from helpers import wait_for_ticks

from aiobus import Bus, State


def test_a_whole_cycle_runs_on_trio() -> None:
    """start, main ticks, graceful and exit run on the trio backend."""
    calls: list[str] = []

    async def cycle() -> State:
        async with Bus(main_interval=0.01) as bus:
            bus.subscribe("start", lambda: calls.append("start"))

            @bus.subscribe("graceful")
            async def reload() -> None:
                await anyio.lowlevel.checkpoint()
                calls.append("graceful")

            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            await wait_for_ticks(bus, 3)
            await bus.graceful()
            bus.start_soon(bus.exit)
            await bus.block()
            return bus.state

    assert anyio.run(cycle, backend="trio") is State.EXITING
    assert calls == ["start", "graceful", "stop", "exit"]


def test_stop_timeout_and_failures_on_trio() -> None:
    """A hung stop listener is cut off on trio too, and the exit listeners run."""
    calls: list[str] = []

    async def cycle() -> int:
        async def hang() -> None:
            await anyio.sleep_forever()

        async with Bus(stop_timeout=0.05) as bus:
            bus.subscribe("stop", hang)
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
        return bus.exit_code

    assert anyio.run(cycle, backend="trio") == 70
    assert calls == ["exit"]
