"""Subprocess: real external programs supervised along with the bus, and nothing of them left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LogRecord, LogRecorder, free_port
from processes import Spawner, alive

import aiobus.plugins.subprocess
from aiobus import Bus, ChannelFailures, State, log_to_structlog
from aiobus._logging import render_line
from aiobus._supervision import ChildExit, ChildState, Supervisor, default_supervisor
from aiobus.plugins.subprocess import LineReady, PortReady, Subprocess

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups, /proc and a subreaper (Linux)")

WAIT = 20  # seconds: a generous bound on waits that normally take a fraction of a second

SLEEPER = "import os, sys, time\nprint(f'pid {os.getpid()}', flush=True)\nwhile True:\n    time.sleep(3600)\n"

# The program ignores SIGTERM and starts two grandchildren that ignore it too; one of them
# leaves the process group (setsid), so only the launcher's subreaper can find it. They share
# the output pipes: each line is one write, so that lines do not interleave.
FAMILY = """
import os, signal, subprocess, sys, time
def say(text):
    os.write(1, (text + "\\n").encode())
signal.signal(signal.SIGTERM, lambda *_: say(f"{os.getpid()} ignores SIGTERM"))
GRANDCHILD = r'''
import os, signal, sys, time
if sys.argv[1] == "escape":
    os.setsid()
def say(text):
    os.write(1, (text + "\\n").encode())
signal.signal(signal.SIGTERM, lambda *_: say(f"{os.getpid()} ignores SIGTERM"))
say(f"grandchild {os.getpid()} {sys.argv[1]}s")
while True:
    time.sleep(3600)
'''
for how in ("stay", "escape"):
    subprocess.Popen([sys.executable, "-c", GRANDCHILD, how, sys.argv[1]])
say(f"family {os.getpid()} ready")
while True:
    time.sleep(3600)
"""


def marked(marker: str) -> list[int]:
    """Running processes whose command line contains ``marker``."""
    result = subprocess.run(["pgrep", "-f", re.escape(marker)], capture_output=True, text=True)
    return alive([int(pid) for pid in result.stdout.split()])


def wait_gone(marker: str, pids: list[int] = []) -> None:  # noqa: B006 - never mutated
    deadline = time.monotonic() + WAIT
    while (marked(marker) or alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not marked(marker), f"left running: {marked(marker)}"
    assert not alive(pids), f"left running: {alive(pids)}"


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """A directory whose path marks every program of the test; none may be left running at its end."""
    yield tmp_path
    left = marked(str(tmp_path))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left processes running: {left}"


def script(where: Path, name: str, code: str) -> list[str]:
    path = where / f"{name}.py"
    path.write_text(code)
    return [sys.executable, str(path), str(where)]


def lines(records: list[LogRecord], program: str, stream: str | None = None) -> list[str]:
    """What ``program`` wrote (on ``stream``, if given), not the supervisor's lines about it."""
    return [
        r.msg
        for r in records
        if r.fields.get("child") == program
        and r.fields.get("stream") in ((stream,) if stream else ("stdout", "stderr"))
    ]


async def logged(bus: Bus, recorder: LogRecorder, text: str, count: int) -> None:
    """Wait until ``count`` messages containing ``text`` have been logged."""
    enough = anyio.Event()

    def check(msg: str, level: int, **fields: Any) -> None:
        if len(recorder.matching(text)) >= count:
            enough.set()

    bus.subscribe("log", check, priority=1000)  # after the recorder
    try:
        check("", 0)
        with anyio.fail_after(WAIT):
            await enough.wait()
    finally:
        bus.unsubscribe("log", check)


class Exits:
    """A ``child_exit`` listener that keeps what it is sent."""

    def __init__(self) -> None:
        self.exits: list[ChildExit] = []
        self.changed = anyio.Event()

    def __call__(self, exit: ChildExit) -> None:
        self.exits.append(exit)
        self.changed.set()

    async def wait_for(self, count: int = 1) -> list[ChildExit]:
        """Wait until ``count`` exits have been published, and return them all."""
        with anyio.fail_after(WAIT):
            while len(self.exits) < count:
                self.changed = anyio.Event()
                await self.changed.wait()
        return self.exits


@asynccontextmanager
async def quiet_bus() -> AsyncIterator[tuple[Bus, LogRecorder, Exits]]:
    """A bus whose log goes to a recorder (not to structlog), and a recorder of child exits."""
    async with Bus() as bus:
        recorder, exits = LogRecorder(), Exits()
        bus.unsubscribe("log", log_to_structlog)
        bus.subscribe("log", recorder)
        bus.subscribe("child_exit", exits)
        yield bus, recorder, exits


