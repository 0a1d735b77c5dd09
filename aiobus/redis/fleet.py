"""Fleet operations: ``status``, ``graceful``, ``stop`` and ``exit`` asked of a group of buses (each
with a :class:`~aiobus.redis.RedisBridge`), the answers collected by a deadline; and the buses'
presence, read from their keys. From Python (:class:`Fleet`) and from ``aiobus fleet``.

Exit codes of ``aiobus fleet``: 0 every bus present answered; 1 some did not (they are named);
2 a bad command line (no URL); 3 Redis could not be reached or refused us.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TextIO

import anyio
import coredis
from coredis.retry import NoRetryPolicy

from aiobus import ExitCode, check_seconds

from ._connect import RedisUnavailable, connect, redact
from ._wire import (
    OPS,
    Dropped,
    FleetRequest,
    check_name,
    check_node,
    check_prefix,
    decode_answer,
    fleet_channel,
    loads,
    presence_pattern,
    reply_channel,
)

#: The environment variable ``aiobus fleet`` reads the URL from when ``--redis`` is not given.
URL_VARIABLE = "AIOBUS_REDIS_URL"


@dataclass(frozen=True)
class Presence:
    """What a bus's presence key says: its node, host, pid, state, and when it was written (epoch s)."""

    node: str
    host: str
    pid: int
    state: str
    time: float


