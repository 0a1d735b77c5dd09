"""SystemdNotifier: a real datagram socket stands in for systemd and reads what the bus sends."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import anyio
import pytest
from helpers import LogRecorder, wait_for_ticks
from processes import Spawner
from trio.testing import MockClock

from aiobus import Bus, ChannelFailures, log_to_structlog
from aiobus.plugins import SystemdNotifier
from aiobus.plugins.systemd import parse_notify_socket, watchdog_period

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="AF_UNIX datagrams, abstract names (Linux)")

SERVICE = """
import signal
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins import SystemdNotifier

async def main() -> int:
    async with Bus(main_interval=0.05) as bus:
        notifier = SystemdNotifier(bus)
        notifier.subscribe()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            await bus.start()
            bus.log("waiting for signals", enabled=notifier.enabled)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await bus.graceful()
                    bus.log("graceful done")
                else:
                    break
        await bus.exit()
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


class StandIn:
    """A datagram socket where systemd's would be.

    A process under test is read by a thread as its datagrams arrive (:meth:`start_reading`);
    a bus in this process is read with :meth:`drain` between its steps, since the thread
    could fall behind a burst and the queue holds only ``net.unix.max_dgram_qlen`` datagrams.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.datagrams: list[str] = []
        self._changed = threading.Condition()
        self._closing = False
        self._reader: threading.Thread | None = None

    def start_reading(self) -> None:
        self.sock.settimeout(0.05)  # how often the reader checks whether to end
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._changed:
                self.datagrams.append(data.decode())
                self._changed.notify_all()

    def drain(self) -> None:
        """Read every datagram already queued (without the reader thread)."""
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            self.datagrams.append(data.decode())

    def lines(self) -> list[str]:
        with self._changed:
            return self._lines()

    def _lines(self) -> list[str]:
        return [line for datagram in self.datagrams for line in datagram.splitlines()]

    def wait_for(self, line: str, count: int = 1, timeout: float = 30) -> None:
        """Wait until ``line`` has arrived ``count`` times (with the reader thread)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._lines().count(line) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{line!r} x{count} not received within {timeout} s: {self.datagrams}"
                self._changed.wait(remaining)

    def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.join()
        self.sock.close()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # A short private directory: an AF_UNIX path holds at most 107 bytes.
    directory = tempfile.mkdtemp(prefix="aiobus-")
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def systemd(socket_dir: str) -> Iterator[tuple[StandIn, str]]:
    """A stand-in for systemd at a filesystem path, and the NOTIFY_SOCKET value naming it."""
    path = os.path.join(socket_dir, "notify")
    stand_in = StandIn(path)
    yield stand_in, path
    stand_in.close()


@pytest.fixture
def abstract_systemd() -> Iterator[tuple[StandIn, str]]:
    """A stand-in for systemd at an abstract address, and the NOTIFY_SOCKET value naming it."""
    name = f"aiobus-test-{uuid.uuid4().hex}"
    stand_in = StandIn("\0" + name)
    yield stand_in, "@" + name
    stand_in.close()


def since(lines: list[str], first: str) -> list[str]:
    return lines[lines.index(first) :]