class TestConstruction:
    def test_argv_as_one_string_is_a_type_error(self) -> None:
        """A command line given as a single string is refused: argv is a list."""
        with pytest.raises(TypeError, match="argv"):
            Subprocess(Bus(), "p", "sleep 1")

    def test_empty_argv_is_a_value_error(self) -> None:
        """An empty argv names no program."""
        with pytest.raises(ValueError, match="argv"):
            Subprocess(Bus(), "p", [])

    @pytest.mark.parametrize(
        ("option", "value"),
        [("kill_after", -1), ("kill_after", float("inf")), ("stop_timeout", -1), ("ready_timeout", 0), ("max_line", 0)],
    )
    def test_bad_numbers_are_value_errors_naming_them(self, option: str, value: Any) -> None:
        """Timeouts and the line limit out of range are refused, and the message names the option."""
        with pytest.raises(ValueError, match=option):
            Subprocess(Bus(), "p", ["true"], **{option: value})

    def test_unknown_stop_signal_is_a_value_error(self) -> None:
        """A stop signal that is no signal is refused."""
        with pytest.raises(ValueError, match="stop_signal"):
            Subprocess(Bus(), "p", ["true"], stop_signal=12345)

    def test_unknown_readiness_check_is_a_type_error(self) -> None:
        """ready takes a PortReady or a LineReady only."""
        with pytest.raises(TypeError, match="ready"):
            Subprocess(Bus(), "p", ["true"], ready=8080)  # type: ignore[arg-type]

    @pytest.mark.parametrize("port", [0, 65536, "80", True])
    def test_port_out_of_range_is_a_value_error(self, port: Any) -> None:
        """PortReady takes a TCP port from 1 to 65535."""
        with pytest.raises(ValueError, match="port"):
            PortReady(port)

    def test_invalid_pattern_is_a_value_error(self) -> None:
        """LineReady compiles its pattern at once and names it when it is invalid."""
        with pytest.raises(ValueError, match=re.escape("'(unclosed'")):
            LineReady("(unclosed")

    def test_subscribe_joins_the_default_supervisor_once(self) -> None:
        """subscribe() lists the program among the bus's children, once; unsubscribe() takes it out."""
        bus = Bus()
        program = Subprocess(bus, "p", ["true"])
        program.subscribe()
        program.subscribe()
        [info] = default_supervisor(bus).children()
        assert (info.name, info.kind, info.state, info.pid) == ("p", "program", ChildState.STOPPED, None)
        program.unsubscribe()
        assert default_supervisor(bus).children() == []


class TestOutput:
    async def test_chatty_program_is_read_whole_on_both_streams(self, where: Path) -> None:
        """Tens of thousands of lines on stdout and stderr all arrive in order, the last ones without a newline."""
        count = 20000
        code = (
            "import sys\n"
            f"for i in range({count}):\n"
            "    sys.stdout.write(f'out {i}\\n')\n"
            "    sys.stderr.write(f'err {i}\\n')\n"
            "sys.stdout.write('last out')\n"
            "sys.stderr.write('last err')\n"
        )
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "chatty", script(where, "chatty", code), restart="temporary").subscribe()
            await bus.start()
            [exit] = await exits.wait_for()
        assert exit.exit_code == 0
        assert lines(recorder.records, "chatty", "stdout") == [f"out {i}" for i in range(count)] + ["last out"]
        assert lines(recorder.records, "chatty", "stderr") == [f"err {i}" for i in range(count)] + ["last err"]
        assert {r.fields["child_pid"] for r in recorder.records if r.fields.get("child") == "chatty"} == {exit.pid}

    async def test_a_programs_lines_are_named_as_a_child_brokers(self, where: Path) -> None:
        """A program's line carries child=<name> and child_pid=<pid>, as a child broker's, and its console line
        shows the program's name in the name column."""
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "redis", script(where, "redis", "print('ready')\n"), restart="temporary").subscribe()
            await bus.start()
            [exit] = await exits.wait_for()
        [line] = [r for r in recorder.records if r.msg == "ready"]
        assert {"child": "redis", "child_pid": exit.pid, "stream": "stdout"} == line.fields
        [started] = recorder.matching("Child redis started")
        assert ("redis", exit.pid) == (started.fields["child"], started.fields["child_pid"])
        console = render_line(None, "info", {"event": "ready", **line.fields})
        assert f"[] Redis      INFO     ready  child_pid={exit.pid} stream=stdout" == console

    async def test_long_line_is_cut_with_a_marker(self, where: Path) -> None:
        """A line longer than max_line keeps its first max_line bytes and says how many were cut."""
        code = "import sys\nsys.stdout.write('x' * 200000 + '\\n' + 'after\\n')\n"
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "long", script(where, "long", code), restart="temporary", max_line=1000).subscribe()
            await bus.start()
            await exits.wait_for()
        assert lines(recorder.records, "long") == ["x" * 1000 + "… [cut: 199000 bytes]", "after"]

    async def test_invalid_utf8_is_replaced_and_reading_goes_on(self, where: Path) -> None:
        """Bytes that are not UTF-8 become replacement characters; the lines around them are intact."""
        code = (
            "import sys\nsys.stdout.buffer.write(b'bad \\xff\\xfe bytes\\n' + 'caf\\u00e9\\n'.encode() + b'end\\n')\n"
        )
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "bytes", script(where, "bytes", code), restart="temporary").subscribe()
            await bus.start()
            await exits.wait_for()
        assert lines(recorder.records, "bytes") == ["bad \ufffd\ufffd bytes", "café", "end"]


