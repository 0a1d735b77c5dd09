"""daemonize(): real double forks, and the original process's exit code telling whether the daemon started."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from processes import Child, Spawner

from aiobus import Bus, DaemonReporter, daemonize
from aiobus._daemon import Daemon, _read_report

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork, sessions and /proc (Linux)")

SERVICE = """
import os, signal, sys, time
import anyio
from aiobus import Bus, DaemonReporter, configure_logging, daemonize

MODE, WORKDIR = sys.argv[1], sys.argv[2]

def mark(name: str, text: str = "") -> None:
    with open(os.path.join(WORKDIR, name), "w") as file:
        file.write(text)

daemon = daemonize(
    stdout=os.path.join(WORKDIR, "out.log"),
    stderr=os.path.join(WORKDIR, "err.log"),
    umask=0o027,
    ready_timeout=float(os.environ.get("READY_TIMEOUT", "60")),
)
mark("daemon.pid", str(os.getpid()))
if MODE == "die":
    os._exit(3)
if MODE == "silent":
    time.sleep(600)

async def main() -> int:
    async with Bus(main_interval=0.05) as bus:
        DaemonReporter(bus, daemon).subscribe()

        @bus.subscribe("start")
        async def slow_start() -> None:
            await anyio.sleep(0.3)
            if MODE == "fail":
                raise ValueError("port 8080 is taken")
            mark("ready")

        async def exit_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    await bus.exit()

        bus.start_soon(exit_on_sigterm)
        sys.stdout.write("hello stdout\\n")
        sys.stdout.flush()
        try:
            await bus.start()
        except Exception:
            pass
        await bus.block()
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


def is_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for init to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Daemons:
    """Runs the service; the daemon leaves the test's process session, so it is killed here by its pid."""

    def __init__(self, spawn: Spawner, workdir: Path) -> None:
        self.spawn = spawn
        self.workdir = workdir

    def run(self, mode: str, pass_fds: tuple[int, ...] = (), **env: str) -> Child:
        return self.spawn.script(SERVICE, mode, str(self.workdir), env=env, pass_fds=pass_fds)

    @property
    def pid(self) -> int:
        return int((self.workdir / "daemon.pid").read_text())

    def kill(self) -> None:
        if not (self.workdir / "daemon.pid").exists():
            return
        pid = self.pid
        if not is_gone(pid):
            os.kill(pid, signal.SIGKILL)
        assert wait_until_gone(pid), f"the daemon {pid} is still running"


@pytest.fixture
def daemons(spawn: Spawner, tmp_path: Path) -> Iterator[Daemons]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    manager = Daemons(spawn, workdir)
    try:
        yield manager
    finally:
        manager.kill()


def start_daemon(daemons: Daemons) -> tuple[Child, int]:
    """Run the service in "ok" mode; return the original process and the daemon's pid."""
    original = daemons.run("ok")
    assert original.wait(60) == 0, original.output
    return original, daemons.pid


class TestStart:
    def test_original_exits_0_only_once_the_daemon_started(self, daemons: Daemons) -> None:
        """The original process exits 0 after the daemon's (slow) start listener has finished."""
        original, pid = start_daemon(daemons)
        assert (daemons.workdir / "ready").exists()
        assert not is_gone(pid)
        original.assert_nothing_left()

    def test_a_pipe_the_caller_held_ends_once_the_daemon_runs(self, daemons: Daemons) -> None:
        """A pipe whose write end the caller held across daemonize reaches its end: the daemon closed its copy."""
        read_fd, write_fd = os.pipe()
        try:
            original = daemons.run("ok", pass_fds=(write_fd,))
            os.close(write_fd)
            write_fd = -1
            assert original.wait(60) == 0, original.output
            assert not is_gone(daemons.pid)  # the daemon runs, and yet:
            ready, _, _ = select.select([read_fd], [], [], 60)
            assert ready and os.read(read_fd, 1) == b""
            assert not is_gone(daemons.pid)
            assert sorted(os.listdir(f"/proc/{daemons.pid}/fd"), key=int)[:3] == ["0", "1", "2"]
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)

    def test_daemon_is_in_a_new_session_without_leading_it(self, daemons: Daemons) -> None:
        """The daemon has left the original's session and, after the second fork, does not lead its own."""
        original, pid = start_daemon(daemons)
        session = os.getsid(pid)
        assert session not in (original.pid, pid)
        with open(f"/proc/{pid}/stat") as file:
            ppid = int(file.read().rsplit(")", 1)[1].split()[1])
        assert ppid not in (original.pid, session)

    def test_daemon_works_in_root_with_the_given_umask(self, daemons: Daemons) -> None:
        """The daemon's working directory is / and its umask the one asked for."""
        _, pid = start_daemon(daemons)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        with open(f"/proc/{pid}/status") as file:
            umask = next(line.split()[1] for line in file if line.startswith("Umask:"))
        assert umask == "0027"

    def test_standard_streams_go_to_the_given_files(self, daemons: Daemons) -> None:
        """The daemon's stdin is /dev/null and its stdout and stderr are appended to the given files."""
        _, pid = start_daemon(daemons)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == str(daemons.workdir / "out.log")
        assert "hello stdout" in (daemons.workdir / "out.log").read_text()
        assert "Bus STARTED" in (daemons.workdir / "err.log").read_text()

    def test_sigterm_ends_the_daemon_through_its_bus(self, daemons: Daemons) -> None:
        """The daemon runs its bus until SIGTERM, then exits through the whole shutdown."""
        _, pid = start_daemon(daemons)
        os.kill(pid, signal.SIGTERM)
        assert wait_until_gone(pid)
        assert "Bus EXITING" in (daemons.workdir / "err.log").read_text()


