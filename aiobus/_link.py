"""The link: an async pipe of Python objects over a byte stream, in length-prefixed pickle frames.

A frame is a 4-byte big-endian length, then that many bytes of pickle (the highest
protocol). Writes are batched: :meth:`Link.send` appends the frame to a buffer and
returns at once while the buffer holds less than ``high_water`` bytes; one writer
task, owned by the link, hands the whole buffer to the stream in one ``send``. A
receive about to wait hands the buffer over first, so a request's reply is not kept
waiting for the writer's turn. Reads take up to 64 KiB at a time and decode every
complete frame in them.

What a reader does with bad input: a length prefix over ``max_frame_size`` is refused
as soon as its 4 bytes are in (nothing of that size is ever allocated), and so is a
stream that ends inside a frame: both raise :class:`CorruptFrame` and close the link.
A complete frame whose payload does not unpickle raises :class:`UndecodableFrame` for
that message only; the link goes on. No other error comes out of the decoder. Inside a
frame, pickle's own limits apply: besides running code, a crafted payload of a few bytes
can make CPython's unpickler fill a memo table of gigabytes (a huge PUT index, CPython
gh-115952); frames are only ever what the peer's ``pickle.dumps`` made.

Pickle runs code: only ever read from a peer you trust (see :mod:`aiobus._private`).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup, UNIXSocketStream

from ._seconds import check_seconds

_HEADER = struct.Struct(">I")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_READ_SIZE = 65536
_MAX_READ_SIZE = 1 << 20


class LinkError(Exception):
    """Base class of the link's own errors."""


class FrameTooLarge(LinkError, ValueError):
    """A message pickles to more than the link's ``max_frame_size``; it was not sent."""


class CorruptFrame(LinkError):
    """The peer sent bytes that are not a stream of frames; the link has been closed.

    Either a length prefix announces more than ``max_frame_size`` bytes, or the stream
    ended inside a frame. The frame boundaries are lost, so nothing after it can be read.
    """


class UndecodableFrame(LinkError):
    """A complete frame whose payload does not unpickle; only that message is lost.

    Say, a pickle naming a module or class this process cannot import, or an object
    whose reconstruction raises. The unpickling error is the cause. The frame's length
    was valid, so the link goes on: the next ``receive`` returns the next message.
    """


