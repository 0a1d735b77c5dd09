"""Brokers on other hosts: the sending side, :class:`RemoteBroker`, and what both sides share.

A broker named ``name`` reads the stream ``{prefix}:{name}:requests`` as a member of a consumer
group (see :mod:`.streams_broker`); any process, on any host, sends to it with a
:class:`RemoteBroker`, which reads the broker's replies on a stream of its own,
``{prefix}:{name}:replies:{origin}``, named in each message's envelope (:mod:`._envelope`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import ObjectReceiveStream
from coredis.tokens import PureToken

from aiobus import check_seconds

from ._connect import CONNECTION_ERRORS, Backoff, RedisUnavailable, _forget_failed_connections, connect, redact
from ._envelope import FIELD, MAX_MESSAGE_SIZE, OPENED, Dropped, Keys, decode, encode, new_origin

_T = TypeVar("_T")

#: The environment variable a Redis URL (with its credentials) is taken from when none is given.
URL_VARIABLE = "AIOBUS_REDIS_URL"
#: Entries kept in a stream, about (``MAXLEN ~``): past it the oldest are trimmed.
MAXLEN = 10_000
#: Seconds a blocking read waits on the server before it looks around (a stop, a claim to make).
BLOCK = 1.0


async def persist(
    operation: Callable[[], Awaitable[_T]],
    url: str,
    timeout: float,  # noqa: ASYNC109
    command_timeout: float,
) -> _T:
    """Await ``operation()`` until it succeeds, retrying with backoff while Redis is away or silent.

    Each attempt has ``command_timeout`` seconds; after ``timeout`` seconds in all it raises
    :class:`RedisUnavailable` (the password hidden). An attempt whose answer was lost may have
    been carried out: what is retried must bear being done twice. Cancelled: no retry follows.
    """
    deadline = anyio.current_time() + timeout
    backoff = Backoff()
    while True:
        failures: list[BaseException] = []
        try:
            with anyio.fail_after(command_timeout):
                return await operation()
        except CONNECTION_ERRORS as error:
            failures.append(error)
        reason = str(failures[0]).splitlines()[0][:200] if str(failures[0]) else type(failures[0]).__name__
        let_go(failures)
        delay = backoff.delay()
        if anyio.current_time() + delay > deadline:
            raise RedisUnavailable(f"no answer from Redis at {redact(url)} within {timeout:g} s: {reason}")
        await anyio.sleep(delay)


def let_go(failures: list[BaseException]) -> None:
    """Drop the errors of failed commands, and with them the connections coredis could not make,
    their ResourceWarning silenced (they leave anyio memory streams open): now, rather than in
    unrelated code. Each error's traceback holds the connection, and the list is the last
    reference to the error: it is emptied here, where the warnings are off, with no await."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        failures.clear()
        _forget_failed_connections()


def redis_url(url: str | None) -> str:
    """``url``, or if it is None the URL in the environment variable ``AIOBUS_REDIS_URL`` (so that a
    password need not appear on a command line).

    Raises:
        ValueError: neither is given.
    """
    if url is None:
        url = os.environ.get(URL_VARIABLE)
        if not url:
            raise ValueError(f"no Redis URL given, and {URL_VARIABLE} is not set")
    return url


def trimmed(maxlen: int) -> dict[str, Any]:
    """XADD's arguments that keep a stream at about ``maxlen`` entries."""
    return {"trim_strategy": PureToken.MAXLEN, "trim_operator": PureToken.APPROXIMATELY, "threshold": maxlen}


@dataclass(frozen=True)
class RemoteBrokerStatistics:
    """What a :class:`RemoteBroker` did: messages sent, replies received, entries dropped."""

    sent: int
    replies: int
    dropped: int