class TestReadiness:
    async def test_http_server_is_started_once_its_port_accepts(self, where: Path) -> None:
        """http.server behind a PortReady check answers a real HTTP request as soon as bus.start() returns."""
        port = free_port()
        (where / "hello.txt").write_text("hello from aiobus")
        argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(where)]
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "web", argv, ready=PortReady(port)).subscribe()
            await bus.start()
            url = f"http://127.0.0.1:{port}/hello.txt"
            body = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=WAIT).read())
            assert body == b"hello from aiobus"
            await recorder.wait_for("GET /hello.txt", WAIT)  # http.server logs each request on stderr
        assert [(e.name, e.expected) for e in exits.exits] == [("web", True)]

    async def test_next_program_starts_only_after_the_ready_line(self, where: Path) -> None:
        """With LineReady, the program after it in the group starts once the line was printed, not before."""
        first = (
            "import sys, time, pathlib\nprint('warming up', flush=True)\ntime.sleep(0.5)\n"
            "pathlib.Path(sys.argv[1], 'first.ready').touch()\nprint('READY to serve', flush=True)\n" + SLEEPER
        )
        second = "import sys, pathlib\nprint('first was ready:', pathlib.Path(sys.argv[1], 'first.ready').exists())\n"
        async with quiet_bus() as (bus, recorder, _):
            Subprocess(bus, "first", script(where, "first", first), ready=LineReady(r"^READY\b")).subscribe()
            Subprocess(bus, "second", script(where, "second", second + SLEEPER)).subscribe()
            await bus.start()
            await recorder.wait_for("first was ready:", WAIT)
        assert lines(recorder.records, "second")[0] == "first was ready: True"

    async def test_readiness_timeout_fails_the_start_and_kills_the_program(self, where: Path) -> None:
        """A check that does not pass in time makes bus.start() fail with a TimeoutError, and the program dies."""
        async with quiet_bus() as (bus, _, _):
            program = Subprocess(
                bus, "mute", script(where, "mute", SLEEPER), ready=LineReady("never printed"), ready_timeout=0.5
            )
            program.subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
            assert not marked(str(where))  # killed, and waited for, before start() raised
        [error] = info.value.exceptions
        assert isinstance(error, TimeoutError)
        assert "'mute' was not ready within 0.5 s" in str(error)

    async def test_program_ending_before_it_is_ready_fails_the_start(self, where: Path) -> None:
        """A program that exits before its check passes makes bus.start() fail, saying how it ended."""
        async with quiet_bus() as (bus, _, _):
            argv = [sys.executable, "-c", "raise SystemExit(5)", str(where)]
            Subprocess(bus, "quitter", argv, ready=LineReady("ready")).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, RuntimeError)
        assert "'quitter' exited with code 5" in str(error)
        assert "before it was ready" in str(error)


class TestStopping:
    async def test_stop_signal_reaches_the_group_then_sigkill_after_the_timeout(self, where: Path) -> None:
        """SIGTERM goes to the program's group; as they ignore it, SIGKILL follows kill_after later, to all."""
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(
                bus, "family", script(where, "family", FAMILY), kill_after=2.0, ready=LineReady("ready")
            ).subscribe()
            await bus.start()
            await logged(bus, recorder, "grandchild", 2)
            grandchildren = [int(r.msg.split()[1]) for r in recorder.matching("grandchild")]
            [program] = [int(line.split()[1]) for line in lines(recorder.records, "family") if "ready" in line]
            began = time.monotonic()
            await bus.stop()
            took = time.monotonic() - began
        ignored = {int(r.msg.split()[0]) for r in recorder.matching("ignores SIGTERM")}
        [stays] = [int(r.msg.split()[1]) for r in recorder.matching("grandchild") if r.msg.endswith("stays")]
        assert ignored == {program, stays}  # the one that left the group with setsid is killed only
        assert took >= 2.0
        [exit] = exits.exits
        assert (exit.pid, exit.signal, exit.expected) == (program, "SIGKILL", True)
        assert exit.reason == "killed with SIGKILL 2 s after SIGTERM (kill_after)"
        assert not alive([program, *grandchildren])

    async def test_leftovers_of_a_program_that_ended_are_stopped(self, where: Path) -> None:
        """When a program ends on its own, what it left running is stopped before its exit is reported."""
        code = (
            "import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)', sys.argv[1]])\n"
            "print(f'left {child.pid}', flush=True)\n"
        )
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "leaver", script(where, "leaver", code), restart="temporary").subscribe()
            await bus.start()
            [exit] = await exits.wait_for()
            [left] = [int(line.split()[1]) for line in lines(recorder.records, "leaver")]
            assert exit.exit_code == 0
            assert not alive([left])

    async def test_no_restart_while_a_stop_is_under_way(self, where: Path) -> None:
        """A program that crashes while the bus is stopping is not restarted (circus#529)."""
        crasher = (
            "import os, sys, time, pathlib\nwhere = pathlib.Path(sys.argv[1])\n"
            "with open(where / 'crasher.runs', 'a') as f: f.write('run\\n')\n"
            "print('up', flush=True)\n"
            "while not (where / 'crash-now').exists(): time.sleep(0.01)\n"
            "(where / 'crashed').touch()\nraise SystemExit(3)\n"
        )
        slow = (
            "import signal, sys, time, pathlib\nwhere = pathlib.Path(sys.argv[1])\n"
            "def stop(*_):\n"
            "    (where / 'crash-now').touch()\n"
            "    while not (where / 'crashed').exists(): time.sleep(0.01)\n"
            "    time.sleep(1)\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\nprint('up', flush=True)\n"
            "while True: time.sleep(3600)\n"
        )
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "crasher", script(where, "crasher", crasher), ready=LineReady("up")).subscribe()
            Subprocess(bus, "slow", script(where, "slow", slow), ready=LineReady("up")).subscribe()
            await bus.start()
            await bus.stop()
            assert bus.state is State.STOPPED
        assert (where / "crasher.runs").read_text() == "run\n"
        assert len(recorder.matching("Child crasher started")) == 1
        crash = next(e for e in exits.exits if e.name == "crasher")
        assert (crash.exit_code, crash.expected) == (3, False)


