"""ControlSocket: the socket of a real service (``aiobus run --control``), spoken to over raw connections."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import anyio.streams.buffered
import pytest
from operating import WAIT, connect, ctl, exit_service, read_reply, request, start_service
from processes import Spawner

from aiobus import Bus, State, log_to_structlog
from aiobus.plugins import ControlSocket

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Unix sockets and SO_PEERCRED")

STATUS = {"v": 1, "cmd": "status"}


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


def still_answers(sock: Path) -> None:
    reply = request(sock, STATUS)
    assert reply["ok"], reply
    assert "STARTED" == reply["result"]["state"]


class TestTheSocket:
    def test_the_socket_is_0600_in_a_0700_folder_made_for_it(self, spawn: Spawner, sock: Path) -> None:
        """The folder aiobus creates is 0700, the socket 0600; both removed... the socket at exit, the folder kept."""
        service = start_service(spawn, "one_program", sock)
        assert 0o700 == stat.S_IMODE(os.stat(sock.parent).st_mode)
        info = os.stat(sock)
        assert stat.S_ISSOCK(info.st_mode)
        assert 0o600 == stat.S_IMODE(info.st_mode)
        assert 0 == exit_service(service, sock)
        assert not sock.exists()
        assert sock.parent.is_dir()

    def test_a_stale_socket_is_replaced(self, spawn: Spawner, sock: Path) -> None:
        """A socket file nobody listens on (a dead service's) is replaced, with a warning."""
        sock.parent.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
            left.bind(str(sock))
        service = start_service(spawn, "one_program", sock)
        assert f"Replacing the stale control socket {sock}" in service.output
        still_answers(sock)
        assert 0 == exit_service(service, sock)

    def test_a_live_services_socket_makes_the_start_fail_naming_it(self, spawn: Spawner, sock: Path) -> None:
        """A second service on the same path fails its start (code 70), naming the path; the first runs on."""
        first = start_service(spawn, "one_program", sock)
        second = spawn.run(
            [sys.executable, "-m", "aiobus", "run", "svc:one_program", "--control", str(sock), "--log-format", "json"]
        )
        assert 70 == second.wait(WAIT), second.output
        assert f"another service is listening on the control socket {sock}" in second.output
        second.assert_nothing_left()
        still_answers(sock)
        assert 0 == exit_service(first, sock)

    def test_something_else_in_the_way_is_not_replaced(self, spawn: Spawner, sock: Path) -> None:
        """A regular file at the path: the start fails naming it, and the file is left as it was."""
        sock.parent.mkdir(mode=0o700)
        sock.write_text("precious")
        (spawn.directory / "svc.py").write_text("def setup(bus):\n    pass\n")
        service = spawn.run([sys.executable, "-m", "aiobus", "run", "svc:setup", "--control", str(sock)])
        assert 70 == service.wait(WAIT), service.output
        assert f"{sock} exists and is not a socket" in service.output
        assert "precious" == sock.read_text()

    def test_a_path_too_long_is_a_usage_error(self, spawn: Spawner, tmp_path: Path) -> None:
        """--control with a path over 107 bytes: exit code 2, one line."""
        (spawn.directory / "svc.py").write_text("def setup(bus):\n    pass\n")
        long = tmp_path / ("x" * 120)
        service = spawn.run([sys.executable, "-m", "aiobus", "run", "svc:setup", "--control", str(long)])
        assert 2 == service.wait(WAIT), service.output
        assert 1 == len(service.lines)

    def test_the_constructor_refuses_a_path_too_long(self) -> None:
        """ControlSocket(bus, path) checks the path's length before anything runs."""
        with pytest.raises(ValueError, match="longer than 107 bytes"):
            ControlSocket(Bus(), "/" + "x" * 107)


# A bad request line, the error it gets, and what the message names.
BAD = [
    (b"garbage", "bad_request", "not JSON"),
    (b"[1, 2]", "bad_request", "a JSON object"),
    (b'{"v": 2, "cmd": "status"}', "bad_request", "version 2"),
    (b'{"v": 1, "cmd": "reboot"}', "unknown_command", "'reboot'"),
    (b'{"v": 1, "cmd": "status", "args": {"all": "yes"}}', "bad_argument", "'all'"),
    (b'{"v": 1, "cmd": "restart"}', "bad_argument", "'name'"),
    (b'{"v": 1, "cmd": "restart", "args": {"name": 3}}', "bad_argument", "'name'"),
    (b'{"v": 1, "cmd": "status", "extra": 1}', "bad_request", "'extra'"),
    (b'{"v": 1, "cmd": "signal", "args": {"name": "web", "signal": "SIGNOPE"}}', "bad_argument", "SIGNOPE"),
    (b'{"v": 1, "cmd": "restart", "args": {"name": "nope"}}', "unknown_child", "the children are: web"),
    (b'{"v": 1, "cmd": "log-level", "args": {"level": "loud"}}', "bad_argument", "'loud'"),
    (b"[" * 60000, "bad_request", "not JSON"),
    (b"\xff\xfe", "bad_request", "not JSON"),
]


class TestBadRequests:
    def test_each_bad_request_gets_an_error_naming_it_and_the_connection_goes_on(
        self, spawn: Spawner, sock: Path
    ) -> None:
        """Each bad request: an error reply naming the problem; the next request on the connection is served."""
        service = start_service(spawn, "one_program", sock)
        with connect(sock) as conn:
            for number, (line, error, names) in enumerate(BAD):
                conn.sendall(line + b"\n" + json.dumps({**STATUS, "id": number}).encode() + b"\n")
                reply = read_reply(conn)
                assert (1, False, error) == (reply["v"], reply["ok"], reply["error"]), line[:80]
                assert names in reply["message"], reply
                served = read_reply(conn)
                assert (True, number) == (served["ok"], served["id"])
        assert 0 == exit_service(service, sock)

    def test_a_line_over_64_kib_is_refused_once_and_skipped(self, spawn: Spawner, sock: Path) -> None:
        """A 1 MiB line: one too_large reply; the request after it on the same connection is served."""
        service = start_service(spawn, "one_program", sock)
        with connect(sock) as conn:
            conn.sendall(b"x" * 2**20 + b"\n" + json.dumps(STATUS).encode() + b"\n")
            refused = read_reply(conn)
            assert ("too_large", "a request is at most 65536 bytes") == (refused["error"], refused["message"])
            assert read_reply(conn)["ok"]
        still_answers(sock)
        assert 0 == exit_service(service, sock)

    def test_half_a_line_then_close_harms_nothing(self, spawn: Spawner, sock: Path) -> None:
        """A client that sends half a request and goes: no reply, nothing logged as failed, the service answers."""
        service = start_service(spawn, "one_program", sock)
        with connect(sock) as conn:
            conn.sendall(b'{"v": 1, "cmd": "sta')
            conn.shutdown(socket.SHUT_WR)
            assert b"" == conn.recv(100)
        still_answers(sock)
        assert 0 == exit_service(service, sock)
        assert '"level": "error"' not in service.output

    def test_100_clients_at_once_are_served(self, spawn: Spawner, sock: Path) -> None:
        """100 connections open together, each sends status: each gets its reply."""
        service = start_service(spawn, "one_program", sock)
        conns = [connect(sock) for _ in range(100)]
        try:
            for number, conn in enumerate(conns):
                conn.sendall(json.dumps({**STATUS, "id": number}).encode() + b"\n")
            replies = [read_reply(conn) for conn in conns]
        finally:
            for conn in conns:
                conn.close()
        assert list(range(100)) == [reply["id"] for reply in replies]
        assert all(reply["ok"] for reply in replies)
        assert 0 == exit_service(service, sock)

    def test_a_tail_client_that_stops_reading_is_cut_and_the_drop_logged(self, spawn: Spawner, sock: Path) -> None:
        """A tail client that never reads while a program floods: cut, the drop logged; the bus answers on."""
        service = start_service(spawn, "flood", sock, "--log-level", "warning", quiet=True)
        with connect(sock) as conn:
            conn.sendall(json.dumps({"v": 1, "cmd": "tail", "args": {"level": "info"}}).encode() + b"\n")
            service.wait_for("a tail client did not keep up", timeout=WAIT)
            still_answers(sock)
            conn.settimeout(WAIT)
            while conn.recv(2**16):  # what was sent before the cut, then the end
                pass
        assert 0 == exit_service(service, sock)


class TestPeers:
    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
    def test_another_uid_is_refused_and_logged(self, spawn: Spawner, sock: Path) -> None:
        """A peer of uid 65534 (nobody), even with the socket and its folder opened: an error reply and a log line."""
        service = start_service(spawn, "one_program", sock)
        os.chmod(sock.parent, 0o711)  # an operator's mistake: the uid check still holds
        os.chmod(sock, 0o666)
        peer = textwrap.dedent(
            f"""
            import json, os, socket
            os.chdir({str(sock.parent)!r})
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout({WAIT})
            conn.connect({sock.name!r})
            print(conn.makefile().readline(), end="")  # the refusal comes before any request
            try:
                conn.sendall(json.dumps({{"v": 1, "cmd": "exit"}}).encode() + b"\\n")
            except BrokenPipeError:
                pass  # already cut
            """
        )
        done = subprocess.run([sys.executable, "-c", peer], capture_output=True, text=True, timeout=WAIT)
        assert 0 == done.returncode, done.stderr
        reply = json.loads(done.stdout)
        assert (False, "refused", "uid 65534 may not steer this service") == (
            reply["ok"],
            reply["error"],
            reply["message"],
        )
        service.wait_for("refused a client of uid 65534", timeout=WAIT)
        still_answers(sock)
        assert 0 == exit_service(service, sock)

    def test_the_services_own_user_is_served(self, spawn: Spawner, sock: Path) -> None:
        """ctl run by the service's own user gets its reply."""
        service = start_service(spawn, "one_program", sock)
        assert 0 == ctl(sock, "status").code
        assert 0 == exit_service(service, sock)


def test_exit_reply_arrives_before_the_socket_closes(spawn: Spawner, sock: Path) -> None:
    """exit over a raw connection: the reply says EXITING, then the connection ends."""
    service = start_service(spawn, "one_program", sock)
    with connect(sock) as conn:
        conn.sendall(json.dumps({"v": 1, "cmd": "exit"}).encode() + b"\n")
        reply = read_reply(conn)
        assert {"v": 1, "ok": True, "result": {"state": "EXITING"}} == reply
        deadline = time.monotonic() + WAIT
        while conn.recv(100) and time.monotonic() < deadline:
            pass
    assert 0 == service.wait(WAIT)
    service.assert_nothing_left()


class TestInProcess:
    async def test_a_log_field_json_cannot_say_reaches_tail_as_text(self, tmp_path: Path) -> None:
        """A field that refers to itself, and an object: the tail event carries them as text; the bus goes on."""
        await tail_odd_fields(tmp_path / "ctl.sock")

    def test_the_socket_serves_on_trio(self, tmp_path: Path) -> None:
        """The same, on the trio backend."""
        anyio.run(tail_odd_fields, tmp_path / "ctl.sock", backend="trio")


async def tail_odd_fields(path: Path) -> None:
    """Tail over a raw connection, log an event with odd fields, and check what arrives."""
    async with Bus() as bus:
        bus.unsubscribe("log", log_to_structlog)
        ControlSocket(bus, path).subscribe()
        await bus.start()
        async with await anyio.connect_unix(path) as stream:
            lines = anyio.streams.buffered.BufferedByteReceiveStream(stream)
            await stream.send(b'{"v": 1, "cmd": "tail"}\n')
            assert json.loads(await lines.receive_until(b"\n", 2**16))["ok"]
            cyclic: dict[str, object] = {}
            cyclic["self"] = cyclic
            bus.log("odd", cyclic=cyclic, thing=Path("/x"))
            with anyio.fail_after(WAIT):
                event = json.loads(await lines.receive_until(b"\n", 2**20))["event"]
        assert "odd" == event["message"]
        assert "/x" == event["fields"]["thing"]
        assert "{'self': {...}}" in json.dumps(event["fields"]["cyclic"])
        assert State.STARTED == bus.state
        await bus.exit()
    assert not await anyio.Path(path).exists()
