"""Connecting to Redis: one URL (``redis://``, ``rediss://`` for TLS, ``unix://``), credentials kept
out of every log line and error, and the backoff used between reconnection attempts."""

from __future__ import annotations

import gc
import random
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import coredis
    import coredis.exceptions
except ImportError as error:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError("aiobus.redis needs coredis: pip install 'aiobus[redis]'") from error

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

#: What a connection attempt or a command may raise when the server is away, slow or refuses us.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    coredis.exceptions.ConnectionError,
    coredis.exceptions.BusyLoadingError,
)

#: What a failed connection attempt raises: the above, or a refusal (a wrong password, an unknown user).
_FAILURES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, coredis.exceptions.ResponseError)

_SCHEMES = ("redis", "rediss", "unix")
_REFUSED = "refused us"


class RedisUnavailable(ConnectionError):
    """Redis could not be reached or refused us (wrong password, unknown user); the URL in the message
    has its password hidden. ``refused`` tells a refusal (retrying will not help) from an absence."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept): what may be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_url(url: str) -> str:
    """``url`` if it names a Redis server; ValueError (the password hidden) otherwise."""
    if not isinstance(url, str):
        raise TypeError(f"a Redis URL is a str, not {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {redact(url)!r}")
    return url


@asynccontextmanager
async def connect(url: str, *, timeout: float = 5.0) -> AsyncIterator[coredis.Redis[str]]:  # noqa: ASYNC109
    """``async with connect(url) as client``: a client for the server at ``url`` that has answered a
    PING, so a wrong password or an unreachable server fails here with :class:`RedisUnavailable`
    (the password hidden), not at the first command. Replies are decoded as str.

    coredis's client runs a task group of its own: use it only inside the ``async with``. Cancelling
    the block cancels the attempt; after ``timeout`` seconds without an answer the attempt raises
    RedisUnavailable (``timeout`` also bounds each later command's wait for a reply).
    """
    check_url(url)
    client: coredis.Redis[str] = coredis.Redis.from_url(
        url, decode_responses=True, connect_timeout=timeout, stream_timeout=timeout
    )
    pool = client.connection_pool
    pool.connection_class = _tidy(pool.connection_class)
    failure: str | None = None
    yielded = False
    try:
        async with client:
            try:
                with anyio.fail_after(timeout):
                    await client.ping()
            except _FAILURES as error:
                failure = _failure(url, error)
            if failure is None:
                yielded = True
                yield client
    except BaseExceptionGroup as group:  # coredis's task group wraps what the block raised
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
    except _FAILURES as error:
        if yielded:
            raise  # the block's own error, not the connection's
        failure = failure or _failure(url, error)
    if failure is not None:
        _forget_failed_connections()
        raise RedisUnavailable(failure, refused=_REFUSED in failure)


_TIDY: dict[type[Any], type[Any]] = {}


def _tidy(base: type[Any]) -> type[Any]:
    """``base``, a coredis connection class, whose instances close their anyio memory streams when
    they end: coredis closes them only after a connection succeeded, and a failed attempt's would
    warn (ResourceWarning) whenever the garbage collector happens to run, in unrelated code."""

    if base in _TIDY.values():
        return base
    if base in _TIDY:
        return _TIDY[base]

    class Tidy(base):  # type: ignore[misc]
        async def run(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().run(*args, **kwargs)
            finally:
                for value in list(vars(self).values()):
                    if isinstance(value, MemoryObjectSendStream | MemoryObjectReceiveStream):
                        value.close()

    Tidy.__name__ = Tidy.__qualname__ = f"Tidy{base.__name__}"
    _TIDY[base] = Tidy
    return Tidy


def _forget_failed_connections() -> None:
    """coredis leaves a connection that never connected with its anyio memory streams open: collect
    them now, their ResourceWarning silenced, rather than later in unrelated code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _failure(url: str, error: BaseException) -> str:
    if isinstance(error, coredis.exceptions.ResponseError):  # a wrong password, an unknown user...
        return f"Redis at {redact(url)} {_REFUSED}: {_reason(error)}"
    return f"cannot reach Redis at {redact(url)}: {_reason(error)}"


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return (text.splitlines() or [""])[0][:200]


@dataclass
class Backoff:
    """Delays between reconnection attempts: from ``first`` seconds, doubled each time up to
    ``most``, with up to 10% of jitter; :meth:`reset` after a success."""

    first: float = 0.1
    most: float = 5.0
    _next: float = 0.0

    def delay(self) -> float:
        """The next delay to wait, in seconds."""
        self._next = self.first if self._next == 0 else min(self.most, self._next * 2)
        return self._next * (1 + random.uniform(0, 0.1))

    def reset(self) -> None:
        self._next = 0.0
