"""SignalHandler: real signals sent to real processes, and the handlers put back afterwards."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import anyio
import pytest
from helpers import LogRecorder
from processes import Child, Spawner

from aiobus import Bus, State
from aiobus.plugins import SignalHandler
from aiobus.plugins.signals import has_controlling_terminal, parse_signal

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc (Linux)")

SERVICE = """
import os, sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins import SignalHandler

MODE = sys.argv[1] if len(sys.argv) > 1 else ""

async def main() -> int:
    if os.environ.get("ACQUIRE_TTY"):
        # a session leader opening a terminal makes it its controlling terminal
        os.close(os.open(os.environ["ACQUIRE_TTY"], os.O_RDWR))
    async with Bus(main_interval=0.05) as bus:
        handlers = {}
        if MODE == "custom":
            handlers = {"SIGUSR2": "orders", "SIGUSR1": lambda signum: bus.log(f"callable got {signum}")}
            bus.subscribe("orders", lambda: bus.log("orders published"))
        SignalHandler(bus, handlers).subscribe()
        if MODE == "hang-stop":
            @bus.subscribe("stop")
            async def hang() -> None:
                bus.log("stop listener hanging")
                await anyio.sleep_forever()
        if MODE == "fail-stop":
            @bus.subscribe("stop")
            def fail() -> None:
                raise RuntimeError("cleanup failed")
        bus.subscribe("graceful", lambda: bus.log("graceful ran"))
        bus.subscribe("exit", lambda: bus.log("exit listener ran"))
        await bus.start()
        bus.log(f"incarnation {os.environ.setdefault('INCARNATION', '0')}")
        os.environ["INCARNATION"] = str(int(os.environ["INCARNATION"]) + 1)
        await bus.block()
    return bus.exit_code

if __name__ == "__main__":
    configure_logging(format="json")
    raise SystemExit(anyio.run(main, backend=os.environ.get("BACKEND", "asyncio")))
