"""A bank places stock orders; a broker, in a child process with a bus of its own, executes them.

    python examples/bank_broker.py [--duration SECONDS] [--interval SECONDS] [--brokers N] [--json]
    python examples/bank_broker.py --redis [URL] --role bank|broker [--duration SECONDS] [--interval SECONDS]

The async version of "Managing your process with the CherryPy's bus": on every main tick the
Bank (this process) places a random order and sends it to the Broker (a child broker; with
``--brokers N``, a pool of N, each order going to the least busy one). Ctrl-C or SIGTERM stops
them all cleanly: the Brokers execute the orders already sent, every bus logs its shutdown, and
the process exits with code 0.

With ``--redis``, the bank and the brokers are processes of their own, on any hosts, linked by a
Redis Stream (the URL, with its password if any, or from ``AIOBUS_REDIS_URL`` when none is given):
run one ``--role bank`` and as many ``--role broker`` as you like. Ctrl-C on any of them stops that
one (exit 0), after the order in hand; the others go on. Every order is executed at least once:
an order left by a broker that died goes to another, which counts it as a duplicate if it was
delivered before. On exit the bank states the orders it placed and those confirmed, each broker
the orders it executed and the duplicates it saw.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import string
from typing import Any

import anyio
import structlog

from aiobus import Bus, ChannelFailures, ChildBroker, ExitCode, ParentLink, configure_logging, log_to_structlog
from aiobus.plugins import SignalHandler

try:  # the optional extra, for --redis
    from aiobus.redis import RedisUnavailable, RemoteBroker, StreamBroker, StreamLink
except ImportError:  # pragma: no cover - without it, the local demo still runs
    REDIS = False
else:
    REDIS = True

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


# -- over Redis: the bank and the brokers in processes of their own ------------------------


class RemoteBank:
    """Places a random order on every main tick, sends it over Redis, and counts confirmations."""

    def __init__(self, bus: Bus, broker: RemoteBroker) -> None:
        self.bus = bus
        self.broker = broker
        self.placed = 0
        self.confirmed: set[str] = set()
        bus.subscribe("main", self.place_order)
        bus.subscribe("exit", self.close)
        bus.start_soon(self.read_confirmations, name="confirmations")

    async def place_order(self) -> None:
        side = random.choice(["BUY", "SELL"])
        symbol = "".join(random.choices(string.ascii_uppercase, k=4))
        quantity = random.randint(1, 100)
        self.placed += 1
        order = f"{os.getpid()}-{self.placed}"
        log.info(f"Placing order {order}: {side} {symbol} {quantity}", logger="Bank")
        await self.broker.send([order, side, symbol, quantity])

    async def read_confirmations(self) -> None:
        async for reply in self.broker:
            self.confirmed.add(reply["order"])
            log.info(f"Order {reply['order']} confirmed by {reply['broker']}", logger="Bank")

    def close(self) -> None:
        placed, confirmed = self.placed, len(self.confirmed)
        log.info("Bank closed", logger="Bank", orders_placed=placed, orders_confirmed=confirmed)


async def remote_broker(bus: Bus, link: StreamLink) -> None:
    """A Broker on its own host: executes each order it is given, and confirms it to the bank."""
    name = f"Broker{os.getpid() % 10000}"  # fits the name column
    broker_log = structlog.get_logger().bind(logger=name)
    executed = duplicates = 0
    async for order, side, symbol, quantity in link:  # ends after the order in hand once stopped
        if link.deliveries > 1:  # delivered before: its first broker may have executed it
            duplicates += 1
        broker_log.info(f"Order {order}: {side} order placed for {quantity} {symbol}", deliveries=link.deliveries)
        executed += 1
        await link.send({"order": order, "broker": name})
    broker_log.info("Broker closed", orders_executed=executed, duplicates=duplicates)


async def main_over_redis(
    url: str | None, role: str, duration: float | None, interval: float, prefix: str, claim_after: float
) -> int:
    if role == "bank":
        async with RemoteBroker(url, "broker", prefix=prefix) as remote, Bus(main_interval=interval) as bus:
            SignalHandler(bus).subscribe()
            RemoteBank(bus, remote)
            await bus.start()
            with anyio.move_on_after(duration if duration is not None else float("inf")):
                await bus.block()
        return bus.exit_code
    async with Bus(stop_timeout=10) as bus:
        SignalHandler(bus).subscribe()
        StreamBroker(bus, url, "broker", remote_broker, prefix=prefix, claim_after=claim_after).subscribe()
        try:
            await bus.start()
        except ChannelFailures as failures:  # Redis absent, a wrong password: said once, clearly
            log.error(f"Broker cannot start: {failures.exceptions[0]}", logger="Broker")
            return ExitCode.FAILURE
        with anyio.move_on_after(duration if duration is not None else float("inf")):
            await bus.block()
    return bus.exit_code


def run_over_redis(args: argparse.Namespace) -> int:
    try:
        return anyio.run(main_over_redis, args.redis or None, args.role, args.duration, args.interval, args.prefix, 5.0)
    except RedisUnavailable as error:  # the bank's connection, at start
        log.error(f"Bank cannot start: {error}", logger="Bank")
        return ExitCode.FAILURE
    except ValueError as error:  # no URL anywhere
        log.error(str(error), logger="Bank")
        return ExitCode.USAGE


if __name__ == "__main__":  # required: the broker's process imports this module again
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=seconds, default=None, help="stop by itself after SECONDS")
    parser.add_argument("--interval", type=seconds, default=1.0, help="seconds between two orders (main ticks)")
    parser.add_argument("--brokers", type=count, default=1, help="a pool of N brokers (default 1)")
    parser.add_argument("--json", action="store_true", help="JSON log lines instead of console lines")
    parser.add_argument(
        "--redis", nargs="?", const="", metavar="URL", help="over Redis (no URL: from AIOBUS_REDIS_URL)"
    )
    parser.add_argument("--role", choices=("bank", "broker"), help="with --redis: this process's part")
    parser.add_argument("--prefix", default="aiobus", help="with --redis: the first part of the keys")
    args = parser.parse_args()
    if (args.redis is None) != (args.role is None):
        parser.error("--redis and --role go together")
    if args.redis is not None and not REDIS:
        parser.error("--redis needs the redis extra: pip install 'aiobus[redis]'")
    configure_logging(format="json" if args.json else "console")
    if args.redis is not None:
        raise SystemExit(run_over_redis(args))
    raise SystemExit(anyio.run(main, args.duration, args.interval, args.brokers))