class TestBadInput:
    async def test_missing_command_fails_bus_start_with_a_clear_error(self, where: Path) -> None:
        """A command that does not exist makes bus.start() fail with FileNotFoundError naming it; all is logged."""
        async with quiet_bus() as (bus, recorder, exits):
            Subprocess(bus, "ghost", [str(where / "no-such-program")]).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
            assert bus.state is State.EXITING
            assert bus.exit_code == 70
        [error] = info.value.exceptions
        assert isinstance(error, FileNotFoundError)
        assert "'ghost'" in str(error) and "no-such-program" in str(error)
        [exit] = exits.exits
        assert exit.name == "ghost" and exit.reason.startswith("could not start")
        assert "No such file or directory" in exit.reason
        assert recorder.matching("Child ghost could not start")

    async def test_command_not_on_path_fails_with_file_not_found(self, where: Path) -> None:
        """A bare command name is looked up on PATH; not found there, the start fails clearly."""
        async with quiet_bus() as (bus, _, _):
            Subprocess(bus, "nope", ["aiobus-no-such-command", str(where)]).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, FileNotFoundError) and "aiobus-no-such-command" in str(error)

    async def test_file_that_is_not_executable_fails_with_permission_error(self, where: Path) -> None:
        """A file without execute permission makes bus.start() fail with PermissionError naming it."""
        path = where / "script.sh"
        path.write_text("#!/bin/sh\necho hello\n")
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        async with quiet_bus() as (bus, _, exits):
            Subprocess(bus, "noexec", [str(path)]).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        assert isinstance(error, PermissionError) and "script.sh" in str(error)
        assert "Permission denied" in exits.exits[0].reason

    async def test_program_exiting_at_once_is_published_with_its_reason(
        self, where: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A program that exits right after its start is reported as such, and its policy decides (here: none)."""
        # "At once" is within AT_ONCE of the start; a loaded machine may take longer than the
        # default second just to start the interpreter, so the test gives it a minute.
        monkeypatch.setattr(aiobus.plugins.subprocess, "AT_ONCE", 60.0)
        async with quiet_bus() as (bus, recorder, exits):
            argv = [sys.executable, "-c", "raise SystemExit(4)", str(where)]
            program = Subprocess(bus, "brief", argv, restart="temporary")
            program.subscribe()
            await bus.start()
            [exit] = await exits.wait_for()
            assert bus.state is State.STARTED
            assert program.state is ChildState.EXITED
        assert exit.exit_code == 4 and "at once" in exit.reason
        assert recorder.matching("Child brief ended: exited with code 4 at once")


SERVICE = """
import os, sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins.subprocess import LineReady, Subprocess

MODE, MARK = sys.argv[1], sys.argv[2]

async def main() -> int:
    async with Bus() as bus:
        if MODE == "crash":
            Subprocess(bus, "crasher", [sys.executable, "-c", "raise SystemExit(3)", MARK]).subscribe()
        else:
            sleep = "import time\\nprint('sleeper up', flush=True)\\nwhile True: time.sleep(3600)"
            Subprocess(bus, "sleeper", [sys.executable, "-c", sleep, MARK], ready=LineReady("up")).subscribe()
            Subprocess(bus, "family", [sys.executable, "-c", os.environ["FAMILY"], MARK]).subscribe()
        await bus.start()
        await bus.block()
    return bus.exit_code

if __name__ == "__main__":
    configure_logging(format="json")
    raise SystemExit(anyio.run(main))
"""


class TestSupervisingProcess:
    def test_program_crashing_at_once_exceeds_the_intensity_and_the_bus_exits_70(
        self, spawn: Spawner, where: Path
    ) -> None:
        """A permanent program that crashes at once is restarted with backoff until the intensity gives up: exit 70."""
        child = spawn.script(SERVICE, "crash", str(where / "mark"))
        assert child.wait(timeout=WAIT * 3) == 70, child.output
        events = child.events()
        ended = [e for e in events if e["event"].startswith("Child crasher ended")]
        assert len(ended) == 4 and all(e["exit_code"] == 3 and "at once" in e["reason"] for e in ended)
        [gave_up] = [e for e in events if e["event"].startswith("Restart intensity exceeded")]
        assert gave_up["level"] == "error" and "more than 3 restarts" in gave_up["reason"]
        wait_gone(str(where))

    def test_sigkill_of_the_supervising_process_leaves_nothing_behind(self, spawn: Spawner, where: Path) -> None:
        """SIGKILL of the supervisor ends its programs and their grandchildren, even one that left the group."""
        mark = str(where / "mark")
        child = spawn.script(SERVICE, "orphans", mark, env={"FAMILY": FAMILY})
        child.wait_for("sleeper up", timeout=WAIT)
        child.wait_for("grandchild", timeout=WAIT, count=2)
        child.wait_for("Bus STARTED", timeout=WAIT)
        pids = [e["child_pid"] for e in child.events() if "stream" in e]  # the programs' lines
        pids += [int(e["event"].split()[1]) for e in child.events() if e["event"].startswith("grandchild")]
        assert len(marked(mark)) >= 6  # two launchers, two programs, two grandchildren
        child.send(signal.SIGKILL)
        child.wait()
        wait_gone(mark, pids)


def test_a_program_runs_and_stops_on_trio(where: Path) -> None:
    """On trio too the output is logged and a stop ends the program with its stop signal."""

    async def cycle() -> tuple[list[str], list[ChildExit]]:
        async with quiet_bus() as (bus, recorder, exits):
            group = Supervisor(bus)
            group.subscribe()
            argv = [sys.executable, "-c", "print('hello from trio', flush=True)\n" + SLEEPER, str(where)]
            Subprocess(bus, "trio", argv, ready=LineReady("hello"), supervisor=group).subscribe()
            await bus.start()
        return lines(recorder.records, "trio"), exits.exits

    output, exits = anyio.run(cycle, backend="trio")
    assert output[0] == "hello from trio"
    [exit] = exits
    assert (exit.signal, exit.expected, exit.reason) == ("SIGTERM", True, "stopped with SIGTERM")


class TestReadinessArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"port": 0}, ValueError),
            ({"port": True}, ValueError),
            ({"port": 8080, "host": ""}, TypeError),
            ({"port": 8080, "interval": 0}, ValueError),
        ],
    )
    def test_bad_port_checks_are_refused(self, kwargs: dict[str, Any], error: type[Exception]) -> None:
        """PortReady needs a port from 1 to 65535, a host and a positive interval."""
        with pytest.raises(error, match="PortReady"):
            PortReady(**kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "match"), [({"pattern": "("}, "regular expression"), ({"pattern": "x", "stream": "stdin"}, "stream")]
    )
    def test_bad_line_checks_are_refused(self, kwargs: dict[str, Any], match: str) -> None:
        """LineReady needs a valid regular expression and stdout, stderr or None as its stream."""
        with pytest.raises(ValueError, match=match):
            LineReady(**kwargs)


class TestMisuse:
    def test_argument_items_environment_and_signal_of_the_wrong_kind_are_refused(self) -> None:
        """Bytes in argv, a NUL in an argument, a non-str environment value, a signal name: clear errors."""
        bus = Bus()
        with pytest.raises(TypeError, match="each argument in argv must be a str or a path, not b'true'"):
            Subprocess(bus, "p", [b"true"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="contains a NUL character"):
            Subprocess(bus, "p", ["echo", "a\0b"])
        with pytest.raises(TypeError, match="env must be a mapping of str to str"):
            Subprocess(bus, "p", ["true"], env={"PORT": 8080})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="stop_signal must be a signal number, not 'SIGTERM'"):
            Subprocess(bus, "p", ["true"], stop_signal="SIGTERM")  # type: ignore[arg-type]
        program = Subprocess(bus, "p", [Path("/bin/true"), "x"])
        assert program.argv == ["/bin/true", "x"]
        assert repr(program) == "<Subprocess 'p' ['/bin/true', 'x'] stopped>"

    def test_unsubscribing_a_program_not_in_the_group_changes_nothing(self) -> None:
        """unsubscribe() of a program never subscribed leaves the group as it is, even one of the same name."""
        bus = Bus()
        Subprocess(bus, "lonely", ["true"]).unsubscribe()
        assert default_supervisor(bus).children() == []
        first = Subprocess(bus, "p", ["true"])
        first.subscribe()
        Subprocess(bus, "p", ["false"]).unsubscribe()
        assert [info.name for info in default_supervisor(bus).children()] == ["p"]
        assert default_supervisor(bus)["p"] is first

    async def test_wait_before_any_start_is_an_error(self) -> None:
        """wait() on a program never started says so instead of waiting for ever."""
        async with Bus() as bus:
            with pytest.raises(RuntimeError, match="'p' was never started"):
                await Subprocess(bus, "p", ["true"]).wait()

    async def test_spawning_a_running_program_again_is_refused(self, where: Path) -> None:
        """A second spawn of a running program raises, and the running one is left alone."""
        async with quiet_bus() as (bus, _, _):
            program = Subprocess(bus, "sleeper", script(where, "sleeper", SLEEPER), ready=LineReady("pid"))
            program.subscribe()
            await bus.start()
            pid = program.pid
            assert pid is not None
            with pytest.raises(RuntimeError, match="'sleeper' is already running"):
                await program.spawn()
            assert program.pid == pid and alive([pid]) == [pid]
        assert not alive([pid])

    async def test_missing_working_directory_fails_the_start_naming_the_program(self, where: Path) -> None:
        """A cwd that does not exist makes bus.start() fail with FileNotFoundError; nothing was started."""
        async with quiet_bus() as (bus, _, exits):
            Subprocess(bus, "lost", [sys.executable, "-c", "pass", str(where)], cwd=where / "missing").subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
            assert bus.exit_code == 70
        [error] = info.value.exceptions
        assert isinstance(error, FileNotFoundError)
        assert "program 'lost' could not be started: No such file or directory" in str(error)
        assert "could not be started" in exits.exits[0].reason

    async def test_program_killed_by_a_realtime_signal_is_reported_by_number(self, where: Path) -> None:
        """A signal without a name (SIGRTMIN+1) is reported as "signal N" in the exit."""
        number = signal.SIGRTMIN + 1
        argv = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {number})", str(where)]
        async with quiet_bus() as (bus, _, exits):
            Subprocess(bus, "rt", argv, restart="temporary").subscribe()
            await bus.start()
            [exit] = await exits.wait_for()
        assert (exit.exit_code, exit.signal, exit.expected) == (None, f"signal {number}", False)
        assert f"was killed by signal {number}" in exit.reason

    async def test_program_whose_supervisor_was_skipped_is_killed_when_the_bus_ends(self, where: Path) -> None:
        """A stop listener hanging past stop_timeout skips the supervisor's stop: the program is killed all the same."""
        async with Bus(stop_timeout=0.5) as bus:
            recorder = LogRecorder()
            bus.unsubscribe("log", log_to_structlog)
            bus.subscribe("log", recorder)
            program = Subprocess(bus, "sleeper", script(where, "sleeper", SLEEPER), ready=LineReady("pid"))
            program.subscribe()

            async def hang() -> None:
                await anyio.sleep_forever()

            bus.subscribe("stop", hang, priority=10)
            await bus.start()
            pid = program.pid
            assert pid is not None
            with anyio.fail_after(WAIT):
                await bus.exit()
            assert alive([pid]) == [pid]  # the supervisor's stop (20) was skipped
        assert bus.exit_code == 70
        assert not alive([pid])
        assert program.pid is None


# Traps SIGTERM: writes a marker file and says so, then goes on sleeping (only SIGKILL ends it).
TRAP = (
    "import pathlib, signal, sys, time\n"
    "def trap(*_):\n"
    "    pathlib.Path(sys.argv[1], 'got-sigterm').touch()\n"
    "    print('got SIGTERM', flush=True)\n"
    "signal.signal(signal.SIGTERM, trap)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)

# Listens on the address argv[2] (:: meaning IPv6 and IPv4) at port argv[3], itself or (argv[4] ==
# "child") in a process it starts, which stays in the program's process group.
LISTENER = (
    "import socket, subprocess, sys, time\n"
    "if sys.argv[4] == 'child':\n"
    "    subprocess.run([sys.executable, sys.argv[0], sys.argv[1], sys.argv[2], sys.argv[3], 'self'])\n"
    "v6 = ':' in sys.argv[2]\n"
    "family = socket.AF_INET6 if v6 else socket.AF_INET\n"
    "server = socket.create_server((sys.argv[2], int(sys.argv[3])), family=family, dualstack_ipv6=v6)\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)


def held_port() -> socket.socket:
    """A socket of this process listening on a free port of 127.0.0.1."""
    return socket.create_server(("127.0.0.1", 0))


HIDDEN = """
import sys
import anyio
from aiobus import Bus, log_to_structlog
from aiobus.plugins.subprocess import PortReady, Subprocess

PORT, MARK = int(sys.argv[1]), sys.argv[2]
# not dumpable before it listens: without CAP_SYS_PTRACE, its descriptors cannot be followed
LISTEN = (
    "import ctypes, socket, sys, time\\n"
    "ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\\n"
    "server = socket.create_server(('127.0.0.1', int(sys.argv[1])))\\n"
    "time.sleep(3600)\\n"
)

async def main() -> None:
    async with Bus() as bus:
        bus.unsubscribe("log", log_to_structlog)
        check = PortReady(PORT)
        program = Subprocess(bus, "hidden", [sys.executable, "-c", LISTEN, str(PORT), MARK], ready=check)
        program.subscribe()
        await bus.start()
        print("started; owned:", check._survey(program.pid, False).owned, flush=True)

anyio.run(main)
"""


class TestPortOwnership:
    async def test_port_held_by_another_process_fails_the_start_with_the_programs_error(self, where: Path) -> None:
        """A program that cannot bind a port held by someone else fails the start with its own error; nothing runs."""
        with held_port() as holder:
            port = holder.getsockname()[1]
            argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(where)]
            async with quiet_bus() as (bus, _, exits):
                Subprocess(bus, "web", argv, ready=PortReady(port)).subscribe()
                with pytest.raises(ChannelFailures) as info:
                    await bus.start()
                assert bus.state is not State.STARTED
                assert not marked(str(where))
        [error] = info.value.exceptions
        assert isinstance(error, RuntimeError)
        assert "before it was ready" in str(error) and "Address already in use" in str(error)
        assert "Address already in use" in exits.exits[0].reason

    async def test_timeout_while_another_process_holds_the_port_names_the_holder(self, where: Path) -> None:
        """A program that never listens, on a port this process holds: the TimeoutError names the port and our pid."""
        with held_port() as holder:
            port = holder.getsockname()[1]
            async with quiet_bus() as (bus, _, _):
                argv = script(where, "idle", SLEEPER)
                Subprocess(bus, "idle", argv, ready=PortReady(port), ready_timeout=1).subscribe()
                with pytest.raises(ChannelFailures) as info:
                    await bus.start()
                assert not marked(str(where))
        [error] = info.value.exceptions
        assert isinstance(error, TimeoutError)
        assert f"port {port} is held by another process (pid {os.getpid()}), not by the program" in str(error)

    @pytest.mark.parametrize("address", ["0.0.0.0", "::"])
    async def test_program_listening_on_all_addresses_passes_a_check_on_localhost(
        self, where: Path, address: str
    ) -> None:
        """A listener on 0.0.0.0, or on :: for IPv6 and IPv4, is the program's own for a check on 127.0.0.1."""
        if ":" in address and not socket.has_dualstack_ipv6():
            pytest.skip("no dual-stack IPv6 here")
        port = free_port()
        argv = [*script(where, "listener", LISTENER), address, str(port), "self"]
        async with quiet_bus() as (bus, recorder, _):
            program = Subprocess(bus, "listener", argv, ready=PortReady(port))
            program.subscribe()
            await bus.start()
            assert bus.state is State.STARTED
            assert lines(recorder.records, "listener") == ["listening"]

    async def test_port_held_by_a_process_the_program_started_is_the_programs(self, where: Path) -> None:
        """The listening socket may belong to any process of the program's group, not only to the program."""
        port = free_port()
        argv = [*script(where, "listener", LISTENER), "127.0.0.1", str(port), "child"]
        async with quiet_bus() as (bus, recorder, _):
            Subprocess(bus, "parent", argv, ready=PortReady(port)).subscribe()
            await bus.start()
            assert lines(recorder.records, "parent") == ["listening"]

    async def test_error_of_a_program_ending_before_it_is_ready_quotes_its_last_ten_lines(self, where: Path) -> None:
        """Only the last ten lines of a program that ended before it was ready are quoted in the error."""
        code = "for i in range(30):\n    print(f'line {i}')\nraise SystemExit(5)\n"
        async with quiet_bus() as (bus, _, _):
            Subprocess(bus, "talker", script(where, "talker", code), ready=LineReady("never")).subscribe()
            with pytest.raises(ChannelFailures) as info:
                await bus.start()
        [error] = info.value.exceptions
        quoted = str(error).split("its last output:\n", 1)[1].splitlines()
        assert [line.strip() for line in quoted] == [f"line {i}" for i in range(20, 30)]

    @pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops CAP_SYS_PTRACE with setpriv")
    def test_descriptors_that_cannot_be_read_fall_back_to_the_program_being_alive(
        self, spawn: Spawner, where: Path
    ) -> None:
        """Where the program's descriptors cannot be read, the port answering while it lives is enough."""
        path = where / "hidden.py"
        path.write_text(HIDDEN)
        argv = ["setpriv", "--bounding-set", "-sys_ptrace", sys.executable, str(path), str(free_port()), str(where)]
        child = spawn.run(argv)
        assert child.wait(timeout=WAIT) == 0, child.output
        assert "started; owned: None" in child.output
        wait_gone(str(where))


class TestTerminate:
    async def test_short_budget_sends_the_stop_signal_then_kills_within_it(self, where: Path) -> None:
        """terminate(budget=1) of a program ignoring SIGTERM: SIGTERM, SIGKILL ~1 s later, and the reason says so."""
        async with quiet_bus() as (bus, _, _):
            program = Subprocess(bus, "trap", script(where, "trap", TRAP), kill_after=30, ready=LineReady("ready"))
            program.subscribe()
            await bus.start()
            began = time.monotonic()
            await program.terminate(budget=1)
            took = time.monotonic() - began
            exit = await program.wait()
        assert (where / "got-sigterm").exists()
        assert 1.0 <= took < WAIT
        assert (exit.signal, exit.expected) == ("SIGKILL", True)
        match = re.fullmatch(r"killed with SIGKILL (\d+\.\d) s after SIGTERM: the shutdown was cut short", exit.reason)
        assert match is not None, exit.reason
        assert 0.95 <= float(match[1]) <= took + 0.05

    async def test_terminate_of_a_program_that_ends_on_sigterm_says_stopped_with_sigterm(self, where: Path) -> None:
        """A program that ends on its stop signal is reported "stopped with SIGTERM", expected."""
        async with quiet_bus() as (bus, _, _):
            program = Subprocess(bus, "sleeper", script(where, "sleeper", SLEEPER), ready=LineReady("pid"))
            program.subscribe()
            await bus.start()
            await program.terminate()
            exit = await program.wait()
        assert (exit.signal, exit.expected, exit.reason) == ("SIGTERM", True, "stopped with SIGTERM")

    async def test_second_terminate_shortens_the_stop_under_way(self, where: Path) -> None:
        """A terminate(budget) during a terminate() with kill_after=30 has the program killed within the new budget."""
        async with quiet_bus() as (bus, recorder, _):
            program = Subprocess(bus, "trap", script(where, "trap", TRAP), kill_after=30, ready=LineReady("ready"))
            program.subscribe()
            await bus.start()
            began = time.monotonic()
            async with anyio.create_task_group() as group:
                group.start_soon(program.terminate)
                await logged(bus, recorder, "got SIGTERM", 1)
                await program.terminate(budget=0.5)
            took = time.monotonic() - began
            exit = await program.wait()
        assert took < WAIT
        assert exit.signal == "SIGKILL" and exit.reason.endswith("s after SIGTERM: the shutdown was cut short")

    async def test_cancelled_terminate_kills_after_the_stop_signal_and_says_it_was_cut_short(self, where: Path) -> None:
        """A stop cancelled after 1 s (say, by the bus's stop_timeout) kills the program and reports the real 1 s."""
        async with quiet_bus() as (bus, _, _):
            program = Subprocess(bus, "trap", script(where, "trap", TRAP), kill_after=30, ready=LineReady("ready"))
            program.subscribe()
            await bus.start()
            with anyio.move_on_after(1):
                await program.terminate()
            exit = await program.wait()
        assert (where / "got-sigterm").exists()
        match = re.fullmatch(r"killed with SIGKILL (\d+\.\d) s after SIGTERM: the shutdown was cut short", exit.reason)
        assert match is not None, exit.reason
        assert float(match[1]) >= 0.95

    async def test_program_left_running_when_the_bus_ends_gets_its_stop_signal_then_the_forced_budget(
        self, where: Path
    ) -> None:
        """Left running as the bus ends, a program gets its stop signal, then SIGKILL after the forced budget."""
        async with Bus(stop_timeout=0.5) as bus:
            bus.unsubscribe("log", log_to_structlog)
            program = Subprocess(bus, "trap", script(where, "trap", TRAP), kill_after=30, ready=LineReady("ready"))
            program.subscribe()

            async def hang() -> None:
                await anyio.sleep_forever()

            bus.subscribe("stop", hang, priority=10)  # the supervisor's stop (20) is skipped
            await bus.start()
            with anyio.fail_after(WAIT):
                await bus.exit()
        exit = await program.wait()
        assert exit.signal == "SIGKILL"
        assert exit.reason.startswith("killed with SIGKILL "), exit.reason
        assert exit.reason.endswith(" s after SIGTERM: the shutdown was cut short"), exit.reason  # FORCED_BUDGET

    def test_old_keyword_stop_timeout_still_sets_kill_after(self) -> None:
        """stop_timeout=, the old name, sets kill_after and the stop budget, with no warning."""
        program = Subprocess(Bus(), "p", ["true"], stop_timeout=3)
        assert (program.kill_after, program.stop_budget) == (3.0, 3.0)
        assert Subprocess(Bus(), "p", ["true"]).kill_after == 10.0

    def test_kill_after_and_stop_timeout_together_are_a_type_error(self) -> None:
        """Both names at once are refused, and the message names both."""
        with pytest.raises(TypeError, match="kill_after or stop_timeout"):
            Subprocess(Bus(), "p", ["true"], kill_after=1, stop_timeout=2)


def test_port_readiness_works_on_trio(where: Path) -> None:
    """On trio too, a PortReady check finds the program's own listener and the start succeeds."""
    port = free_port()

    async def start() -> State:
        async with quiet_bus() as (bus, _, _):
            argv = [*script(where, "listener", LISTENER), "127.0.0.1", str(port), "self"]
            Subprocess(bus, "listener", argv, ready=PortReady(port)).subscribe()
            await bus.start()
            return bus.state

    assert anyio.run(start, backend="trio") is State.STARTED


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return bytes(response.read())


class TestInstances:
    async def test_instances_with_substituted_ports_all_answer(self, where: Path) -> None:
        """Three copies of http.server, each on the port its names give it and checked by PortReady("{port}"):
        all answer once bus.start() returns, each is a child of its own, and all stop with the bus."""
        ports = [free_port() for _ in range(3)]
        (where / "hello.txt").write_text("hello")
        argv = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", str(where)]
        async with quiet_bus() as (bus, _, exits):
            web = Subprocess(
                bus, "web", argv, instances=3, names=lambda index: {"port": ports[index]}, ready=PortReady("{port}")
            )
            web.subscribe()
            await bus.start()
            assert web.supervisor is not None
            assert [info.name for info in web.supervisor.children()] == ["web[0]", "web[1]", "web[2]"]
            assert [member.argv[3] for member in web.members] == [str(port) for port in ports]
            for port in ports:
                url = f"http://127.0.0.1:{port}/hello.txt"
                body = await anyio.to_thread.run_sync(fetch, url)
                assert body == b"hello"
            pids = [member.pid for member in web.members]
        assert len(set(pids)) == 3 and None not in pids
        assert sorted((e.name, e.expected) for e in exits.exits) == [
            ("web[0]", True),
            ("web[1]", True),
            ("web[2]", True),
        ]

    async def test_index_and_name_reach_argv_and_env(self, where: Path) -> None:
        """{index} and {name} are filled in argv and env values; doubled braces stay braces."""
        code = "import os, sys\nprint('I am', os.environ['WHO'], sys.argv[2], sys.argv[3], flush=True)\n" + SLEEPER
        argv = [*script(where, "who", code), "{index}", "{{literal}}"]
        async with quiet_bus() as (bus, recorder, _):
            Subprocess(bus, "who", argv, env={"WHO": "{name}"}, instances=2).subscribe()
            await bus.start()
            for index in range(2):
                await recorder.wait_for(f"I am who[{index}] {index} {{literal}}", WAIT)

    async def test_bad_instances_and_templates_are_refused(self) -> None:
        """instances=0, a name the template does not know, a template port without instances: errors at construction."""
        async with Bus() as bus:
            with pytest.raises(ValueError, match="instances"):
                Subprocess(bus, "x", ["true"], instances=0)
            with pytest.raises(ValueError, match="cannot be filled in"):
                Subprocess(bus, "x", ["true", "{port}"], instances=2)
            with pytest.raises(ValueError, match="template"):
                Subprocess(bus, "x", ["true"], ready=PortReady("{port}"))
            with pytest.raises(ValueError, match="not a port"):
                Subprocess(bus, "x", ["true"], instances=1, names=lambda i: {"port": "web"}, ready=PortReady("{port}"))


# Prints each of systemd's variables it has, then "env done", and waits to be stopped.
ENV_PRINTER = """
import os, time
for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OTHER"):
    print(f"{name}={os.environ.get(name)}", flush=True)
print("env done", flush=True)
while True:
    time.sleep(3600)
"""

SYSTEMD_ENV = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}


class TestEnvironment:
    async def test_systemd_variables_do_not_reach_a_program(self, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A program inherits the service's environment but for NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        for name, value in {**SYSTEMD_ENV, "OTHER": "kept"}.items():
            monkeypatch.setenv(name, value)
        recorder = LogRecorder()
        async with Bus() as bus:
            bus.subscribe("log", recorder)
            Subprocess(bus, "env", script(where, "env", ENV_PRINTER), ready=LineReady("env done")).subscribe()
            await bus.start()
        printed = lines(recorder.records, "env", "stdout")
        assert printed == ["NOTIFY_SOCKET=None", "WATCHDOG_USEC=None", "WATCHDOG_PID=None", "OTHER=kept", "env done"]

    async def test_systemd_variables_given_in_env_reach_the_program(
        self, where: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A program given the variables explicitly in env= gets them."""
        monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
        recorder = LogRecorder()
        async with Bus() as bus:
            bus.subscribe("log", recorder)
            env = {**SYSTEMD_ENV, "OTHER": "given"}
            program = Subprocess(bus, "env", script(where, "env", ENV_PRINTER), env=env, ready=LineReady("env done"))
            program.subscribe()
            await bus.start()
        printed = lines(recorder.records, "env", "stdout")
        assert printed == [*(f"{name}={value}" for name, value in env.items()), "env done"]