class UndeliveredMessages(LinkError):
    """Messages accepted by :meth:`Link.send` were never handed to the stream."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count

    def __reduce__(self) -> tuple[type[UndeliveredMessages], tuple[str, int]]:
        return type(self), (str(self), self.count)  # it may travel back from a worker process


class EndOfLink(anyio.EndOfStream):
    """The peer closed the link cleanly, between two frames."""


class Skipped:
    """In a queue of messages, in the place of one that did not unpickle (its error).

    Within the package: a link's decoded messages, and a child broker's inbox.
    """

    __slots__ = ("error",)

    def __init__(self, error: UndecodableFrame) -> None:
        self.error = error


class LinkOptions(TypedDict, total=False):
    """The keyword options of :class:`Link`, for functions that create links."""

    max_frame_size: int
    high_water: int
    close_timeout: float
    name: str


def check_link_options(**options: Any) -> None:
    """Raise TypeError or ValueError if ``options`` are not valid options of :class:`Link`."""
    unknown = set(options) - set(LinkOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown link options: {', '.join(sorted(unknown))}")
    for key in ("max_frame_size", "high_water"):
        value = options.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{key} must be an int from 1 to 2**32 - 1 bytes, not {value!r}")
    check_seconds("close_timeout", options.get("close_timeout", 0))
    if not isinstance(options.get("name", ""), str):
        raise TypeError(f"name must be a str, not {options['name']!r}")


@dataclass(frozen=True)
class LinkStatistics:
    """A snapshot of a link's counters, from :meth:`Link.statistics`.

    ``messages_sent`` and ``bytes_sent`` count frames handed to the stream in full;
    ``buffered_*`` frames accepted by ``send`` and not handed over yet; ``undelivered``
    frames dropped by a close or a broken stream (a batch cut short counts whole, though
    the peer may have read its first frames). Accepted = sent + buffered + undelivered.
    Received counts are of messages returned by ``receive``.
    """

    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    buffered_bytes: int
    buffered_messages: int
    undelivered: int


class Link:
    """An ordered, batched, back-pressured pipe of picklable objects over ``stream``.

    Use it as ``async with Link(stream) as link:``: entering starts the writer task the
    link owns; leaving closes the link (see :meth:`aclose`). The link owns the stream.
    One task at a time may receive; any number may send.

    Args:
        stream: a connected byte stream (a Unix socket, a pipe pair...).
        max_frame_size: the largest pickle payload sent or accepted, in bytes.
        high_water: ``send`` waits while this many bytes or more are buffered.
        close_timeout: how long :meth:`aclose` waits for buffered messages to be written.
        name: shown in errors.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        max_frame_size: int = 16 * 2**20,
        high_water: int = 1 * 2**20,
        close_timeout: float = 5.0,
        name: str = "link",
    ) -> None:
        if not isinstance(stream, ByteStream):
            raise TypeError(f"stream must be an anyio ByteStream, not {type(stream).__name__}")
        check_link_options(max_frame_size=max_frame_size, high_water=high_water, close_timeout=close_timeout, name=name)
        self.name = name
        self.max_frame_size = max_frame_size
        self.high_water = high_water
        self.close_timeout = close_timeout
        self._stream = stream
        # See _write_now. (A blocking socket would stall the loop: leave it to the stream.)
        sock = stream.extra(SocketAttribute.raw_socket) if isinstance(stream, UNIXSocketStream) else None
        self._socket = sock if sock is not None and sock.gettimeout() == 0.0 else None
        self._group: TaskGroup | None = None
        self._writer_scope = anyio.CancelScope()
        self._writer_done = anyio.Event()
        # Sending: frames accepted and not yet written; then those being written.
        self._buffer = bytearray()
        self._buffer_messages = 0
        self._inflight = 0
        self._inflight_messages = 0
        self._wake: anyio.Event | None = None  # set to wake the idle writer
        self._progress: anyio.Event | None = None  # set when bytes were written, or the link broke
        self._broken: BaseException | None = None
        self._closing = False
        self._closed = False
        # Receiving: bytes of a frame not complete yet, and messages decoded and not returned.
        self._unparsed = bytearray()
        self._messages: deque[Any] = deque()  # and Skipped errors, in their place
        self._sizes: deque[int] = deque()  # the payload size of each, in the same order
        #: The pickled size, in bytes, of the message the last :meth:`receive` returned.
        self.last_size = 0
        self._finished = False
        self._frames_read = 0
        self._corrupt: CorruptFrame | None = None
        self._receiving = False
        self._eof = False
        self._read_broken: anyio.BrokenResourceError | None = None
        self._messages_sent = self._messages_received = self._bytes_sent = self._bytes_received = 0
        self._undelivered = 0

    def __repr__(self) -> str:
        return f"<Link {self.name!r}>"

    async def __aenter__(self) -> Link:
        if self._group is not None or self._closing:
            raise RuntimeError(f"link {self.name!r} can be entered only once")
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        group.start_soon(self._write_loop, name=f"aiobus link {self.name!r} writer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the link; if messages are dropped, raise UndeliveredMessages unless the block raised."""
        assert self._group is not None
        try:
            await self.aclose()
        except UndeliveredMessages:
            if exc is None:
                raise
        finally:
            # The writer never raises: the only error is the block's own, so let it through
            # as itself, but show anyio a cancellation.
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                exc_type, exc, tb = None, None, None
            await self._group.__aexit__(exc_type, exc, tb)

    # -- sending -------------------------------------------------------------------------

    def send_nowait(self, obj: Any) -> None:
        """Like :meth:`send`, but raise anyio.WouldBlock (``obj`` not queued) instead of waiting for room."""
        self._check_can_send()
        if len(self._buffer) + self._inflight >= self.high_water:
            raise anyio.WouldBlock
        self._append(self._encode(obj))

    async def send(self, obj: Any) -> None:
        """Queue ``obj`` to be written, waiting first while ``high_water`` bytes or more are buffered.

        Returns without yielding to the event loop while the buffer has room, so a burst of
        sends costs one write. Returning means queued, not delivered: :meth:`drain` waits
        for the write. Messages from one task are delivered in the order sent. If it raises,
        ``obj`` was not queued.

        Cancelled (only while it waits for room): ``obj`` was not queued. No timeout of its own.

        Raises:
            FrameTooLarge: ``obj`` pickles to more than ``max_frame_size`` bytes (nothing queued).
            LinkError: ``obj`` cannot be pickled (the pickling error is its cause).
            anyio.ClosedResourceError: the link is closed or closing.
            anyio.BrokenResourceError: a write failed (its error is the cause).
            RuntimeError: the link has not been entered with ``async with``.
        """
        self._check_can_send()
        frame = self._encode(obj)
        # Buffered bytes stay under high_water + 4 + max_frame_size.
        while len(self._buffer) + self._inflight >= self.high_water:
            await self._wait_progress()
            self._check_can_send()
        self._append(frame)

    def finish(self, obj: Any) -> None:
        """Queue ``obj`` as the last message, without waiting, and refuse every send after it.

        ``obj`` is queued even when the buffer is past ``high_water`` (a last word must not
        wait for a peer that does not read); senders waiting for room get
        ClosedResourceError, so the messages accepted are exactly those queued before
        ``obj``. What is queued is still written; receiving goes on.

        Raises:
            LinkError, FrameTooLarge: as :meth:`send` (nothing queued, nothing refused).
            anyio.ClosedResourceError, anyio.BrokenResourceError: as :meth:`send`.
        """
        self._check_can_send()
        frame = self._encode(obj)
        self._finished = True
        self._append(frame)
        self._signal_progress()  # senders waiting for room find the link finished

    async def drain(self) -> None:
        """Wait until every message queued so far has been handed to the stream (the OS).

        Cancelled: nothing is lost; the messages stay queued. No timeout of its own.

        Raises:
            anyio.BrokenResourceError: a write failed, so some messages will never be written.
            anyio.ClosedResourceError: the link was closed with messages still queued.
        """
        while self._buffer_messages or self._inflight_messages:
            if self._broken is not None:
                raise anyio.BrokenResourceError(f"link {self.name!r} is broken") from self._broken
            if self._closed:
                raise anyio.ClosedResourceError(f"link {self.name!r} was closed before its messages were written")
            await self._wait_progress()

    def _check_can_send(self) -> None:
        if self._closing:
            raise anyio.ClosedResourceError(f"link {self.name!r} is closed")
        if self._finished:
            raise anyio.ClosedResourceError(f"link {self.name!r} sent its last message")
        if self._broken is not None:
            raise anyio.BrokenResourceError(f"link {self.name!r} is broken") from self._broken
        if self._group is None:
            raise RuntimeError(f"link {self.name!r} sends only inside `async with link:`")

    def _encode(self, obj: Any) -> bytes:
        try:
            payload = pickle.dumps(obj, _PROTOCOL)
        except Exception as exc:
            raise LinkError(f"link {self.name!r} cannot send {type(obj).__name__!r}: {exc}") from exc
        if len(payload) > self.max_frame_size:
            raise FrameTooLarge(
                f"link {self.name!r}: a {type(obj).__name__!r} of {len(payload)} bytes is larger "
                f"than max_frame_size ({self.max_frame_size} bytes); it was not sent"
            )
        return payload

    def _append(self, payload: bytes) -> None:
        self._buffer += _HEADER.pack(len(payload))
        self._buffer += payload
        self._buffer_messages += 1
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def _wait_progress(self) -> None:
        if self._progress is None:
            self._progress = anyio.Event()
        await self._progress.wait()

    def _signal_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    async def _write_loop(self) -> None:
        try:
            with self._writer_scope:
                while True:
                    if not self._buffer_messages:
                        self._wake = anyio.Event()
                        await self._wake.wait()
                        continue
                    self._write_now()
                    if not self._buffer_messages:
                        continue
                    data, self._buffer = self._buffer, bytearray()
                    self._inflight, self._inflight_messages = len(data), self._buffer_messages
                    self._buffer_messages = 0
                    await self._stream.send(data)  # type: ignore[arg-type]  # a bytearray is fine
                    self._bytes_sent += self._inflight
                    self._messages_sent += self._inflight_messages
                    self._inflight = self._inflight_messages = 0
                    self._signal_progress()
        except Exception as exc:
            self._broken = exc
        finally:
            self._wake = None
            self._signal_progress()
            self._writer_done.set()

    def _write_now(self) -> None:
        """Hand what the socket takes of the buffer to it now, unless a write is under way.

        A Unix socket stream keeps no buffer of its own (on asyncio and trio alike), so
        writing to its socket directly keeps the order, and saves the stream's pass
        through the event loop.
        """
        if self._socket is None or not self._buffer_messages or self._inflight_messages:
            return
        try:
            sent = self._socket.send(self._buffer)
        except OSError:
            return  # full, or broken: the writer will say which
        self._bytes_sent += sent
        if sent == len(self._buffer):
            self._messages_sent += self._buffer_messages
            self._buffer = bytearray()
            self._buffer_messages = 0
        elif sent:
            del self._buffer[:sent]  # its frames count as sent once the rest is written
        self._signal_progress()

    # -- receiving -----------------------------------------------------------------------

    async def receive(self) -> Any:
        """Return the next message, waiting for it if none has arrived.

        Returns at once, without yielding, when a message was already read. Before it
        waits, it writes what ``send`` queued, if the socket takes it. Cancelled:
        nothing is lost (the next call returns the same message). No timeout of its own:
        wrap it in ``anyio.fail_after``.

        Raises:
            EndOfLink: the peer closed the link cleanly (also on every later call).
            UndecodableFrame: the next frame's payload does not unpickle (the error is the
                cause); that message is skipped and the link goes on: call again for the next.
            CorruptFrame: the peer broke the framing (a length over ``max_frame_size``, or a
                frame cut short by the end of stream); the messages before it were returned
                first; the link is closed.
            anyio.BrokenResourceError: the stream broke (say, the peer died with unread data;
                the messages read before it are returned first); also on every later call.
            anyio.ClosedResourceError: the link is closed.
            anyio.BusyResourceError: another task is receiving.
        """
        while not self._messages:
            if self._corrupt is not None:
                await self._close_corrupt()
            if self._closed:
                raise anyio.ClosedResourceError(f"link {self.name!r} is closed")
            if self._receiving:
                raise anyio.BusyResourceError("receiving from")
            if self._read_broken is not None:
                raise anyio.BrokenResourceError(str(self._read_broken)) from self._read_broken.__cause__
            if self._eof:
                raise EndOfLink(f"link {self.name!r}: the peer closed the link")
            self._write_now()  # about to wait, maybe for a reply: send what is queued first
            self._receiving = True
            try:
                chunk = await self._stream.receive(self._read_size())
            except anyio.EndOfStream:
                self._eof = True
                if self._unparsed:
                    self._corrupt = CorruptFrame(
                        f"link {self.name!r}: the stream ended inside a frame ({self._describe_partial()})"
                    )
                    continue
                raise EndOfLink(f"link {self.name!r}: the peer closed the link") from None
            except anyio.BrokenResourceError as exc:
                self._read_broken = anyio.BrokenResourceError(
                    f"link {self.name!r}: the stream broke ({exc.__cause__ or exc!r}); "
                    "the peer may have died with data unread"
                )
                self._read_broken.__cause__ = exc
                continue
            finally:
                self._receiving = False
            self._bytes_received += len(chunk)
            self._parse(chunk)
        message = self._messages.popleft()
        self.last_size = self._sizes.popleft()
        if type(message) is Skipped:
            raise message.error
        self._messages_received += 1
        return message

    @property
    def raw_socket(self) -> socket.socket | None:
        """The non-blocking Unix socket under the link, or None: for bytes sent outside the
        framing on a link used for nothing else (a child broker's heartbeats)."""
        return self._socket

    def __aiter__(self) -> Link:
        return self

    async def __anext__(self) -> Any:
        """The next message; the iteration ends at a clean end of the link (see :meth:`receive`)."""
        try:
            return await self.receive()
        except EndOfLink:
            raise StopAsyncIteration from None

    def _read_size(self) -> int:
        if len(self._unparsed) >= _HEADER.size:
            missing: int = _HEADER.size + _HEADER.unpack_from(self._unparsed)[0] - len(self._unparsed)
            return max(_READ_SIZE, min(missing, _MAX_READ_SIZE))
        return _READ_SIZE

    def _describe_partial(self) -> str:
        have = len(self._unparsed)
        if have < _HEADER.size:
            return f"{have} of the {_HEADER.size} bytes of a length prefix"
        return f"{have - _HEADER.size} of {_HEADER.unpack_from(self._unparsed)[0]} payload bytes"

    def _parse(self, chunk: bytes) -> None:
        """Decode every complete frame of the unparsed bytes and ``chunk``."""
        if self._corrupt is not None:
            return
        self._unparsed += chunk
        data = self._unparsed
        end = len(data)
        pos = 0
        with memoryview(data) as view:
            while end - pos >= 4:
                (size,) = _HEADER.unpack_from(data, pos)
                if size > self.max_frame_size:
                    self._corrupt = CorruptFrame(
                        f"link {self.name!r}: a frame announces {size} bytes, more than max_frame_size "
                        f"({self.max_frame_size} bytes)"
                    )
                    break
                stop = pos + 4 + size
                if stop > end:
                    break
                self._frames_read += 1
                self._sizes.append(size)
                try:
                    self._messages.append(pickle.loads(view[pos + 4 : stop]))
                except Exception as exc:
                    error = UndecodableFrame(
                        f"link {self.name!r}: frame {self._frames_read} ({size} bytes) does not unpickle: "
                        f"{exc!r}; that message is skipped"
                    )
                    error.__cause__ = exc
                    self._messages.append(Skipped(error))
                pos = stop
        del data[:pos]

    async def _close_corrupt(self) -> None:
        error = self._corrupt
        assert error is not None
        if not self._closing:
            self._closing = True
            await self._close(flush=False)
        raise error

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the link: write what is queued, within ``close_timeout`` seconds, then close the stream.

        New sends are refused at once (and senders waiting for room get ClosedResourceError).
        The peer then sees the end of the link: a clean one if everything was written, else
        the last frame may be cut short (it gets CorruptFrame). Calling it again does nothing.

        Cancelled: the stream is closed at once; queued messages are dropped and counted in
        ``statistics().undelivered``. On timeout: the same, then UndeliveredMessages is raised.

        Raises:
            UndeliveredMessages: some messages accepted by ``send`` were never written (the
                close timed out, or a write failed earlier); ``count`` says how many.
        """
        if self._closing:
            return
        self._closing = True
        await self._close(flush=self._group is not None)
        if self._undelivered:
            raise UndeliveredMessages(
                f"link {self.name!r} closed with {self._undelivered} message(s) never written"
                + ("" if self._broken is None else f" (a write failed: {self._broken!r})"),
                self._undelivered,
            )

    async def _close(self, *, flush: bool) -> None:
        try:
            if flush:
                with anyio.move_on_after(self.close_timeout):
                    while (self._buffer_messages or self._inflight_messages) and self._broken is None:
                        await self._wait_progress()
        finally:
            with anyio.CancelScope(shield=True):
                self._writer_scope.cancel()
                if self._group is not None:
                    await self._writer_done.wait()
                self._closed = True
                self._undelivered += self._buffer_messages + self._inflight_messages
                self._buffer = bytearray()
                self._buffer_messages = self._inflight = self._inflight_messages = 0
                self._signal_progress()
                await anyio.aclose_forcefully(self._stream)

    @property
    def ready(self) -> int:
        """How many messages have arrived that :meth:`receive` returns without waiting."""
        return len(self._messages)

    def statistics(self) -> LinkStatistics:
        """Counters of what went through the link (see :class:`LinkStatistics`)."""
        return LinkStatistics(
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            buffered_bytes=len(self._buffer) + self._inflight,
            buffered_messages=self._buffer_messages + self._inflight_messages,
            undelivered=self._undelivered,
        )
