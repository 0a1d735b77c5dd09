"""A child broker's output at its limits: lines longer than a frame, 32 MiB without a newline,
oversized structlog events, and floods of 100,000 lines or events (none may be dropped).

Every test with a child runs a real worker process and checks that none (nor anything it
started) is left running afterwards.
"""

from __future__ import annotations

import logging
import sys
import time

import anyio
import hostile_functions
import pytest
from helpers import LogRecord
from hostile_functions import (
    FLOOD_LINES,
    HUGE_EVENT_BYTES,
    HUGE_LINE_BYTES,
    HUGE_STDERR_BYTES,
    Records,
)

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit, LineSplitter, log_to_structlog

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)"),
    pytest.mark.usefixtures("nothing_left_running"),
]

#: Generous bound for one step (a worker starts in about 0.3 s on a quiet machine).
STEP = 30.0
#: ChildBroker's default max_line.
MAX_LINE = 65536


def cut(kept: str, total: int) -> str:
    """The log line of a ``total``-byte line of which ``kept`` was kept."""
    return f"{kept}… [cut: {total - len(kept.encode())} bytes]"


class Run:
    """A bus with one child broker, its log recorded (and not rendered: floods stay cheap)."""

    def __init__(self, fn: object, name: str = "output") -> None:
        self.fn = fn
        self.name = name
        self.records = Records()
        self.exits: list[ChildExit] = []
        self.unexpected_exits: list[ChildExit] = []
        self.answer: object = None
        self.pid: int | None = None

    async def until(self, condition: object, seconds: float = STEP) -> LogRecord:
        """Start the child, wait for a record matching ``condition``, ask the child a question, stop."""
        assert callable(condition)
        async with Bus() as bus:
            bus.unsubscribe("log", log_to_structlog)
            bus.subscribe("log", self.records)
            bus.subscribe(CHILD_EXIT_CHANNEL, self.exits.append)
            broker = ChildBroker(bus, self.name, self.fn)  # type: ignore[arg-type]
            broker.subscribe()
            await bus.start()
            record = await self.records.wait_until(condition, seconds)
            with anyio.fail_after(STEP):
                _, self.pid = await broker.receive()
                await broker.send("still there?")
                self.answer = await broker.receive()
            self.unexpected_exits = list(self.exits)
        return record

    def lines(self, stream: str) -> list[str]:
        return [r.msg for r in self.records.records if r.fields.get("stream") == stream]


class TestLongLines:
    async def test_a_20_mib_print_is_logged_cut_with_the_count(self) -> None:
        """``print`` of a 20 MiB line (over the 16 MiB frame limit) is logged as its first 65536 bytes
        and ``… [cut: N bytes]``, N the rest."""
        run = Run(hostile_functions.prints_a_huge_line)
        record = await run.until(lambda r: r.fields.get("stream") == "stdout" and r.msg.startswith("xxx"))
        assert cut("x" * MAX_LINE, HUGE_LINE_BYTES) == record.msg

    async def test_a_child_that_printed_20_mib_keeps_running(self) -> None:
        """After printing a 20 MiB line the same incarnation answers; it was never restarted."""
        run = Run(hostile_functions.prints_a_huge_line)
        await run.until(lambda r: r.fields.get("stream") == "stdout" and r.msg.startswith("xxx"))
        assert (("answer", "still there?", run.pid), []) == (run.answer, run.unexpected_exits)

    async def test_32_mib_on_descriptor_2_without_newline_is_logged_cut(self) -> None:
        """32 MiB written to descriptor 2 in 64 KiB chunks, no newline, then one: logged cut, with the count."""
        run = Run(hostile_functions.writes_a_huge_stderr_line)
        record = await run.until(lambda r: r.fields.get("stream") == "stderr" and r.msg.startswith("eee"))
        assert cut("e" * MAX_LINE, HUGE_STDERR_BYTES) == record.msg

    async def test_32_mib_without_newline_is_forwarded_in_linear_time(self) -> None:
        """The 32 MiB line and the short line after it are logged within 30 s of the start (linear
        work takes well under a second here; a quadratic splitter would take minutes)."""
        run = Run(hostile_functions.writes_a_huge_stderr_line)
        start = time.monotonic()
        await run.until(lambda r: r.msg == "short line after the huge one", seconds=60)
        took = time.monotonic() - start
        assert took < 30, f"took {took:.1f} s"

    async def test_a_line_over_16_mib_on_descriptor_2_does_not_end_the_forwarding(self) -> None:
        """The short line written after the 32 MiB one arrives after it, from stderr; the child answers."""
        run = Run(hostile_functions.writes_a_huge_stderr_line)
        await run.until(lambda r: r.msg == "short line after the huge one", seconds=60)
        stderr = [line[:3] if line.startswith("eee") else line for line in run.lines("stderr")]
        assert ["eee", "short line after the huge one"] == stderr
        assert (("answer", "still there?", run.pid), []) == (run.answer, run.unexpected_exits)

    async def test_a_structlog_event_over_the_log_line_limit_is_cut_and_the_next_arrives(self) -> None:
        """An event with a 2 MiB field (over the 1 MiB log line limit) is logged cut, as malformed text
        at WARNING; the event after it arrives whole; the child answers."""
        run = Run(hostile_functions.logs_a_huge_event)
        await run.until(lambda r: r.msg == "short event after the huge one")
        [huge] = [r for r in run.records.records if r.fields.get("malformed") and "yyy" in r.msg]
        assert (logging.WARNING, True, "… [cut: ") == (huge.level, huge.fields.get("malformed"), huge.msg[2**20 :][:8])
        assert (("answer", "still there?", run.pid), []) == (run.answer, run.unexpected_exits)
        assert HUGE_EVENT_BYTES > 2**20