@dataclass(frozen=True)
class FleetResult:
    """The answers to one fleet operation.

    Attributes:
        op: the operation asked.
        answered: the state of each bus that answered by the deadline (before it acted), by node.
        missing: the buses present (or named) that did not answer by the deadline, sorted.
    """

    op: str
    answered: Mapping[str, str]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every bus present (or named) answered."""
        return not self.missing


class Fleet:
    """Asks a group of buses of one deployment (one ``prefix``) to do something, and collects their answers.

    Each call connects (within ``timeout``), does its work, and disconnects. Cancelling a call
    cancels it (an operation already published is done by the buses all the same).

    Args:
        url: the Redis URL (credentials only there; never logged or printed).
        prefix: the deployment's key prefix, as given to its bridges.
        group: the group of buses, as given to their bridges.
        timeout: seconds for connecting and for each command.

    Raises:
        TypeError, ValueError: a malformed URL, prefix or group.
    """

    def __init__(self, url: str, *, prefix: str = "aiobus", group: str = "default", timeout: float = 5.0) -> None:
        from ._connect import check_url

        self.url = check_url(url)
        self.prefix = check_prefix(prefix)
        self.group = check_name("a group", group)
        self.timeout = check_seconds("timeout", timeout, positive=True)

    def __repr__(self) -> str:
        return f"<Fleet {self.prefix}/{self.group} at {redact(self.url)}>"

    async def members(self) -> dict[str, Presence]:
        """The buses present in the group: those whose presence key has not expired, by node.

        Raises:
            RedisUnavailable: Redis could not be reached or refused us.
        """
        async with connect(self.url, timeout=self.timeout) as client:
            return await self._members(client)

    async def status(self, deadline: float = 5.0, nodes: Iterable[str] | None = None) -> FleetResult:
        """Ask each bus its state; see :meth:`request`."""
        return await self.request("status", deadline, nodes)

    async def graceful(self, deadline: float = 5.0, nodes: Iterable[str] | None = None) -> FleetResult:
        """Have each bus publish ``graceful`` once it has answered; see :meth:`request`."""
        return await self.request("graceful", deadline, nodes)

    async def stop(self, deadline: float = 5.0, nodes: Iterable[str] | None = None) -> FleetResult:
        """Have each bus stop once it has answered (it stays reachable, STOPPED); see :meth:`request`."""
        return await self.request("stop", deadline, nodes)

    async def exit(self, deadline: float = 5.0, nodes: Iterable[str] | None = None) -> FleetResult:
        """Have each bus exit once it has answered; see :meth:`request`."""
        return await self.request("exit", deadline, nodes)

    async def request(self, op: str, deadline: float = 5.0, nodes: Iterable[str] | None = None) -> FleetResult:
        """Publish ``op`` to the group (or to the buses ``nodes`` names) and collect the answers until
        every bus present has answered or ``deadline`` seconds have passed.

        A bus answers with its state, then acts. The buses expected are those present when the
        request is sent (or those named); one that answers without a presence key counts as answered.

        Raises:
            ValueError: an unknown op, a deadline that is not a positive number of seconds.
            RedisUnavailable: Redis could not be reached or refused us.
        """
        if op not in OPS:
            raise ValueError(f"a fleet op is one of {', '.join(OPS)}, not {op!r}")
        check_seconds("deadline", deadline, positive=True)
        named = None if nodes is None else tuple(check_node(node) for node in nodes)
        request = FleetRequest(uuid.uuid4().hex, op, named)
        answered: dict[str, str] = {}
        async with (
            connect(self.url, timeout=self.timeout) as client,
            client.pubsub(
                channels=[reply_channel(self.prefix, request.id)],
                ignore_subscribe_messages=True,
                retry_policy=NoRetryPolicy(),
                subscription_timeout=self.timeout,
            ) as pubsub,
        ):
            expected = set(await self._members(client)) if named is None else set(named)
            with anyio.fail_after(self.timeout):
                await client.publish(fleet_channel(self.prefix, self.group), request.encode(self.prefix))
            with anyio.move_on_after(deadline):
                async for message in pubsub:
                    try:
                        node, state = decode_answer(message["data"], self.prefix, request.id)
                    except Dropped:
                        continue
                    answered[node] = state
                    if expected <= answered.keys():
                        break
        missing = tuple(sorted(expected - answered.keys()))
        return FleetResult(op, MappingProxyType(dict(sorted(answered.items()))), missing)

    async def _members(self, client: coredis.Redis[str]) -> dict[str, Presence]:
        with anyio.fail_after(self.timeout):
            keys = [key async for key in client.scan_iter(match=presence_pattern(self.prefix, self.group), count=500)]
            values = await client.mget(keys) if keys else ()
        found: dict[str, Presence] = {}
        for value in values:
            try:
                record = loads(value, self.prefix, 64 * 1024)
                presence = Presence(
                    str(record["node"]), str(record["host"]), int(record["pid"]), str(record["state"]), record["time"]
                )
            except (Dropped, KeyError, TypeError, ValueError):
                continue  # expired between SCAN and MGET, or not one of ours
            found[presence.node] = presence
        return dict(sorted(found.items()))


# -- aiobus fleet ------------------------------------------------------------------------------


def run_fleet(args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``aiobus fleet`` with the parsed ``args``; return the exit code (nothing raised)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    url = args.redis or os.environ.get(URL_VARIABLE)
    if not url:
        err.write(f"aiobus fleet: error: --redis URL or the environment variable {URL_VARIABLE} is required\n")
        return ExitCode.USAGE
    try:
        fleet = Fleet(url, prefix=args.prefix, group=args.group)
        nodes = args.node or None
        result, members = anyio.run(_ask, fleet, args.op, args.deadline, nodes)
    except (TypeError, ValueError) as error:
        err.write(f"aiobus fleet: error: {error}\n")  # a URL in it has its password hidden
        return ExitCode.USAGE
    except RedisUnavailable as error:
        err.write(f"aiobus fleet: {error}\n")
        return 3
    except KeyboardInterrupt:
        return ExitCode.FORCED
    if args.json:
        document = {
            "op": result.op,
            "answered": dict(result.answered),
            "missing": list(result.missing),
            "members": {node: vars(presence) for node, presence in members.items()},
        }
        out.write(json.dumps(document) + "\n")
    else:
        _print_table(out, result, members, args.group)
    return ExitCode.OK if result.ok else ExitCode.FAILURE


async def _ask(
    fleet: Fleet, op: str, deadline: float, nodes: list[str] | None
) -> tuple[FleetResult, dict[str, Presence]]:
    members = await fleet.members()
    return await fleet.request(op, deadline, nodes), members


def _print_table(out: TextIO, result: FleetResult, members: Mapping[str, Presence], group: str) -> None:
    nodes = sorted({*members, *result.answered, *result.missing})
    if not nodes:
        out.write(f"No bus present in group {group}.\n")
        return
    rows = [("NODE", "STATE", "HOST", "PID", "ANSWERED")]
    for node in nodes:
        presence = members.get(node)
        state = result.answered.get(node) or (presence.state if presence else "-")
        host, pid = (presence.host, str(presence.pid)) if presence else ("-", "-")
        rows.append((node, state, host, pid, "yes" if node in result.answered else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
    count = len(result.answered) + len(result.missing)
    out.write(f"\n{result.op}: {len(result.answered)} of {count} answered")
    out.write(f"; no answer from {', '.join(result.missing)}.\n" if result.missing else ".\n")
