"""``aiobus ctl``, run as a command against real services run by ``aiobus run --control``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from operating import WAIT, children, ctl, exit_service, start_service
from processes import Spawner

from aiobus._ctl import duration, printable, table

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Unix sockets, SO_PEERCRED, signals")


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


class TestStatus:
    def test_status_prints_the_bus_and_a_table_of_the_children(self, spawn: Spawner, sock: Path) -> None:
        """status: a line for the bus (state, pid, uptime), then a row per child under aligned headings."""
        service = start_service(spawn, "web_and_worker", sock)
        result = ctl(sock, "status")
        assert 0 == result.code, result.err
        lines = result.out.splitlines()
        assert lines[0].startswith(f"Bus STARTED, pid {service.pid}, up ")
        heading = lines[2]
        assert heading.split() == ["NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "LAST", "EXIT"]
        rows = {line.split()[0]: line for line in lines[3:]}
        assert ["web", "worker"] == sorted(rows)
        assert rows["web"].split()[1:3] == ["program", "running"]
        assert rows["worker"].split()[1:3] == ["broker", "running"]
        assert {len(heading[: heading.index("PID")])} == {len(row[: heading.index("PID")]) for row in rows.values()}
        assert 0 == exit_service(service, sock)

    def test_status_json_is_one_document(self, spawn: Spawner, sock: Path) -> None:
        """status --json: state, pid, uptime, and each child's name, kind, state, pid, uptime, restarts, last exit."""
        service = start_service(spawn, "web_and_worker", sock)
        result = ctl(sock, "status", "--json")
        assert 0 == result.code, result.err
        status = result.json()
        assert ("STARTED", service.pid) == (status["state"], status["pid"])
        assert status["uptime"] >= 0
        kids = {child["name"]: child for child in status["children"]}
        assert {"name", "kind", "state", "pid", "uptime", "restarts", "last_exit"} == set(kids["web"])
        assert ("program", "running", 0, None) == (
            kids["web"]["kind"],
            kids["web"]["state"],
            kids["web"]["restarts"],
            kids["web"]["last_exit"],
        )
        assert isinstance(kids["worker"]["pid"], int)
        assert 0 == exit_service(service, sock)