class TestLineSplitter:
    def test_a_32_mib_line_in_64_kib_chunks_never_holds_more_than_the_limit(self) -> None:
        """Fed 32 MiB without a newline in 64 KiB chunks, the splitter keeps at most ``limit`` bytes."""
        splitter = LineSplitter(MAX_LINE)
        chunk = b"z" * 65536
        held = 0
        for _ in range(512):
            assert [] == splitter.feed(chunk)
            held = max(held, len(splitter.buffer))
        assert (MAX_LINE, cut("z" * MAX_LINE, 32 * 2**20)) == (held, splitter.flush())

    def test_32_mib_costs_about_four_times_8_mib(self) -> None:
        """Linear time: feeding 32 MiB in 64 KiB chunks takes less than 8 times what 8 MiB takes
        (linear is 4; quadratic would be 16). CPU time of this thread, best of 5 runs each: the
        ratio is what is checked, with a 2x margin for a noisy machine."""
        chunk = b"z" * 65536

        def cost(chunks: int) -> float:
            best = float("inf")
            for _ in range(5):
                splitter = LineSplitter(MAX_LINE)
                start = time.thread_time()
                for _ in range(chunks):
                    splitter.feed(chunk)
                splitter.flush()
                best = min(best, time.thread_time() - start)
            return best

        small, large = cost(128), cost(512)
        assert large / max(small, 1e-6) < 8, f"8 MiB: {small:.4f} s, 32 MiB: {large:.4f} s"


class TestFloods:
    async def test_100000_printed_lines_all_arrive_in_order(self) -> None:
        """A child printing 100,000 lines: every one is logged, in order (backpressure, no drops)."""
        run = Run(hostile_functions.prints_many_lines)
        await run.until(lambda r: r.msg == f"flood line {FLOOD_LINES - 1}", seconds=180)
        flood = [line for line in run.lines("stdout") if line.startswith("flood line ")]
        assert [f"flood line {n}" for n in range(FLOOD_LINES)] == flood

    async def test_100000_structlog_events_all_arrive_in_order(self) -> None:
        """A child logging 100,000 structlog events: every one is logged, in order (no drops)."""
        run = Run(hostile_functions.logs_many_events)
        await run.until(lambda r: r.msg == "flood event" and r.fields.get("n") == FLOOD_LINES - 1, seconds=180)
        numbers = [r.fields.get("n") for r in run.records.records if r.msg == "flood event"]
        assert list(range(FLOOD_LINES)) == numbers

    async def test_a_child_that_flooded_its_log_keeps_running(self) -> None:
        """After 100,000 structlog events the same incarnation answers; it was never restarted."""
        run = Run(hostile_functions.logs_many_events)
        await run.until(lambda r: r.msg == "flood event" and r.fields.get("n") == FLOOD_LINES - 1, seconds=180)
        assert (("answer", "still there?", run.pid), []) == (run.answer, run.unexpected_exits)
