"""PIDFile: a real PID file written, locked and removed by real processes."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LogRecorder
from processes import Child, Spawner

from aiobus import Bus, ChannelFailures
from aiobus.plugins.pidfile import PIDFile, PIDFileFolderWarning, PIDFileLockedError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX files, locks and signals (Linux)")

SERVICE = """
import signal, sys
import anyio
from aiobus import Bus, ChannelFailures, configure_logging
from aiobus.plugins.pidfile import PIDFile

async def main() -> int:
    # The receiver is in place before the start, so a SIGTERM is never missed.
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with Bus() as bus:
            PIDFile(bus, sys.argv[1]).subscribe()
            try:
                await bus.start()
            except ChannelFailures:
                print("outcome: failed")
                return bus.exit_code
            print("outcome: started")

            async def exit_on_sigterm() -> None:
                async for _ in signals:
                    await bus.exit()
                    return

            bus.start_soon(exit_on_sigterm)
            await bus.block()
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


@pytest.fixture
def pid_path(tmp_path: Path) -> Path:
    """A PID file in a folder of its own (the service's script lives in tmp_path)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return folder / "service.pid"


def start_service(spawn: Spawner, pid_path: Path, name: str = "service.py", **popen: Any) -> Child:
    child = spawn.script(SERVICE, str(pid_path), name=name, **popen)
    child.wait_for("Bus STARTED")
    return child


def stop_service(child: Child) -> None:
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.output
    child.assert_nothing_left()


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def warnings_of(child: Child) -> list[dict[str, Any]]:
    return [event for event in child.events() if event["level"] == "warning"]


class TestWhileRunning:
    def test_file_holds_the_pid_of_the_running_process(self, spawn: Spawner, pid_path: Path) -> None:
        """Once started, the PID file holds the service's pid, and no temporary file is left beside it."""
        child = start_service(spawn, pid_path)
        assert pid_path.read_text() == f"{child.pid}\n"
        assert os.listdir(pid_path.parent) == [pid_path.name]
        stop_service(child)

    @pytest.mark.parametrize("umask", [0o000, 0o077])
    def test_file_mode_is_0644_whatever_the_umask(self, spawn: Spawner, pid_path: Path, umask: int) -> None:
        """The PID file is readable by all and writable by its owner only, under any umask."""
        child = start_service(spawn, pid_path, umask=umask)
        assert stat.S_IMODE(pid_path.stat().st_mode) == 0o644
        stop_service(child)

    def test_file_is_locked_while_running(self, spawn: Spawner, pid_path: Path) -> None:
        """Another open of the PID file cannot take its lock while the service runs."""
        child = start_service(spawn, pid_path)
        with open(pid_path) as file, pytest.raises(BlockingIOError):
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        stop_service(child)

    def test_second_instance_fails_to_start_naming_the_first_pid(self, spawn: Spawner, pid_path: Path) -> None:
        """A second service on the same PID file fails at start with an error naming the first's pid."""
        first = start_service(spawn, pid_path)
        second = spawn.script(SERVICE, str(pid_path), name="second.py")
        assert second.wait() != 0
        failure = second.wait_for("locked by")
        assert f"is locked by process {first.pid}, which is running" in failure
        assert "Bus STARTED" not in second.output
        assert pid_path.read_text() == f"{first.pid}\n"
        stop_service(first)

    @pytest.mark.parametrize("stale", [True, False], ids=["stale file", "no file"])
    def test_two_instances_starting_together_one_wins(self, spawn: Spawner, pid_path: Path, stale: bool) -> None:
        """Of two services started at once, one holds the file and the other fails naming it."""
        if stale:
            pid_path.write_text(f"{dead_pid()}\n")
        children = [spawn.script(SERVICE, str(pid_path), name=f"service{n}.py") for n in (1, 2)]
        outcomes = [child.wait_for("outcome:") for child in children]
        winners = [child for child, line in zip(children, outcomes, strict=True) if line == "outcome: started"]
        losers = [child for child, line in zip(children, outcomes, strict=True) if line == "outcome: failed"]
        assert (len(winners), len(losers)) == (1, 1), "\n".join(child.output for child in children)
        assert losers[0].wait() != 0
        assert f"is locked by process {winners[0].pid}" in losers[0].output
        assert pid_path.read_text() == f"{winners[0].pid}\n"
        stop_service(winners[0])