class TestSteering:
    def test_restart_a_program_changes_its_pid_only(self, spawn: Spawner, sock: Path) -> None:
        """restart web: a new pid for web, its last exit says how it was stopped; the broker is untouched."""
        service = start_service(spawn, "web_and_worker", sock)
        before = children(sock)
        result = ctl(sock, "restart", "web")
        assert 0 == result.code, result.err
        after = children(sock)
        assert result.out == f"web: running, pid {after['web']['pid']}\n"
        assert before["web"]["pid"] != after["web"]["pid"]
        assert ("running", 1, "stopped with SIGTERM") == (
            after["web"]["state"],
            after["web"]["restarts"],
            after["web"]["last_exit"]["reason"],
        )
        assert before["worker"]["pid"] == after["worker"]["pid"]
        assert 0 == after["worker"]["restarts"]
        assert 0 == exit_service(service, sock)

    def test_restart_a_broker_changes_its_pid_only(self, spawn: Spawner, sock: Path) -> None:
        """restart worker: a new pid for the broker; the program is untouched."""
        service = start_service(spawn, "web_and_worker", sock)
        before = children(sock)
        result = ctl(sock, "restart", "worker", "--json")
        assert 0 == result.code, result.err
        assert "running" == result.json()["child"]["state"]
        after = children(sock)
        assert before["worker"]["pid"] != after["worker"]["pid"]
        assert after["worker"]["last_exit"]["expected"]
        assert before["web"]["pid"] == after["web"]["pid"]
        assert 0 == exit_service(service, sock)

    def test_stop_keeps_a_child_stopped_until_start(self, spawn: Spawner, sock: Path) -> None:
        """stop web: stopped, no pid, not restarted by its permanent policy; start web: running with a new pid."""
        service = start_service(spawn, "web_and_worker", sock)
        old = children(sock)["web"]["pid"]
        stopped = ctl(sock, "stop", "web")
        assert (0, "web: stopped\n") == (stopped.code, stopped.out), stopped.err
        ctl(sock, "status")  # a round trip: a restart by the policy would have begun by now
        web = children(sock)["web"]
        assert ("stopped", None) == (web["state"], web["pid"])
        started = ctl(sock, "start", "web")
        assert 0 == started.code, started.err
        web = children(sock)["web"]
        assert "running" == web["state"]
        assert web["pid"] not in (None, old)
        assert 0 == exit_service(service, sock)

    def test_an_unknown_child_fails_naming_the_known_ones(self, spawn: Spawner, sock: Path) -> None:
        """restart nope: exit code 1 and one line naming the children."""
        service = start_service(spawn, "web_and_worker", sock)
        result = ctl(sock, "restart", "nope")
        assert 1 == result.code
        assert "" == result.out
        assert ["aiobus ctl: no child named 'nope'; the children are: web, worker"] == result.err.splitlines()
        assert 0 == exit_service(service, sock)

    def test_signal_reaches_the_program(self, spawn: Spawner, sock: Path) -> None:
        """signal web HUP: the program's handler runs; it keeps its pid."""
        service = start_service(spawn, "web_and_worker", sock)
        pid = children(sock)["web"]["pid"]
        result = ctl(sock, "signal", "web", "HUP")
        assert (0, f"SIGHUP sent to web (pid {pid})\n") == (result.code, result.out), result.err
        service.wait_for('"reloaded"', timeout=WAIT)
        assert pid == children(sock)["web"]["pid"]
        assert 0 == exit_service(service, sock)

    def test_graceful_sends_the_reload_signal_to_the_program(self, spawn: Spawner, sock: Path) -> None:
        """graceful: the program with reload_signal=SIGHUP gets SIGHUP and is not restarted."""
        service = start_service(spawn, "web_and_worker", sock)
        pid = children(sock)["web"]["pid"]
        result = ctl(sock, "graceful")
        assert (0, "Graceful published.\n") == (result.code, result.out), result.err
        service.wait_for('"reloaded"', timeout=WAIT)
        web = children(sock)["web"]
        assert (pid, 0) == (web["pid"], web["restarts"])
        assert 0 == exit_service(service, sock)

    def test_log_level_debug_shows_debug_events(self, spawn: Spawner, sock: Path) -> None:
        """log-level debug: the service's debug events appear in its log from then on."""
        service = start_service(spawn, "web_and_worker", sock)
        assert "svc debug tick" not in service.output
        result = ctl(sock, "log-level", "debug")
        assert (0, "Log level: debug (was info).\n") == (result.code, result.out), result.err
        service.wait_for("svc debug tick", timeout=WAIT)
        assert 0 == exit_service(service, sock)

    def test_exit_returns_once_exiting_and_the_service_ends_with_code_0(self, spawn: Spawner, sock: Path) -> None:
        """exit: 'The service is EXITING.', the service ends with code 0, its socket removed."""
        service = start_service(spawn, "web_and_worker", sock)
        result = ctl(sock, "exit")
        assert (0, "The service is EXITING.\n") == (result.code, result.out), result.err
        assert 0 == service.wait(WAIT)
        service.assert_nothing_left()
        assert not sock.exists()


