"""The parent's inbox from a child broker is bounded in bytes: a child sending far more than the
parent reads waits, the parent's memory stays bounded, and nothing is lost.

The test runs a real worker process and checks that none (nor anything it started) is left
running afterwards.
"""

from __future__ import annotations

import sys

import anyio
import hostile_functions
import pytest
from hostile_functions import (
    FLOOD_MESSAGE_BYTES,
    FLOOD_MESSAGES,
    Records,
    reset_peak_rss,
    vm_status,
)

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit, log_to_structlog

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)"),
    pytest.mark.usefixtures("nothing_left_running"),
]

#: Generous bound for one step (a worker starts in about 0.3 s on a quiet machine).
STEP = 30.0
MIB = 2**20
#: How much the parent's memory may grow while a child floods it and it reads nothing: the
#: inbox (16 MiB by default) holds 4 messages of 4 MiB, plus one in decoding (4 MiB), plus the
#: link's unparsed bytes (up to a frame, 4 MiB) and its copies while decoding (~ 2 frames): about
#: 40 MiB; 200 MiB leaves room for the allocator and a noisy machine.
GROWTH_BOUND = 200 * MIB


def intact(number: int, message: object) -> bool:
    """Whether ``message`` is message ``number`` of :func:`hostile_functions.floods_the_parent`."""
    if not isinstance(message, bytes) or len(message) != FLOOD_MESSAGE_BYTES:
        return False
    tag = number.to_bytes(4, "big")
    return message[:4] == tag and message[-4:] == tag and message[4:4096] == bytes(4092)


class TestInboxBound:
    async def test_a_flooding_child_waits_and_the_parents_memory_stays_bounded(self) -> None:
        """A child sends 300 messages of 4 MiB (1.2 GiB) while the parent reads none: once the child's
        send waits, the parent's peak RSS grew by less than 200 MiB (16 MiB inbox, link buffers,
        allocator slack); then the parent reads all 300, intact and in order, none lost."""
        records = Records()
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.unsubscribe("log", log_to_structlog)
            bus.subscribe("log", records)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "flood", hostile_functions.floods_the_parent)
            broker.subscribe()
            baseline = vm_status("VmRSS")
            peak_known = reset_peak_rss()
            await bus.start()
            blocked = await records.wait_until(lambda r: r.msg == "child send blocked", STEP * 2)
            growth = vm_status("VmHWM" if peak_known else "VmRSS") - baseline
            wrong: list[int] = []
            with anyio.fail_after(STEP * 4):
                for number in range(FLOOD_MESSAGES):
                    if not intact(number, await broker.receive()):
                        wrong.append(number)
                await records.wait_until(lambda r: r.msg == "child sent everything", STEP)
                await broker.send("anything more?")
                answer = await broker.receive()
            unexpected_exits = list(exits)
        assert growth < GROWTH_BOUND, f"the parent grew by {growth / MIB:.0f} MiB"
        assert 0 < blocked.fields["sent"] < FLOOD_MESSAGES
        assert ([], [], "anything more?") == (wrong, unexpected_exits, answer[1])
