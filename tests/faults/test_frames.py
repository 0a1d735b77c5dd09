"""Fault injection on the link and the private rendezvous, over real sockets and real child processes.

Bad input for the frame decoder (any bytes, flipped bytes, truncated frames, huge length
prefixes, payloads that do not unpickle), objects that cannot be pickled at the sending
side, and peers that do not present the token. Every wait is bounded; every test checks
that no descriptor is left open.

Faults injected per run (hypothesis runs exactly ``max_examples`` valid examples per
property; the few random payloads that are CPython memo bombs, see :func:`memo_bomb`, are
rejected and not counted):

- frame decoder: 600 streams of arbitrary bytes (raw, or frames of arbitrary payloads)
  on asyncio and 200 on trio, each written in up to 6 slices; 300 streams of valid frames
  with 1 to 8 bytes flipped; 300 valid streams cut at a random point; 150 length
  prefixes over ``max_frame_size``; 200 mixes of good frames and frames that do not
  unpickle (5 kinds); one 4 GiB length prefix under tracemalloc; one skipped frame's cause;
  6 peers that die with data unread (3 cut points, asyncio and trio);
- sending side: 8 kinds of unpicklable objects through ``send`` and through
  ``send_nowait`` (16), 1 oversized object, 100 objects around the ``max_frame_size`` boundary;
- child brokers: 4 bad messages to a child, 1 unpicklable and 1 undecodable message
  from a child, 1 uncaught send error in a child;
- private listener: 8 kinds of refused peers, 1 slow peer, 1 peer gone before the OK,
  and 60 sequences of 1 to 6 peers sending arbitrary bytes (some followed by a pickle
  that would create a file if it were ever loaded).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import pickletools
import socket
import struct
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import child_functions
import pytest
from anyio.abc import UNIXSocketStream
from helpers import LogRecorder
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit, State
from aiobus._link import CorruptFrame, EndOfLink, FrameTooLarge, Link, LinkError, UndecodableFrame
from aiobus._private import TOKEN_SIZE, PrivateListener, connect_private

pytestmark = pytest.mark.faults

TIMEOUT = 10.0  # seconds: far more than any of these waits needs (they take milliseconds)
CHILD_TIMEOUT = 60.0  # a child process starts in about a second

# Simple objects for valid frames: what equality compares reliably.
simple = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)
frame_sizes = st.sampled_from([1, 8, 64, 4096, 16 * 2**20])

# Payloads that are complete frames and still fail to unpickle, each for its own reason.
MISSING_MODULE = b"caiobus_no_such_module\nGone\n)\x81."  # GLOBAL, EMPTY_TUPLE, NEWOBJ, STOP
MISSING_CLASS = b"cos\nno_such_function_in_os\n."
NOT_PICKLE = b"\x00this is not pickle"
EMPTY = b""
LOAD_BOMB = pickle.dumps(child_functions.LoadBomb(), pickle.HIGHEST_PROTOCOL)
BAD_PAYLOADS = [MISSING_MODULE, MISSING_CLASS, NOT_PICKLE, EMPTY, LOAD_BOMB]


# -- helpers ----------------------------------------------------------------------------


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def frame_of(obj: Any) -> bytes:
    return framed(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def run(main: Callable[..., Awaitable[Any]], *args: Any, backend: str = "asyncio") -> Any:
    """Run ``main`` in a fresh event loop; fail if it leaves a descriptor open or (asyncio) a task running."""
    before = open_fds()

    async def checked() -> Any:
        tasks = asyncio.all_tasks() if backend == "asyncio" else set()
        result = await main(*args)
        if backend == "asyncio":
            await asyncio.sleep(0)
            leaked = {
                task
                for task in asyncio.all_tasks() - tasks - {asyncio.current_task()}
                if task.get_name() != "AnyIO process pool shutdown task"  # anyio's own, ends with the loop
            }
            assert not leaked, f"tasks left running: {leaked}"
        return result

    result = anyio.run(checked, backend=backend)
    assert open_fds() == before, "descriptors left open"
    return result


async def stream_pair() -> tuple[UNIXSocketStream, UNIXSocketStream]:
    left, right = socket.socketpair()
    return await UNIXSocketStream.from_socket(left), await UNIXSocketStream.from_socket(right)


def outcome(obj: Any) -> tuple[str, str]:
    """A message as compared: repr, since what arbitrary bytes unpickle to may not equal itself (nan)."""
    return ("message", repr(obj))


def memo_bomb(payload: bytes) -> bool:
    """Whether CPython's C unpickler would size its memo after a huge PUT or LONG_BINPUT index.

    It makes a table of 16 bytes per index, and fills it: a 9-byte payload can take up to
    64 GiB (CPython gh-115952, fixed in later versions). Pickle's own limit, not the link's:
    such payloads are left out of the random inputs (the OOM killer would end the run).
    """
    try:
        for opcode, arg, _ in pickletools.genops(payload):
            if opcode.name in ("PUT", "LONG_BINPUT") and isinstance(arg, int) and arg >= 2**16:
                return True
    except Exception:
        pass  # the unpickler stops at the same place
    return False


def expected_outcomes(data: bytes, max_frame_size: int) -> list[tuple[str, str]]:
    """What a reader of ``data`` (then the end of the stream) must report, decoded the plain way.

    Call it before the link reads ``data``: it rejects the example if a payload is a memo bomb."""
    found: list[tuple[str, str]] = []
    pos = 0
    while True:
        if pos == len(data):
            return [*found, ("end", "")]
        if len(data) - pos < 4:
            return [*found, ("corrupt", "stream ended inside a frame")]
        (size,) = struct.unpack_from(">I", data, pos)
        if size > max_frame_size:
            return [*found, ("corrupt", f"announces {size} bytes")]
        if len(data) - pos - 4 < size:
            return [*found, ("corrupt", "stream ended inside a frame")]
        payload = data[pos + 4 : pos + 4 + size]
        assume(not memo_bomb(payload))
        try:
            found.append(outcome(pickle.loads(payload)))
        except Exception:
            found.append(("undecodable", f"frame {len(found) + 1} ({size} bytes)"))
        pos += 4 + size


async def read_all(link: Link) -> list[tuple[str, str]]:
    """Receive until the link ends or breaks, and say what came; any other error fails the test."""
    found: list[tuple[str, str]] = []
    while True:
        try:
            found.append(outcome(await link.receive()))
        except UndecodableFrame as error:
            assert error.__cause__ is not None
            found.append(("undecodable", str(error)))
        except CorruptFrame as error:
            found.append(("corrupt", str(error)))
            with pytest.raises(CorruptFrame):  # it stays broken
                await link.receive()
            with pytest.raises(anyio.ClosedResourceError):
                await link.send("anything")
            return found
        except EndOfLink:
            found.append(("end", ""))
            return found


def same(found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> bool:
    """Messages equal; errors of the same kind, each message containing the expected text."""
    return len(found) == len(expected) and all(
        f[0] == e[0] and (f[1] == e[1] if f[0] == "message" else e[1] in f[1])
        for f, e in zip(found, expected, strict=True)
    )


async def feed(data: bytes, cuts: list[int], max_frame_size: int, close: bool = True) -> list[tuple[str, str]]:
    """A raw peer writes ``data`` in slices cut at ``cuts`` (then closes); a link reads it all."""
    ours, theirs = await stream_pair()
    async with theirs, Link(ours, max_frame_size=max_frame_size) as link:

        async def write() -> None:
            points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
            try:
                for start, stop in itertools.pairwise(points):
                    if stop > start:
                        await theirs.send(data[start:stop])
            except anyio.BrokenResourceError:
                pass  # the reader found an error and hung up before the rest
            if close:
                await theirs.aclose()

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as group:
                group.start_soon(write)
                found = await read_all(link)
    return found


# -- the frame decoder: any bytes -------------------------------------------------------


any_bytes = {
    # Raw bytes, or frames of raw payloads: the decoder's paths, and the unpickler's on any payload.
    "data": st.binary(max_size=600)
    | st.lists(st.binary(max_size=60), max_size=8).map(lambda ps: b"".join(map(framed, ps))),
    "cuts": st.lists(st.integers(min_value=0), max_size=5),
    "max_frame_size": frame_sizes,
}


def check_any_bytes(data: bytes, cuts: list[int], max_frame_size: int, backend: str) -> None:
    expected = expected_outcomes(data, max_frame_size)
    found = run(feed, data, cuts, max_frame_size, backend=backend)
    assert same(found, expected), (found, expected)


@settings(max_examples=600)
@given(**any_bytes)
def test_any_bytes_give_messages_or_a_clear_error(data: bytes, cuts: list[int], max_frame_size: int) -> None:
    """Arbitrary bytes, written in arbitrary slices, then the end: the link reports exactly what a plain
    decoder finds (messages, frames skipped as undecodable, then a clean end or CorruptFrame), and nothing else."""
    check_any_bytes(data, cuts, max_frame_size, "asyncio")


@settings(max_examples=200)
@given(**any_bytes)
def test_any_bytes_on_trio(data: bytes, cuts: list[int], max_frame_size: int) -> None:
    """The same on trio."""
    check_any_bytes(data, cuts, max_frame_size, "trio")


@settings(max_examples=300)
@given(
    messages=st.lists(simple, min_size=1, max_size=6),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=8
    ),
    max_frame_size=frame_sizes,
)
def test_valid_frames_with_flipped_bytes(
    messages: list[Any], flips: list[tuple[int, int]], max_frame_size: int
) -> None:
    """Valid frames with bytes flipped anywhere (length prefixes included): the same as a plain decoder."""
    data = bytearray(b"".join(frame_of(m) for m in messages))
    for where, mask in flips:
        data[where % len(data)] ^= mask
    expected = expected_outcomes(bytes(data), max_frame_size)
    found = run(feed, bytes(data), [], max_frame_size)
    assert same(found, expected), (found, expected)


@settings(max_examples=300)
@given(messages=st.lists(simple, min_size=1, max_size=6), cut=st.integers(min_value=0), data=st.data())
def test_valid_frames_truncated_anywhere(messages: list[Any], cut: int, data: st.DataObject) -> None:
    """Frames cut at any byte: every whole frame arrives, then a clean end at a boundary, else CorruptFrame."""
    frames = [frame_of(m) for m in messages]
    stream = b"".join(frames)
    cut %= len(stream) + 1
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=max(cut, 1)), max_size=4))
    found = run(feed, stream[:cut], cuts, 16 * 2**20)
    whole = 0
    while whole < len(frames) and sum(map(len, frames[: whole + 1])) <= cut:
        whole += 1
    at_boundary = sum(map(len, frames[:whole])) == cut
    assert found[:whole] == [outcome(m) for m in messages[:whole]]
    end = ("end", "") if at_boundary else ("corrupt", "stream ended inside a frame")
    assert same(found[whole:], [end]), found


@settings(max_examples=150)
@given(
    before=st.lists(simple, max_size=3),
    max_frame_size=st.integers(min_value=1, max_value=2**24),
    excess=st.integers(min_value=1, max_value=2**32 - 1),
    tail=st.binary(max_size=64),
)
def test_a_huge_length_prefix_fails_at_once(before: list[Any], max_frame_size: int, excess: int, tail: bytes) -> None:
    """A length prefix over max_frame_size raises CorruptFrame naming it as soon as its 4 bytes are in,
    while the peer keeps the stream open: the reader waits for none of the bytes announced."""
    size = min(max_frame_size + excess, 2**32 - 1)
    messages = [m for m in before if len(frame_of(m)) - 4 <= max_frame_size]
    data = b"".join(frame_of(m) for m in messages) + struct.pack(">I", size) + tail
    found = run(feed, data, [], max_frame_size, False)  # never closed by the peer
    assert found[:-1] == [outcome(m) for m in messages]
    assert same(found[-1:], [("corrupt", f"announces {size} bytes, more than max_frame_size ({max_frame_size} bytes)")])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("cut", [0, 3, 7])
def test_a_peer_that_dies_with_data_unread(cut: int, backend: str) -> None:
    """A peer that closes with our message unread (a reset), after a frame and part of another: the
    whole frame arrives, then BrokenResourceError naming the link, and again on the next call."""

    async def main() -> None:
        ours, theirs = await stream_pair()
        async with Link(ours, name="to the dead") as link:
            await link.send("never read")
            await link.drain()
            await theirs.send(frame_of(1) + frame_of(2)[:cut])
            await theirs.aclose()
            with anyio.fail_after(TIMEOUT):
                assert 1 == await link.receive()
                for _ in range(2):
                    with pytest.raises(anyio.BrokenResourceError, match="link 'to the dead': the stream broke"):
                        await link.receive()

    run(main, backend=backend)


def test_a_huge_announced_frame_is_never_allocated() -> None:
    """A frame announcing 4 GiB - 1 (allowed by max_frame_size), of which 3 MiB come before the end:
    CorruptFrame, and the reader's memory never grows anywhere near the size announced."""
    announced = 2**32 - 1
    data = struct.pack(">I", announced) + os.urandom(3 * 2**20)
    tracemalloc.start()
    try:
        found = run(feed, data, [], announced)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same(found, [("corrupt", f"ended inside a frame ({3 * 2**20} of {announced} payload bytes)")]), found
    assert peak < 64 * 2**20, f"peak {peak} bytes"