class TestInAProcess:
    @pytest.mark.parametrize("which", ["systemd", "abstract_systemd"])
    def test_service_reports_ready_then_stopping(
        self, spawn: Spawner, which: str, request: pytest.FixtureRequest
    ) -> None:
        """A service under NOTIFY_SOCKET (a path or an abstract name) sends READY=1, then STOPPING=1 on SIGTERM."""
        stand_in, notify_socket = request.getfixturevalue(which)
        stand_in.start_reading()
        child = spawn.script(SERVICE, env={"NOTIFY_SOCKET": notify_socket})
        child.wait_for("waiting for signals")
        stand_in.wait_for("READY=1")
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output
        stand_in.wait_for("STATUS=Exiting")
        assert stand_in.lines() == [
            "STATUS=Starting",
            "READY=1",
            "STATUS=Running",
            "STOPPING=1",
            "STATUS=Stopping",
            "STATUS=Stopped",
            "STATUS=Exiting",
        ]

    def test_sighup_graceful_reports_reloading_then_ready(self, spawn: Spawner, systemd: tuple[StandIn, str]) -> None:
        """A graceful in a real service sends RELOADING=1 with MONOTONIC_USEC=, then READY=1 again."""
        stand_in, notify_socket = systemd
        stand_in.start_reading()
        child = spawn.script(SERVICE, env={"NOTIFY_SOCKET": notify_socket})
        child.wait_for("waiting for signals")
        child.send(signal.SIGHUP)
        child.wait_for("graceful done")
        stand_in.wait_for("READY=1", count=2)
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output
        reload = since(stand_in.lines(), "RELOADING=1")
        assert reload[1].startswith("MONOTONIC_USEC=")
        assert reload[2:5] == ["STATUS=Reloading", "READY=1", "STATUS=Running"]

    def test_watchdog_pings_reach_systemd(self, spawn: Spawner, systemd: tuple[StandIn, str]) -> None:
        """With WATCHDOG_USEC=200000 and 0.05 s ticks, pings keep coming at least once per period."""
        stand_in, notify_socket = systemd
        stand_in.start_reading()
        child = spawn.script(SERVICE, env={"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"})
        stand_in.wait_for("READY=1")
        began = time.monotonic()
        stand_in.wait_for("WATCHDOG=1", count=10)
        periods = int((time.monotonic() - began) / 0.2)
        assert periods <= 10
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output

    def test_unset_notify_socket_changes_nothing(self, spawn: Spawner, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without NOTIFY_SOCKET the plugin is disabled and the service runs and exits normally."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        child = spawn.script(SERVICE, env={"WATCHDOG_USEC": "1"})
        line = child.wait_for("waiting for signals")
        assert '"enabled": false' in line
        child.send(signal.SIGHUP)
        child.wait_for("graceful done")
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output
        assert not [event for event in child.events() if event["level"] in ("warning", "error")]


async def run_bus(notifier_env: dict[str, str], *, graceful: bool = False, main_interval: float = 0.1) -> Bus:
    """Start a bus with a SystemdNotifier, optionally run a graceful, and exit."""
    async with Bus(main_interval=main_interval) as bus:
        SystemdNotifier(bus, environ=notifier_env).subscribe()
        await bus.start()
        if graceful:
            await bus.graceful()
    return bus


class TestMessages:
    async def test_ready_follows_the_last_start_listener(self, systemd: tuple[StandIn, str]) -> None:
        """READY=1 goes out after every start listener has run, even one of a very late priority."""
        stand_in, notify_socket = systemd
        async with Bus() as bus:
            notifier = SystemdNotifier(bus, environ={"NOTIFY_SOCKET": notify_socket})
            notifier.subscribe()
            bus.subscribe("start", lambda: notifier.notify("STATUS=last start listener"), priority=10**9)
            await bus.start()
            stand_in.drain()
        stand_in.drain()
        lines = stand_in.lines()
        assert lines.index("STATUS=last start listener") < lines.index("READY=1")

    async def test_states_are_followed_on_the_state_channel_not_in_log_lines(
        self, systemd: tuple[StandIn, str]
    ) -> None:
        """The notifier listens on ``state``, not ``log``: each change sends its message once, in order."""
        stand_in, notify_socket = systemd
        async with Bus() as bus:
            notifier = SystemdNotifier(bus, environ={"NOTIFY_SOCKET": notify_socket})
            notifier.subscribe()
            assert notifier.state in bus.listeners["state"]
            assert bus.listeners["log"] == (log_to_structlog,)
            await bus.start()
            bus.log("a log line is not a state change")
            await bus.stop()
            stand_in.drain()
        stand_in.drain()
        assert [d.splitlines()[-1] for d in stand_in.datagrams] == [
            "STATUS=Starting",
            "STATUS=Running",
            "STATUS=Stopping",
            "STATUS=Stopped",
            "STATUS=Exiting",
        ]

    async def test_graceful_listeners_run_between_reloading_and_ready(self, systemd: tuple[StandIn, str]) -> None:
        """RELOADING=1 (with the monotonic clock in microseconds) precedes the graceful listeners, READY=1 follows."""
        stand_in, notify_socket = systemd
        async with Bus() as bus:
            notifier = SystemdNotifier(bus, environ={"NOTIFY_SOCKET": notify_socket})
            notifier.subscribe()
            bus.subscribe("graceful", lambda: notifier.notify("STATUS=reloading things"))
            await bus.start()
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            await bus.graceful()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            stand_in.drain()
        stand_in.drain()
        reload = since(stand_in.lines(), "RELOADING=1")
        assert reload[2:6] == ["STATUS=Reloading", "STATUS=reloading things", "READY=1", "STATUS=Running"]
        key, _, value = reload[1].partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    async def test_restart_reports_reloading_not_stopping(self, systemd: tuple[StandIn, str]) -> None:
        """bus.restart() tells systemd RELOADING=1 (the process comes back), not STOPPING=1."""
        stand_in, notify_socket = systemd
        async with Bus() as bus:
            SystemdNotifier(bus, environ={"NOTIFY_SOCKET": notify_socket}).subscribe()
            await bus.start()
            await bus.restart()  # block() is not called: no re-exec here, only the shutdown
            stand_in.drain()
        stand_in.drain()
        lines = since(stand_in.lines(), "READY=1")
        assert "RELOADING=1" in lines
        assert "STATUS=Restarting" in lines
        assert "STOPPING=1" not in lines

    async def test_graceful_of_a_stopped_bus_reports_nothing(self, systemd: tuple[StandIn, str]) -> None:
        """A graceful while the bus is not STARTED sends neither RELOADING=1 nor READY=1."""
        stand_in, notify_socket = systemd
        async with Bus() as bus:
            SystemdNotifier(bus, environ={"NOTIFY_SOCKET": notify_socket}).subscribe()
            await bus.graceful()
            await bus.start()
            stand_in.drain()
        stand_in.drain()
        assert "RELOADING=1" not in stand_in.lines()
        assert stand_in.lines().count("READY=1") == 1

    async def test_watchdog_pid_of_another_process_means_no_pings(self, systemd: tuple[StandIn, str]) -> None:
        """WATCHDOG_PID naming another process disables the pings: the watchdog is not ours."""
        stand_in, notify_socket = systemd
        environ = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())}
        async with Bus(main_interval=0.01) as bus:
            notifier = SystemdNotifier(bus, environ=environ)
            notifier.subscribe()
            bus.subscribe("main", stand_in.drain, priority=10**9)
            await bus.start()
            await wait_for_ticks(bus, 5)
        stand_in.drain()
        assert notifier.watchdog is None
        assert "WATCHDOG=1" not in stand_in.lines()

    async def test_failed_send_is_logged_once_and_the_bus_runs_on(
        self, socket_dir: str, log_recorder: LogRecorder
    ) -> None:
        """With nobody listening on NOTIFY_SOCKET, one warning is logged and the bus goes through its states."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            notifier = SystemdNotifier(bus, environ={"NOTIFY_SOCKET": os.path.join(socket_dir, "nobody")})
            notifier.subscribe()
            await bus.start()
            await bus.graceful()
        assert bus.exit_code == 0
        assert "Bus EXITING" in log_recorder.messages
        assert len(log_recorder.matching("Could not notify systemd")) == 1

    async def test_unset_notify_socket_disables_everything(self, log_recorder: LogRecorder) -> None:
        """Without NOTIFY_SOCKET nothing is sent and the watchdog settings are not even checked."""
        async with Bus(main_interval=5) as bus:
            bus.subscribe("log", log_recorder)
            notifier = SystemdNotifier(bus, environ={"WATCHDOG_USEC": "1000"})
            notifier.subscribe()
            await bus.start()
            await bus.graceful()
        assert not notifier.enabled
        assert not notifier.notify("STATUS=anyone?")
        assert bus.exit_code == 0
        assert not [record for record in log_recorder.records if record.level >= logging.WARNING]


class TestWatchdog:
    @pytest.mark.parametrize(("usec", "interval"), [(200_000, 0.05), (200_000, 0.1), (1_000_000, 0.01)])
    def test_pings_come_at_least_twice_per_period(self, socket_dir: str, usec: int, interval: float) -> None:
        """On trio's virtual clock, no gap between two WATCHDOG=1 exceeds half of WATCHDOG_USEC."""
        period = usec / 1e6
        path = os.path.join(socket_dir, "notify")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.setblocking(False)
        pings: list[float] = []

        def drain() -> None:
            """After each tick, note the (virtual) time of the pings it sent."""
            while True:
                try:
                    data = receiver.recv(4096)
                except BlockingIOError:
                    return
                if data == b"WATCHDOG=1":
                    pings.append(anyio.current_time())

        async def main() -> tuple[float, float]:
            async with Bus(main_interval=interval) as bus:
                environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(usec), "WATCHDOG_PID": str(os.getpid())}
                SystemdNotifier(bus, environ=environ).subscribe()
                bus.subscribe("main", drain, priority=10**9)
                await bus.start()
                began = anyio.current_time()
                await anyio.sleep(10 * period)
                ended = anyio.current_time()
            return began, ended

        try:
            began, ended = anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
        finally:
            receiver.close()
        times = [began, *pings, ended]
        assert max(later - earlier for earlier, later in itertools.pairwise(times)) <= period / 2 + 1e-9
        assert len(pings) >= 19

    async def test_main_interval_too_long_is_a_value_error(self) -> None:
        """A main interval over half the watchdog period is refused at construction, naming both."""
        bus = Bus(main_interval=0.15)
        with pytest.raises(ValueError, match=r"main_interval 0\.15 s.*WATCHDOG_USEC=200000"):
            SystemdNotifier(bus, environ={"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "200000"})

    async def test_main_interval_lengthened_later_fails_the_start(self, socket_dir: str) -> None:
        """A main interval lengthened after construction makes start() fail with that ValueError."""
        environ = {"NOTIFY_SOCKET": os.path.join(socket_dir, "x"), "WATCHDOG_USEC": "200000"}
        async with Bus(main_interval=0.05) as bus:
            SystemdNotifier(bus, environ=environ).subscribe()
            bus.main_interval = 1.0
            with pytest.raises(ChannelFailures) as caught:
                await bus.start()
        [error] = caught.value.exceptions
        assert isinstance(error, ValueError)
        assert "main_interval 1 s" in str(error)


class TestEnvironment:
    @pytest.mark.parametrize(("value", "address"), [("/run/systemd/notify", "/run/systemd/notify"), ("@sd", "\0sd")])
    def test_notify_socket_is_a_path_or_an_abstract_name(self, value: str, address: str) -> None:
        """An absolute path is used as is; a leading @ names an abstract socket."""
        assert parse_notify_socket(value) == address

    @pytest.mark.parametrize("value", ["run/notify", "vsock:2:1234", "/" + "x" * 107])
    def test_other_notify_socket_values_are_value_errors(self, value: str) -> None:
        """A relative path, another address family or an over-long path is refused with a ValueError."""
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            SystemdNotifier(Bus(), environ={"NOTIFY_SOCKET": value})

    def test_watchdog_period_is_read_in_microseconds(self) -> None:
        """WATCHDOG_USEC is microseconds, for this process when WATCHDOG_PID names it."""
        assert watchdog_period({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) == 0.2
        assert watchdog_period({}) is None

    @pytest.mark.parametrize(
        "environ", [{"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "5", "WATCHDOG_PID": "me"}]
    )
    def test_malformed_watchdog_variables_are_value_errors(self, environ: dict[str, str]) -> None:
        """A WATCHDOG_USEC or WATCHDOG_PID that is not a positive integer is a ValueError naming it."""
        with pytest.raises(ValueError, match="WATCHDOG_"):
            watchdog_period(environ)
