"""A small service on an aiobus Bus: it starts, logs every tenth main tick, and exits
cleanly on Ctrl-C or SIGTERM (or by itself after --duration seconds).

    python examples/hello_service.py [--duration SECONDS] [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import math

import anyio
import structlog

from aiobus import Bus, configure_logging
from aiobus.plugins import SignalHandler

log = structlog.get_logger("hello")


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, not {text!r}")
    return value


async def main(duration: float | None, interval: float) -> int:
    async with Bus(main_interval=interval) as bus:
        SignalHandler(bus).subscribe()  # SIGTERM and Ctrl-C exit; a second Ctrl-C forces

        @bus.subscribe("main")
        def tick() -> None:
            ticks = bus.statistics().ticks
            if ticks % 10 == 0:
                log.info("Main tick", ticks=ticks)

        @bus.subscribe("exit")
        def goodbye() -> None:
            log.info("Goodbye", ticks=bus.statistics().ticks)

        await bus.start()
        with anyio.move_on_after(duration if duration is not None else float("inf")):
            await bus.block()
    return bus.exit_code  # leaving the block ran exit() if nothing else did


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=seconds, default=None, help="exit after this many seconds")
    parser.add_argument("--interval", type=seconds, default=0.1, help="seconds between main ticks")
    args = parser.parse_args()
    configure_logging()
    raise SystemExit(anyio.run(main, args.duration, args.interval))