@settings(max_examples=200)
@given(
    items=st.lists(st.one_of(simple.map(lambda m: (True, m)), st.sampled_from(BAD_PAYLOADS).map(lambda p: (False, p)))),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_frames_that_do_not_unpickle_are_skipped(items: list[tuple[bool, Any]], cuts: list[int]) -> None:
    """Good frames and frames that do not unpickle (a missing module, a missing name, not pickle, empty,
    a reduce that raises), in any order: each good one arrives, each bad one raises UndecodableFrame
    naming its frame number, the reader goes on, and the link ends cleanly."""
    data = b"".join(frame_of(m) if good else framed(m) for good, m in items)
    found = run(feed, data, cuts, 16 * 2**20)
    expected = [
        outcome(m) if good else ("undecodable", f"frame {number} ({len(m)} bytes) does not unpickle")
        for number, (good, m) in enumerate(items, 1)
    ]
    assert same(found, [*expected, ("end", "")]), found


def test_a_skipped_frame_keeps_its_cause_and_the_counts() -> None:
    """An UndecodableFrame is a LinkError whose cause is the unpickler's error; it counts as no message."""

    async def main() -> None:
        ours, theirs = await stream_pair()
        async with theirs, Link(ours, name="probe") as link:
            await theirs.send(framed(LOAD_BOMB) + frame_of("next"))
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(UndecodableFrame, match=r"link 'probe': frame 1 .* refuses to be unpickled") as info:
                    await link.receive()
                assert isinstance(info.value, LinkError) and not isinstance(info.value, CorruptFrame)
                assert isinstance(info.value.__cause__, ValueError)
                assert "next" == await link.receive()
            assert 1 == link.statistics().messages_received

    run(main)


# -- the sending side -------------------------------------------------------------------


class RefusesToPickle:
    def __reduce__(self) -> Any:
        raise RuntimeError("this object refuses to be pickled")


def _generator() -> Iterator[int]:
    yield 1


def _too_deep() -> list[Any]:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    return nested


UNPICKLABLE: dict[str, Callable[[], Any]] = {  # a socket is closed by the caller
    "lambda": lambda: lambda: None,
    "socket": lambda: socket.socket(socket.AF_UNIX),
    "lock": threading.Lock,
    "reduce raises": RefusesToPickle,
    "generator": _generator,
    "fails halfway": lambda: [1, "two", b"three", lambda: None, 5],
    "too deep": _too_deep,
    "local class": lambda: type("Local", (), {})(),
}


@pytest.mark.parametrize("nowait", [False, True], ids=["send", "send_nowait"])
@pytest.mark.parametrize("kind", UNPICKLABLE)
def test_an_unpicklable_object_fails_at_send_and_the_stream_stays_intact(kind: str, nowait: bool) -> None:
    """send raises LinkError (the pickling error its cause); the bytes on the wire are exactly the good frames."""

    async def main() -> None:
        obj = UNPICKLABLE[kind]()
        ours, theirs = await stream_pair()
        try:
            async with theirs:
                async with Link(ours) as link:
                    await link.send("before")
                    before = link.statistics()
                    with pytest.raises(LinkError, match="cannot send") as info:
                        link.send_nowait(obj) if nowait else await link.send(obj)
                    assert type(info.value) is LinkError and info.value.__cause__ is not None
                    after = link.statistics()
                    assert (before.buffered_messages + before.messages_sent) == (
                        after.buffered_messages + after.messages_sent
                    )
                    await link.send("after")
                received = bytearray()
                with anyio.fail_after(TIMEOUT):
                    async for chunk in theirs:
                        received += chunk
            assert bytes(received) == frame_of("before") + frame_of("after")
        finally:
            if isinstance(obj, socket.socket):
                obj.close()

    run(main)


def test_an_oversized_object_fails_at_send_and_nothing_is_written() -> None:
    """FrameTooLarge at send, nothing written: the peer reads exactly the frames before and after."""

    async def main() -> None:
        ours, theirs = await stream_pair()
        async with theirs:
            async with Link(ours, max_frame_size=1000) as link:
                await link.send("before")
                with pytest.raises(FrameTooLarge, match="larger than max_frame_size"):
                    await link.send(b"x" * 5000)
                await link.send("after")
            received = bytearray()
            with anyio.fail_after(TIMEOUT):
                async for chunk in theirs:
                    received += chunk
        assert bytes(received) == frame_of("before") + frame_of("after")

    run(main)


@settings(max_examples=100)
@given(length=st.integers(min_value=0, max_value=3000), delta=st.integers(min_value=-3, max_value=3))
def test_the_max_frame_size_boundary_is_the_same_both_ways(length: int, delta: int) -> None:
    """An object whose pickle is max_frame_size bytes or fewer is sent and received; one byte more
    is FrameTooLarge at send; the two sides agree on the limit."""
    obj = b"y" * length
    max_frame_size = max(1, len(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)) + delta)

    async def main() -> None:
        left, right = await stream_pair()
        async with (
            Link(left, max_frame_size=max_frame_size) as one,
            Link(right, max_frame_size=max_frame_size) as other,
        ):
            if delta < 0:
                with pytest.raises(FrameTooLarge):
                    await one.send(obj)
            else:
                await one.send(obj)
                with anyio.fail_after(TIMEOUT):
                    assert obj == await other.receive()

    run(main)


