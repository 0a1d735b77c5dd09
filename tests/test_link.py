"""The link over real Unix sockets: framing, order, batching, backpressure, corrupt frames, closing."""

from __future__ import annotations

import pickle
import random
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, UNIXSocketStream

from aiobus._link import CorruptFrame, EndOfLink, FrameTooLarge, Link, LinkError, UndecodableFrame, UndeliveredMessages


async def stream_pair() -> tuple[UNIXSocketStream, UNIXSocketStream]:
    left, right = socket.socketpair()
    return await UNIXSocketStream.from_socket(left), await UNIXSocketStream.from_socket(right)


@asynccontextmanager
async def link_and_raw(**options: Any) -> AsyncIterator[tuple[Link, UNIXSocketStream]]:
    """A link on one end of a socket pair, and the bare stream of the other end."""
    ours, theirs = await stream_pair()
    async with theirs, Link(ours, **options) as link:
        yield link, theirs


@asynccontextmanager
async def linked(**options: Any) -> AsyncIterator[tuple[Link, Link]]:
    """Two links on the two ends of a socket pair."""
    left, right = await stream_pair()
    async with Link(left, **options) as one, Link(right, **options) as other:
        yield one, other


def frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return struct.pack(">I", len(payload)) + payload


class CountingStream(ByteStream):
    """A real stream, passed through, that counts the calls to ``send``."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.sends = 0

    async def send(self, item: bytes) -> None:
        self.sends += 1
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_objects_make_the_round_trip() -> None:
    """Objects sent one way and back arrive equal to what was sent."""
    objects: list[Any] = [None, 1, "é", b"\x00" * 100_000, {"a": [1, 2.5, (3, "x")]}, list(range(10_000))]
    async with linked() as (one, other):
        for obj in objects:
            await one.send(obj)
            await other.send(await other.receive())
            assert obj == await one.receive()


async def test_a_hundred_thousand_messages_arrive_in_order() -> None:
    """100,000 messages sent while the other side reads arrive all, once each, in order."""
    count = 100_000
    received: list[int] = []
    async with linked() as (one, other):

        async def read() -> None:
            for _ in range(count):
                received.append((await other.receive())[1])

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            for i in range(count):
                await one.send(("message", i))
    assert list(range(count)) == received


async def test_a_burst_of_sends_costs_few_writes() -> None:
    """A burst of 1000 small sends reaches the stream in far fewer than 1000 writes."""
    left, right = await stream_pair()
    counting = CountingStream(left)
    received: list[int] = []
    async with Link(counting) as one, Link(right) as other:

        async def read() -> None:
            received.extend([await other.receive() for _ in range(1000)])

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            for i in range(1000):
                await one.send(i)
            await one.drain()
    assert list(range(1000)) == received
    assert counting.sends <= 10


async def test_send_waits_above_high_water_until_the_reader_reads() -> None:
    """A writer whose reader does not read blocks once high_water is exceeded, and resumes when it reads."""
    high_water, count, blob = 64 * 1024, 5000, b"x" * 1000
    sent = peak = 0
    async with linked(high_water=high_water) as (one, other):

        async def produce() -> None:
            nonlocal sent, peak
            for i in range(count):
                await one.send((i, blob))
                sent += 1
                peak = max(peak, one.statistics().buffered_bytes)

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            await anyio.wait_all_tasks_blocked()
            assert 0 < sent < count
            with pytest.raises(anyio.WouldBlock):
                one.send_nowait("one more")
            assert list(range(count)) == [(await other.receive())[0] for _ in range(count)]
    assert high_water <= peak <= high_water + len(frame((count, blob)))


async def test_a_cancelled_send_queues_nothing() -> None:
    """A send cancelled while it waits for room is never delivered."""
    queued = 0
    async with linked(high_water=1024) as (one, other):
        with anyio.CancelScope() as scope:
            scope.cancel()
            while True:
                await one.send("filler")  # returns without yielding while there is room
                queued += 1
        assert scope.cancelled_caught
        await one.send("last")
        received = [await other.receive() for _ in range(queued + 1)]
    assert ["filler"] * queued + ["last"] == received


async def test_drain_waits_until_everything_is_written() -> None:
    """After drain() nothing is buffered and every message sent is counted as written."""
    async with linked() as (one, _):
        for i in range(500):
            await one.send(i)
        await one.drain()
        stats = one.statistics()
        assert (0, 0, 500) == (stats.buffered_bytes, stats.buffered_messages, stats.messages_sent)


async def test_an_oversized_message_fails_at_send_and_the_next_arrives() -> None:
    """A message larger than max_frame_size raises FrameTooLarge at send; the next one still arrives."""
    async with linked(max_frame_size=1000) as (one, other):
        await one.send("before")
        with pytest.raises(FrameTooLarge, match="larger than max_frame_size") as info:
            await one.send(b"x" * 2000)
        assert isinstance(info.value, ValueError)
        await one.send("after")
        assert ["before", "after"] == [await other.receive(), await other.receive()]


async def test_an_unpicklable_message_fails_at_send_and_the_next_arrives() -> None:
    """An object that cannot be pickled raises LinkError at send; the next message still arrives."""
    async with linked() as (one, other):
        with pytest.raises(LinkError, match="cannot send 'lock'") as info:
            await one.send(threading.Lock())
        assert isinstance(info.value.__cause__, TypeError)
        await one.send("after")
        assert "after" == await other.receive()


async def test_a_huge_length_prefix_is_a_corrupt_frame() -> None:
    """A length prefix over max_frame_size raises CorruptFrame and closes the link."""
    async with link_and_raw(max_frame_size=1000) as (link, raw):
        await raw.send(frame("good") + struct.pack(">I", 0xFFFFFFFF))
        assert "good" == await link.receive()
        with pytest.raises(CorruptFrame, match="announces 4294967295 bytes, more than max_frame_size"):
            await link.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await link.send("anything")


@pytest.mark.parametrize(("cut", "description"), [(2, "2 of the 4 bytes of a length prefix"), (-2, "payload bytes")])
async def test_a_frame_cut_short_by_the_end_of_stream_is_corrupt(cut: int, description: str) -> None:
    """A frame truncated by the end of the stream raises CorruptFrame naming what arrived."""
    async with link_and_raw() as (link, raw):
        await raw.send(frame("good") + frame("lost")[:cut])
        await raw.aclose()
        assert "good" == await link.receive()
        with pytest.raises(CorruptFrame, match=f"stream ended inside a frame .*{description}"):
            await link.receive()


async def test_a_payload_that_does_not_unpickle_is_skipped() -> None:
    """A frame whose payload is not pickle raises UndecodableFrame in its turn; the link goes on."""
    garbage = b"\x00garbage"
    async with link_and_raw() as (link, raw):
        await raw.send(frame(1) + frame(2) + struct.pack(">I", len(garbage)) + garbage + frame(3))
        assert [1, 2] == [await link.receive(), await link.receive()]
        with pytest.raises(UndecodableFrame, match=r"frame 3 .* does not unpickle"):
            await link.receive()
        assert 3 == await link.receive()


async def test_a_clean_end_of_stream_ends_the_iteration() -> None:
    """When the peer closes between frames, iteration ends and receive raises EndOfLink."""
    async with link_and_raw() as (link, raw):
        await raw.send(frame(1) + frame(2))
        await raw.aclose()
        assert [1, 2] == [msg async for msg in link]
        with pytest.raises(EndOfLink) as info:
            await link.receive()
        assert isinstance(info.value, anyio.EndOfStream)


@pytest.mark.parametrize("seed", range(20))
async def test_frames_written_in_random_slices_decode(seed: int) -> None:
    """Frames written in slices of random sizes, cutting headers and payloads anywhere, decode in order."""
    rng = random.Random(seed)
    messages = [rng.randbytes(rng.choice((0, 1, 3, 4, 5, 100, 70_000))) for _ in range(60)]
    data = b"".join(frame(m) for m in messages)
    async with link_and_raw() as (link, raw):

        async def write() -> None:
            pos = 0
            while pos < len(data):
                size = rng.choice((1, 2, 3, 5, 7, rng.randrange(1, 200_000)))
                await raw.send(data[pos : pos + size])
                pos += size
            await raw.aclose()

        async with anyio.create_task_group() as group:
            group.start_soon(write)
            assert messages == [msg async for msg in link]


async def test_closing_writes_what_is_queued() -> None:
    """Messages queued when the link closes are written before the stream is closed."""
    left, right = await stream_pair()
    async with Link(right) as other:
        async with Link(left) as one:
            for i in range(2000):
                await one.send(i)
        assert list(range(2000)) == [msg async for msg in other]


async def test_closing_reports_messages_never_written() -> None:
    """A close that cannot write everything in close_timeout raises UndeliveredMessages with the count."""
    count = 8000
    left, right = await stream_pair()
    async with right:
        one = Link(left, high_water=64 * 2**20, close_timeout=0.2)
        with pytest.raises(UndeliveredMessages, match="never written") as info:
            async with one:
                for i in range(count):
                    await one.send((i, b"x" * 1000))
        stats = one.statistics()
        assert 0 < info.value.count == stats.undelivered
        assert count == stats.messages_sent + stats.undelivered


def test_the_link_errors_pickle() -> None:
    """The link's errors survive pickling (they may travel back from a worker process), count included."""
    errors = [UndeliveredMessages("3 lost", 3), CorruptFrame("bad"), FrameTooLarge("big"), EndOfLink("end")]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert (type(error), str(error)) == (type(copy), str(copy))
    assert 3 == pickle.loads(pickle.dumps(errors[0])).count


