"""A small service on an aiobus Bus: it starts, logs a main tick now and then, and exits
cleanly on Ctrl-C or SIGTERM (or by itself after --duration seconds).

    python examples/hello_service.py [--duration SECONDS] [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import signal

import anyio
import structlog

from aiobus import Bus, configure_logging

log = structlog.get_logger("hello")


async def stop_on_signals(bus: Bus) -> None:
    """Exit the bus on SIGINT or SIGTERM."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("Signal received: exiting", signal=signal.Signals(signum).name)
            await bus.exit()
            return


async def main(duration: float | None, interval: float) -> int:
    async with Bus(main_interval=interval) as bus:

        @bus.subscribe("main")
        def tick() -> None:
            ticks = bus.statistics().ticks
            if ticks % 10 == 0:
                log.info("Main tick", ticks=ticks)

        @bus.subscribe("exit")
        def goodbye() -> None:
            log.info("Goodbye", ticks=bus.statistics().ticks)

        bus.start_soon(stop_on_signals, bus)
        await bus.start()
        if duration is None:
            await bus.block()
        else:
            with anyio.move_on_after(duration):
                await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between main ticks")
    args = parser.parse_args()
    configure_logging()
    raise SystemExit(anyio.run(main, args.duration, args.interval))