# -- through a real child broker --------------------------------------------------------


async def started_broker(bus: Bus, name: str, fn: Callable[..., Any], **options: Any) -> ChildBroker:
    broker = ChildBroker(bus, name, fn, **options)
    broker.subscribe()
    await bus.start()
    return broker


async def ask(broker: ChildBroker, message: Any) -> Any:
    await broker.send(message)
    return await broker.receive()


def test_bad_messages_to_a_child_fail_at_send_or_are_skipped_and_the_child_goes_on() -> None:
    """To a child: a lambda and a socket fail at send (LinkError), a too large one (FrameTooLarge), a bomb
    that does not unpickle in the child is reported by it; the same child process answers the next message.
    From the child: its unpicklable message fails in the child, which reports it."""

    async def main() -> None:
        sock = socket.socket(socket.AF_UNIX)
        try:
            with anyio.fail_after(CHILD_TIMEOUT):
                async with Bus() as bus:
                    broker = await started_broker(
                        bus, "tolerant", child_functions.reports_link_errors, max_frame_size=10_000
                    )
                    _, pid = await ask(broker, "pid")
                    for obj in (lambda: None, sock):
                        with pytest.raises(LinkError, match="cannot send"):
                            await broker.send(obj)
                    with pytest.raises(FrameTooLarge):
                        await broker.send(b"z" * 20_000)
                    kind, text = await ask(broker, child_functions.LoadBomb())
                    assert kind == "undecodable" and "refuses to be unpickled" in text
                    kind, text = await ask(broker, "send a lambda")
                    assert kind == "send failed" and "cannot send 'function'" in text
                    assert ("echo", 1) == await ask(broker, 1)
                    assert ("pid", pid) == await ask(broker, "pid")
        finally:
            sock.close()

    run(main)


