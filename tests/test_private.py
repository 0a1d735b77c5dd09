"""The private rendezvous, with real sockets and real child processes: who may connect, and what is left."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from helpers import LogRecorder
from processes import Spawner

from aiobus._link import Link
from aiobus._private import PrivateListener, connect_private

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SO_PEERCRED and /proc are Linux's")
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run as nobody")
NOBODY = 65534

CHILD = """
import os, sys
import anyio
from aiobus._link import Link
from aiobus._private import connect_private

async def main() -> None:
    token = bytes.fromhex(os.environ["AIOBUS_TEST_TOKEN"])
    async with await connect_private(sys.argv[1], token, name="child") as link:
        for i in range(int(sys.argv[2])):
            await link.send(("message", i))
        assert await link.receive() == "thanks"
    print("child done", flush=True)

anyio.run(main)
"""


@functools.cache
def python_for_nobody() -> str:
    """An interpreter the user nobody may run (ours may sit in root's home), for stdlib-only code."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            subprocess.run([candidate, "-c", "pass"], user=NOBODY, cwd="/", check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        return candidate
    pytest.skip("no Python interpreter that the user nobody can run")


async def accept_one(listener: PrivateListener, into: list[object]) -> None:
    """Accept a peer, keep the first message it sends, and close."""
    async with await listener.accept(timeout=30) as link:
        into.append(await link.receive())


async def connect_and_send(listener: PrivateListener, message: object) -> None:
    """Connect with the right token, send one message, and close."""
    async with await connect_private(listener.address, listener.token) as link:
        await link.send(message)


class Evil:
    """Unpickling this creates a directory: proof that a pickle was read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


async def test_the_directory_is_0700_and_the_socket_0600() -> None:
    """The socket is mode 0600 in a fresh directory of mode 0700 owned by us."""
    async with PrivateListener() as listener:
        directory = os.stat(os.path.dirname(listener.address))
        sock = os.stat(listener.address)
    assert 0o700 == stat.S_IMODE(directory.st_mode)
    assert os.getuid() == directory.st_uid
    assert stat.S_ISSOCK(sock.st_mode)
    assert 0o600 == stat.S_IMODE(sock.st_mode)


async def test_nothing_is_left_on_disk_after_the_block() -> None:
    """Leaving the block removes the socket and its directory, even after a link was made."""
    async with PrivateListener() as listener:
        async with anyio.create_task_group() as group:
            group.start_soon(connect_and_send, listener, "hello")
            await accept_one(listener, [])
        directory = os.path.dirname(listener.address)
    assert not await anyio.Path(directory).exists()


async def test_the_right_token_gives_a_link_both_ways() -> None:
    """A peer with the token gets a link, and messages go both ways."""
    children: list[Link] = []

    async def connect(listener: PrivateListener) -> None:
        children.append(await connect_private(listener.address, listener.token))

    async with PrivateListener() as listener:
        async with anyio.create_task_group() as group:
            group.start_soon(connect, listener)
            parent = await listener.accept(timeout=30)
        async with parent, children[0] as child:
            await child.send("up")
            await parent.send("down")
            assert ("up", "down") == (await parent.receive(), await child.receive())


async def test_a_wrong_token_is_refused_and_logged_and_the_right_peer_still_accepted() -> None:
    """A peer with a wrong token gets PermissionError, a WARNING is logged, and the right peer then connects."""
    log = LogRecorder()
    accepted: list[object] = []
    async with PrivateListener(log=log) as listener, anyio.create_task_group() as group:
        group.start_soon(accept_one, listener, accepted)
        with pytest.raises(PermissionError, match="refused the token"):
            await connect_private(listener.address, bytes(32))
        await connect_and_send(listener, "hello")
    assert ["hello"] == accepted
    (refusal,) = log.matching("wrong token refused")
    assert 30 == refusal.level
    assert (os.getpid(), os.getuid()) == (refusal.fields["pid"], refusal.fields["uid"])


async def test_pickle_from_an_unauthenticated_peer_is_never_read(tmp_path: Path) -> None:
    """A peer that sends a pickle frame instead of the token is refused, and the pickle is never unpickled."""
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Evil(marker))
    assert len(payload) > 32
    log = LogRecorder()
    async with PrivateListener(log=log) as listener, anyio.create_task_group() as group:
        group.start_soon(accept_one, listener, [])
        async with await anyio.connect_unix(listener.address) as raw:
            await raw.send(len(payload).to_bytes(4, "big") + payload)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):  # reset: it left data unread
                await raw.receive()
        await log.wait_for("refused")
        assert not marker.exists()
        assert log.matching("wrong token refused")
        await connect_and_send(listener, "hello")


async def test_a_peer_that_sends_no_token_is_refused() -> None:
    """A peer that closes before sending 32 bytes is refused and logged."""
    log = LogRecorder()
    async with PrivateListener(log=log) as listener, anyio.create_task_group() as group:
        group.start_soon(accept_one, listener, [])
        async with await anyio.connect_unix(listener.address) as raw:
            await raw.send(b"short")
            await raw.send_eof()
            await log.wait_for("peer without a token refused")
        await connect_and_send(listener, "hello")


async def test_a_silent_peer_is_refused_after_the_handshake_timeout() -> None:
    """A peer that connects and sends nothing is refused after handshake_timeout, and the right peer then connects."""
    log = LogRecorder()
    accepted: list[object] = []
    async with PrivateListener(log=log, handshake_timeout=0.1) as listener, anyio.create_task_group() as group:
        group.start_soon(accept_one, listener, accepted)
        async with await anyio.connect_unix(listener.address):
            await log.wait_for("peer without a token refused")
        await connect_and_send(listener, "hello")
    assert ["hello"] == accepted


async def test_connect_times_out_when_nobody_accepts() -> None:
    """connect_private raises TimeoutError when the listener never answers the token."""
    async with PrivateListener() as listener:
        with pytest.raises(TimeoutError, match="no handshake with the listener"):
            await connect_private(listener.address, listener.token, timeout=0.1)


async def test_bad_arguments_are_refused_before_waiting() -> None:
    """A bad handshake_timeout, a bad link option, or accept outside the block raise at once."""
    with pytest.raises(ValueError, match="handshake_timeout"):
        PrivateListener(handshake_timeout=0)
    with pytest.raises(RuntimeError, match="async with PrivateListener"):
        await PrivateListener().accept(timeout=1)
    async with PrivateListener() as listener:
        with pytest.raises(ValueError, match="high_water"):
            await listener.accept(timeout=30, high_water=0)
        with pytest.raises(TypeError, match="unknown link options: hihg_water"):
            await listener.accept(timeout=30, **cast(Any, {"hihg_water": 10}))


async def test_accept_without_a_peer_times_out() -> None:
    """accept raises TimeoutError naming the address when no peer comes in time."""
    async with PrivateListener() as listener:
        with pytest.raises(TimeoutError, match="no child presented the token"):
            await listener.accept(timeout=0.05)


async def test_connecting_after_the_listener_is_gone_fails() -> None:
    """connect_private to a listener that has closed raises FileNotFoundError."""
    async with PrivateListener() as listener:
        address, token = listener.address, listener.token
    with pytest.raises(FileNotFoundError):
        await connect_private(address, token)


async def test_a_token_of_the_wrong_size_is_a_value_error() -> None:
    """connect_private refuses a token that is not 32 bytes, before connecting."""
    with pytest.raises(ValueError, match="token must be 32 bytes"):
        await connect_private("/nonexistent", b"short")


async def test_a_hundred_thousand_messages_between_processes(spawn: Spawner) -> None:
    """100,000 messages from a real child process arrive all, once each, in order."""
    count = 100_000
    with anyio.fail_after(120):
        received = await receive_from_child(spawn, count)
    assert list(range(count)) == received


async def receive_from_child(spawn: Spawner, count: int) -> list[int]:
    """Start CHILD, take ``count`` messages from it over a private link, thank it and wait for its exit."""
    async with PrivateListener() as listener:
        child = spawn.script(CHILD, listener.address, str(count), env={"AIOBUS_TEST_TOKEN": listener.token.hex()})
        async with await listener.accept(timeout=60) as link:
            received = [(await link.receive())[1] for _ in range(count)]
            await link.send("thanks")
            assert [] == [msg async for msg in link]
        assert 0 == await anyio.to_thread.run_sync(child.wait, 60), child.output
    return received


@linux_only
@as_root
def test_another_user_cannot_reach_the_socket() -> None:
    """A process of another user cannot even connect: the directory keeps it out."""

    async def main() -> subprocess.CompletedProcess[str]:
        async with PrivateListener() as listener:
            code = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
            argv = [python_for_nobody(), "-c", code, listener.address]
            return await anyio.to_thread.run_sync(
                lambda: subprocess.run(argv, capture_output=True, text=True, user=NOBODY, cwd="/", timeout=60)
            )

    result = anyio.run(main)
    assert "PermissionError" in result.stderr, result.stderr


@linux_only
@as_root
async def test_a_listener_of_another_user_is_refused(spawn: Spawner) -> None:
    """connect_private refuses a socket served by another user (SO_PEERCRED), before sending the token."""
    server = """
import os, socket, sys, tempfile
directory = tempfile.mkdtemp()
path = os.path.join(directory, "s")
sock = socket.socket(socket.AF_UNIX)
sock.bind(path)
sock.listen()
print("listening", path, flush=True)
conn, _ = sock.accept()
got = conn.recv(100)
conn.close()
sock.close()
os.unlink(path)
os.rmdir(directory)  # nothing left behind
print("got", repr(got), flush=True)
"""
    child = spawn.run([python_for_nobody(), "-c", server], user=NOBODY)
    path = (await anyio.to_thread.run_sync(child.wait_for, "listening", 60)).split()[1]
    with pytest.raises(PermissionError, match=f"runs as uid {NOBODY}"):
        await connect_private(path, bytes(32))
    await anyio.to_thread.run_sync(child.wait_for, "got b''", 60)
    assert 0 == await anyio.to_thread.run_sync(child.wait, 60)


@pytest.mark.parametrize(
    "test",
    [
        test_the_right_token_gives_a_link_both_ways,
        test_a_wrong_token_is_refused_and_logged_and_the_right_peer_still_accepted,
    ],
    ids=lambda test: test.__name__.removeprefix("test_"),
)
def test_works_on_trio(test: Callable[[], Awaitable[None]]) -> None:
    """The behaviour holds under the trio backend too."""
    anyio.run(test, backend="trio")


async def test_a_listener_is_entered_only_once_and_accepts_only_inside() -> None:
    """accept() outside ``async with`` and a second entry are clear errors."""
    listener = PrivateListener()
    with pytest.raises(RuntimeError, match="async with"):
        await listener.accept(timeout=1)
    async with listener:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        async with listener:
            pass


async def test_a_directory_removed_meanwhile_is_not_an_error_at_exit() -> None:
    """If something removed the listener's directory during the block, leaving it does not raise."""
    async with PrivateListener() as listener:
        directory = os.path.dirname(listener.address)
        shutil.rmtree(directory)
    assert not await anyio.Path(directory).exists()


async def test_accept_timing_out_during_a_handshake_closes_that_peer() -> None:
    """accept's timeout ends a handshake under way: TimeoutError, and the silent peer's connection is closed."""
    log = LogRecorder()
    async with PrivateListener(log=log, handshake_timeout=60) as listener:
        async with await anyio.connect_unix(listener.address) as raw:
            with pytest.raises(TimeoutError, match="no child presented the token"):
                await listener.accept(timeout=0.2)
            with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await raw.receive()
    assert log.records == []  # cancelled, not refused: nothing to report about the peer


async def test_a_listener_answering_something_else_than_ok_is_refused(tmp_path: Path) -> None:
    """connect_private raises PermissionError naming the reply when the listener answers the token with a wrong byte."""
    received = bytearray()

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            while len(received) < 32:
                received.extend(await stream.receive(32 - len(received)))
            await stream.send(b"\x02")

    async with await anyio.create_unix_listener(tmp_path / "fake") as server, anyio.create_task_group() as group:
        group.start_soon(server.serve, serve)
        with pytest.raises(PermissionError, match=r"answered b'\\x02', not OK"):
            await connect_private(str(tmp_path / "fake"), bytes(range(32)))
        group.cancel_scope.cancel()
    assert bytes(received) == bytes(range(32))


@linux_only
@as_root
async def test_a_peer_of_another_user_is_refused_and_logged(spawn: Spawner) -> None:
    """A process of another user that reaches the socket (permissions opened up) is refused by uid and logged;
    the right peer is still accepted after it."""
    log = LogRecorder()
    accepted: list[object] = []
    async with PrivateListener(log=log) as listener, anyio.create_task_group() as group:
        os.chmod(os.path.dirname(listener.address), 0o755)
        os.chmod(listener.address, 0o777)
        group.start_soon(accept_one, listener, accepted)
        code = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print(repr(s.recv(1)))"
        child = spawn.run([python_for_nobody(), "-c", code, listener.address], user=NOBODY)
        assert "b''" == await anyio.to_thread.run_sync(child.wait_for, "b", 60)
        assert 0 == await anyio.to_thread.run_sync(child.wait, 60)
        (refusal,) = log.matching("peer of another user refused")
        assert (child.pid, NOBODY, 30) == (refusal.fields["pid"], refusal.fields["uid"], refusal.level)
        await connect_and_send(listener, "hello")
    assert ["hello"] == accepted
