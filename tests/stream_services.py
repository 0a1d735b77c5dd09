"""A broker process serving a Redis Stream, for the tests (a real process, real signals).

    python tests/stream_services.py URL|- PREFIX [--claim-after S] [--hold S] [--timeout S] [--batch N]

It serves the broker named ``work``: for each message it prints a JSON line
``{"got": body, "id": ..., "deliveries": n, "pid": ...}``, holds it ``--hold`` seconds, then
replies ``{"done": body, "by": pid, "deliveries": n}``. ``-`` takes the URL from the environment
(``AIOBUS_REDIS_URL``). SIGINT or SIGTERM: exit 0 after the message in hand. A start that fails
(Redis absent, a wrong password) prints one line ``cannot start: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import anyio

from aiobus import Bus, ChannelFailures, configure_logging
from aiobus.plugins import SignalHandler
from aiobus.redis import StreamBroker, StreamLink


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def worker(hold: float) -> object:
    async def work(bus: Bus, link: StreamLink) -> None:
        async for body in link:
            say(got=body, id=link.message_id, deliveries=link.deliveries, pid=os.getpid())
            await anyio.sleep(hold)
            await link.send({"done": body, "by": os.getpid(), "deliveries": link.deliveries})

    return work


async def main(args: argparse.Namespace) -> int:
    url = None if args.url == "-" else args.url
    async with Bus(stop_timeout=30) as bus:
        SignalHandler(bus).subscribe()
        StreamBroker(
            bus,
            url,
            "work",
            worker(args.hold),  # type: ignore[arg-type]
            prefix=args.prefix,
            claim_after=args.claim_after,
            batch=args.batch,
            connect_timeout=args.timeout,
            send_timeout=args.timeout * 2,
        ).subscribe()
        try:
            await bus.start()
        except ChannelFailures as failures:
            sys.stdout.write(f"cannot start: {failures.exceptions[0]}\n")
            return 1
        say(serving=os.getpid())
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("--claim-after", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=10)
    configure_logging(format="console")
    raise SystemExit(anyio.run(main, parser.parse_args()))