def test_a_message_the_parent_cannot_unpickle_is_reported_and_the_parent_runs_on() -> None:
    """A child sends an object the parent cannot unpickle: the parent logs it (with the child's name),
    ``receive`` raises UndecodableFrame in that message's turn, the bus stays STARTED, and the same
    child answers the next message."""

    async def main() -> None:
        log = LogRecorder()
        exits: list[ChildExit] = []
        with anyio.fail_after(CHILD_TIMEOUT):
            async with Bus() as bus:
                bus.subscribe("log", log)
                bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
                broker = await started_broker(
                    bus, "bomber", child_functions.reports_link_errors, send_timeout=CHILD_TIMEOUT
                )
                await broker.send("send a bomb")
                await log.wait_for("does not unpickle", seconds=CHILD_TIMEOUT)
                assert bus.state is State.STARTED
                [record] = log.matching("does not unpickle")
                assert "frame 1" in record.msg and ("bomber" in record.msg or record.fields.get("child") == "bomber")
                with pytest.raises(UndecodableFrame, match="does not unpickle"):
                    await broker.receive()
                assert ("echo", "ping") == await ask(broker, "ping")
                assert bus.state is State.STARTED
                assert not exits  # the same incarnation goes on

    run(main)


def test_an_uncaught_send_error_in_a_child_is_reported_and_the_parent_runs_on() -> None:
    """A child's function that sends a lambda fails with LinkError in the child; the parent logs the
    failure with the child's traceback, publishes its exit (code 1), and its own bus runs on."""

    async def main() -> None:
        log = LogRecorder()
        ended = anyio.Event()
        exits: list[ChildExit] = []

        def record(exit: ChildExit) -> None:
            exits.append(exit)
            ended.set()

        with anyio.fail_after(CHILD_TIMEOUT):
            async with Bus() as bus:
                bus.subscribe("log", log)
                bus.subscribe(CHILD_EXIT_CHANNEL, record)
                await started_broker(bus, "careless", child_functions.sends_a_lambda, restart="temporary")
                await ended.wait()
                assert bus.state is State.STARTED
        [failure] = log.matching("The child's function failed")
        assert "LinkError" in failure.fields["exception"] and "cannot send 'function'" in failure.fields["exception"]
        assert (exits[0].name, exits[0].exit_code) == ("careless", 1)

    run(main)