class TestTail:
    def test_tail_streams_one_programs_lines_until_ctrl_c(self, spawn: Spawner, sock: Path) -> None:
        """tail chatty: its lines as they come, none of the other program's; Ctrl-C ends it with code 0."""
        service = start_service(spawn, "chatty", sock)
        tail = spawn.run([sys.executable, "-m", "aiobus", "ctl", "--socket", str(sock), "tail", "chatty", "--json"])
        tail.wait_for('"chat ', timeout=WAIT, count=5)
        tail.send(signal.SIGINT)
        assert 0 == tail.wait(WAIT), tail.output
        assert "Traceback" not in tail.output
        events = [json.loads(line) for line in tail.lines if line.startswith("{")]
        assert len(events) >= 5
        assert {"chatty"} == {event["fields"]["child"] for event in events}
        numbers = [int(event["message"].split()[1]) for event in events]
        assert numbers == sorted(numbers)
        assert 0 == exit_service(service, sock)

    def test_tail_for_people_prints_a_line_per_event(self, spawn: Spawner, sock: Path) -> None:
        """tail: each event a line with its time, name, level and message."""
        service = start_service(spawn, "chatty", sock)
        tail = spawn.run([sys.executable, "-m", "aiobus", "ctl", "--socket", str(sock), "tail"])
        line = tail.wait_for("chat ", timeout=WAIT)
        assert line.startswith("[")
        assert line.split("] ", 1)[1].split()[:3] == ["chatty", "INFO", "chat"]
        tail.send(signal.SIGINT)
        assert 0 == tail.wait(WAIT), tail.output
        assert 0 == exit_service(service, sock)


class TestFailures:
    def test_no_service_is_exit_code_3(self, tmp_path: Path) -> None:
        """Nothing at the path, or a socket file nobody listens on: exit code 3 and one line."""
        missing = ctl(tmp_path / "nothing.sock", "status")
        assert 3 == missing.code
        assert 1 == len(missing.err.splitlines())
        assert "not running" in missing.err
        import socket

        stale = tmp_path / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
            left.bind(str(stale))  # bound, never listening: as a dead service leaves it
            assert 3 == ctl(stale, "status").code

    @pytest.mark.parametrize(
        "args",
        [
            [],
            ["frobnicate"],
            ["restart"],
            ["signal", "web", "SIGNOPE"],
            ["log-level", "loud"],
            ["status", "--timeout", "0"],
        ],
    )
    def test_bad_command_lines_are_exit_code_2(self, tmp_path: Path, args: list[str]) -> None:
        """A missing or unknown command, argument or value: exit code 2, one line, nothing sent."""
        result = ctl(tmp_path / "nothing.sock", *args)
        assert 2 == result.code
        assert 1 == len(result.err.splitlines()), result.err

    def test_no_socket_option_is_exit_code_2(self) -> None:
        """ctl without --socket: exit code 2 and one line."""
        done = subprocess.run(
            [sys.executable, "-m", "aiobus", "ctl", "status"], capture_output=True, text=True, timeout=WAIT
        )
        assert 2 == done.returncode
        assert ["aiobus ctl: error: --socket PATH is required (see --help)"] == done.stderr.splitlines()

    def test_a_failed_start_is_exit_code_1_with_the_reason(self, spawn: Spawner, sock: Path) -> None:
        """start on a stopped program that cannot run: exit code 1, the reason on one line."""
        service = start_service(
            spawn,
            "broken_later",
            sock,
            extra="""
            def broken_later(bus):
                child = Subprocess(bus, "web", [sys.executable, "-c", "import time; time.sleep(60)"])
                child.subscribe()
                bus.subscribe("start", lambda: setattr(child, "argv", ["/nonexistent/program"]), priority=90)
            """,
        )
        assert 0 == ctl(sock, "stop", "web").code
        result = ctl(sock, "start", "web")
        assert 1 == result.code
        assert 1 == len(result.err.splitlines()), result.err
        assert "start web: program 'web' could not run '/nonexistent/program'" in result.err
        assert "stopped" == children(sock)["web"]["state"]
        assert 0 == exit_service(service, sock)


