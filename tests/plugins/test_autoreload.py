"""Autoreloader: a change to a source file restarts (re-executes) the process."""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from processes import Child, Spawner

import aiobus.plugins.autoreload
from aiobus import Bus, State
from aiobus.plugins import Autoreloader

WAIT = 30  # seconds: a generous bound on waits that normally take a second or two


class Logs:
    """A ``log`` listener that keeps each message with the time it came, and can wait for one."""

    def __init__(self) -> None:
        self.records: list[tuple[float, str, dict[str, Any]]] = []
        self._new = anyio.Event()

    def __call__(self, msg: str, level: int, **fields: Any) -> None:
        self.records.append((time.monotonic(), msg, fields))
        self._new.set()
        self._new = anyio.Event()

    def matching(self, prefix: str) -> list[tuple[float, str, dict[str, Any]]]:
        return [record for record in self.records if record[1].startswith(prefix)]

    async def wait_for(self, prefix: str, count: int = 1) -> None:
        with anyio.fail_after(WAIT):
            while True:
                new = self._new
                if len(self.matching(prefix)) >= count:
                    return
                await new.wait()


def changed_files(logs: Logs) -> list[str]:
    """The files of the single "files changed; restarting" line."""
    [(_, _, fields)] = logs.matching("Autoreloader: ")
    files: list[str] = fields["files"]
    return files


async def started_reloader(bus: Bus, logs: Logs, *paths: Path, debounce: float = 0.1) -> Autoreloader:
    bus.subscribe("log", logs)
    reloader = Autoreloader(bus, paths, debounce=debounce)
    reloader.subscribe()
    await bus.start()
    await logs.wait_for("Autoreloader watching")
    return reloader