async def test_a_failed_write_makes_sending_raise() -> None:
    """Once the peer is gone and a write fails, drain and send raise BrokenResourceError, close counts the loss."""
    left, right = await stream_pair()
    await right.aclose()
    one = Link(left)
    with pytest.raises(UndeliveredMessages) as info:
        async with one:
            await one.send("into the void")
            with pytest.raises(anyio.BrokenResourceError):
                await one.drain()
            with pytest.raises(anyio.BrokenResourceError):
                await one.send("again")
    assert 1 == info.value.count


async def test_a_cancelled_receive_loses_nothing() -> None:
    """A receive cancelled while it waits leaves the next message for the next receive."""
    async with linked() as (one, other):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await other.receive()
        await one.send("kept")
        assert "kept" == await other.receive()


async def test_using_a_closed_link_raises() -> None:
    """send and receive on a closed link raise ClosedResourceError."""
    async with linked() as (one, _):
        await one.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await one.send(1)
        with pytest.raises(anyio.ClosedResourceError):
            await one.receive()


async def test_send_nowait_queues_when_there_is_room() -> None:
    """send_nowait queues a message without waiting, and it arrives."""
    async with linked() as (one, other):
        one.send_nowait("quick")
        assert "quick" == await other.receive()


async def test_a_link_is_entered_once() -> None:
    """Entering a link a second time raises RuntimeError."""
    async with linked() as (one, _):
        with pytest.raises(RuntimeError, match="entered only once"):
            await one.__aenter__()


