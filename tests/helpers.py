"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field
from typing import Any

import anyio

from aiobus import Bus


@dataclass
class LogRecord:
    msg: str
    level: int
    fields: dict[str, Any]


@dataclass
class LogRecorder:
    """A ``log`` listener that keeps what it is sent."""

    records: list[LogRecord] = field(default_factory=list)

    waiters: list[tuple[str, anyio.Event]] = field(default_factory=list)

    def __call__(self, msg: str, level: int, **fields: Any) -> None:
        self.records.append(LogRecord(msg, level, fields))
        for text, event in self.waiters:
            if text in msg:
                event.set()

    async def wait_for(self, text: str, seconds: float = 10) -> None:
        """Wait until a message containing ``text`` has been logged."""
        if self.matching(text):
            return
        waiter = (text, anyio.Event())
        self.waiters.append(waiter)
        try:
            with anyio.fail_after(seconds):
                await waiter[1].wait()
        finally:
            self.waiters.remove(waiter)

    @property
    def messages(self) -> list[str]:
        return [record.msg for record in self.records]

    def matching(self, text: str) -> list[LogRecord]:
        return [record for record in self.records if text in record.msg]


async def wait_for_ticks(bus: Bus, count: int, seconds: float = 10) -> None:
    """Wait, on an event and not by polling, until ``bus`` has published ``count`` main ticks."""
    reached = anyio.Event()

    def check() -> None:
        if bus.statistics().ticks >= count:
            reached.set()

    check()
    bus.subscribe("main", check, priority=1000)
    try:
        with anyio.fail_after(seconds):
            await reached.wait()
    finally:
        bus.unsubscribe("main", check)


_TAKEN: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now, below the kernel's ephemeral range, and not given before in this run.

    A port from ``bind(("127.0.0.1", 0))`` comes from the ephemeral range, where any outgoing connection
    of any process (the shared machine's, the tests' own) may take it before the program under test binds
    it; below that range only an explicit bind can.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            ephemeral = int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    while True:
        port = random.randrange(10000, max(ephemeral, 10001))
        if port in _TAKEN:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