class TestConstruction:
    def test_missing_watchfiles_is_an_import_error_naming_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without watchfiles, construction fails with an ImportError that says what to install."""
        monkeypatch.setitem(sys.modules, "watchfiles", None)
        with pytest.raises(ImportError, match=r"pip install aiobus\[reload\]"):
            Autoreloader(Bus())

    @pytest.mark.parametrize("debounce", [-1, math.nan, math.inf, "1", None, True])
    def test_bad_debounce_is_a_value_error_naming_it(self, debounce: object) -> None:
        """A debounce that is not a finite number >= 0 is refused, and the message names it."""
        with pytest.raises(ValueError, match="debounce") as info:
            Autoreloader(Bus(), debounce=debounce)  # type: ignore[arg-type]
        assert repr(debounce) in str(info.value)

    def test_missing_path_is_file_not_found(self, tmp_path: Path) -> None:
        """A path to watch that does not exist is refused at construction."""
        with pytest.raises(FileNotFoundError, match="no such file"):
            Autoreloader(Bus(), [tmp_path / "absent.toml"])

    def test_a_single_path_instead_of_a_list_is_a_type_error(self, tmp_path: Path) -> None:
        """A str given as paths (which would iterate over its characters) is refused."""
        with pytest.raises(TypeError, match="iterable"):
            Autoreloader(Bus(), str(tmp_path))


class TestFiles:
    def test_imported_modules_and_extra_files_are_watched(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """files() holds the file of a module imported from anywhere, and each extra file."""
        source = tmp_path / "my_module.py"
        source.write_text("X = 1\n")
        spec = importlib.util.spec_from_file_location("my_module_for_reload", source)
        assert spec is not None
        monkeypatch.setitem(sys.modules, "my_module_for_reload", importlib.util.module_from_spec(spec))
        config = tmp_path / "config.toml"
        config.write_text("")
        files = Autoreloader(Bus(), [config]).files()
        assert str(source) in files
        assert str(config) in files
        installed = "site-packages" in aiobus.plugins.autoreload.__file__
        # site-packages is skipped by default; a package installed in editable mode is watched
        assert (aiobus.plugins.autoreload.__file__ in files) is not installed
        if installed:
            assert aiobus.plugins.autoreload.__file__ in Autoreloader(Bus(), include_site_packages=True).files()

    def test_standard_library_and_site_packages_are_skipped(self) -> None:
        """The standard library is never watched, site-packages only with include_site_packages."""
        assert json.__file__ not in Autoreloader(Bus()).files()
        assert pytest.__file__ not in Autoreloader(Bus()).files()
        with_site = Autoreloader(Bus(), include_site_packages=True).files()
        assert pytest.__file__ in with_site
        assert json.__file__ not in with_site


class TestWatching:
    async def test_a_change_to_a_watched_file_restarts_the_bus(self, tmp_path: Path) -> None:
        """Writing a watched file logs it and restarts: the bus exits (block() would re-execute)."""
        config = tmp_path / "config.toml"
        config.write_text("port = 1\n")
        logs = Logs()
        async with Bus() as bus:
            await started_reloader(bus, logs, config)
            config.write_text("port = 2\n")
            await bus.wait(State.EXITING, timeout=WAIT)
        assert changed_files(logs) == [str(config)]

    async def test_a_file_below_a_watched_directory_restarts_but_pycache_does_not_count(self, tmp_path: Path) -> None:
        """A directory in paths is watched recursively; __pycache__ below it is ignored."""
        templates = tmp_path / "templates"
        (templates / "pages" / "__pycache__").mkdir(parents=True)
        logs = Logs()
        async with Bus() as bus:
            await started_reloader(bus, logs, templates)
            (templates / "pages" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"compiled")
            (templates / "pages" / "index.html").write_text("<p>hello</p>")
            await bus.wait(State.EXITING, timeout=WAIT)
        assert changed_files(logs) == [str(templates / "pages" / "index.html")]

    async def test_a_module_imported_after_start_is_watched(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A module imported from a new directory while watching is picked up, and its change restarts."""
        late = tmp_path / "late"
        late.mkdir()
        source = late / "late_module.py"
        source.write_text("X = 1\n")
        logs = Logs()
        async with Bus() as bus:
            await started_reloader(bus, logs)
            spec = importlib.util.spec_from_file_location("late_module_for_reload", source)
            assert spec is not None
            monkeypatch.setitem(sys.modules, "late_module_for_reload", importlib.util.module_from_spec(spec))
            await logs.wait_for("Autoreloader watching anew")
            source.write_text("X = 22\n")
            await bus.wait(State.EXITING, timeout=WAIT)
        assert changed_files(logs) == [str(source)]

    async def test_restart_waits_for_debounce_seconds_without_change(self, tmp_path: Path) -> None:
        """Writes in quick succession give one restart, debounce seconds after the last of them."""
        config = tmp_path / "config.toml"
        config.write_text("")
        logs = Logs()
        async with Bus() as bus:
            await started_reloader(bus, logs, config, debounce=1.0)
            for n in range(5):
                config.write_text(f"n = {n}\n")
                await anyio.sleep(0.1)
            last_write = time.monotonic() - 0.1
            await bus.wait(State.EXITING, timeout=WAIT)
        [(restart_time, _, fields)] = logs.matching("Autoreloader: ")
        assert fields["files"] == [str(config)]
        assert restart_time - last_write >= 1.0

    async def test_stop_returns_and_start_watches_again(self, tmp_path: Path) -> None:
        """stop ends the watch, and a new start watches again."""
        config = tmp_path / "config.toml"
        config.write_text("")
        logs = Logs()
        async with Bus(stop_timeout=WAIT) as bus:  # a stop is shielded: only its own deadline bounds it
            await started_reloader(bus, logs, config)
            await bus.stop()
            assert bus.exit_code == 0  # 70 had the stop been cut off at its deadline
            await bus.start()
            await logs.wait_for("Autoreloader watching", count=2)
            config.write_text("again\n")
            await bus.wait(State.EXITING, timeout=WAIT)
        assert changed_files(logs) == [str(config)]


SERVICE = textwrap.dedent(
    """
    import os, signal, sys

    import anyio

    from aiobus import Bus, configure_logging
    from aiobus.plugins import Autoreloader
    IMPORT_HELPER


    async def main() -> int:
        configure_logging(format="json")
        incarnation = int(os.environ["AR_TEST_INCARNATION"]) + 1
        os.environ["AR_TEST_INCARNATION"] = str(incarnation)  # the re-exec'd process inherits it
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with Bus() as bus:

                def mark(msg: str, level: int, **fields: object) -> None:
                    if msg == "Autoreloader watching":
                        sys.stdout.write(f"watching in incarnation {incarnation}\\n")
                        sys.stdout.flush()

                async def exit_on_sigterm() -> None:
                    async for _ in signals:
                        await bus.exit()

                bus.subscribe("log", mark)
                bus.start_soon(exit_on_sigterm)
                Autoreloader(bus, debounce=float(os.environ["AR_TEST_DEBOUNCE"])).subscribe()
                bus.log(
                    "ready",
                    incarnation=incarnation,
                    pid=os.getpid(),
                    argv=sys.argv,
                    orig_argv=sys.orig_argv,
                    value=helper.VALUE,
                )
                await bus.start()
                await bus.block()
        return bus.exit_code


    raise SystemExit(anyio.run(main))
    """
)


