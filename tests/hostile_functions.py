"""Child broker functions for the hostile tests (tests/children), importable by name in the worker,
and the few parent-side helpers those tests share.

Parameters a child function cannot take as arguments come through the environment, which
a worker inherits from the test process when it is started (see each function).
"""

from __future__ import annotations

import gc
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from helpers import LogRecord, LogRecorder
from processes import alive, descendants

from aiobus import Bus, Link, ParentLink

#: The environment variable naming a file whose existence makes :func:`crashes_if_flagged` exit at once.
CRASH_FLAG = "AIOBUS_TEST_CRASH_FLAG"

#: The size of each message :func:`floods_the_parent` sends, and how many it sends.
FLOOD_MESSAGE_BYTES = 4 * 2**20
FLOOD_MESSAGES = 300

#: The line :func:`prints_a_huge_line` prints, and the bytes :func:`writes_a_huge_stderr_line` writes.
HUGE_LINE_BYTES = 20 * 2**20
HUGE_STDERR_BYTES = 32 * 2**20
#: The structlog field :func:`logs_a_huge_event` logs (over the 1 MiB limit of a log line).
HUGE_EVENT_BYTES = 2 * 2**20

#: How many lines (and structlog events) the flooding children write.
FLOOD_LINES = 100_000


# -- child functions --------------------------------------------------------------------


async def _answer(link: ParentLink) -> None:
    """Answer each message with ("answer", msg, pid) until the parent stops the child."""
    async for message in link:
        await link.send(("answer", message, os.getpid()))


async def answers(bus: Bus, link: ParentLink) -> None:
    """Say which process runs this incarnation, then answer every message."""
    await link.send(("pid", os.getpid()))
    await _answer(link)


def refuse_to_load() -> None:
    """What a :class:`Unloadable` calls as it is unpickled."""
    raise ValueError("this object refuses to be unpickled")


class Unloadable:
    """Pickles fine, and fails to unpickle anywhere."""

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return refuse_to_load, ()


async def sends_bad_control_messages(bus: Bus, link: ParentLink) -> None:
    """Find this child's control link (as a buggy or hostile child could) and send it a message of
    an unknown kind and one that does not unpickle; then answer messages."""
    [control] = [obj for obj in gc.get_objects() if isinstance(obj, Link) and obj.name == "control"]
    await control.send(("garbage", 1))
    await control.send(Unloadable())
    await control.drain()
    await answers(bus, link)


async def runs_echo_subprocess(bus: Bus, link: ParentLink) -> None:
    """Run ``echo hi`` as a subprocess that inherits the child's stdout, then answer messages."""
    subprocess.run(["echo", "hi"], check=True)  # noqa: ASYNC221 - a short blocking call, as user code does
    await link.send(("pid", os.getpid()))
    await _answer(link)


async def never_reads(bus: Bus, link: ParentLink) -> None:
    """Say which process runs this incarnation, then never read the link."""
    await link.send(("pid", os.getpid()))
    await anyio.sleep_forever()


async def crashes_if_flagged(bus: Bus, link: ParentLink) -> None:
    """Exit the child's bus at once while the file named by $AIOBUS_TEST_CRASH_FLAG exists; else answer."""
    if await anyio.Path(os.environ[CRASH_FLAG]).exists():
        await bus.exit()
        return
    await answers(bus, link)


async def logs_colliding_fields(bus: Bus, link: ParentLink) -> None:
    """Log a structlog event whose fields are named as the parent's own, then answer messages."""
    structlog.get_logger("child").warning(
        "colliding fields",
        child="child's child",
        child_pid=-1,
        msg="child's msg",
        level="child's level",
        traceback="child's traceback",
        timestamp="child's timestamp",
        **{"child.x": "child's child.x"},
    )
    bus.log("colliding through bus.log", child="bus child", child_pid=-2, event="bus event", timestamp="bus ts")
    structlog.get_logger("child").info("collisions logged")  # after the others, on the same socket
    await answers(bus, link)


async def floods_the_parent(bus: Bus, link: ParentLink) -> None:
    """Send FLOOD_MESSAGES messages of FLOOD_MESSAGE_BYTES each, logging when a send first waits.

    Message ``i`` is ``i`` as 4 big-endian bytes, zeros, then ``i`` again. A send that has
    not returned after 2 s counts as blocked: "child send blocked" is logged (field
    ``sent``: how many went before) and the send is made again (a cancelled send queued
    nothing). At the end "child sent everything" is logged.
    """
    log = structlog.get_logger("child")
    blocked = False
    for number in range(FLOOD_MESSAGES):
        tag = number.to_bytes(4, "big")
        message = tag + bytes(FLOOD_MESSAGE_BYTES - 8) + tag
        if not blocked:
            with anyio.move_on_after(2) as scope:
                await link.send(message)
            if not scope.cancelled_caught:
                continue
            blocked = True
            log.info("child send blocked", sent=number)
        await link.send(message)
    log.info("child sent everything", sent=FLOOD_MESSAGES)
    await _answer(link)


async def prints_a_huge_line(bus: Bus, link: ParentLink) -> None:
    """Print one line of HUGE_LINE_BYTES bytes, then answer messages."""
    print("x" * HUGE_LINE_BYTES)  # noqa: T201 - the child's output is under test
    await answers(bus, link)