class TestStaleFile:
    def test_stale_file_is_replaced_with_a_warning(self, spawn: Spawner, pid_path: Path) -> None:
        """A PID file naming a dead process is replaced, and a warning names the dead pid."""
        gone = dead_pid()
        pid_path.write_text(f"{gone}\n")
        child = start_service(spawn, pid_path)
        assert pid_path.read_text() == f"{child.pid}\n"
        [warning] = warnings_of(child)
        assert warning["stale_pid"] == gone
        assert f"pid {gone} is not running" in warning["event"]
        stop_service(child)

    def test_unlocked_file_of_a_live_pid_is_replaced_with_a_warning(self, spawn: Spawner, pid_path: Path) -> None:
        """A PID file nobody holds the lock of is stale even if its pid now names a running process."""
        pid_path.write_text(f"{os.getpid()}\n")  # a reused pid: this test process, alive and not the service
        child = start_service(spawn, pid_path)
        assert pid_path.read_text() == f"{child.pid}\n"
        [warning] = warnings_of(child)
        assert warning["stale_pid"] == os.getpid()
        assert f"pid {os.getpid()} does not hold its lock" in warning["event"]
        stop_service(child)


class TestAtExit:
    def test_file_is_removed_at_exit_after_sigterm(self, spawn: Spawner, pid_path: Path) -> None:
        """After a SIGTERM the service exits with code 0 and its PID file is gone."""
        child = start_service(spawn, pid_path)
        stop_service(child)
        assert not pid_path.exists()
        assert any(event["event"] == f"PID file {pid_path} removed" for event in child.events())

    def test_file_naming_another_pid_is_left_at_exit(self, spawn: Spawner, pid_path: Path) -> None:
        """A PID file rewritten with another pid while the service ran is left in place at exit, with a warning."""
        child = start_service(spawn, pid_path)
        pid_path.write_text("1\n")
        stop_service(child)
        assert pid_path.read_text() == "1\n"
        [warning] = warnings_of(child)
        assert warning["found"] == 1

    def test_lock_is_released_at_exit(self, spawn: Spawner, pid_path: Path) -> None:
        """A file left at exit (it names another pid) is no longer locked once the service has ended."""
        child = start_service(spawn, pid_path)
        pid_path.write_text("1\n")
        stop_service(child)
        with open(pid_path) as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


class TestErrors:
    async def test_missing_folder_is_an_error_at_construction(self, tmp_path: Path) -> None:
        """A PID file in a folder that does not exist is refused by the constructor, naming the folder."""
        missing = tmp_path / "missing"
        async with Bus() as bus:
            with pytest.raises(FileNotFoundError, match="does not exist") as info:
                PIDFile(bus, missing / "service.pid")
        assert info.value.filename == str(missing)

    async def test_folder_as_path_is_an_error_at_construction(self, tmp_path: Path) -> None:
        """A path that is a folder is refused by the constructor."""
        async with Bus() as bus:
            with pytest.raises(IsADirectoryError):
                PIDFile(bus, tmp_path)

    async def test_symbolic_link_is_not_followed(self, pid_path: Path) -> None:
        """A symbolic link at the PID file's path fails the start, and its target is not written."""
        target = anyio.Path(pid_path.parent / "target")
        await target.write_text("precious\n")
        await anyio.Path(pid_path).symlink_to(target)
        async with Bus() as bus:
            PIDFile(bus, pid_path).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, PermissionError)
        assert "symbolic link" in str(error)
        assert await target.read_text() == "precious\n"
        assert await anyio.Path(pid_path).is_symlink()

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
    async def test_file_of_another_user_is_refused(self, pid_path: Path) -> None:
        """An existing PID file owned by another user (not root) fails the start and is left alone."""
        path = anyio.Path(pid_path)
        await path.write_text("12345\n")
        os.chown(pid_path, 65534, 65534)
        async with Bus() as bus:
            PIDFile(bus, pid_path).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, PermissionError)
        assert "belongs to uid 65534" in str(error)
        assert await path.read_text() == "12345\n"