class TestOutputForPeople:
    def test_control_characters_are_shown_not_obeyed(self) -> None:
        """A terminal escape in what the service sends is printed as text; tabs and newlines stay."""
        assert "a\\x1b[31mred\tb\nc\\x9b" == printable("a\x1b[31mred\tb\nc\x9b")

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (None, "-"),
            (0.4, "0s"),
            (59.9, "59s"),
            (65, "1m 05s"),
            (3 * 3600 + 120, "3h 02m"),
            (2 * 86400 + 7200, "2d 02h"),
        ],
    )
    def test_durations_read_at_a_glance(self, seconds: float | None, text: str) -> None:
        """Uptimes: seconds, then minutes, hours, days, with the unit below."""
        assert text == duration(seconds)

    def test_a_table_aligns_its_columns(self) -> None:
        """Each column as wide as its widest cell, two spaces apart, no trailing blanks."""
        assert "A    BB\nccc  d\n" == table([["A", "BB"], ["ccc", "d"]])


def test_tail_into_a_pipe_that_closes_ends_quietly(spawn: Spawner, tmp_path: Path) -> None:
    """aiobus ctl tail | head -3: three lines, then tail ends with code 0 and no traceback."""
    sock = tmp_path / "run" / "ctl.sock"
    service = start_service(spawn, "chatty", sock)
    tail = subprocess.Popen(
        [sys.executable, "-m", "aiobus", "ctl", "--socket", str(sock), "tail", "chatty"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tail.stdout is not None and tail.stderr is not None
    with tail:
        lines = [tail.stdout.readline() for _ in range(3)]
        tail.stdout.close()  # as head does once it has its lines
        assert 0 == tail.wait(WAIT)
        assert b"" == tail.stderr.read()
    assert all(b"chat " in line for line in lines)
    assert 0 == exit_service(service, sock)


def test_a_pool_is_restarted_one_member_after_another(spawn: Spawner, tmp_path: Path) -> None:
    """restart web, a program with 2 instances: each member gets a new pid; stop web stops both."""
    sock = tmp_path / "run" / "ctl.sock"
    service = start_service(
        spawn,
        "pool",
        sock,
        extra="""
        def pool(bus):
            program(bus, "web", RELOADABLE, instances=2)
        """,
    )
    before = children(sock)
    assert ["web[0]", "web[1]"] == sorted(before)
    result = ctl(sock, "restart", "web")
    assert 0 == result.code, result.err
    after = children(sock)
    assert [f"web[{n}]: running, pid {after[f'web[{n}]']['pid']}" for n in (0, 1)] == result.out.splitlines()
    assert all(before[name]["pid"] != after[name]["pid"] for name in before)
    stopped = ctl(sock, "stop", "web")
    assert (0, ["web[0]: stopped", "web[1]: stopped"]) == (stopped.code, stopped.out.splitlines()), stopped.err
    assert 0 == exit_service(service, sock)


def test_a_service_file_serves_a_control_socket_and_sends_reload_signals(spawn: Spawner, tmp_path: Path) -> None:
    """control_socket (relative to the file), reload_signal and significant from aiobus.toml: ctl graceful
    reaches the program, and the significant program's end ends the service with code 0."""
    (tmp_path / "aiobus.toml").write_text(
        textwrap.dedent(
            f"""
            [service]
            control_socket = "run/ctl.sock"
            log_format = "json"

            [programs.web]
            argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(RELOAD_THEN_END)}]
            ready = {{ line = "^up$" }}
            reload_signal = "SIGHUP"
            restart = "transient"
            significant = true
            """
        )
    )
    sock = tmp_path / "run" / "ctl.sock"
    service = spawn.run([sys.executable, "-m", "aiobus", "run", "--config", str(tmp_path / "aiobus.toml")])
    service.wait_for('"Bus STARTED"', timeout=WAIT)
    assert 0 == ctl(sock, "graceful").code
    service.wait_for('"reloaded"', timeout=WAIT)
    assert 0 == service.wait(WAIT), service.output
    assert "Significant child web ended for good" in service.output
    service.assert_nothing_left()


# Says "up"; on SIGHUP says "reloaded" and exits 0.
RELOAD_THEN_END = """
import signal, sys, time
def reload(*args):
    print("reloaded", flush=True)
    sys.exit(0)
signal.signal(signal.SIGHUP, reload)
print("up", flush=True)
while True:
    time.sleep(1)
"""