class TestFailure:
    def test_start_failure_exits_1_with_the_daemons_error(self, daemons: Daemons) -> None:
        """A start listener failing in the daemon makes the original exit 1 and print that error."""
        original = daemons.run("fail")
        assert original.wait(60) == 1
        assert "failed to start" in original.output
        assert "ValueError: port 8080 is taken" in original.output
        assert wait_until_gone(daemons.pid)

    def test_daemon_dying_before_reporting_exits_1(self, daemons: Daemons) -> None:
        """A daemon that ends without reporting makes the original exit 1 and say so."""
        original = daemons.run("die")
        assert original.wait(60) == 1
        assert "exited before reporting that it started" in original.output

    def test_silent_daemon_is_terminated_at_the_ready_timeout(self, daemons: Daemons) -> None:
        """A daemon silent past ready_timeout is sent SIGTERM and the original exits 1."""
        original = daemons.run("silent", READY_TIMEOUT="1")
        assert original.wait(60) == 1
        assert "did not report within 1 s" in original.output
        assert wait_until_gone(daemons.pid)

    def test_unusable_output_file_raises_in_the_caller(self, spawn: Spawner, tmp_path: Path) -> None:
        """A stream file that cannot be opened raises OSError in the calling process, before any fork."""
        code = (
            "import sys\nfrom aiobus import daemonize\n"
            "try:\n    daemonize(stdout=sys.argv[1])\n"
            "except OSError as exc:\n    print('caught', type(exc).__name__)\n"
        )
        child = spawn.script(code, str(tmp_path / "missing" / "out.log"))
        assert child.wait() == 0
        assert child.output == "caught FileNotFoundError"


class TestRefusal:
    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_refuses_inside_a_running_event_loop(self, backend: str) -> None:
        """daemonize() raises RuntimeError when an event loop runs in the thread."""

        async def attempt() -> None:
            daemonize()

        with pytest.raises(RuntimeError, match="before the event loop starts"):
            anyio.run(attempt, backend=backend)

    def test_refuses_while_another_thread_is_alive(self) -> None:
        """daemonize() raises RuntimeError naming the threads alive."""
        release = threading.Event()
        thread = threading.Thread(target=release.wait, name="busy-worker")
        thread.start()
        try:
            with pytest.raises(RuntimeError, match="busy-worker"):
                daemonize()
        finally:
            release.set()
            thread.join()

    # A running loop makes daemonize() refuse before forking, so these cannot fork the test runner.
    @pytest.mark.parametrize("umask", [-1, 0o1000, "022", True])
    async def test_bad_umask_is_a_value_error(self, umask: object) -> None:
        """A umask outside 0..0o777 (or not an int) is a ValueError."""
        with pytest.raises(ValueError, match="umask"):
            daemonize(umask=umask)  # type: ignore[arg-type]

    @pytest.mark.parametrize("seconds", [0, -1, float("inf"), "5"])
    async def test_bad_ready_timeout_is_a_value_error(self, seconds: object) -> None:
        """A ready_timeout that is not a positive finite number (or None) is a ValueError."""
        with pytest.raises(ValueError, match="ready_timeout"):
            daemonize(ready_timeout=seconds)  # type: ignore[arg-type]

    async def test_missing_working_directory_is_an_error(self, tmp_path: Path) -> None:
        """A chdir that is not a directory is a NotADirectoryError."""
        with pytest.raises(NotADirectoryError, match="missing"):
            daemonize(chdir=tmp_path / "missing")


