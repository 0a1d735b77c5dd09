"""A service as systemd or an init script would run it: a PID file, signal handling,
and a clean exit (code 0, PID file gone) on SIGTERM or Ctrl-C.

    python examples/pid_service.py --pidfile /tmp/pid_service.pid

A second copy started on the same PID file refuses to start, naming the first one's pid, in one
line (exit code 70); a PID file whose folder does not exist is one line too (exit code 1). The
default file is in /tmp, which everyone may write to: a warning says so (give --pidfile a folder
only the service's user may write to, such as /run/pid_service/).
"""

from __future__ import annotations

import argparse
import math

import anyio

from aiobus import Bus, ChannelFailures, configure_logging
from aiobus.plugins import PIDFile, SignalHandler


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, not {text!r}")
    return value


async def main(pidfile: str, interval: float) -> int:
    async with Bus(main_interval=interval, stop_timeout=10) as bus:
        SignalHandler(bus).subscribe()  # SIGTERM and Ctrl-C exit, SIGHUP restarts, SIGUSR1 is graceful
        PIDFile(bus, pidfile).subscribe()  # written at start (priority 70), removed at exit

        @bus.subscribe("graceful")
        def reload() -> None:
            bus.log("Reloading the configuration")

        try:
            await bus.start()
        except ChannelFailures:
            return bus.exit_code  # 70, logged in one line (a running copy, say); the bus ran stop and exit
        bus.log("Service running", pidfile=pidfile)
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pidfile", default="/tmp/aiobus-pid-service.pid", help="where to write the pid")
    parser.add_argument("--interval", type=seconds, default=1.0, help="seconds between main ticks")
    args = parser.parse_args()
    configure_logging()
    try:
        raise SystemExit(anyio.run(main, args.pidfile, args.interval))
    except OSError as error:  # raised when PIDFile is made: its folder is missing, say
        raise SystemExit(f"pid_service: {error}") from None