# -- the private listener: peers without the token ---------------------------------------


class Evil:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (str(self.marker), os.O_CREAT | os.O_WRONLY))


def bad_peer_bytes(kind: str, token: bytes, evil: bytes) -> bytes:
    """What a refused peer sends: never the token, always with a pickle frame where it can."""
    wrong = bytes(b ^ 0xFF for b in token)
    return {
        "wrong token": wrong,
        "wrong token, then a pickle": wrong + evil,
        "last byte wrong, then a pickle": token[:-1] + bytes([token[-1] ^ 1]) + evil,
        "truncated token": token[:16],
        "31 bytes of the token, then a pickle": token[:31] + evil,
        "no token": b"",
        "a pickle instead": evil,
        "garbage": os.urandom(4096),
    }[kind]


BAD_PEERS = [
    "wrong token",
    "wrong token, then a pickle",
    "last byte wrong, then a pickle",
    "truncated token",
    "31 bytes of the token, then a pickle",
    "no token",
    "a pickle instead",
    "garbage",
]


async def accept_right_peer(listener: PrivateListener, got: list[Any]) -> None:
    async with await listener.accept(timeout=TIMEOUT) as link:
        got.append(await link.receive())


async def right_peer(listener: PrivateListener) -> None:
    async with await connect_private(listener.address, listener.token, timeout=TIMEOUT) as link:
        await link.send("the right peer")


