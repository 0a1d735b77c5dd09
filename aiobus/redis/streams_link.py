"""The link a stream broker's function gets: :class:`StreamLink`, the shape of
:class:`~aiobus.ParentLink`, reading the consumer group's entries for one broker (see
:mod:`.streams_broker`): new ones ``batch`` at a time, those left by other consumers when due,
the acks of a batch together, the entries not ours dropped."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import coredis.exceptions
from anyio.abc import ObjectReceiveStream

from aiobus import EndOfLink

from ._connect import CONNECTION_ERRORS, Backoff, RedisUnavailable
from ._envelope import FIELD, Dropped, Envelope, decode, encode
from .streams import BLOCK, let_go, persist, trimmed

if TYPE_CHECKING:
    from .streams_broker import StreamBroker


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
            with anyio.CancelScope() as self._waiting:
                if self._ending:
                    pass
                elif self._to_ack:  # the acks go while the next batch is read: one round trip saved
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(self._flush_shielded)
                        await self._fetch()
                else:
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

    async def _flush_shielded(self) -> None:
        with anyio.CancelScope(shield=True):  # a stop cancels the read, never the acks
            await self._flush()

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
