"""The ``aiobus`` command: real ``python -m aiobus run svc:...`` processes on a small service module."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import textwrap

import pytest
from processes import Child, Spawner

import aiobus.__main__
from aiobus._cli import main as cli_main

WAIT = 30  # seconds: a generous bound on waits that normally take a second or two

# Written to tmp_path/svc.py; the child runs in tmp_path, so "svc" is importable.
SERVICE = """
import importlib.util
import os
import anyio
from aiobus import ChildBroker


def setup(bus):
    bus.subscribe("main", lambda: bus.log("svc tick", interval=bus.main_interval))


async def async_setup(bus):
    await anyio.sleep(0)

    @bus.subscribe("start")
    async def started():
        bus.log("svc async start", stop_timeout=bus.stop_timeout)


def failing_stop(bus):
    bus.subscribe("start", lambda: bus.log("svc started"))

    def stop():
        raise RuntimeError("svc stop failed")

    bus.subscribe("stop", stop)


def failing_setup(bus):
    raise RuntimeError("svc setup failed")


def whoami(bus):
    bus.subscribe("start", lambda: bus.log("svc identity", euid=os.geteuid()), priority=80)


async def child(bus, link):
    bus.log("svc child running")
    async for _ in link:
        pass


def with_child(bus):
    ChildBroker(bus, "kid", child).subscribe()


def report_umask(bus):
    def report():
        mask = os.umask(0)
        os.umask(mask)
        bus.log("svc umask", umask=mask)

    bus.subscribe("start", report, priority=80)


def missing_program(bus):
    from aiobus.plugins import Subprocess

    Subprocess(bus, "nope", ["/no/such/program"]).subscribe()


NOT_CALLABLE = 42
"""


def run(spawn: Spawner, *args: str, service: str = SERVICE) -> Child:
    """Write the service module and run ``python -m aiobus *args`` on it."""
    (spawn.directory / "svc.py").write_text(textwrap.dedent(service))
    return spawn.run([sys.executable, "-m", "aiobus", *args])


def stop_cleanly(child: Child) -> None:
    child.send(signal.SIGTERM)
    assert child.wait(WAIT) == 0, child.output
    child.assert_nothing_left()


def single_error_line(child: Child) -> str:
    """Wait for a command that must fail with exit code 2 and one line; return the line."""
    assert child.wait(WAIT) == 2, child.output
    assert "Traceback" not in child.output
    assert len(child.lines) == 1, child.output
    line = child.lines[0]
    assert "error" in line
    return line


class TestEntryPoints:
    def test_python_m_aiobus_calls_the_console_script_function(self) -> None:
        """``python -m aiobus`` runs ``aiobus._cli:main``, the console script's function."""
        assert aiobus.__main__.main is cli_main

    def test_main_module_runs_nothing_when_loaded_under_another_name(self) -> None:
        """Loading aiobus/__main__.py as ``__mp_main__`` (as anyio's process workers do) only imports."""
        spec = importlib.util.spec_from_file_location("__mp_main__", aiobus.__main__.__file__)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main is cli_main

    def test_help_describes_the_command_and_every_flag(self, spawn: Spawner) -> None:
        """``--help`` and ``run --help`` exit 0; the latter names every flag."""
        top = run(spawn, "--help")
        assert top.wait(WAIT) == 0, top.output
        assert "run" in top.output
        sub = run(spawn, "run", "--help")
        assert sub.wait(WAIT) == 0, sub.output
        for flag in ("--pidfile", "--user", "--group", "--reload", "--log-format", "--main-interval", "--stop-timeout"):
            assert flag in sub.output
        assert "The current directory comes first on sys.path" in " ".join(sub.output.split())