class TestInProcess:
    async def test_locked_error_carries_the_pid(self, pid_path: Path) -> None:
        """A second PIDFile on a held file fails with PIDFileLockedError whose pid is the holder's."""
        async with Bus() as first_bus:
            PIDFile(first_bus, pid_path).subscribe()
            await first_bus.start()
            async with Bus() as second_bus:
                PIDFile(second_bus, pid_path).subscribe()
                with pytest.raises(ChannelFailures) as info:
                    await second_bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, PIDFileLockedError)
        assert error.pid == os.getpid()
        assert isinstance(error, FileExistsError)
        assert not await anyio.Path(pid_path).exists()

    async def test_start_listener_has_priority_70(self, pid_path: Path) -> None:
        """The plugin's start listener runs after one at 69.9 and before one at 70.1."""
        async with Bus() as bus:
            before, after = (lambda: None), (lambda: None)
            bus.subscribe("start", after, priority=70.1)
            plugin = PIDFile(bus, pid_path)
            plugin.subscribe()
            bus.subscribe("start", before, priority=69.9)
            assert bus.listeners["start"] == (before, plugin.start, after)

    @pytest.mark.parametrize(("mode", "who"), [(0o777, "everyone"), (0o1777, "everyone"), (0o770, "its group")])
    async def test_folder_others_may_write_to_is_warned_about_at_construction(
        self, pid_path: Path, mode: int, who: str
    ) -> None:
        """A PID file in a folder others may write to, sticky like /tmp or not, warns when the plugin is made."""
        os.chmod(pid_path.parent, mode)
        async with Bus() as bus:
            with pytest.warns(PIDFileFolderWarning, match=f"is writable by {who}: another user can create") as caught:
                PIDFile(bus, pid_path)
        [warning] = caught
        assert warning.filename == __file__  # it points at the caller

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a file to another user")
    def test_file_another_user_made_first_in_a_sticky_folder_blocks_the_start(
        self, spawn: Spawner, pid_path: Path
    ) -> None:
        """What the warning is about: a file of another user in a sticky folder open to all refuses the start."""
        os.chmod(pid_path.parent, 0o1777)
        pid_path.write_text("")
        os.chown(pid_path, 65534, 65534)  # as if nobody had made it
        child = spawn.script(SERVICE, str(pid_path))
        assert child.wait() == 70, child.output
        assert "PIDFileFolderWarning" in child.output
        assert "belongs to uid 65534" in child.output

    async def test_unsubscribed_plugin_writes_nothing(self, pid_path: Path) -> None:
        """After unsubscribe(), a start writes no PID file."""
        async with Bus() as bus:
            plugin = PIDFile(bus, pid_path)
            plugin.subscribe()
            plugin.unsubscribe()
            await bus.start()
            assert not await anyio.Path(pid_path).exists()

    async def test_relative_path_is_made_absolute(self, pid_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative path is resolved at construction, so a later chdir does not move the file."""
        monkeypatch.chdir(pid_path.parent)
        async with Bus() as bus:
            plugin = PIDFile(bus, "service.pid")
            plugin.subscribe()
            monkeypatch.chdir(pid_path.parent.parent)
            await bus.start()
            assert await anyio.Path(pid_path).read_text() == f"{os.getpid()}\n"
            assert plugin.pid == os.getpid()
        assert not await anyio.Path(pid_path).exists()


class TestFileEdgeCases:
    """The same plugin driven in the test's own process: the file's edge cases."""

    @pytest.mark.parametrize("content", ["", "not a pid\n", "0\n", "-5\n"])
    async def test_file_naming_no_pid_is_replaced_with_a_warning(self, tmp_path: Path, content: str) -> None:
        """A PID file that names no pid is replaced by ours, with a warning saying so."""
        path = tmp_path / "service.pid"
        path.write_text(content)
        recorder = LogRecorder()
        async with Bus() as bus:
            bus.subscribe("log", recorder)
            PIDFile(bus, path).subscribe()
            await bus.start()
            assert path.read_text() == f"{os.getpid()}\n"
        assert recorder.matching("which named no pid")
        assert not path.exists()

    async def test_file_removed_while_running_is_reported_at_exit(self, tmp_path: Path) -> None:
        """If someone removed the PID file meanwhile, exit says so and goes on."""
        path = tmp_path / "service.pid"
        recorder = LogRecorder()
        async with Bus() as bus:
            bus.subscribe("log", recorder)
            PIDFile(bus, path).subscribe()
            await bus.start()
            path.unlink()
        assert recorder.matching("could not be read at exit")
        assert bus.exit_code == 0

    async def test_started_again_after_a_stop_keeps_the_same_file(self, tmp_path: Path) -> None:
        """stop then start keeps holding the file written at the first start."""
        path = tmp_path / "service.pid"
        async with Bus() as bus:
            plugin = PIDFile(bus, path)
            plugin.subscribe()
            await bus.start()
            await bus.stop()
            await bus.start()
            assert plugin.pid == os.getpid()
            assert path.read_text() == f"{os.getpid()}\n"
        assert plugin.pid is None
        assert not path.exists()


# argv: the PID file. Written as root (70), then the process becomes nobody (77).
THEN_DROP = """
import sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins.pidfile import PIDFile
from aiobus.plugins.privileges import DropPrivileges

async def main() -> int:
    async with Bus() as bus:
        PIDFile(bus, sys.argv[1]).subscribe()
        DropPrivileges(bus, uid="nobody").subscribe()
        await bus.start()
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""

# argv: the PID file. Written as root with privileged_removal (70), then the process becomes nobody
# (77) and waits for SIGTERM.
DROP_AND_WAIT = """
import signal, sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins.pidfile import PIDFile
from aiobus.plugins.privileges import DropPrivileges

async def main() -> int:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with Bus() as bus:
            PIDFile(bus, sys.argv[1], privileged_removal=True).subscribe()
            DropPrivileges(bus, uid="nobody").subscribe()
            await bus.start()
            print("outcome: started")
            async for _ in signals:
                break
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""

needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/proc/1"), reason="needs root (to become nobody) and a pid 1"
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder (owned by root, mode 0755) that nobody may read but not write: tmp_path is private to root."""
    folder = Path(tempfile.mkdtemp(prefix="aiobus-test-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


class TestUnusualFiles:
    async def test_folder_that_is_a_file_is_an_error_at_construction(self, tmp_path: Path) -> None:
        """A PID file whose folder is a regular file is refused by the constructor, naming that file."""
        plain = tmp_path / "plain"
        plain.write_text("not a folder\n")
        async with Bus() as bus:
            with pytest.raises(NotADirectoryError, match="is not a folder") as info:
                PIDFile(bus, plain / "service.pid")
        assert info.value.filename == str(plain)

    async def test_fifo_at_the_path_fails_the_start_and_is_left(self, pid_path: Path) -> None:
        """A named pipe where the PID file should be fails the start (not a regular file) and is left in place."""
        os.mkfifo(pid_path)
        async with Bus() as bus:
            plugin = PIDFile(bus, pid_path)
            plugin.subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, PermissionError)
        assert "not a regular file" in str(error)
        assert stat.S_ISFIFO(os.lstat(pid_path).st_mode)
        assert plugin.pid is None
        assert os.listdir(pid_path.parent) == [pid_path.name]

    async def test_socket_at_the_path_fails_the_start_with_the_os_error(self, tmp_path: Path) -> None:
        """A Unix socket at the path cannot be opened: the start fails with that OS error, the socket is left."""
        path = tmp_path / "service.pid"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            async with Bus() as bus:
                PIDFile(bus, path).subscribe()
                with pytest.raises(ChannelFailures) as info:
                    await bus.start()
                assert bus.exit_code == 70
        [error] = info.value.exceptions
        assert isinstance(error, OSError) and error.errno == errno.ENXIO
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert sorted(os.listdir(tmp_path)) == ["service.pid"]


@needs_root_and_nobody
class TestAsAnotherUser:
    def test_file_that_cannot_be_removed_at_exit_is_warned_about(self, spawn: Spawner, shared_folder: Path) -> None:
        """Written as root, then run as nobody in a folder nobody may not write: exit warns and leaves the file."""
        pid_path = shared_folder / "service.pid"
        child = spawn.script(THEN_DROP, str(pid_path))
        assert child.wait(timeout=60) == 0, child.output
        [warning] = warnings_of(child)
        assert warning["event"] == f"PID file {pid_path} could not be removed (Permission denied)"
        assert warning["path"] == str(pid_path)
        assert pid_path.read_text() == f"{child.pid}\n"
        assert not any("removed" in event["event"] and event["level"] == "info" for event in child.events())
        with open(pid_path) as file:  # the lock went with the process
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_privileged_removal_removes_the_file_after_the_drop(self, spawn: Spawner, shared_folder: Path) -> None:
        """With privileged_removal, a helper that stayed root removes the file once the service, now nobody, exits."""
        pid_path = shared_folder / "service.pid"
        child = spawn.script(DROP_AND_WAIT, str(pid_path))
        child.wait_for("outcome: started", timeout=60)
        assert pid_path.read_text() == f"{child.pid}\n"
        child.send(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, child.output
        assert not warnings_of(child)
        assert f"PID file {pid_path} removed" in child.output
        assert os.listdir(shared_folder) == []
        child.assert_nothing_left()  # the helper too

    def test_privileged_removal_removes_the_file_of_a_killed_service(self, spawn: Spawner, shared_folder: Path) -> None:
        """The helper removes the file when the service dies by SIGKILL, without an exit of its own."""
        pid_path = shared_folder / "service.pid"
        child = spawn.script(DROP_AND_WAIT, str(pid_path))
        child.wait_for("outcome: started", timeout=60)
        child.send(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        child.assert_nothing_left()  # the helper ends once it has removed the file
        assert os.listdir(shared_folder) == []

    def test_privileged_removal_leaves_a_file_that_another_process_took_over(
        self, spawn: Spawner, shared_folder: Path
    ) -> None:
        """A file replaced since (it names another pid now) is not the helper's to remove."""
        pid_path = shared_folder / "service.pid"
        child = spawn.script(DROP_AND_WAIT, str(pid_path))
        child.wait_for("outcome: started", timeout=60)
        os.unlink(pid_path)
        pid_path.write_text("1\n")
        child.send(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, child.output
        child.assert_nothing_left()
        assert pid_path.read_text() == "1\n"