class RemoteBroker(ObjectReceiveStream[Any]):
    """The link to the brokers named ``name``, wherever they run: ``await broker.send(obj)``,
    ``await broker.receive()``, ``async for reply in broker``; the shape of a local
    :class:`~aiobus.ChildBroker`.

    Use it as ``async with RemoteBroker(url, name) as broker:``; connecting checks the server
    and the credentials (from the URL, or the environment: never logged), so a wrong password or an absent
    server fails there with :class:`RedisUnavailable`.

    Messages are JSON (never pickle: Redis crosses a network): a tuple arrives as a list, a
    dict's keys as strings. Each goes to one of the brokers serving ``name`` (a
    :class:`~aiobus.redis.StreamBroker`), at least once: a broker that dies before it asked for
    the next message leaves it to another, which sees it delivered more than once. Replies come
    back to this sender only, on a stream of its own deleted when it closes (and expiring
    ``reply_ttl`` seconds after its last use if the sender dies).

    Args:
        url: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix://``;
            None: the URL in the environment variable ``AIOBUS_REDIS_URL``. Credentials come
            from there only, and are never logged (errors show the URL with ``***``).
        name: the brokers' name (no ``:`` or spaces).
        prefix: the first part of every key.
        maxlen: entries kept in the requests and replies streams, about: past it, the oldest
            are trimmed even if no broker read them, so Redis's memory stays bounded.
        send_timeout: seconds :meth:`send` keeps trying while Redis is away or silent.
        connect_timeout: seconds to connect, and for each command's answer.
        max_message_size: the largest envelope, as JSON, in bytes, sent or received.
        reply_ttl: seconds the reply stream outlives this sender if it dies without closing.
        replies_buffer: replies read ahead before the reader waits for :meth:`receive`.

    Raises:
        ValueError: a name, prefix or number is out of range, or ``url`` is not a Redis URL.
    """

    def __init__(
        self,
        url: str | None,
        name: str,
        *,
        prefix: str = "aiobus",
        maxlen: int = MAXLEN,
        send_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        reply_ttl: float = 3600.0,
        replies_buffer: int = 1000,
    ) -> None:
        self.url = redis_url(url)
        self.keys = Keys(prefix, name)
        if maxlen < 1 or max_message_size < 1 or replies_buffer < 1:
            raise ValueError("maxlen, max_message_size and replies_buffer must be 1 or more")
        self.maxlen = maxlen
        self.send_timeout = check_seconds("send_timeout", send_timeout)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.reply_ttl = check_seconds("reply_ttl", reply_ttl)
        self.max_message_size = max_message_size
        #: This sender's name on the wire (host, pid, random part).
        self.origin = new_origin()
        self.reply_key = self.keys.replies(self.origin)
        self._replies_buffer = replies_buffer
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._log = structlog.get_logger().bind(logger="aiobus.redis", broker=name)
        self._sent = self._received = self._dropped = 0
        self._last = "0-0"  # the last entry read on the reply stream

    async def __aenter__(self) -> RemoteBroker:
        self._replies_in, self._replies_out = anyio.create_memory_object_stream[Any](self._replies_buffer)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._replies_out.aclose)
            stack.push_async_callback(self._replies_in.aclose)
            self._client = await stack.enter_async_context(connect(self.url, timeout=self.connect_timeout))
            stack.push_async_callback(self._forget_replies)
            self._last = await persist(self._open_replies, self.url, self.send_timeout, self.connect_timeout)
            tasks = await stack.enter_async_context(anyio.create_task_group())
            tasks.start_soon(self._read_replies, name=f"aiobus replies of {self.keys.name}")
            stack.callback(tasks.cancel_scope.cancel)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close: stop reading replies and delete this sender's reply stream. Bounded by
        ``connect_timeout``; cancelled, the stream is left to expire after ``reply_ttl``."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()  # not in a scope of its own: the client's scopes were entered before
            let_go([])  # what the client dropped while Redis was away

    async def send(self, obj: Any) -> str:
        """Queue ``obj`` for the brokers; return its message id (replies carry it too).

        Raises:
            TypeError: ``obj`` is not JSON-serializable (nothing was sent).
            ValueError: its envelope is larger than ``max_message_size``.
            RedisUnavailable: Redis did not take it within ``send_timeout`` seconds (it may
                have, if only its answer was lost).
            RuntimeError: the broker is not open (use ``async with``).

        Cancelled: the message may or may not have been queued.
        """
        if self._stack is None:
            raise RuntimeError("a RemoteBroker sends only inside `async with RemoteBroker(...)`")
        message_id, text = encode(obj, self.origin, self.reply_key, self.max_message_size)
        client = self._client

        async def add() -> Any:
            return await client.xadd(self.keys.requests, {FIELD: text}, **trimmed(self.maxlen))

        await persist(add, self.url, self.send_timeout, self.connect_timeout)
        self._sent += 1
        return message_id

    async def receive(self) -> Any:
        """The next reply from a broker (its body), in the order they arrived.

        Raises:
            anyio.ClosedResourceError: the broker was closed.
            RuntimeError: the broker was never opened (use ``async with``).

        Cancelled: nothing is lost. No timeout of its own: while Redis is away, it waits.
        """
        if not hasattr(self, "_replies_out"):
            raise RuntimeError("a RemoteBroker receives only inside `async with RemoteBroker(...)`")
        try:
            return await self._replies_out.receive()
        except anyio.EndOfStream:
            raise anyio.ClosedResourceError from None

    def statistics(self) -> RemoteBrokerStatistics:
        return RemoteBrokerStatistics(self._sent, self._received, self._dropped)

    async def _open_replies(self) -> str:
        """Create the reply stream, with its lease; return its first id."""
        opened: str = await self._client.xadd(self.reply_key, {OPENED: self.origin}, **trimmed(self.maxlen))
        await self._client.expire(self.reply_key, int(self.reply_ttl) + 1)
        return opened

    async def _forget_replies(self) -> None:
        with anyio.move_on_after(self.connect_timeout):
            failures: list[BaseException] = []
            try:
                await self._client.delete([self.reply_key])
            except CONNECTION_ERRORS as error:
                failures.append(error)  # the stream expires after reply_ttl
            let_go(failures)

    async def _read_replies(self) -> None:
        """Read the reply stream into the buffer; while Redis is away, try again with backoff.
        Every read that finds nothing renews the stream's lease (a restarted server may have
        lost the stream: brokers make it again as they reply, with a lease of their own)."""
        backoff = Backoff(most=2.0)
        client = self._client
        while True:
            failures: list[BaseException] = []
            try:
                with anyio.fail_after(BLOCK + self.connect_timeout):
                    found = await client.xread({self.reply_key: self._last}, count=100, block=int(BLOCK * 1000))
                    if not found:
                        await client.expire(self.reply_key, int(self.reply_ttl) + 1)
            except CONNECTION_ERRORS as error:
                failures.append(error)
            if failures:
                let_go(failures)  # out of the except block, which holds the error
                await anyio.sleep(backoff.delay())
                continue
            backoff.reset()
            for entry in (found or {}).get(self.reply_key, ()):
                self._last = entry.identifier
                if OPENED in entry.field_values:
                    continue
                try:
                    envelope = decode(dict(entry.field_values), self.max_message_size)
                except Dropped as dropped:
                    self._dropped += 1
                    self._log.warning("A reply was dropped", reason=dropped.reason, detail=str(dropped))
                    continue
                self._received += 1
                await self._replies_in.send(envelope.body)
