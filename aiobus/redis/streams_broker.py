"""Brokers on other hosts: the serving side, :class:`StreamBroker` and the link its function gets.

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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import coredis.exceptions
from anyio.abc import ObjectReceiveStream

from aiobus import Bus, EndOfLink, check_seconds

from ._connect import CONNECTION_ERRORS, Backoff, RedisUnavailable, connect
from ._envelope import FIELD, MAX_MESSAGE_SIZE, Dropped, Envelope, Keys, decode, encode, new_origin
from .streams import BLOCK, MAXLEN, let_go, persist, redis_url, trimmed

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


@dataclass
class _Entry:
    stream_id: str
    envelope: Envelope
    deliveries: int
    fetched: float


class StreamLink(ObjectReceiveStream[Any]):
    """The function's link, the shape of :class:`~aiobus.ParentLink`: ``async for msg in link``,
    ``await link.receive()``, ``await link.send(reply)``.

    The iteration ends cleanly (:class:`~aiobus.EndOfLink`) once the bus stops, after the
    message in hand. A message is done with once the function asks for the next one, or
    returns; one it raised on stays pending and goes to another broker after ``claim_after``.
    """

    def __init__(self, broker: StreamBroker, client: Any) -> None:
        self._broker = broker
        self._client = client
        self._buffer: deque[_Entry] = deque()
        self._current: _Entry | None = None
        self._to_ack: list[str] = []
        self._ending = False
        self._waiting: anyio.CancelScope | None = None
        self._last_claim = -float("inf")  # look for entries left by others at once
        self._claim_cursor = "0-0"

    @property
    def deliveries(self) -> int:
        """How many times the message in hand was delivered, to any broker (1 the first time)."""
        return 0 if self._current is None else self._current.deliveries

    @property
    def message_id(self) -> str | None:
        """The id of the message in hand (the one :meth:`RemoteBroker.send` returned)."""
        return None if self._current is None else self._current.envelope.id

    @property
    def origin(self) -> str | None:
        """The sender of the message in hand (host/pid/random)."""
        return None if self._current is None else self._current.envelope.origin

    async def receive(self) -> Any:
        """The next message; the one taken before counts as done with (its ack is sent).

        Raises:
            EndOfLink: the bus stopped (or is reloading); nothing follows.

        Cancelled: nothing is lost (an entry fetched stays pending until claimed). No timeout
        of its own: while Redis is away it waits, retrying with backoff.
        """
        self._done()
        broker = self._broker
        while not self._ending:
            if self._buffer:
                entry = self._buffer.popleft()
                if time.monotonic() - entry.fetched > broker.claim_after / 2:
                    continue  # waited too long here: another broker may have claimed it
                self._current = entry
                broker._received += 1
                broker._redelivered += entry.deliveries > 1
                return entry.envelope.body
            await self._flush()
            with anyio.CancelScope() as self._waiting:
                if not self._ending:
                    await self._fetch()
            self._waiting = None
        await self._finish()
        raise EndOfLink

    async def send(self, obj: Any) -> None:
        """Reply ``obj`` to the sender of the message in hand (JSON, as it sent).

        Raises:
            RuntimeError: no message is in hand.
            TypeError: ``obj`` is not JSON-serializable; ValueError: it is too large.
            RedisUnavailable: Redis did not take it within ``send_timeout`` seconds.

        The sender's reply stream is trimmed to about ``maxlen`` entries and expires
        ``reply_ttl`` seconds after the last reply if its sender has gone. Cancelled: the reply
        may or may not have been sent.
        """
        entry, broker = self._current, self._broker
        if entry is None:
            raise RuntimeError("a reply goes to the sender of the message in hand: none is")
        _, text = encode(obj, broker.consumer, "", broker.max_message_size, message_id=entry.envelope.id)

        key = entry.envelope.reply

        async def add() -> Any:
            return await self._client.xadd(key, {FIELD: text}, **trimmed(broker.maxlen))

        async def lease() -> Any:
            return await self._client.expire(key, int(broker.reply_ttl) + 1)

        await persist(add, broker.url, broker.send_timeout, broker.connect_timeout)
        broker._replies += 1
        await persist(lease, broker.url, broker.send_timeout, broker.connect_timeout)  # apart: no reply twice

    async def aclose(self) -> None:
        """Take no more messages; the one in hand counts as done with."""
        self._done()
        self._ending = True

    def _end(self) -> None:
        """The bus stops: end the iteration after the message in hand."""
        self._ending = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _done(self) -> None:
        if self._current is not None:
            self._to_ack.append(self._current.stream_id)
            self._current = None
            self._broker._acknowledged += 1

    async def _finish(self) -> None:
        """Send the acks left, and release what was fetched but not handed out (for another
        broker to claim at once: its idle time is set past ``claim_after``). The message in
        hand, if any (the function raised on it), stays pending."""
        with anyio.CancelScope(shield=True):
            await self._flush()
            released = [entry.stream_id for entry in self._buffer]
            self._buffer.clear()
            if released:
                broker = self._broker
                idle = int(broker.claim_after * 1000) + 1
                await self._quietly(
                    self._client.xclaim, broker.keys.requests, broker.group, broker.consumer, 0, released,
                    idle=idle, justid=True,
                )  # fmt: skip

    async def _flush(self) -> None:
        if self._to_ack:
            ids, self._to_ack = self._to_ack, []
            await self._quietly(self._client.xack, self._broker.keys.requests, self._broker.group, ids)

    async def _quietly(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``command`` with retries for up to ``send_timeout``; if Redis stays away, log that
        the messages concerned will be delivered again (at-least-once), and go on."""
        broker = self._broker
        try:
            await persist(lambda: command(*args, **kwargs), broker.url, broker.send_timeout, broker.connect_timeout)
        except RedisUnavailable as error:
            text = f"Stream broker {broker.keys.name}: {error}; messages may be delivered again"
            broker.bus.log(text, logging.WARNING)

    async def _fetch(self) -> None:
        """Fill the buffer: entries left by others first (when due), else new ones."""
        broker = self._broker
        backoff = Backoff(most=2.0)
        regroup = False
        while True:
            failures: list[BaseException] = []
            try:
                with anyio.fail_after(BLOCK + broker.connect_timeout):
                    if regroup:  # the server restarted empty, or someone deleted the stream
                        await broker._create_group(self._client)
                        regroup = False
                    if anyio.current_time() - self._last_claim >= broker.claim_after / 4:
                        await self._claim()
                    if not self._buffer:
                        await self._read_new()
                return
            except coredis.exceptions.StreamConsumerGroupError:  # NOGROUP
                regroup = True
                continue
            except CONNECTION_ERRORS as error:
                failures.append(error)
            let_go(failures)  # out of the except block, which holds the error
            await anyio.sleep(backoff.delay())

    async def _read_new(self) -> None:
        broker = self._broker
        keys = broker.keys
        found = await self._client.xreadgroup(
            broker.group, broker.consumer, {keys.requests: ">"}, count=broker.batch, block=int(BLOCK * 1000)
        )
        for entry in (found or {}).get(keys.requests, ()):
            self._take(entry.identifier, entry.field_values, 1)

    async def _claim(self) -> None:
        broker = self._broker
        key, group = broker.keys.requests, broker.group
        min_idle = int(broker.claim_after * 1000)
        cursor, entries, deleted = await self._client.xautoclaim(
            key, group, broker.consumer, min_idle, self._claim_cursor, count=broker.batch
        )
        self._claim_cursor = cursor
        if cursor == "0-0":
            self._last_claim = anyio.current_time()  # the whole list looked through
        if deleted:
            broker._trimmed += len(deleted)
            text = f"Stream broker {broker.keys.name}: {len(deleted)} pending messages were trimmed away"
            broker.bus.log(text, logging.WARNING)
        if not entries:
            return
        pending = await self._client.xpending(
            key, group, entries[0].identifier, entries[-1].identifier, len(entries) * 2, consumer=broker.consumer
        )
        counts = {item.identifier: item.delivered for item in pending}
        broker._claimed += len(entries)
        for entry in entries:
            self._take(entry.identifier, entry.field_values, counts.get(entry.identifier, 2))

    def _take(self, stream_id: str, fields: Any, deliveries: int) -> None:
        broker = self._broker
        try:
            envelope = decode(dict(fields), broker.max_message_size)
            if not envelope.reply.startswith(broker.keys.replies_prefix):
                raise Dropped("foreign", "its reply key is not one of this broker's reply streams")
        except Dropped as dropped:
            broker._dropped += 1
            self._to_ack.append(stream_id)
            text = f"Stream broker {broker.keys.name}: an entry was dropped ({dropped.reason})"
            broker.bus.log(text, logging.WARNING, entry=stream_id, reason=dropped.reason, detail=str(dropped))
            return
        self._buffer.append(_Entry(stream_id, envelope, deliveries, time.monotonic()))


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
