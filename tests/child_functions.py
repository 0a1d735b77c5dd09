"""Child broker functions for the tests: importable by name in the worker (tests/ is on sys.path)."""

from __future__ import annotations

import os
import time

import anyio
import structlog

from aiobus import Bus, ParentLink


async def echo(bus: Bus, link: ParentLink) -> None:
    """Send every message back as ("echo", msg) until the parent stops the child."""
    bus.log("echo child up")
    print("printed in the child")  # noqa: T201 - the child's print must reach the parent
    async for message in link:
        await link.send(("echo", message))
    bus.log("echo child drained")


async def count(bus: Bus, link: ParentLink) -> None:
    """Check that messages come 0, 1, 2... and report how many arrived in order."""
    expected = 0
    async for message in link:
        if message != expected:
            await link.send(("out of order", expected, message))
            return
        expected += 1
    await link.send(("counted", expected))


async def report_pid(bus: Bus, link: ParentLink) -> None:
    """Say which process runs this incarnation, then serve until stopped."""
    os.write(2, b"written to descriptor 2\n")  # as C code would
    await link.send(("pid", os.getpid()))
    structlog.get_logger("child").warning("a structlog warning", answer=42)

    @bus.subscribe("graceful")
    def reload() -> None:
        bus.log("child graceful ran")

    async for _ in link:
        pass


async def stubborn(bus: Bus, link: ParentLink) -> None:
    """Ignore the end of input and SIGTERM alike: block the loop for good once stopped."""
    await link.send(("pid", os.getpid()))
    async for _ in link:
        pass
    while True:  # blocks the event loop: the SIGTERM handler cannot run
        time.sleep(0.05)  # noqa: ASYNC251


async def hangs_after_start(bus: Bus, link: ParentLink) -> None:
    """Block the event loop soon after starting: no more heartbeats."""
    await link.send(("pid", os.getpid()))
    await anyio.sleep(0.2)
    while True:
        time.sleep(0.05)  # noqa: ASYNC251


async def exits_itself(bus: Bus, link: ParentLink) -> None:
    """Exit the child's own bus at once, as the article's broker does on "stop"."""
    await bus.exit()


async def fails(bus: Bus, link: ParentLink) -> None:
    """Raise right away."""
    raise RuntimeError("the broker could not connect to the exchange")


async def ignores_input(bus: Bus, link: ParentLink) -> None:
    """Say which process runs this incarnation, then never read a message."""
    await link.send(("pid", os.getpid()))
    await anyio.sleep_forever()


class Doubler:
    """A child as a class: built with (bus, link), its run() is the body."""

    def __init__(self, bus: Bus, link: ParentLink) -> None:
        self.bus = bus
        self.link = link

    async def run(self) -> None:
        async for number in self.link:
            await self.link.send(number * 2)
