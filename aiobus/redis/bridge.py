"""RedisBridge: chosen channels carried between buses on any hosts through one Redis deployment, each
bus's presence kept in a key with a time to live, and the fleet operations answered.

The local bus never waits for Redis: a listener on each outgoing channel only puts the envelope in
a bounded buffer (or counts it, while Redis is away or the buffer full); one task of the bus owns the
connection, sends, receives, reconnects with backoff, and states what was missed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import coredis
import coredis.exceptions
from coredis.retry import NoRetryPolicy

from aiobus import Bus, ChannelFailures, State, StateError, check_seconds, priority

from ._connect import CONNECTION_ERRORS, Backoff, RedisUnavailable, _forget_failed_connections, connect, redact
from ._ledger import BridgeStatistics, Ledger
from ._wire import (
    Dropped,
    Envelope,
    FleetRequest,
    channel_key,
    check_name,
    check_node,
    check_prefix,
    dumps,
    encode_answer,
    fleet_channel,
    presence_key,
)

_T = TypeVar("_T")
_relayed: ContextVar[Envelope | None] = ContextVar("aiobus_redis_envelope", default=None)
#: The bridge (its id) and channel of the message being relayed, until that bridge's forwarder, the
#: first listener, has seen it: that one call is not sent back, while what the listeners publish in
#: their turn is sent (and so is the message by another bridge of the bus, to another deployment).
_relaying: ContextVar[tuple[int, str] | None] = ContextVar("aiobus_redis_relaying", default=None)
#: Forwarders run first on their channel: the message leaves before the local listeners run, and a
#: listener publishing on the same channel is not mistaken for the relayed message.
_FORWARDER_PRIORITY = -math.inf
#: Errors after which the connection is dropped and made again; any other is a bug, and fails the task.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, coredis.exceptions.RedisError)


def current_envelope() -> Envelope | None:
    """In a listener called for a message from another bus, that message's :class:`Envelope` (origin,
    sequence, time); None in any other call."""
    return _relayed.get()


class _Queue(Generic[_T]):
    """A bounded buffer filled without waiting (False when full) and emptied by one task."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: deque[_T] = deque()
        self._ready: anyio.Event | None = None

    def put_nowait(self, item: _T) -> bool:
        if len(self.items) >= self.size:
            return False
        self.items.append(item)
        if self._ready is not None:
            self._ready.set()
        return True

    async def wait(self) -> None:
        """Wait until there is an item, or :meth:`wake` is called."""
        if not self.items:
            self._ready = anyio.Event()
            await self._ready.wait()

    def wake(self) -> None:
        if self._ready is not None:
            self._ready.set()