class TestRunning:
    def test_a_sync_setup_runs_and_sigterm_exits_0_with_nothing_left(self, spawn: Spawner) -> None:
        """A sync setup's main listener runs; SIGTERM ends the process with code 0 and nothing left."""
        child = run(spawn, "run", "svc:setup", "--log-format", "json")
        child.wait_for('"svc tick"', timeout=WAIT)
        stop_cleanly(child)
        assert "Caught SIGTERM: exiting" in [event["event"] for event in child.events()]

    def test_an_async_setup_is_awaited_and_stop_timeout_reaches_the_bus(self, spawn: Spawner) -> None:
        """An async setup is awaited (its start listener runs) and --stop-timeout is the bus's."""
        child = run(spawn, "run", "svc:async_setup", "--log-format", "json", "--stop-timeout", "7.5")
        child.wait_for('"svc async start"', timeout=WAIT)
        stop_cleanly(child)
        [started] = [event for event in child.events() if event["event"] == "svc async start"]
        assert started["stop_timeout"] == 7.5

    def test_main_interval_sets_the_tick(self, spawn: Spawner) -> None:
        """--main-interval 0.01 is the bus's main interval, and the main channel ticks at it."""
        child = run(spawn, "run", "svc:setup", "--log-format", "json", "--main-interval", "0.01")
        child.wait_for('"svc tick"', timeout=WAIT, count=20)
        stop_cleanly(child)
        ticks = [event for event in child.events() if event["event"] == "svc tick"]
        assert len(ticks) >= 20
        assert {event["interval"] for event in ticks} == {0.01}

    def test_a_child_broker_subscribed_by_setup_runs_and_stops(self, spawn: Spawner) -> None:
        """A child broker whose function lives in the service module runs (the worker can load __main__)."""
        child = run(spawn, "run", "svc:with_child", "--log-format", "json")
        child.wait_for('"svc child running"', timeout=WAIT)
        child.wait_for('"Bus STARTED"', timeout=WAIT, count=2)
        stop_cleanly(child)

    def test_pidfile_is_written_while_running_and_removed_at_exit(self, spawn: Spawner) -> None:
        """--pidfile writes the process's pid, and the file is gone once it has exited."""
        pidfile = spawn.directory / "svc.pid"
        child = run(spawn, "run", "svc:setup", "--log-format", "json", "--pidfile", str(pidfile))
        child.wait_for('"Bus STARTED"', timeout=WAIT)
        assert pidfile.read_text().strip() == str(child.pid)
        stop_cleanly(child)
        assert not pidfile.exists()


class TestLogFormat:
    def test_json_gives_json_lines(self, spawn: Spawner) -> None:
        """--log-format json: every line is a JSON log event."""
        child = run(spawn, "run", "svc:setup", "--log-format", "json")
        child.wait_for('"svc tick"', timeout=WAIT)
        stop_cleanly(child)
        assert len(child.events()) == len(child.lines) > 0

    def test_console_gives_lines_for_people(self, spawn: Spawner) -> None:
        """--log-format console: lines that are not JSON, with the level and the message."""
        child = run(spawn, "run", "svc:setup", "--log-format", "console")
        child.wait_for("svc tick", timeout=WAIT)
        stop_cleanly(child)
        assert child.events() == []
        started = child.wait_for("Bus STARTED")
        assert "info" in started.lower()


class TestFailures:
    def test_a_failing_stop_listener_gives_exit_code_70(self, spawn: Spawner) -> None:
        """The process exits with the bus's exit code: 70 after a stop listener failed."""
        child = run(spawn, "run", "svc:failing_stop", "--log-format", "json")
        child.wait_for('"svc started"', timeout=WAIT)
        child.send(signal.SIGTERM)
        assert child.wait(WAIT) == 70, child.output
        child.assert_nothing_left()

    def test_a_failing_setup_is_logged_with_its_traceback_and_gives_70(self, spawn: Spawner) -> None:
        """An exception from setup() is one log event carrying its traceback, and the exit code is 70."""
        child = run(spawn, "run", "svc:failing_setup", "--log-format", "json")
        assert child.wait(WAIT) == 70, child.output
        child.assert_nothing_left()
        [failed] = [event for event in child.events() if event["event"] == "setup svc:failing_setup failed"]
        assert failed["level"] == "error"
        assert "RuntimeError: svc setup failed" in failed["exception"]
        assert all(line.startswith("{") for line in child.lines), child.output

    def test_a_module_that_fails_to_import_is_logged_with_its_traceback_and_gives_70(self, spawn: Spawner) -> None:
        """An error raised by importing the target's module (a bug in it, not a bad target): logged, code 70."""
        child = run(spawn, "run", "svc:setup", "--log-format", "json", service="import no_such_dependency\n")
        assert child.wait(WAIT) == 70, child.output
        [failed] = child.events()
        assert failed["event"] == "importing svc:setup failed"
        assert "No module named 'no_such_dependency'" in failed["exception"]

    @pytest.mark.parametrize(
        ("target", "named"),
        [
            ("no_such_module:setup", "no module named 'no_such_module'"),
            ("svc:no_such_function", "no attribute 'no_such_function'"),
            ("svc:NOT_CALLABLE", "not callable"),
            ("svc", "module:function"),
            ("svc:", "module:function"),
        ],
    )
    def test_a_bad_target_is_one_line_and_exit_code_2(self, spawn: Spawner, target: str, named: str) -> None:
        """A missing module or attribute, a non-callable or a malformed target: one line naming it, code 2."""
        line = single_error_line(run(spawn, "run", target))
        assert named in line

    @pytest.mark.parametrize(
        ("args", "named"),
        [
            (["--main-interval", "-1"], "--main-interval"),
            (["--main-interval", "soon"], "--main-interval"),
            (["--stop-timeout", "-1"], "--stop-timeout"),
            (["--user", "no_such_user_here"], "unknown user 'no_such_user_here'"),
            (["--group", "no_such_group_here"], "unknown group 'no_such_group_here'"),
            (["--log-format", "xml"], "--log-format"),
            (["--pidfile", "/no/such/folder/svc.pid"], "/no/such/folder"),
            (["--umask", "1000"], "must be octal within 000..777, such as 022, not '1000'"),
            (["--umask", "028"], "--umask: must be octal within 000..777"),
        ],
    )
    def test_a_bad_flag_value_is_one_line_and_exit_code_2(self, spawn: Spawner, args: list[str], named: str) -> None:
        """A flag value that cannot work is refused before anything runs: one line naming it, code 2."""
        line = single_error_line(run(spawn, "run", "svc:setup", *args))
        assert named in line

    def test_reload_without_watchfiles_is_one_line_naming_the_extra(self, spawn: Spawner) -> None:
        """--reload where watchfiles cannot be imported: one line saying what to install, code 2."""
        (spawn.directory / "watchfiles.py").write_text("raise ImportError('watchfiles hidden by the test')\n")
        line = single_error_line(run(spawn, "run", "svc:setup", "--reload"))
        assert "pip install aiobus[reload]" in line

    def test_umask_is_set_at_start(self, spawn: Spawner) -> None:
        """--umask 027 (octal) is the process's umask once it has started."""
        child = run(spawn, "run", "svc:report_umask", "--log-format", "json", "--umask", "027")
        child.wait_for('"svc umask"', timeout=WAIT)
        stop_cleanly(child)
        [reported] = [event for event in child.events() if event["event"] == "svc umask"]
        assert reported["umask"] == 0o027