def environment(debounce: float = 0.2) -> dict[str, str]:
    return {"AR_TEST_INCARNATION": "0", "AR_TEST_DEBOUNCE": str(debounce)}


def script_service(spawn: Spawner, tmp_path: Path, debounce: float = 0.2) -> tuple[Child, Path]:
    helper = tmp_path / "helper.py"
    helper.write_text("VALUE = 1\n")
    code = SERVICE.replace("IMPORT_HELPER", "import helper")
    return spawn.script(code, "--port", "8080", env=environment(debounce)), helper


def stop_and_check(child: Child) -> list[dict[str, Any]]:
    """SIGTERM the child (it handles it), check it ends cleanly, and return its "ready" lines."""
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.output
    child.assert_nothing_left()
    events = child.events()
    assert [event["event"] for event in events].count("Bus STARTED") == 2, child.output
    return [event for event in events if event["event"] == "ready"]


@pytest.mark.skipif(sys.platform != "linux", reason="watches with inotify and re-executes in place")
class TestInAService:
    def test_script_service_reexecs_on_a_module_change(self, spawn: Spawner, tmp_path: Path) -> None:
        """Changing a module a script imports re-executes it: same pid, same arguments, the new code."""
        child, helper = script_service(spawn, tmp_path)
        child.wait_for("watching in incarnation 1")
        helper.write_text("VALUE = 22\n")
        child.wait_for("watching in incarnation 2")
        first, second = stop_and_check(child)
        assert (first["incarnation"], second["incarnation"]) == (1, 2)
        assert first["pid"] == second["pid"] == child.pid
        assert first["argv"] == second["argv"] == [str(tmp_path / "service.py"), "--port", "8080"]
        assert (first["value"], second["value"]) == (1, 22)
        [restart] = [event for event in child.events() if event["event"].startswith("Autoreloader: ")]
        assert restart["files"] == [str(helper)]

    def test_package_run_with_dash_m_reexecs_as_dash_m(self, spawn: Spawner, tmp_path: Path) -> None:
        """A ``python -m pkg`` service comes back as ``python -m pkg`` with its arguments."""
        package = tmp_path / "svcpkg"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "helper.py").write_text("VALUE = 1\n")
        (package / "__main__.py").write_text(SERVICE.replace("IMPORT_HELPER", "from svcpkg import helper"))
        child = spawn.run([sys.executable, "-m", "svcpkg", "x"], env=environment())
        child.wait_for("watching in incarnation 1")
        (package / "helper.py").write_text("VALUE = 22\n")
        child.wait_for("watching in incarnation 2")
        first, second = stop_and_check(child)
        assert first["pid"] == second["pid"] == child.pid
        assert first["orig_argv"] == second["orig_argv"] == [sys.executable, "-m", "svcpkg", "x"]
        assert first["argv"] == second["argv"] == [str(package / "__main__.py"), "x"]
        assert (first["value"], second["value"]) == (1, 22)

    def test_writes_in_quick_succession_restart_once(self, spawn: Spawner, tmp_path: Path) -> None:
        """Seven writes over two seconds, within the debounce of each other, give a single restart."""
        child, helper = script_service(spawn, tmp_path, debounce=3.0)
        child.wait_for("watching in incarnation 1")
        for n in range(7):
            helper.write_text(f"VALUE = {10**n}\n")  # a new size each time: no stale .pyc
            time.sleep(0.3)  # paces the writes like an editor saving in steps
        child.wait_for("watching in incarnation 2")
        _, second = stop_and_check(child)
        assert second["value"] == 10**6
        restarts = [event for event in child.events() if event["event"].startswith("Autoreloader: ")]
        assert len(restarts) == 1