"""

BACKENDS = ["asyncio", "trio"]


def start_service(spawn: Spawner, *args: str, backend: str = "asyncio", **env: str) -> Child:
    child = spawn.script(SERVICE, *args, env={"BACKEND": backend, **env})
    child.wait_for("Receiving signals")
    child.wait_for("incarnation 0")
    return child


class TestDefaults:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_sigterm_and_sigint_exit_cleanly_with_code_0(self, spawn: Spawner, sig: int, backend: str) -> None:
        """SIGTERM or SIGINT runs the whole shutdown and the process ends with exit code 0."""
        child = start_service(spawn, backend=backend)
        child.send(sig)
        assert child.wait() == 0, child.output
        child.assert_nothing_left()
        events = [event["event"] for event in child.events()]
        assert f"Caught {signal.Signals(sig).name}: exiting" in events
        assert events.index("Bus STOPPING") < events.index("exit listener ran") < events.index("Bus EXITING") + 2

    def test_the_exit_code_is_the_buss(self, spawn: Spawner) -> None:
        """After a failing stop listener, SIGTERM ends the process with exit code 70."""
        child = start_service(spawn, "fail-stop")
        child.send(signal.SIGTERM)
        assert child.wait() == 70, child.output
        child.assert_nothing_left()

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_second_sigint_forces_the_shutdown_with_code_130(self, spawn: Spawner, backend: str) -> None:
        """A second SIGINT while a stop listener hangs cancels the rest and ends with 130."""
        child = start_service(spawn, "hang-stop", backend=backend)
        child.send(signal.SIGINT)
        child.wait_for("stop listener hanging")
        child.send(signal.SIGINT)
        assert child.wait() == 130, child.output
        child.assert_nothing_left()
        assert "Caught a second SIGINT: forcing the shutdown" in child.output
        assert "exit listener ran" not in child.output

    def test_sigterm_during_shutdown_does_not_force_it(self, spawn: Spawner) -> None:
        """Only SIGINT forces: a SIGTERM during the shutdown is logged and the shutdown goes on."""
        child = start_service(spawn, "hang-stop")
        child.send(signal.SIGTERM)
        child.wait_for("stop listener hanging")
        child.send(signal.SIGTERM)
        child.wait_for("Caught SIGTERM", count=2)
        assert child.proc.poll() is None
        child.send(signal.SIGINT)
        assert child.wait() == 130
        child.assert_nothing_left()

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_sigusr1_is_graceful(self, spawn: Spawner, backend: str) -> None:
        """SIGUSR1 publishes graceful and the service keeps running."""
        child = start_service(spawn, backend=backend)
        child.send(signal.SIGUSR1)
        child.wait_for("graceful ran")
        assert "Caught SIGUSR1: graceful" in [event["event"] for event in child.events()]
        assert child.proc.poll() is None
        child.send(signal.SIGTERM)
        assert child.wait() == 0
        child.assert_nothing_left()

    def test_sighup_without_a_terminal_restarts(self, spawn: Spawner) -> None:
        """SIGHUP re-executes a process that has no controlling terminal (a service)."""
        child = start_service(spawn)
        child.send(signal.SIGHUP)
        child.wait_for("incarnation 1")
        child.wait_for("Receiving signals", count=2)
        assert "Caught SIGHUP: restarting (no controlling terminal)" in [event["event"] for event in child.events()]
        assert child.proc.poll() is None  # the same pid, re-executed
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output
        child.assert_nothing_left()

    def test_sighup_with_a_terminal_exits(self, spawn: Spawner) -> None:
        """SIGHUP exits a process that has a controlling terminal."""
        master, slave = os.openpty()
        try:
            child = start_service(spawn, ACQUIRE_TTY=os.ttyname(slave))
            child.send(signal.SIGHUP)
            assert child.wait() == 0, child.output
            child.assert_nothing_left()
        finally:
            os.close(slave)
            os.close(master)
        assert "incarnation 1" not in child.output
        assert "Caught SIGHUP: exiting (a terminal controls it)" in [event["event"] for event in child.events()]


class TestCustomHandlers:
    def test_a_channel_name_is_published_and_a_callable_called(self, spawn: Spawner) -> None:
        """A handler may be a channel name (published) or a callable (given the signal number)."""
        child = start_service(spawn, "custom")
        child.send(signal.SIGUSR2)
        child.wait_for("orders published")
        child.send(signal.SIGUSR1)
        child.wait_for(f"callable got {int(signal.SIGUSR1)}")
        child.send(signal.SIGTERM)  # the defaults still hold for the others
        assert child.wait() == 0
        child.assert_nothing_left()

    def test_every_caught_signal_is_logged(self, spawn: Spawner) -> None:
        """Each signal caught gives a log line naming it and what it does."""
        child = start_service(spawn, "custom")
        child.send(signal.SIGUSR2)
        child.wait_for("orders published")
        child.send(signal.SIGUSR1)
        child.wait_for("callable got")
        child.send(signal.SIGTERM)
        assert child.wait() == 0
        caught = [(e["event"], e["signal"], e["action"]) for e in child.events() if e["event"].startswith("Caught")]
        assert caught == [
            ("Caught SIGUSR2: publishing orders", "SIGUSR2", "orders"),
            ("Caught SIGUSR1: calling main.<locals>.<lambda>", "SIGUSR1", "main.<locals>.<lambda>"),
            ("Caught SIGTERM: exiting", "SIGTERM", "exit"),
        ]

    def test_none_removes_a_default(self) -> None:
        """Mapping a signal to None leaves it alone."""
        handler = SignalHandler(Bus(), {"SIGUSR1": None})
        assert signal.SIGUSR1 not in handler.handlers
        assert handler.handlers[signal.SIGTERM] == "exit"

    @pytest.mark.parametrize("spec", ["SIGNOPE", "NOPE", 999])
    def test_unknown_signal_is_a_value_error(self, spec: Any) -> None:
        """An unknown signal name or number is refused at construction."""
        with pytest.raises(ValueError, match="unknown signal"):
            SignalHandler(Bus(), {spec: "exit"})

    def test_uncatchable_signal_is_a_value_error(self) -> None:
        """SIGKILL cannot be handled, so asking for it is an error."""
        with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
            SignalHandler(Bus(), {"SIGKILL": "exit"})

    def test_bad_handler_is_a_type_error(self) -> None:
        """A handler must be a channel name or a callable."""
        with pytest.raises(TypeError, match="SIGTERM"):
            SignalHandler(Bus(), {"SIGTERM": 42})  # type: ignore[dict-item]

    def test_signal_names_numbers_and_short_names_are_accepted(self) -> None:
        """Signals may be given as SIGTERM, TERM, a number or a signal.Signals."""
        assert parse_signal("SIGTERM") is parse_signal("term") is parse_signal(15) is signal.SIGTERM


class TestRestoring:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_unsubscribe_puts_back_the_previous_handlers(self, backend: str) -> None:
        """After unsubscribe, the handler that was there before runs again (not the default)."""
        seen: list[int] = []
        previous_int = signal.getsignal(signal.SIGINT)

        recorder = LogRecorder()

        def custom(signum: int, frame: object) -> None:
            seen.append(signum)
            recorder("SIGUSR2 seen", 20)

        async def main() -> None:
            inner_int = signal.getsignal(signal.SIGINT)
            async with Bus() as bus:
                bus.subscribe("log", recorder)
                handler = SignalHandler(bus, {"SIGUSR2": "graceful"})
                handler.subscribe()
                await bus.wait(State.STOPPED)
                await recorder.wait_for("Receiving signals")
                assert signal.getsignal(signal.SIGUSR2) is not custom
                handler.unsubscribe()
                with anyio.fail_after(10):
                    await handler.wait_restored()
                assert signal.getsignal(signal.SIGUSR2) is custom
                assert signal.getsignal(signal.SIGINT) is inner_int
                os.kill(os.getpid(), signal.SIGUSR2)
                await recorder.wait_for("SIGUSR2 seen")

        old = signal.signal(signal.SIGUSR2, custom)
        try:
            anyio.run(main, backend=backend)
        finally:
            signal.signal(signal.SIGUSR2, old)
        assert seen == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGINT) is previous_int

    def test_handlers_are_restored_when_the_bus_ends(self) -> None:
        """Leaving the bus ends the receiver and puts the previous handlers back."""
        marker = signal.getsignal(signal.SIGUSR1)

        async def main() -> None:
            async with Bus() as bus:
                SignalHandler(bus).subscribe()
                await bus.start()

        anyio.run(main)
        assert signal.getsignal(signal.SIGUSR1) is marker

    def test_subscribing_before_entering_starts_at_the_bus_start(self) -> None:
        """A handler subscribed before ``async with`` starts receiving when the bus starts."""
        bus = Bus()
        handler = SignalHandler(bus)
        handler.subscribe()
        recorder = LogRecorder()
        bus.subscribe("log", recorder)

        async def main() -> None:
            async with bus:
                assert not recorder.matching("Receiving signals")
                await bus.start()
                await recorder.wait_for("Receiving signals")

        anyio.run(main)
        assert handler.handlers[signal.SIGTERM] == "exit"


def test_controlling_terminal_is_detected() -> None:
    """The test runner's own answer matches whether /dev/tty can be opened."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
        expected = True
    except OSError:
        expected = False
    assert has_controlling_terminal() is expected


def test_a_failing_handler_is_logged_and_the_bus_goes_on() -> None:
    """A callable handler that raises is logged with the signal's name; the bus keeps running."""

    def broken() -> None:
        raise RuntimeError("handler broke")

    recorder = LogRecorder()

    async def main() -> State:
        async with Bus() as bus:
            bus.subscribe("log", recorder)
            SignalHandler(bus, {"SIGUSR2": broken}).subscribe()
            await recorder.wait_for("Receiving signals")
            os.kill(os.getpid(), signal.SIGUSR2)
            await recorder.wait_for("The SIGUSR2 handler failed")
            return bus.state

    assert anyio.run(main) is State.STOPPED
    [failure] = recorder.matching("The SIGUSR2 handler failed")
    assert "handler broke" in failure.fields["traceback"]