class TestReload:
    def test_a_change_to_the_service_module_restarts_the_process(self, spawn: Spawner) -> None:
        """--reload: writing svc.py re-executes the process, which runs the new setup; SIGTERM then exits 0."""
        child = run(spawn, "run", "svc:setup", "--log-format", "json", "--reload")
        child.wait_for("Autoreloader watching", timeout=WAIT)
        (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE).replace("svc tick", "svc tock"))
        child.wait_for('"svc tock"', timeout=WAIT)
        assert any(event["event"] == "Re-executing the process" for event in child.events())
        stop_cleanly(child)


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX users (Linux)")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
class TestPrivileges:
    def test_user_nobody_runs_the_service_as_nobody(self, spawn: Spawner) -> None:
        """As root, --user nobody makes the started service run with nobody's uid."""
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user 'nobody' here")
        child = run(spawn, "run", "svc:whoami", "--log-format", "json", "--user", "nobody")
        child.wait_for('"svc identity"', timeout=WAIT)
        stop_cleanly(child)
        [identity] = [event for event in child.events() if event["event"] == "svc identity"]
        assert identity["euid"] == nobody.pw_uid

    def test_pidfile_with_user_nobody_is_removed_at_exit(self, spawn: Spawner) -> None:
        """As root, --pidfile in a folder only root may write to, with --user nobody: the file is gone after exit."""
        folder = spawn.directory / "run"
        folder.mkdir(mode=0o755)
        pidfile = folder / "svc.pid"
        child = run(spawn, "run", "svc:whoami", "--log-format", "json", "--pidfile", str(pidfile), "--user", "nobody")
        child.wait_for('"svc identity"', timeout=WAIT)
        assert pidfile.read_text() == f"{child.pid}\n"
        stop_cleanly(child)
        assert not pidfile.exists()
        assert not [event for event in child.events() if event["level"] == "warning"]

    def test_user_root_keeps_root(self, spawn: Spawner) -> None:
        """As root, --user root changes nothing and the service runs."""
        child = run(spawn, "run", "svc:whoami", "--log-format", "json", "--user", "root")
        child.wait_for('"svc identity"', timeout=WAIT)
        stop_cleanly(child)
        [identity] = [event for event in child.events() if event["event"] == "svc identity"]
        assert identity["euid"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
class TestCurrentDirectory:
    @pytest.mark.parametrize("mode", [0o777, 0o1777])
    def test_as_root_a_directory_everyone_may_write_to_is_refused(self, spawn: Spawner, mode: int) -> None:
        """As root, a current directory writable by everyone (sticky or not) is one line and exit code 2."""
        os.chmod(spawn.directory, mode)
        child = run(spawn, "run", "svc:setup")
        line = single_error_line(child)
        assert f"the current directory {spawn.directory} is writable by everyone" in line
        assert "comes first on sys.path" in line

    def test_as_root_a_directory_only_root_may_write_to_is_used(self, spawn: Spawner) -> None:
        """As root, a current directory of mode 0755 is imported from as before."""
        os.chmod(spawn.directory, 0o755)
        child = run(spawn, "run", "svc:setup", "--log-format", "json")
        child.wait_for('"svc tick"', timeout=WAIT)
        stop_cleanly(child)


class TestSystemd:
    def test_under_notify_socket_the_command_tells_ready_then_stopping(self, spawn: Spawner) -> None:
        """With NOTIFY_SOCKET set, aiobus run sends READY=1 once started and STOPPING=1 at the stop."""
        folder = tempfile.mkdtemp(prefix="aiobus-")  # short: an AF_UNIX path holds 107 bytes
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
                systemd.bind(os.path.join(folder, "notify"))
                (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE))
                env = {"NOTIFY_SOCKET": systemd.getsockname()}
                child = spawn.run([sys.executable, "-m", "aiobus", "run", "svc:setup", "--log-format", "json"], env=env)
                child.wait_for('"svc tick"', timeout=WAIT)
                assert "READY=1" in received(systemd)
                stop_cleanly(child)
                assert "STOPPING=1" in received(systemd)
        finally:
            shutil.rmtree(folder)

    def test_a_watchdog_the_main_interval_cannot_feed_is_one_line(self, spawn: Spawner) -> None:
        """Under a watchdog of 0.1 s, the default main interval (0.1 s) cannot ping twice per period: code 2."""
        env = {"NOTIFY_SOCKET": "/run/no-such-notify-socket", "WATCHDOG_USEC": "100000"}
        (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE))
        child = spawn.run([sys.executable, "-m", "aiobus", "run", "svc:setup"], env=env)
        assert "main_interval" in single_error_line(child)

    def test_a_main_interval_short_enough_for_the_watchdog_runs(self, spawn: Spawner) -> None:
        """Under a watchdog of 0.1 s, --main-interval 0.01 is accepted (checked against that interval, not 0.1)."""
        env = {"NOTIFY_SOCKET": "/run/no-such-notify-socket", "WATCHDOG_USEC": "100000"}
        (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE))
        argv = [sys.executable, "-m", "aiobus", "run", "svc:setup", "--log-format", "json", "--main-interval", "0.01"]
        child = spawn.run(argv, env=env)
        child.wait_for('"svc tick"', timeout=WAIT)
        stop_cleanly(child)