async def refused(raw: UNIXSocketStream) -> None:
    """The listener closes a refused peer without a word: never the OK byte."""
    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
        await raw.receive()


@contextmanager
def directory_removed(listener: PrivateListener) -> Iterator[None]:
    yield
    assert listener.address and not os.path.exists(os.path.dirname(listener.address)), "directory left behind"


@pytest.mark.parametrize("kind", BAD_PEERS)
def test_a_peer_without_the_token_is_refused_and_never_read(kind: str, tmp_path: Path) -> None:
    """Each kind of bad peer is refused and logged (WARNING), its pickle never loaded, and the right
    peer is accepted next by the same accept call; the listener's directory is gone afterwards."""
    marker = tmp_path / "loaded"

    async def main() -> None:
        log = LogRecorder()
        got: list[Any] = []
        listener = PrivateListener(log=log)
        with directory_removed(listener), anyio.fail_after(TIMEOUT):
            async with listener, anyio.create_task_group() as group:
                group.start_soon(accept_right_peer, listener, got)
                async with await anyio.connect_unix(listener.address) as raw:
                    data = bad_peer_bytes(kind, listener.token, frame_of(Evil(marker)))
                    if data:
                        await raw.send(data)
                    if len(data) < TOKEN_SIZE:
                        await raw.send_eof()
                    await refused(raw)
                await log.wait_for("refused")
                await right_peer(listener)
        assert ["the right peer"] == got
        [refusal] = log.records
        assert refusal.level == 30 and refusal.fields["received"] == min(len(data), TOKEN_SIZE)
        expected = "wrong token refused" if len(data) >= TOKEN_SIZE else "peer without a token refused"
        assert expected in refusal.msg

    run(main)
    assert not marker.exists(), "a pickle from an unauthenticated peer was loaded"