@dataclass(eq=False)
class _Run:
    """One run of the connection task, from a start to the exit."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    first: anyio.Event = field(default_factory=anyio.Event)  # the first attempt is over
    closing: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    presence_due: anyio.Event = field(default_factory=anyio.Event)
    failure: RedisUnavailable | None = None


class RedisBridge:
    """Carries ``outgoing`` channels from this bus to the other buses of a Redis deployment, and
    their ``incoming`` channels to this one; keeps this bus's presence in Redis; answers the fleet
    operations (:class:`aiobus.redis.Fleet`, ``aiobus fleet``).

    A publish on an outgoing channel reaches, through Redis pub/sub, the listeners of that channel
    on every bus that has it among its incoming channels (at most once; see :class:`BridgeStatistics`
    for what is counted instead); the forwarder runs first among the channel's listeners. The
    arguments travel as JSON in an :class:`Envelope`: use str, numbers, bools, None, lists and dicts
    with str keys (a tuple arrives as a list); a publish that JSON cannot carry is counted and
    logged, not sent. Our own messages are not delivered back to
    us, and a message received is not sent out again (what its listeners publish in turn is).

    Channels: ``start`` (priority 40) connects; a refusal (a wrong password, an unknown user) fails
    the start with :class:`RedisUnavailable`, while an absent server is retried in the background.
    ``exit`` (priority 90, after the other plugins' exit listeners) sends what is buffered, deletes
    the presence key and disconnects, within ``timeout``. ``main`` refreshes the presence key at most
    once a second, ``state`` at each change. A fleet ``graceful``, ``stop`` or ``exit`` is answered
    first, then done on the bus.

    Args:
        bus: the bus to attach to.
        url: ``redis://[user:password@]host:port/db``, ``rediss://`` for TLS, ``unix://``: the only
            place credentials come from (never logged).
        outgoing: the channels whose local publishes are sent to the other buses.
        incoming: the channels on which the other buses' publishes are published here.
        node: this bus's name in the deployment, unique; ``host:pid`` by default.
        prefix: the deployment's key prefix: buses with another prefix do not hear each other.
        group: the fleet group this bus belongs to.
        max_envelope: the largest envelope sent or accepted, in bytes of JSON.
        buffer: envelopes waiting to be sent beyond which more are counted as ``overflow`` and
            dropped. Received envelopes are published here one after another, as they come: while
            the local listeners run, the next ones wait in the Redis client's buffer.
        timeout: seconds for connecting and for the presence refresh (the commands of the fleet
            too): a server silent longer, as a paused one is, counts as away.
        presence_ttl: seconds the presence key lives without a refresh (at least 3 main intervals).
        fleet: whether to answer fleet operations (anyone who may publish on the deployment's
            fleet channel may then stop this bus).

    Raises:
        TypeError, ValueError: a malformed option (a channel or group with other characters than
            letters, digits and ``_.-``).
    """

    def __init__(
        self,
        bus: Bus,
        url: str,
        *,
        outgoing: Iterable[str] = (),
        incoming: Iterable[str] = (),
        node: str | None = None,
        prefix: str = "aiobus",
        group: str = "default",
        max_envelope: int = 64 * 1024,
        buffer: int = 1000,
        timeout: float = 5.0,
        presence_ttl: float = 10.0,
        fleet: bool = True,
    ) -> None:
        from ._connect import check_url

        self.bus = bus
        self.url = check_url(url)
        self.outgoing = frozenset(check_name("a bridged channel", c) for c in _channels(outgoing))
        self.incoming = frozenset(check_name("a bridged channel", c) for c in _channels(incoming))
        self.node = check_node(f"{socket.gethostname()}:{os.getpid()}" if node is None else node)
        self.prefix = check_prefix(prefix)
        self.group = check_name("a group", group)
        if isinstance(max_envelope, bool) or not isinstance(max_envelope, int) or max_envelope < 256:
            raise ValueError(f"max_envelope is a number of bytes, at least 256, not {max_envelope!r}")
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer is a number of envelopes, at least 1, not {buffer!r}")
        self.max_envelope = max_envelope
        self.timeout = check_seconds("timeout", timeout, positive=True)
        self.presence_ttl = check_seconds("presence_ttl", presence_ttl, positive=True)
        self.fleet = fleet
        self._keys = {channel_key(self.prefix, c): c for c in self.incoming}
        self._outgoing_keys = {c: channel_key(self.prefix, c) for c in self.outgoing}
        self._fleet_key = fleet_channel(self.prefix, self.group)
        self._presence_key = presence_key(self.prefix, self.group, self.node)
        self._forwarders = {c: functools.partial(self._forward, c) for c in self.outgoing}
        self._outbox: _Queue[tuple[str, str]] = _Queue(buffer)
        self._run: _Run | None = None
        self._connected = False
        self._seqs: dict[str, int] = {}
        self._presence_written = -math.inf
        self._ledger = Ledger(bus, self.node)

    def __repr__(self) -> str:
        return f"<RedisBridge {self.node!r} at {redact(self.url)}>"

    # -- the plugin ---------------------------------------------------------------------

    def subscribe(self) -> None:
        """Subscribe to the bus: its lifecycle channels, and a forwarder on each outgoing channel."""
        for channel, listener in self._lifecycle():
            self.bus.subscribe(channel, listener)
        for channel, forwarder in self._forwarders.items():
            self.bus.subscribe(channel, forwarder, priority=_FORWARDER_PRIORITY)

    def unsubscribe(self) -> None:
        """Unsubscribe, and cancel the connection task without waiting for it."""
        for channel, listener in self._lifecycle():
            self.bus.unsubscribe(channel, listener)
        for channel, forwarder in self._forwarders.items():
            self.bus.unsubscribe(channel, forwarder)
        if self._run is not None:
            self._run.scope.cancel()

    def _lifecycle(self) -> list[tuple[str, Callable[..., Any]]]:
        return [("start", self.start), ("exit", self.exit), ("main", self.main), ("state", self.state)]

    @priority(40)
    async def start(self) -> None:
        """Connect (the connection then lives in a task of the bus); a no-op if connected already.

        Waits for the first attempt only (at most ``timeout``, twice over): an absent server is
        retried in the background. Cancelled: the task goes on.

        Raises:
            RedisUnavailable: Redis refused us (a wrong password, an unknown user, no permission).
        """
        if self._run is not None and not self._run.done.is_set():
            return
        run = self._run = _Run()
        self.bus.start_soon(self._task, run, name=f"redis bridge {self.node}")
        with anyio.move_on_after(2 * self.timeout + 1):
            await run.first.wait()
        if run.failure is not None:
            raise run.failure

    @priority(90)
    async def exit(self) -> None:
        """Send what is buffered, delete the presence key and disconnect, within ``timeout``; then
        whatever is left is cancelled. Not connected: the reconnection attempts end at once."""
        run = self._run
        if run is None:
            return
        run.closing.set()
        self._outbox.wake()
        if not self._connected:
            run.scope.cancel()
        with anyio.move_on_after(self.timeout):
            await run.done.wait()
        run.scope.cancel()
        with anyio.CancelScope(shield=True):
            await run.done.wait()

    def main(self) -> None:
        """Have the presence key refreshed, at most once a second."""
        if self._run is not None and time.monotonic() - self._presence_written >= 1.0:
            self._run.presence_due.set()

    def state(self, old: State, new: State) -> None:
        """Have the presence key rewritten with the new state."""
        if self._run is not None:
            self._run.presence_due.set()

    def statistics(self) -> BridgeStatistics:
        """The bridge's counters since it was made."""
        return self._ledger.snapshot(self._connected)

    # -- outgoing: never waits --------------------------------------------------------------

    def _forward(self, channel: str, *args: Any, **kwargs: Any) -> None:
        if _relaying.get() == (id(self), channel):
            _relaying.set(None)  # the relayed message itself, from another bus: not sent back
            return
        seq = self._seqs[channel] = self._seqs.get(channel, 0) + 1  # a message not sent leaves a gap
        if not self._connected:
            self._ledger.not_sent("away", channel, "Redis is away")
            return
        try:
            data = Envelope(channel, self.node, seq, time.time(), args, kwargs).encode(self.prefix)
        except (TypeError, ValueError) as error:
            self._ledger.not_sent("unencodable", channel, f"not JSON: {str(error)[:200]}")
            return
        if len(data) > self.max_envelope and len(data.encode()) > self.max_envelope:
            self._ledger.not_sent("too_large", channel, f"{len(data.encode())} bytes, over {self.max_envelope}")
        elif not self._outbox.put_nowait((channel, data)):
            self._ledger.not_sent("overflow", channel, f"the send buffer of {self._outbox.size} is full")

    # -- the connection task ---------------------------------------------------------------

    async def _task(self, run: _Run) -> None:
        try:
            with run.scope:
                await self._connection(run)
        finally:
            self._connected = False
            run.first.set()
            run.done.set()
            _forget_failed_connections()

    async def _connection(self, run: _Run) -> None:
        backoff = Backoff(first=0.1, most=5.0)
        away_since: float | None = None
        attempts = 0
        while not run.closing.is_set():
            try:
                async with connect(self.url, timeout=self.timeout) as client:
                    if away_since is not None:
                        self._ledger.reconnects += 1
                    await self._session(client, run, away_since, attempts)
                    return
            except RedisUnavailable as error:
                if error.refused and not run.first.is_set():
                    run.failure = error
                    return
                reason = str(error)
            except Exception as error:
                if not _is_redis_error(error):
                    raise
                reason = f"lost Redis at {redact(self.url)}: {_first_line(error)}"
            finally:
                self._lost()
            attempts += 1
            if away_since is None:
                away_since = time.monotonic()
                self.bus.log(
                    f"{reason}; publishes on bridged channels are counted, not sent, until it is back",
                    logging.WARNING,
                    node=self.node,
                )
            else:
                self.bus.log(f"Redis still away (attempt {attempts}): {reason}", logging.DEBUG, node=self.node)
            run.first.set()
            _forget_failed_connections()
            await anyio.sleep(backoff.delay())

    def _lost(self) -> None:
        self._connected = False
        while self._outbox.items:  # sent after an outage they would be stale: counted as not sent
            self._outbox.items.popleft()
            self._ledger.count_not_sent("away")

    async def _session(self, client: coredis.Redis[str], run: _Run, away_since: float | None, attempts: int) -> None:
        """Subscribe, then send, receive and keep the presence key until the exit; errors end it."""
        async with AsyncExitStack() as stack:
            # Both subscribed before the bus counts as connected: nothing sent after it is missed.
            bridged = await stack.enter_async_context(self._subscription(client, *self._keys)) if self._keys else None
            fleet = await stack.enter_async_context(self._subscription(client, self._fleet_key)) if self.fleet else None
            await self._write_presence(client)
            self._connected = True
            run.first.set()
            if away_since is None:
                self.bus.log(f"Bridge {self.node} connected to Redis at {redact(self.url)}", node=self.node)
            else:
                unsent = self._ledger.not_bridged.get("away", 0)
                self.bus.log(
                    f"Redis back after {time.monotonic() - away_since:.1f} s and {attempts} attempt(s); "
                    f"{unsent} publish(es) on bridged channels not sent while away so far; what other buses "
                    "sent meanwhile is lost, reported per origin at its next message",
                    logging.WARNING,
                    node=self.node,
                    not_bridged=unsent,
                )
            async with anyio.create_task_group() as group:
                if bridged is not None:
                    group.start_soon(self._receive, client, bridged)
                if fleet is not None:  # on a connection of its own: slow listeners do not hold it up
                    group.start_soon(self._answer_fleet, client, fleet)
                group.start_soon(self._keep_presence, client, run)
                await self._send(client, run)
                group.cancel_scope.cancel()
            with anyio.move_on_after(self.timeout):
                await client.delete([self._presence_key])

    async def _command(self, command: Any) -> Any:
        with anyio.fail_after(self.timeout):  # coredis's own timeout retries: this bounds it
            return await command

    async def _send(self, client: coredis.Redis[str], run: _Run) -> None:
        """Publish what the forwarders buffered, one at a time; return at the exit once it is sent."""
        outbox = self._outbox
        closing = run.closing
        while True:
            if not outbox.items:
                if closing.is_set():
                    return
                await outbox.wait()  # the exit wakes it too
                continue
            channel, data = outbox.items.popleft()
            try:
                # No deadline of its own (that is the hot path): a silent server fails the presence
                # refresh within `timeout`, which ends the session and this publish with it.
                await client.publish(self._outgoing_keys[channel], data)
            except BaseException:
                self._ledger.count_not_sent("failed")
                raise
            self._ledger.sent += 1

    async def _write_presence(self, client: coredis.Redis[str]) -> None:
        ttl = max(self.presence_ttl, 3 * self.bus.main_interval)
        record = {
            "v": 1,
            "prefix": self.prefix,
            "node": self.node,
            "group": self.group,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": self.bus.state.name,
            "time": time.time(),
        }
        await self._command(client.set(self._presence_key, dumps(record), px=math.ceil(ttl * 1000)))
        self._presence_written = time.monotonic()

    async def _keep_presence(self, client: coredis.Redis[str], run: _Run) -> None:
        """Rewrite the presence key when the main tick or a change of state asks; while the bus is not
        started (no tick), every third of its time to live. A hung main tick lets it expire."""
        while True:
            idle = math.inf if self.bus.state is State.STARTED else self.presence_ttl / 3
            with anyio.move_on_after(idle):
                await run.presence_due.wait()
            run.presence_due = anyio.Event()
            await self._write_presence(client)

    # -- incoming -------------------------------------------------------------------------

    async def _receive(self, client: coredis.Redis[str], pubsub: Any) -> None:
        async for message in pubsub:
            if message["type"] != "message":
                continue
            key, data = message["channel"], message["data"]
            try:
                envelope = Envelope.decode(data, self.prefix, self.max_envelope, self.incoming, self._keys.get(key, ""))
            except Dropped as drop:
                self._ledger.drop(drop.reason, key, str(drop))
                continue
            if envelope.origin == self.node:
                self._ledger.echoes += 1
                continue
            self._ledger.track(envelope)
            await self._relay(envelope)
        raise coredis.exceptions.ConnectionError("the subscription ended")  # made again with the connection

    async def _relay(self, envelope: Envelope) -> None:
        """Publish a received envelope on the local bus (the next ones wait in the client's buffer)."""
        token, guard = _relayed.set(envelope), _relaying.set((id(self), envelope.channel))
        try:
            await self.bus.publish(envelope.channel, *envelope.args, **envelope.kwargs)
        except ChannelFailures:
            pass  # each failure is logged by the bus
        finally:
            _relaying.reset(guard)
            _relayed.reset(token)
        self._ledger.received += 1

    # -- fleet operations -------------------------------------------------------------------

    def _subscription(self, client: coredis.Redis[str], *keys: str) -> Any:
        """A pub/sub connection subscribed to ``keys``: ``async with`` it."""
        return client.pubsub(
            channels=keys,
            ignore_subscribe_messages=True,
            retry_policy=NoRetryPolicy(),  # reconnected by _connection, with our backoff and counts
            subscription_timeout=self.timeout,
        )

    async def _answer_fleet(self, client: coredis.Redis[str], pubsub: Any) -> None:
        async for message in pubsub:
            if message["type"] != "message":
                continue
            try:
                request = FleetRequest.decode(message["data"], self.prefix, self.max_envelope)
            except Dropped as drop:
                self._ledger.drop(drop.reason, self._fleet_key, str(drop))
                continue
            await self._fleet_request(client, request)
        raise coredis.exceptions.ConnectionError("the subscription ended")

    async def _fleet_request(self, client: coredis.Redis[str], request: FleetRequest) -> None:
        if request.nodes is not None and self.node not in request.nodes:
            return
        self._ledger.fleet_requests += 1
        answer = encode_answer(self.prefix, request.id, self.node, self.bus.state.name)
        await self._command(client.publish(f"{self.prefix}:reply:{request.id}", answer))
        self.bus.log(f"Fleet request {request.op!r} answered", node=self.node, op=request.op)
        if request.op != "status":
            self.bus.start_soon(self._act, request.op, name=f"fleet {request.op}")

    async def _act(self, op: str) -> None:
        try:
            await getattr(self.bus, op)()
        except StateError as error:
            self.bus.log(f"Fleet {op} not done: {error}", logging.WARNING, node=self.node)
        except ChannelFailures:
            pass  # logged by the bus


def _channels(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"channels are given as a list of names, not the str {names!r}")
    return tuple(names)


def _is_redis_error(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return all(_is_redis_error(inner) for inner in error.exceptions)
    return isinstance(error, _REDIS_ERRORS)


def _first_line(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = str(error) or type(error).__name__
    return (text.splitlines() or [""])[0][:200]
