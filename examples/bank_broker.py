"""A bank places stock orders; a broker, in a child process with a bus of its own, executes them.

    python examples/bank_broker.py [--duration SECONDS] [--interval SECONDS] [--brokers N] [--json]

The async version of "Managing your process with the CherryPy's bus": on every main tick the
Bank (this process) places a random order and sends it to the Broker (a child broker; with
``--brokers N``, a pool of N, each order going to the least busy one). Ctrl-C or SIGTERM stops
them all cleanly: the Brokers execute the orders already sent, every bus logs its shutdown, and
the process exits with code 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import string
from typing import Any

import anyio
import structlog

from aiobus import Bus, ChildBroker, ParentLink, configure_logging, log_to_structlog
from aiobus.plugins import SignalHandler

log = structlog.get_logger()  # bound at each call: configure_logging() runs after this import


class Bank:
    """Places a random order on every main tick and sends it to the broker."""

    def __init__(self, bus: Bus, broker: ChildBroker) -> None:
        self.bus = bus
        self.broker = broker
        self.orders = 0
        bus.subscribe("main", self.place_order)
        bus.subscribe("exit", self.close)

    async def place_order(self) -> None:
        side = random.choice(["BUY", "SELL"])
        symbol = "".join(random.choices(string.ascii_uppercase, k=4))
        quantity = random.randint(1, 100)
        log.info(f"Placing order: {side} {symbol} {quantity}", logger="Bank")
        await self.broker.send((side, symbol, quantity))
        self.orders += 1

    def close(self) -> None:
        log.info("Bank closed", logger="Bank", orders_placed=self.orders)
        self.bus.unsubscribe("main", self.place_order)  # as in the article: leave the bus tidy
        self.bus.unsubscribe("exit", self.close)


async def broker(bus: Bus, link: ParentLink) -> None:
    """The Broker, in the child process: executes each order until the bank stops it."""
    broker_log = structlog.get_logger().bind(logger="Broker")
    executed = 0
    async for side, symbol, quantity in link:  # ends after the last order the bank sent
        broker_log.info(f"{side} order placed for {quantity} {symbol}")
        executed += 1
    broker_log.info("Broker closed", orders_executed=executed)


def bank_log(msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """The bank's bus logs as "Bank"; lines relayed from a child keep the child's name, and a
    pool's worker adds its number to it ("Broker2" for broker[2])."""
    child = fields.get("child")
    if child is None:
        fields.setdefault("logger", "Bank")
    elif isinstance(child, str) and child.endswith("]") and "logger" in fields:
        fields["logger"] = f"{fields['logger']}{child[child.index('[') + 1 : -1]}"
    log_to_structlog(msg, level, **fields)


async def main(duration: float | None, interval: float, brokers: int = 1) -> int:
    async with Bus(main_interval=interval, stop_timeout=10) as bus:
        bus.unsubscribe("log", log_to_structlog)
        bus.subscribe("log", bank_log)
        SignalHandler(bus).subscribe()  # Ctrl-C and SIGTERM exit; a second Ctrl-C forces
        child = ChildBroker(bus, "broker", broker, workers=brokers if brokers > 1 else None)
        child.subscribe()
        Bank(bus, child)
        await bus.start()
        with anyio.move_on_after(duration if duration is not None else float("inf")):
            await bus.block()
    return bus.exit_code


def seconds(text: str) -> float:
    """A finite number of seconds > 0, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, not {text!r}")
    return value


def count(text: str) -> int:
    """An int >= 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text!r}")
    return value


if __name__ == "__main__":  # required: the broker's process imports this module again
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=seconds, default=None, help="stop by itself after SECONDS")
    parser.add_argument("--interval", type=seconds, default=1.0, help="seconds between two orders (main ticks)")
    parser.add_argument("--brokers", type=count, default=1, help="a pool of N brokers (default 1)")
    parser.add_argument("--json", action="store_true", help="JSON log lines instead of console lines")
    args = parser.parse_args()
    configure_logging(format="json" if args.json else "console")
    raise SystemExit(anyio.run(main, args.duration, args.interval, args.brokers))