def test_a_silent_peer_is_refused_and_the_right_peer_gets_in_after_it(tmp_path: Path) -> None:
    """A peer that sends part of a token and then nothing holds the listener for handshake_timeout only:
    it is refused (logged as such), the right peer waiting behind it gets in, and the pickle the slow
    peer sends afterwards is never loaded."""
    marker = tmp_path / "loaded"

    async def main() -> None:
        log = LogRecorder()
        got: list[Any] = []
        listener = PrivateListener(log=log, handshake_timeout=0.5)
        with directory_removed(listener), anyio.fail_after(TIMEOUT):
            async with listener, anyio.create_task_group() as group:
                raw = await anyio.connect_unix(listener.address)
                async with raw:
                    await raw.send(listener.token[:10])
                    group.start_soon(accept_right_peer, listener, got)
                    await right_peer(listener)  # waits behind the slow peer
                    await log.wait_for("refused")
                    with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                        await raw.send(listener.token[10:] + frame_of(Evil(marker)))
                        await raw.receive()
        assert ["the right peer"] == got
        [refusal] = log.records
        assert "peer without a token refused" in refusal.msg
        assert (refusal.fields["received"], refusal.fields["ended"]) == (10, "handshake_timeout")

    run(main)
    assert not marker.exists()


def test_a_peer_gone_before_the_ok_is_refused_and_the_listener_goes_on() -> None:
    """A peer that presents the right token and leaves at once: accept logs it and waits for the next."""

    async def main() -> None:
        log = LogRecorder()
        got: list[Any] = []
        listener = PrivateListener(log=log)
        with directory_removed(listener), anyio.fail_after(TIMEOUT):
            async with listener:
                async with await anyio.connect_unix(listener.address) as raw:
                    await raw.send(listener.token)
                async with anyio.create_task_group() as group:  # accepts only once the first peer left
                    group.start_soon(accept_right_peer, listener, got)
                    await log.wait_for("peer left during the handshake")
                    await right_peer(listener)
        assert ["the right peer"] == got

    run(main)


@settings(max_examples=60)
@given(peers=st.lists(st.tuples(st.binary(max_size=80), st.booleans()), min_size=1, max_size=6))
def test_any_sequence_of_bad_peers_is_refused_one_by_one(
    peers: list[tuple[bytes, bool]], tmp_path_factory: Any
) -> None:
    """Peers sending arbitrary bytes (some then a pickle), then closing: each is refused with the count
    of bytes it sent, up to 32; none of their pickles is loaded; then the right peer gets its link."""
    marker = tmp_path_factory.mktemp("evil") / "loaded"
    evil = frame_of(Evil(marker))

    async def main() -> LogRecorder:
        log = LogRecorder()
        got: list[Any] = []
        listener = PrivateListener(log=log)
        with directory_removed(listener), anyio.fail_after(TIMEOUT):
            async with listener, anyio.create_task_group() as group:
                group.start_soon(accept_right_peer, listener, got)
                for data, with_pickle in peers:
                    sent = data + evil if with_pickle else data
                    async with await anyio.connect_unix(listener.address) as raw:
                        if sent:
                            await raw.send(sent)
                        if len(sent) < TOKEN_SIZE:
                            await raw.send_eof()
                        await refused(raw)
                await right_peer(listener)
        assert ["the right peer"] == got
        return log

    log = run(main)
    sizes = [len(data) + (len(evil) if with_pickle else 0) for data, with_pickle in peers]
    assert [r.fields["received"] for r in log.records] == [min(size, TOKEN_SIZE) for size in sizes]
    assert all(r.level == 30 for r in log.records)
    assert not marker.exists()
