"""A service with a RedisBridge, run as a real process by the tests: JSON log lines on stdout.

    python bridge_service.py NODE PREFIX [--ttl SECONDS] [--timeout SECONDS]

The URL comes from the environment (``AIOBUS_REDIS_URL``), as a service's should. It takes
``ping`` in and sends ``pong`` out: each ping is answered with ``pong(node, *args)``; it sends
``tick(node, n)`` every main tick when ``--ticks`` is given. SIGTERM exits it.
"""

from __future__ import annotations

import argparse
import os

import anyio

from aiobus import Bus, ChannelFailures, configure_logging
from aiobus.plugins import SignalHandler
from aiobus.redis import RedisBridge


async def main(args: argparse.Namespace) -> int:
    async with Bus(main_interval=0.05) as bus:
        SignalHandler(bus).subscribe()
        bridge = RedisBridge(
            bus,
            os.environ["AIOBUS_REDIS_URL"],
            node=args.node,
            prefix=args.prefix,
            group="test",
            incoming=["ping"],
            outgoing=["pong", "tick"],
            presence_ttl=args.ttl,
            timeout=args.timeout,
        )
        bridge.subscribe()

        async def ping(*values: object) -> None:
            bus.log("ping received", values=list(values))
            await bus.publish("pong", args.node, *values)

        bus.subscribe("ping", ping)
        if args.ticks:
            count = 0

            async def tick() -> None:
                nonlocal count
                count += 1
                await bus.publish("tick", args.node, count)

            bus.subscribe("main", tick)

        def report() -> None:
            stats = bridge.statistics()
            bus.log("bridge statistics", not_bridged=dict(stats.not_bridged), sent=stats.sent)

        bus.subscribe("exit", report)
        try:
            await bus.start()
        except ChannelFailures:
            pass  # logged by the bus, which has exited with code 70 (as `aiobus run` does)
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("node")
    parser.add_argument("prefix")
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--ticks", action="store_true")
    configure_logging(format="json")
    raise SystemExit(anyio.run(main, parser.parse_args()))