def received(sock: socket.socket) -> list[str]:
    """The lines of the datagrams queued on ``sock``."""
    found = []
    while True:
        try:
            found += sock.recv(4096, socket.MSG_DONTWAIT).decode().splitlines()
        except BlockingIOError:
            return found


class TestStartFailures:
    def assert_one_clear_line(self, child: Child, text: str) -> None:
        """The start failed with code 70: the error is one log line, with no traceback."""
        assert child.wait(WAIT) == 70, child.output
        assert "Traceback" not in child.output and "ExceptionGroup" not in child.output
        errors = [line for line in child.lines if " ERROR " in line and "Start failed" not in line]
        assert any(text in line for line in errors), child.output
        assert all(line.startswith("[") for line in child.lines), child.output  # log lines only
        child.assert_nothing_left()

    def test_a_missing_program_is_one_line(self, spawn: Spawner) -> None:
        """A program whose command does not exist fails the start with one clear line, not a traceback."""
        child = run(spawn, "run", "svc:missing_program", "--log-format", "console")
        self.assert_one_clear_line(child, "could not run '/no/such/program': No such file or directory")

    def test_a_second_copy_on_the_same_pidfile_is_one_line(self, spawn: Spawner) -> None:
        """A second copy of a running service, on the same --pidfile, fails the start with one clear line."""
        pidfile = spawn.directory / "svc.pid"
        first = run(spawn, "run", "svc:setup", "--log-format", "json", "--pidfile", str(pidfile))
        first.wait_for('"Bus STARTED"', timeout=WAIT)
        second = spawn.run(
            [sys.executable, "-m", "aiobus", "run", "svc:setup", "--log-format", "console", "--pidfile", str(pidfile)]
        )
        self.assert_one_clear_line(second, f"is locked by process {first.pid}, which is running")
        stop_cleanly(first)
