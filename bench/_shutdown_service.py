"""The services that bench_shutdown.py stops with SIGTERM; run one as ``python bench/_shutdown_service.py KIND N``.

KIND is one of:

- ``aiobus``: a Bus with a SignalHandler, and N child brokers plus N programs (N may be 0);
- ``cherrypy``: CherryPy's wspbus with its SignalHandler plugin (N is ignored);
- ``plain``: no bus: a plain parent with 2N sleeping Python children; it waits for SIGTERM
  with ``sigwait``, then terminates and reaps them one after another (the floor cost of
  stopping that many processes).

The service prints ``ready`` once it is started, then, once stopped, ``blocked <t>`` where t
is ``time.monotonic()`` (system-wide on Linux) right after ``block()`` returned (or, for
``plain``, after the last child was reaped). Logs go to standard error. Each service imports only what it uses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the other services must not pay for loading aiobus
    from aiobus import Bus, ParentLink

SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e9)"]


async def broker(bus: Bus, link: ParentLink) -> None:
    """A child broker that takes messages until the parent stops it."""
    async for _ in link:
        pass


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


async def serve_aiobus(children: int) -> int:
    from aiobus import Bus, ChildBroker
    from aiobus.plugins import SignalHandler, Subprocess

    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        for i in range(children):
            ChildBroker(bus, f"broker-{i}", broker).subscribe()
        for i in range(children):
            Subprocess(bus, f"program-{i}", SLEEPER).subscribe()
        await bus.start()
        say("ready")
        await bus.block()
        say("blocked", repr(time.monotonic()))
    return bus.exit_code


def serve_cherrypy() -> int:
    from cherrypy.process import plugins, wspbus  # type: ignore[import-untyped]

    bus = wspbus.Bus()
    bus.subscribe("log", lambda msg, level=20, traceback=False: sys.stderr.write(f"{msg}\n"))
    plugins.SignalHandler(bus).subscribe()
    bus.start()
    say("ready")
    bus.block()
    say("blocked", repr(time.monotonic()))
    return 0


def serve_plain(children: int) -> int:
    command = [sys.executable, "-c", "print(flush=True); import time; time.sleep(1e9)"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(2 * children)]
    for process in processes:
        assert process.stdout is not None
        process.stdout.readline()  # it is up
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # after the spawns: children inherit the mask
    say("ready")
    signal.sigwait({signal.SIGTERM})
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()
    say("blocked", repr(time.monotonic()))
    return 0


def main() -> int:
    kind, children = sys.argv[1], int(sys.argv[2])
    if kind == "aiobus":
        import anyio

        from aiobus import configure_logging

        configure_logging()
        return anyio.run(serve_aiobus, children)
    if kind == "cherrypy":
        return serve_cherrypy()
    if kind == "plain":
        return serve_plain(children)
    raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":  # required: the child brokers' workers import this module again
    raise SystemExit(main())
