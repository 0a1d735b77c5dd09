"""Child broker functions for the tests: importable by name in the worker (tests/ is on sys.path)."""

from __future__ import annotations

import os
import time

import anyio
import structlog

from aiobus import Bus, EndOfLink, ParentLink


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


# -- for tests/faults/test_frames.py: objects that pickle but do not unpickle, and a child that reports link errors


def refuse_to_load() -> None:
    """Called by the unpickler of a LoadBomb: it fails, as a constructor or __setstate__ might."""
    raise ValueError("this object refuses to be unpickled")


class LoadBomb:
    """Pickles fine (by reference to refuse_to_load); unpickling it raises ValueError, in any process."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (refuse_to_load, ())


async def reports_link_errors(bus: Bus, link: ParentLink) -> None:
    """Echo messages; say what fails instead of failing, and keep going.

    "pid" asks for the pid; "send a lambda" sends one; "send a bomb" sends a LoadBomb the
    parent cannot unpickle. A message this child cannot unpickle is answered with
    ("undecodable", error); a send that fails with ("send failed", error).
    """
    from aiobus import LinkError

    while True:
        try:
            message = await link.receive()
        except LinkError as error:
            await link.send(("undecodable", str(error)))
            continue
        except anyio.EndOfStream:
            return
        try:
            if message == "pid":
                await link.send(("pid", os.getpid()))
            elif message == "send a lambda":
                await link.send(lambda: "never pickled")
            elif message == "send a bomb":
                await link.send(LoadBomb())
            else:
                await link.send(("echo", message))
        except LinkError as error:
            await link.send(("send failed", str(error)))


async def sends_a_lambda(bus: Bus, link: ParentLink) -> None:
    """Send an object that cannot be pickled, without catching the error."""
    await link.send(lambda: "never pickled")


# -- for tests/faults/test_killed_children.py: a child that records what it processes, and stubborn ones


#: The size of one record written by :func:`records`: it divides the page size, so a record
#: appended at a multiple of it never straddles two pages and is written whole or not at all.
RECORD_SIZE = 32


async def records(bus: Bus, link: ParentLink) -> None:
    """For each message ``(path, number)``, append one record "<pid> <number>" to ``path``.

    The record is written (one ``os.write``, O_APPEND: it survives a SIGKILL that follows)
    only after an await, a longer one for every 50th message: heartbeats go out while a
    message is being worked on.
    """
    pid = os.getpid()
    files: dict[str, int] = {}
    try:
        async for path, number in link:
            await anyio.sleep(0.005 if number % 50 == 0 else 0)
            fd = files.get(path)
            if fd is None:
                fd = files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, f"{pid} {number}".ljust(RECORD_SIZE - 1).encode() + b"\n")
    finally:
        for fd in files.values():
            os.close(fd)


async def ignores_sigterm(bus: Bus, link: ParentLink) -> None:
    """Have the kernel discard SIGTERM, and go on running after the end of input: only SIGKILL ends it."""
    import signal  # here: this part of the module is appended to, not rearranged

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await link.send(("pid", os.getpid()))
    async for _ in link:
        pass
    await anyio.sleep_forever()


async def stalls_on_first(bus: Bus, link: ParentLink) -> None:
    """Take the first message and never finish with it; heartbeats go on meanwhile."""
    message = await link.receive()
    ticks = anyio.Event()
    bus.subscribe("main", lambda: ticks.set() if bus.statistics().ticks >= 3 else None, priority=1000)
    await ticks.wait()  # heartbeats went out after the message was taken
    await link.send(("took", message))
    await anyio.sleep_forever()


async def receives_after_the_end(bus: Bus, link: ParentLink) -> None:
    """Once the parent has stopped it, ask for a message again and tell the parent what that did."""
    async for _ in link:
        pass
    try:
        message = await link.receive()
    except EndOfLink as error:
        await link.send(("again", type(error).__name__))
    else:
        await link.send(("again", message))


async def report_environment(bus: Bus, link: ParentLink) -> None:
    """Send the values of systemd's variables and of OTHER in this process's environment, then serve until stopped."""
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OTHER")
    await link.send({name: os.environ.get(name) for name in names})
    async for _ in link:
        pass


async def report_console_modules(bus: Bus, link: ParentLink) -> None:
    """Send whether rich was loaded with structlog, whether structlog's console renderer took it, and
    where ``import rich`` finds it when the child's own code asks; then serve until stopped."""
    import sys

    import structlog.dev

    loaded = "rich" in sys.modules
    taken = getattr(structlog.dev, "rich", None) is not None
    import rich  # type: ignore[import-not-found]  # a stand-in the test puts on PYTHONPATH

    await link.send((loaded, taken, rich.__file__))
    async for _ in link:
        pass


async def leaves_work_for_its_end(bus: Bus, link: ParentLink) -> None:
    """Take a folder; register an atexit handler writing ``atexit`` there and start a non-daemon
    thread writing ``thread`` there a little later; say so, then serve until stopped."""
    import atexit
    import pathlib
    import threading

    folder = pathlib.Path(await link.receive())
    atexit.register((folder / "atexit").write_text, "ran")

    def late() -> None:
        time.sleep(0.5)
        (folder / "thread").write_text("ran")

    threading.Thread(target=late, daemon=False).start()
    await link.send("armed")
    async for _ in link:
        pass