async def test_sending_outside_async_with_raises() -> None:
    """send on a link that was not entered raises RuntimeError naming the fix."""
    left, right = await stream_pair()
    link = Link(left)
    with pytest.raises(RuntimeError, match="async with"):
        await link.send(1)
    await link.aclose()
    await right.aclose()


async def test_two_receivers_at_once_are_refused() -> None:
    """A second task receiving while one waits gets BusyResourceError."""
    async with linked() as (_, other), anyio.create_task_group() as group:
        group.start_soon(other.receive)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(anyio.BusyResourceError):
            await other.receive()
        group.cancel_scope.cancel()


@pytest.mark.parametrize(
    "options",
    [{"max_frame_size": 0}, {"max_frame_size": 2**32}, {"high_water": -1}, {"close_timeout": -1}, {"high_water": 1.5}],
)
async def test_bad_options_raise_value_error(options: dict[str, Any]) -> None:
    """An option out of range raises ValueError naming it."""
    left, right = await stream_pair()
    async with left, right:
        with pytest.raises(ValueError, match=next(iter(options))):
            Link(left, **options)


async def test_a_stream_of_the_wrong_type_raises_type_error() -> None:
    """A stream that is not an anyio ByteStream (say, a bare socket) raises TypeError naming its type."""
    left, right = await stream_pair()
    async with left, right:
        with pytest.raises(TypeError, match="anyio ByteStream, not socket"):
            Link(left.extra(anyio.abc.SocketAttribute.raw_socket))  # type: ignore[arg-type]


async def test_statistics_count_messages_and_bytes() -> None:
    """statistics() counts messages and bytes both ways."""
    async with linked() as (one, other):
        await one.send("hello")
        await one.drain()
        assert "hello" == await other.receive()
        sent, received = one.statistics(), other.statistics()
    size = len(frame("hello"))
    assert (1, size) == (sent.messages_sent, sent.bytes_sent)
    assert (1, size) == (received.messages_received, received.bytes_received)


@pytest.mark.parametrize(
    "test",
    [
        test_objects_make_the_round_trip,
        test_a_hundred_thousand_messages_arrive_in_order,
        test_send_waits_above_high_water_until_the_reader_reads,
        test_a_cancelled_send_queues_nothing,
        test_a_payload_that_does_not_unpickle_is_skipped,
        test_a_clean_end_of_stream_ends_the_iteration,
        test_closing_reports_messages_never_written,
        test_a_failed_write_makes_sending_raise,
    ],
    ids=lambda test: test.__name__.removeprefix("test_"),
)
def test_works_on_trio(test: Callable[[], Awaitable[None]]) -> None:
    """The behaviour holds under the trio backend too."""
    anyio.run(test, backend="trio")


async def test_finish_queues_its_last_message_on_a_full_link_and_refuses_later_sends() -> None:
    """finish() queues past high_water without waiting, a waiting sender is refused, and all arrives in order."""
    async with linked(high_water=1024) as (one, other):
        refused: list[BaseException] = []

        async def stuck_sender() -> None:
            try:
                while True:
                    await one.send(b"x" * 512)
            except anyio.ClosedResourceError as error:
                refused.append(error)

        async with anyio.create_task_group() as group:
            group.start_soon(stuck_sender)
            await anyio.wait_all_tasks_blocked()  # the sender waits for room: nobody reads
            accepted = one.statistics().buffered_messages + one.statistics().messages_sent
            one.finish("the end")
        assert len(refused) == 1
        with pytest.raises(anyio.ClosedResourceError):
            await one.send("too late")
        with pytest.raises(anyio.ClosedResourceError):
            one.send_nowait("too late")
        received = [await other.receive() for _ in range(accepted + 1)]
    assert received == [b"x" * 512] * accepted + ["the end"]


async def test_last_size_is_the_pickled_size_of_the_message_received() -> None:
    """After receive(), last_size is the payload size of that message's frame."""
    async with linked() as (one, other):
        for obj in (b"", b"y" * 100_000, ("a", 1)):
            await one.send(obj)
            assert await other.receive() == obj
            assert other.last_size == len(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
