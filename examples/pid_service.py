"""A service as systemd or an init script would run it: a PID file, signal handling,
and a clean exit (code 0, PID file gone) on SIGTERM or Ctrl-C.

    python examples/pid_service.py --pidfile /tmp/pid_service.pid

A second copy started on the same PID file refuses to start, naming the first one's pid.
"""

from __future__ import annotations

import argparse

import anyio

from aiobus import Bus, configure_logging
from aiobus.plugins import PIDFile, SignalHandler


async def main(pidfile: str, interval: float) -> int:
    async with Bus(main_interval=interval, stop_timeout=10) as bus:
        SignalHandler(bus).subscribe()  # SIGTERM and Ctrl-C exit, SIGHUP restarts, SIGUSR1 is graceful
        PIDFile(bus, pidfile).subscribe()  # written at start (priority 70), removed at exit

        @bus.subscribe("graceful")
        def reload() -> None:
            bus.log("Reloading the configuration")

        try:
            await bus.start()
        except Exception:
            return bus.exit_code  # already logged; the bus ran stop and exit
        bus.log("Service running", pidfile=pidfile)
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pidfile", default="/tmp/aiobus-pid-service.pid", help="where to write the pid")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between main ticks")
    args = parser.parse_args()
    configure_logging()
    raise SystemExit(anyio.run(main, args.pidfile, args.interval))
