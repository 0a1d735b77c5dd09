"""The adapter to anyio's process pool: each child broker runs in a worker of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.to_process
import child_functions
import pytest
from processes import Spawner, alive

from aiobus import Bus, ChildBroker, end_idle_workers
from aiobus._children.child import run_child
from aiobus._children.messages import ChildSpec, Sockets

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc (Linux)")


class TestOwnWorker:
    async def test_a_child_never_takes_a_worker_from_anyios_pool(self) -> None:
        """With a worker idle in anyio's pool, the child runs elsewhere and the pool's worker is untouched."""
        pooled = await anyio.to_process.run_sync(os.getpid)
        async with Bus() as bus:
            broker = ChildBroker(bus, "reporter", child_functions.report_pid)
            broker.subscribe()
            await bus.start()
            message, pid = await broker.receive()
            assert message == "pid" and pid != pooled
            assert await anyio.to_process.run_sync(os.getpid) == pooled  # still there, still idle-able
        assert alive([pooled]) == [pooled]
        assert not alive([pid])
        assert await end_idle_workers() == 1
        assert not alive([pooled])

    async def test_the_child_refuses_to_run_in_a_worker_not_started_for_it(self) -> None:
        """run_child handed to a pool worker raises at once, and that worker lives on."""
        spec = ChildSpec(child_functions.echo, "lost", os.getpid(), 1, 0.1, {}, Sockets(-1, -1, -1, -1))
        with pytest.raises(RuntimeError, match="must run in worker 1"):
            await anyio.to_process.run_sync(run_child, spec)
        pooled = await anyio.to_process.run_sync(os.getpid)
        assert alive([pooled]) == [pooled]
        assert await end_idle_workers() == 1


class TestEndIdleWorkers:
    async def test_without_a_pool_nothing_is_ended(self) -> None:
        """In a loop that never used to_process there is nothing to end."""
        assert await end_idle_workers() == 0

    async def test_idle_workers_are_killed_and_reaped(self) -> None:
        """Two idle workers are ended; the next to_process call starts a new one."""
        async with anyio.create_task_group() as group:
            pids: list[int] = []

            async def one() -> None:
                pids.append(await anyio.to_process.run_sync(os.getpid))

            group.start_soon(one)
            group.start_soon(one)
        assert await end_idle_workers() == 2
        assert not alive(pids)
        fresh = await anyio.to_process.run_sync(os.getpid)
        assert fresh not in pids
        assert await end_idle_workers() == 1


class TestEnvironment:
    async def test_systemd_variables_do_not_reach_a_child_broker(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A child's worker inherits the parent's environment but for NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        monkeypatch.setenv("OTHER", "kept")
        async with Bus() as bus:
            child = ChildBroker(bus, "env", child_functions.report_environment)
            child.subscribe()
            await bus.start()
            with anyio.fail_after(30):
                seen = await child.receive()
        assert seen == {"NOTIFY_SOCKET": None, "WATCHDOG_USEC": None, "WATCHDOG_PID": None, "OTHER": "kept"}


# A script that starts its service when imported: no `if __name__ == "__main__":` guard.
UNGUARDED = """
import anyio
from aiobus import Bus, ChannelFailures, ChildBroker, ParentLink, configure_logging


async def broker(bus: Bus, link: ParentLink) -> None:
    async for _ in link:
        pass


async def main() -> int:
    async with Bus() as bus:
        ChildBroker(bus, "broker", broker).subscribe()
        try:
            await bus.start()
        except ChannelFailures as failures:
            print("start failed:", failures.exceptions[0])
    return bus.exit_code


configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


class TestMainGuard:
    def test_a_script_without_the_main_guard_fails_the_start_naming_it(self, spawn: Spawner) -> None:
        """The child's worker imports the unguarded script, which would run the service again: the start fails
        naming the missing guard, and nothing is left running."""
        child = spawn.script(UNGUARDED, name="unguarded.py")
        assert child.wait(60) == 70, child.output
        failed = child.wait_for("start failed:")
        assert f"the main module {spawn.directory / 'unguarded.py'} starts its service when it is imported" in failed
        assert 'needs the `if __name__ == "__main__":` guard' in failed
        assert child.output.count('"Bus STARTING"') == 1  # the worker built no bus of its own past the check
        child.assert_nothing_left()
        assert_none_left_in(spawn.directory)  # the worker left the script's session: found by its directory


def assert_none_left_in(directory: Path, timeout: float = 10) -> None:
    """Fail unless every process whose working directory is ``directory`` has ended within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == str(directory):
                    left.append(int(entry))
            except OSError:
                continue
        if not alive(left):
            return
        assert time.monotonic() < deadline, f"processes left behind: {alive(left)}"
        time.sleep(0.05)


class TestLightWorker:
    async def test_a_worker_loads_no_console_renderer_library_yet_its_code_may(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With rich importable, a worker's structlog does not load it, and the child's own ``import rich`` works."""
        (tmp_path / "rich").mkdir()
        (tmp_path / "rich" / "__init__.py").write_text("")
        (tmp_path / "rich" / "console.py").write_text("class Console: ...\n")
        (tmp_path / "rich" / "traceback.py").write_text("class Traceback: ...\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))  # the worker's path at boot
        monkeypatch.syspath_prepend(str(tmp_path))  # its path once it runs (anyio gives it the parent's)
        async with Bus() as bus:
            broker = ChildBroker(bus, "console", child_functions.report_console_modules)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(60):
                loaded, taken, where = await broker.receive()
        assert (False, False, str(tmp_path / "rich" / "__init__.py")) == (loaded, taken, where)

    async def test_a_worker_s_end_runs_atexit_handlers_and_waits_for_its_threads(self, tmp_path: Path) -> None:
        """A worker ends without the interpreter's teardown, yet its atexit handlers run and a thread not
        marked daemon finishes first, as at any interpreter's exit."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "ender", child_functions.leaves_work_for_its_end)
            broker.subscribe()
            await bus.start()
            await broker.send(str(tmp_path))
            with anyio.fail_after(60):
                assert "armed" == await broker.receive()
            pid = broker.pid
        assert pid is not None and not alive([pid])
        assert ("ran", "ran") == ((tmp_path / "atexit").read_text(), (tmp_path / "thread").read_text())

    def test_importing_aiobus_loads_none_of_its_layers(self) -> None:
        """``import aiobus`` loads neither anyio nor structlog nor a module of the package; a name does, when used."""
        code = (
            "import sys, aiobus; layers = ('aiobus._b', 'aiobus._c', 'anyio', 'structlog');"
            "before = sorted(m for m in sys.modules if m.startswith(layers));"
            "aiobus.Bus; print(before, 'aiobus._bus' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert "[] True" == done.stdout.strip()
