"""What a bridge counts and states: its statistics, the messages not sent or dropped (logged at most
once a second of each kind, never with the payload), and the gaps in each origin's sequence."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aiobus import Bus

from ._wire import Envelope


@dataclass(frozen=True)
class BridgeStatistics:
    """A snapshot of a bridge's counters, from :meth:`RedisBridge.statistics`.

    Attributes:
        connected: whether the bridge is connected to Redis now.
        sent: envelopes published to Redis (the server acknowledged them).
        received: envelopes from other buses published on the local bus.
        echoes: our own envelopes coming back from Redis, skipped.
        not_bridged: local publishes not sent, by reason: ``away`` (Redis was away), ``overflow``
            (the send buffer was full), ``too_large``, ``unencodable`` (not JSON), ``failed`` (the
            connection broke while sending: it may or may not have reached Redis).
        dropped: envelopes from Redis not delivered, by reason: ``malformed``, ``too_large``,
            ``foreign`` (another version or prefix), ``unknown_channel``.
        missed: messages of other buses that never reached us, by origin node, from the gaps in
            their sequence numbers (what was published while we were away shows at the next
            message of that origin and channel).
        reconnects: connections made again after one was lost.
        fleet_requests: fleet operations answered.
    """

    connected: bool
    sent: int
    received: int
    echoes: int
    not_bridged: Mapping[str, int]
    dropped: Mapping[str, int]
    missed: Mapping[str, int]
    reconnects: int
    fleet_requests: int


class Ledger:
    """A bridge's counters, and the warnings that go with them."""

    def __init__(self, bus: Bus, node: str) -> None:
        self.bus = bus
        self.node = node
        self.sent = self.received = self.echoes = self.reconnects = self.fleet_requests = 0
        self.not_bridged: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self._last_seen: dict[tuple[str, str], int] = {}  # by (origin, channel)
        self._logged: dict[str, float] = {}  # the last warning of each kind

    def snapshot(self, connected: bool) -> BridgeStatistics:
        return BridgeStatistics(
            connected=connected,
            sent=self.sent,
            received=self.received,
            echoes=self.echoes,
            not_bridged=MappingProxyType(dict(self.not_bridged)),
            dropped=MappingProxyType(dict(self.dropped)),
            missed=MappingProxyType(dict(self.missed)),
            reconnects=self.reconnects,
            fleet_requests=self.fleet_requests,
        )

    def count_not_sent(self, reason: str) -> None:
        self.not_bridged[reason] = self.not_bridged.get(reason, 0) + 1

    def not_sent(self, reason: str, channel: str, why: str) -> None:
        """Count a local publish not sent; warn, unless Redis is away (the outage is reported once,
        with its count, when Redis is back)."""
        self.count_not_sent(reason)
        if reason != "away":
            self.warn(f"out:{reason}", f"A publish on bridged channel {channel!r} was not sent: {why}", channel)

    def drop(self, reason: str, key: str, why: str) -> None:
        """Count and warn of a message from Redis channel ``key`` not delivered."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.warn(f"in:{reason}", f"Dropped a message from Redis channel {key!r} ({reason}): {why}", reason=reason)

    def warn(self, kind: str, message: str, channel: str | None = None, **fields: Any) -> None:
        """Log a warning, at most once a second of each kind (a flood is counted, not logged line by line)."""
        now = time.monotonic()
        if now - self._logged.get(kind, -math.inf) >= 1.0:
            self._logged[kind] = now
            self.bus.log(message, logging.WARNING, channel=channel, node=self.node, **fields)

    def track(self, envelope: Envelope) -> None:
        """State the messages missed from an origin: the gaps in its sequence on a channel."""
        key = (envelope.origin, envelope.channel)
        last = self._last_seen.get(key)
        self._last_seen[key] = envelope.seq
        if last is None or envelope.seq == last + 1:
            return
        if envelope.seq <= last:
            self.bus.log(f"{envelope.origin} started its sequence on {envelope.channel!r} over", node=self.node)
            return
        gap = envelope.seq - last - 1
        self.missed[envelope.origin] = self.missed.get(envelope.origin, 0) + gap
        self.bus.log(
            f"Missed {gap} message(s) on channel {envelope.channel!r} from {envelope.origin} "
            f"(sequence {last}, then {envelope.seq})",
            logging.WARNING,
            channel=envelope.channel,
            origin=envelope.origin,
            missed=gap,
        )