async def writes_a_huge_stderr_line(bus: Bus, link: ParentLink) -> None:
    """Write HUGE_STDERR_BYTES to descriptor 2 in 64 KiB chunks with no newline, then a short line."""
    chunk = b"e" * 65536
    for _ in range(HUGE_STDERR_BYTES // len(chunk)):
        os.write(2, chunk)
    os.write(2, b"\nshort line after the huge one\n")
    await answers(bus, link)


async def logs_a_huge_event(bus: Bus, link: ParentLink) -> None:
    """Log a structlog event with a field of HUGE_EVENT_BYTES, then a short one, then answer messages."""
    log = structlog.get_logger("child")
    log.info("huge event", blob="y" * HUGE_EVENT_BYTES)
    log.info("short event after the huge one")
    await answers(bus, link)


async def prints_many_lines(bus: Bus, link: ParentLink) -> None:
    """Print FLOOD_LINES lines ``flood line <n>``, then answer messages."""
    for number in range(FLOOD_LINES):
        print(f"flood line {number}")  # noqa: T201 - the child's output is under test
    await answers(bus, link)


async def logs_many_events(bus: Bus, link: ParentLink) -> None:
    """Log FLOOD_LINES structlog events ``flood event`` with field ``n``, then answer messages."""
    log = structlog.get_logger("child")
    for number in range(FLOOD_LINES):
        log.info("flood event", n=number)
    await answers(bus, link)


async def sleeps_per_message(bus: Bus, link: ParentLink) -> None:
    """Block the event loop for 2 s per message (time.sleep), then answer it."""
    await link.send(("pid", os.getpid()))
    async for message in link:
        time.sleep(2)  # noqa: ASYNC251 - blocking work, as user code does
        await link.send(("answer", message, os.getpid()))


# -- parent-side helpers ----------------------------------------------------------------


class Records(LogRecorder):
    """A ``log`` listener that keeps what it is sent and wakes waiters on a condition."""

    def __init__(self) -> None:
        super().__init__()
        self.conditions: list[tuple[Callable[[LogRecord], bool], anyio.Event]] = []

    def __call__(self, msg: str, level: int, **fields: Any) -> None:
        super().__call__(msg, level, **fields)
        record = self.records[-1]
        for condition, event in self.conditions:
            if condition(record):
                event.set()

    async def wait_until(self, condition: Callable[[LogRecord], bool], seconds: float = 30) -> LogRecord:
        """Wait until a record for which ``condition`` holds has been logged, and return the first such."""
        for record in self.records:
            if condition(record):
                return record
        waiter = (condition, anyio.Event())
        self.conditions.append(waiter)
        try:
            with anyio.fail_after(seconds):
                await waiter[1].wait()
        finally:
            self.conditions.remove(waiter)
        return next(record for record in self.records if condition(record))


def is_worker(pid: int) -> bool:
    """Whether ``pid`` runs a child broker's worker (``aiobus/_children/_boot.py``, however started)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            argv = file.read().split(b"\0")
    except OSError:
        return False
    return any(
        arg.replace(b"/", b".").endswith(b"aiobus._children._boot" + suffix) for arg in argv for suffix in (b"", b".py")
    )


def left_running(before: set[int], seconds: float = 10) -> list[int]:
    """The processes descended from this one since ``before`` still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := alive(sorted(descendants() - before))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def vm_status(key: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


async def blocks_its_loop_at_once(bus: Bus, link: ParentLink) -> None:
    """Block the event loop for 5 s as soon as the function runs (before any await)."""
    time.sleep(5)  # noqa: ASYNC251 - the point: a loop blocked from the start
    await _answer(link)


async def ignores_everything(bus: Bus, link: ParentLink) -> None:
    """Say its pid, then block the loop for good: neither the stop nor SIGTERM can end it."""
    await link.send(("pid", os.getpid()))
    await link.drain()
    while True:
        time.sleep(0.05)  # noqa: ASYNC251


async def starts_an_escaping_subprocess(bus: Bus, link: ParentLink) -> None:
    """Start ``setsid sleep 300`` (a new session: out of the worker's process group, holding its
    stdout and stderr), report its pid, then answer messages."""
    escaped = subprocess.Popen(["setsid", "sleep", "300"])  # noqa: ASYNC220 - a start, nothing awaited
    await link.send(("escaped", escaped.pid))
    await _answer(link)


#: How many messages :func:`sends_and_returns` sends, and their size.
SENT_AT_STOP = 10
SENT_AT_STOP_BYTES = 200_000


async def sends_and_returns(bus: Bus, link: ParentLink) -> None:
    """Send SENT_AT_STOP messages of SENT_AT_STOP_BYTES each, then return."""
    for number in range(SENT_AT_STOP):
        await link.send((number, b"z" * SENT_AT_STOP_BYTES))


async def works(bus: Bus, link: ParentLink) -> None:
    """For pools: answer each message with ``(pid, message)``, after 2 ms of CPU work; a message
    ``"hold"`` is taken and never finished (the function waits for good)."""
    async for message in link:
        if message == "hold":
            await link.send((os.getpid(), "holding"))
            await anyio.sleep_forever()
        deadline = time.process_time() + 0.002
        while time.process_time() < deadline:
            pass
        await link.send((os.getpid(), message))