class TestReports:
    """The daemon's side of the report, read from a real pipe in this process (no fork)."""

    @staticmethod
    def reports(read_fd: int) -> list[dict[str, object]]:
        with os.fdopen(read_fd, "rb") as pipe:
            return [json.loads(line) for line in pipe.read().splitlines()]

    async def test_started_is_reported_after_the_last_start_listener(self) -> None:
        """The bus's report of a start goes out once every start listener has run."""
        read_fd, write_fd = os.pipe()
        daemon = Daemon(write_fd)
        async with Bus() as bus:
            DaemonReporter(bus, daemon).subscribe()

            @bus.subscribe("start", priority=10**9)
            def last() -> None:
                assert not daemon.reported

            await bus.start()
            assert daemon.reported
        assert self.reports(read_fd) == [{"pid": os.getpid()}, {"started": True}]

    async def test_exit_before_start_is_reported_as_a_failure(self) -> None:
        """A bus that exits without ever starting reports a failure saying so."""
        read_fd, write_fd = os.pipe()
        daemon = Daemon(write_fd)
        async with Bus() as bus:
            DaemonReporter(bus, daemon).subscribe()
        assert self.reports(read_fd)[1:] == [{"failed": "the bus exited before it started"}]

    async def test_only_the_first_report_counts(self) -> None:
        """After a report, later ones (and the bus's) send nothing more."""
        read_fd, write_fd = os.pipe()
        daemon = Daemon(write_fd)
        daemon.failed("no database")
        daemon.started()
        async with Bus() as bus:
            DaemonReporter(bus, daemon).subscribe()
            await bus.start()
        assert self.reports(read_fd)[1:] == [{"failed": "no database"}]

    async def test_unsubscribed_reporter_reports_nothing(self) -> None:
        """A reporter taken off before the start leaves the bus's start unreported."""
        read_fd, write_fd = os.pipe()
        daemon = Daemon(write_fd)
        async with Bus() as bus:
            reporter = DaemonReporter(bus, daemon)
            reporter.subscribe()
            reporter.unsubscribe()
            await bus.start()
            assert not daemon.reported
        daemon.started()
        assert self.reports(read_fd)[1:] == [{"started": True}]

    async def test_the_old_subscribe_with_the_bus_still_reports_with_a_deprecation_warning(self) -> None:
        """``daemon.subscribe(bus)`` and ``daemon.unsubscribe(bus)`` warn, and still attach and detach."""
        read_fd, write_fd = os.pipe()
        daemon = Daemon(write_fd)
        async with Bus() as bus:
            before = bus.listeners
            with pytest.warns(DeprecationWarning, match=r"DaemonReporter\(bus, daemon\)\.subscribe\(\)"):
                daemon.subscribe(bus)
            assert bus.listeners != before
            with pytest.warns(DeprecationWarning, match=r"DaemonReporter\(bus, daemon\)\.unsubscribe\(\)"):
                daemon.unsubscribe(bus)
            assert bus.listeners == before
            with pytest.warns(DeprecationWarning):
                daemon.subscribe(bus)
            await bus.start()
            assert daemon.reported
        assert self.reports(read_fd)[1:] == [{"started": True}]


class TestReportReading:
    """The original process's reading of the daemon's reports, over a real pipe."""

    @staticmethod
    def outcome(*chunks: bytes, close: bool = True, timeout: float | None = 10) -> tuple[int, str]:
        read_fd, write_fd = os.pipe()
        try:
            for chunk in chunks:
                os.write(write_fd, chunk)
            if close:
                os.close(write_fd)
            return _read_report(read_fd, timeout)
        finally:
            os.close(read_fd)
            if not close:
                os.close(write_fd)

    def test_started_means_exit_code_0(self) -> None:
        """A pid then a start report, even split across writes, gives exit code 0 and no message."""
        assert self.outcome(b'{"pid": 42}\n{"sta', b'rted": true}\n') == (0, "")

    def test_failure_report_is_exit_code_1_with_the_error(self) -> None:
        """A failure report gives exit code 1 and a message with the daemon's pid and error."""
        code, message = self.outcome(b'{"pid": 42}\n{"failed": "no database"}\n')
        assert code == 1
        assert "pid 42" in message and "no database" in message

    def test_end_without_a_report_is_exit_code_1(self) -> None:
        """A daemon that dies before reporting (the pipe closes) gives exit code 1, saying so."""
        code, message = self.outcome(b'{"pid": 42}\n')
        assert code == 1
        assert "exited before reporting" in message

    def test_no_report_in_time_is_exit_code_1(self) -> None:
        """Silence past the timeout gives exit code 1 and says how long it waited."""
        code, message = self.outcome(b'{"pid": 42}\n', close=False, timeout=0.05)
        assert code == 1
        assert "0.05" in message
