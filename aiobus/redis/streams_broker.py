"""Brokers on other hosts: the serving side, :class:`StreamBroker` (its function's link is in :mod:`.streams_link`).

Every broker of a name is a consumer of one group on the stream ``{prefix}:{name}:requests``:

1. it reads new entries (XREADGROUP ``>``), ``batch`` at a time; a message is acknowledged
   (XACK) once the function asks for the next one (the acks of one batch go together, before
   the next read or at the end);
2. every ``claim_after / 4`` seconds while it waits for messages, it takes over (XAUTOCLAIM)
   the entries delivered to any consumer and left unacknowledged for ``claim_after`` seconds:
   those of a broker that died, or hangs. So a message left by a dead broker is handed to
   another within about ``1.25 * claim_after + 1`` seconds, with its delivery count
   (:attr:`StreamLink.deliveries`) above 1: at-least-once, and a broker can tell a retry;
3. entries that are not messages of ours (foreign, malformed, oversized) are acknowledged
   and dropped, counted and logged without their payload;
4. a reply goes to the stream of the sender of the message in hand, trimmed to about
   ``maxlen`` entries, which expires ``reply_ttl`` seconds after its last use (the sender
   deletes it as it closes).

The bus's stop ends the function's iteration after the message in hand, whose ack is sent; the
entries of the batch not handed out yet are released at once for another broker to claim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import coredis.exceptions

from aiobus import Bus, check_seconds

from ._connect import CONNECTION_ERRORS, RedisUnavailable, connect
from ._envelope import MAX_MESSAGE_SIZE, Keys, new_origin
from .streams import MAXLEN, let_go, persist, redis_url
from .streams_link import StreamLink

#: What leaving the group tidy may meet; it is given up then.
_TIDYING_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, coredis.exceptions.RedisError)


@dataclass(frozen=True)
class StreamBrokerStatistics:
    """What a :class:`StreamBroker` did since it was made.

    ``received``: messages handed to the function; ``acknowledged``: those it was done with;
    ``redelivered``: those handed with a delivery count above 1; ``claimed``: entries taken
    over from other consumers; ``dropped``: foreign, malformed or oversized entries;
    ``trimmed``: pending entries trimmed away before any broker was done with them;
    ``replies``: replies sent.
    """

    received: int
    acknowledged: int
    redelivered: int
    claimed: int
    dropped: int
    trimmed: int
    replies: int


class StreamBroker:
    """Serves the messages sent to ``name`` (by :class:`~aiobus.redis.RemoteBroker`, from any
    process on any host) with ``fn(bus, link)``, in this process, a plugin of its bus:
    ``StreamBroker(bus, url, "broker", fn).subscribe()``.

    Once the bus started, ``fn`` is awaited with the bus and a :class:`StreamLink`; many
    brokers of one name, on any hosts, share the messages (each goes to one of them). The
    bus's stop ends ``async for msg in link`` after the message in hand; a graceful (reload)
    does too, and ``fn`` then runs again with a new link. If ``fn`` raises
    :class:`RedisUnavailable` (a reply Redis did not take within ``send_timeout``), that is
    logged and ``fn`` runs again with a new link; if it raises anything else, the bus exits
    with code 70. Either way the message in hand stays pending, to be claimed again.

    Connecting is part of the bus's start: a wrong password or an absent server fails the
    start with :class:`RedisUnavailable` (the password hidden). Later, while Redis is away or
    silent, the broker keeps trying with backoff; if it comes back empty, the group is made
    again.

    Args:
        bus: this process's bus.
        url: the Redis URL; None: the one in the environment variable ``AIOBUS_REDIS_URL``
            (credentials come from there only; they are never logged).
        name: the brokers' name, as the senders give it.
        fn: ``async def fn(bus, link)``.
        prefix: the first part of every key.
        group: the consumer group; brokers of different groups each get every message.
        consumer: this broker's name in the group; unique by default (host/pid/random).
        claim_after: seconds a message may stay unacknowledged by its broker before another
            takes it over (the documented time: it is handed again within about
            ``1.25 * claim_after + 1`` s). Longer than ``fn`` ever takes on a message.
        batch: entries read at a time; the acks of a batch are sent together.
        maxlen: entries kept in the requests stream and the reply streams, about.
        connect_timeout: seconds to connect, and for each command's answer.
        send_timeout: seconds a reply (or an ack) keeps trying while Redis is away.
        max_message_size: the largest envelope read or sent, in bytes (JSON).
        reply_ttl: seconds a reply stream is kept after the last reply, if its sender is gone.
    """

    def __init__(
        self,
        bus: Bus,
        url: str | None,
        name: str,
        fn: Callable[[Bus, StreamLink], Any],
        *,
        prefix: str = "aiobus",
        group: str = "brokers",
        consumer: str | None = None,
        claim_after: float = 30.0,
        batch: int = 10,
        maxlen: int = MAXLEN,
        connect_timeout: float = 5.0,
        send_timeout: float = 10.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        reply_ttl: float = 3600.0,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be an async function, not {type(fn).__name__}")
        if batch < 1 or maxlen < 1 or max_message_size < 1:
            raise ValueError("batch, maxlen and max_message_size must be 1 or more")
        self.bus = bus
        self.url = redis_url(url)
        self.keys = Keys(prefix, name)
        self.fn = fn
        self.group = group
        self.consumer = consumer or new_origin()
        self.claim_after = check_seconds("claim_after", claim_after)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.send_timeout = check_seconds("send_timeout", send_timeout)
        self.reply_ttl = check_seconds("reply_ttl", reply_ttl)
        self.batch = batch
        self.maxlen = maxlen
        self.max_message_size = max_message_size
        self._link: StreamLink | None = None
        self._stopping = False
        self._reload = False
        self._done: anyio.Event | None = None  # set once fn has returned; None: never started
        self._received = self._acknowledged = self._redelivered = self._claimed = 0
        self._dropped = self._trimmed = self._replies = 0

    def subscribe(self) -> None:
        self.bus.subscribe("start", self.start)
        self.bus.subscribe("stop", self.stop)
        self.bus.subscribe("graceful", self.graceful)

    def unsubscribe(self) -> None:
        self.bus.unsubscribe("start", self.start)
        self.bus.unsubscribe("stop", self.stop)
        self.bus.unsubscribe("graceful", self.graceful)

    def statistics(self) -> StreamBrokerStatistics:
        return StreamBrokerStatistics(
            self._received, self._acknowledged, self._redelivered, self._claimed,
            self._dropped, self._trimmed, self._replies,
        )  # fmt: skip

    async def start(self) -> None:
        """Connect (a failure fails the bus's start), make the group if need be, run ``fn``."""
        self._stopping = False
        self._done = done = anyio.Event()
        ready = anyio.Event()
        failure: list[BaseException] = []
        self.bus.start_soon(self._serve, ready, done, failure, name=f"aiobus stream broker {self.keys.name}")
        await ready.wait()
        if failure:
            raise failure[0]

    async def stop(self) -> None:
        """End ``fn``'s iteration after the message in hand; wait until ``fn`` has returned."""
        self._stopping = True
        if self._link is not None:
            self._link._end()
        if self._done is not None:
            await self._done.wait()

    async def graceful(self) -> None:
        """End ``fn``'s iteration after the message in hand; ``fn`` then runs again."""
        if self._link is not None and not self._stopping:
            self._reload = True
            self._link._end()

    async def _serve(self, ready: anyio.Event, done: anyio.Event, failure: list[BaseException]) -> None:
        try:
            try:
                async with connect(self.url, timeout=self.connect_timeout) as client:
                    await persist(lambda: self._create_group(client), self.url, self.send_timeout, self.connect_timeout)
                    ready.set()
                    self.bus.log(f"Stream broker {self.keys.name} serving", consumer=self.consumer, group=self.group)
                    await self._run(client)
            except Exception as error:
                if ready.is_set():
                    raise
                failure.append(error)  # the bus's start fails with it
        finally:
            ready.set()
            done.set()

    async def _run(self, client: Any) -> None:
        while not self._stopping:
            self._reload = False
            self._link = link = StreamLink(self, client)
            try:
                await self.fn(self.bus, link)
                await link.aclose()
            except RedisUnavailable as error:  # a reply that Redis did not take in time
                text = f"Stream broker {self.keys.name}: {error}; the message in hand will be delivered again"
                self.bus.log(text, logging.WARNING)
                self._reload = True
            finally:
                self._link = None
                with anyio.CancelScope(shield=True):
                    await link._finish()
            if not (self._reload or self._stopping):
                return  # fn returned by itself: nothing more to do until the bus stops
        failures: list[BaseException] = []
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.connect_timeout):
            try:  # a consumer with nothing pending leaves the group tidy
                pending = await client.xpending(self.keys.requests, self.group, "-", "+", 1, consumer=self.consumer)
                if not pending:
                    await client.xgroup_delconsumer(self.keys.requests, self.group, self.consumer)
            except _TIDYING_ERRORS as error:
                failures.append(error)
        let_go(failures)

    async def _create_group(self, client: Any) -> None:
        try:
            await client.xgroup_create(self.keys.requests, self.group, "0", mkstream=True)
        except coredis.exceptions.StreamDuplicateConsumerGroupError:
            pass  # another broker made it
