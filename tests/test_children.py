"""Child brokers: real worker processes run through anyio.to_process, linked to the parent's bus."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import anyio
import anyio.to_process
import child_functions
import pytest
from helpers import LogRecorder
from processes import Spawner, alive, descendants

from aiobus import (
    CHILD_EXIT_CHANNEL,
    Bus,
    ChildBroker,
    ChildExit,
    ChildState,
    ChildUnavailable,
    EndOfLink,
    FrameTooLarge,
    State,
    Supervisor,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pidfd and /proc (Linux)")


def is_alive(pid: int) -> bool:
    """Whether the process runs (a zombie counts as gone)."""
    return bool(alive([pid]))


async def wait_gone(*pids: int, seconds: float = 10) -> None:
    """Wait until the processes have ended (no event tells it: look at /proc now and then)."""
    with anyio.fail_after(seconds):
        while alive(list(pids)):  # noqa: ASYNC110
            await anyio.sleep(0.02)


class TestMessages:
    async def test_round_trips_and_the_childs_logs_reach_the_parent(self, log_recorder: LogRecorder) -> None:
        """Messages go to the child and back; its bus log, structlog and print lines arrive tagged."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            broker = ChildBroker(bus, "echo", child_functions.echo)
            broker.subscribe()
            await bus.start()
            for number in range(5):
                await broker.send(number)
            assert [await broker.receive() for _ in range(5)] == [("echo", n) for n in range(5)]
            pid = broker.pid
        assert pid is not None and pid != os.getpid()
        [up] = log_recorder.matching("echo child up")
        assert up.fields["child"] == "echo" and up.fields["child_pid"] == pid
        [printed] = log_recorder.matching("printed in the child")
        assert printed.fields["stream"] == "stdout"
        assert log_recorder.matching("echo child drained")  # the child drained before it exited
        await wait_gone(pid)

    async def test_100000_messages_arrive_in_order_none_lost(self) -> None:
        """A burst of 100,000 messages reaches the child complete and in order."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "counter", child_functions.count)
            broker.subscribe()
            await bus.start()
            for number in range(100_000):
                await broker.send(number)
            await bus.stop()  # the child sees the end of input after the last message
            with anyio.fail_after(30):
                assert await broker.receive() == ("counted", 100_000)

    async def test_the_childs_bus_follows_graceful(self, log_recorder: LogRecorder) -> None:
        """The parent's graceful runs the child's graceful listeners."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            ChildBroker(bus, "worker", child_functions.report_pid).subscribe()
            await bus.start()
            await bus.graceful()
            await log_recorder.wait_for("child graceful ran", seconds=30)
            [warning] = log_recorder.matching("a structlog warning")
            assert warning.fields["answer"] == 42 and warning.fields["child"] == "worker"
            await log_recorder.wait_for("written to descriptor 2", seconds=30)
            assert log_recorder.matching("written to descriptor 2")[0].fields["stream"] == "stderr"

    async def test_send_while_the_child_restarts_reaches_the_next_incarnation(self) -> None:
        """A message sent while a permanent child is down waits for the restarted child and is delivered."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "echo", child_functions.echo)
            broker.subscribe()
            await bus.start()
            ended = anyio.Event()
            bus.subscribe(CHILD_EXIT_CHANNEL, lambda exit: ended.set())
            first = broker.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(30):
                await ended.wait()  # the parent knows: the child is down, restarting
                await broker.send("after the crash")
                assert await broker.receive() == ("echo", "after the crash")
            assert broker.pid not in (None, first)

    async def test_messages_that_die_with_the_child_are_reported_in_its_exit(self) -> None:
        """Messages the child never received before it was killed are counted in its published exit."""
        exits: list[ChildExit] = []
        ended = anyio.Event()

        def record(exit: ChildExit) -> None:
            exits.append(exit)
            ended.set()

        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, record)
            broker = ChildBroker(bus, "deaf", child_functions.ignores_input, restart="temporary")
            broker.subscribe()
            await bus.start()
            _, pid = await broker.receive()
            for number in range(5):
                await broker.send(number)
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(30):
                await ended.wait()
        assert "5 message(s) sent to it were not acknowledged" in exits[0].reason

    async def test_send_to_a_child_that_stays_down_raises(self) -> None:
        """send() to a temporary child that was killed waits send_timeout, then raises ChildUnavailable."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "once", child_functions.report_pid, restart="temporary", send_timeout=0.2)
            broker.subscribe()
            await bus.start()
            _, pid = await broker.receive()
            os.kill(pid, signal.SIGKILL)
            await wait_gone(pid)
            with anyio.fail_after(30), pytest.raises(ChildUnavailable, match="once"):
                while True:
                    await broker.send("hello")
                    await anyio.sleep(0.01)


class TestSupervision:
    async def test_a_child_killed_with_sigkill_is_restarted(self) -> None:
        """A permanent child killed by SIGKILL comes back in a new process; the exit is published."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "worker", child_functions.report_pid)
            broker.subscribe()
            await bus.start()
            _, first = await broker.receive()
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(30):
                _, second = await broker.receive()
            assert second != first
            [info] = broker.supervisor.children() if broker.supervisor else []
            assert (info.state, info.restarts, info.pid) == (ChildState.RUNNING, 1, second)
        killed, stopped = exits  # the SIGKILL, then the stop at the end of the block
        assert (killed.name, killed.pid, killed.signal, killed.exit_code) == ("worker", first, "SIGKILL", None)
        assert killed.reason == "killed by SIGKILL" and killed.failed
        assert (stopped.pid, stopped.exit_code, stopped.expected) == (second, 0, True)

    async def test_a_temporary_child_is_not_restarted(self) -> None:
        """A temporary child that dies stays down; the parent runs on."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "once", child_functions.report_pid, restart="temporary")
            broker.subscribe()
            await bus.start()
            ended = anyio.Event()
            bus.subscribe(CHILD_EXIT_CHANNEL, lambda exit: ended.set())
            _, pid = await broker.receive()
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(30):
                await ended.wait()
                with pytest.raises(EndOfLink):  # nothing more will come from it
                    await broker.receive()
            await wait_gone(pid)
            assert broker.state is ChildState.EXITED
            assert bus.state is State.STARTED

    async def test_a_child_that_ignores_the_stop_is_killed_after_the_grace_period(self) -> None:
        """A child that neither drains nor obeys SIGTERM is SIGKILLed after grace + term_grace."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "stubborn", child_functions.stubborn, grace=0.3, term_grace=0.3)
            broker.subscribe()
            await bus.start()
            _, pid = await broker.receive()
            with anyio.fail_after(30):
                await bus.stop()
            last = broker.last_exit
        assert not is_alive(pid)
        assert broker.state is ChildState.STOPPED
        assert last is None or last.expected  # a stop is not a failure

    async def test_a_hung_child_is_killed_and_restarted(self, log_recorder: LogRecorder) -> None:
        """A child whose heartbeats stop is killed and handled by its policy."""
        exits: list[ChildExit] = []
        async with Bus(main_interval=0.05) as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "hangs", child_functions.hangs_after_start, heartbeat_misses=5)
            broker.subscribe()
            await bus.start()
            _, first = await broker.receive()
            with anyio.fail_after(30):
                _, second = await broker.receive()
            assert second != first
        assert exits[0].reason.startswith("hung")
        assert exits[0].signal == "SIGKILL"
        assert log_recorder.matching("hung: no heartbeat")

    async def test_a_child_that_keeps_failing_exits_the_parent_with_70(self, log_recorder: LogRecorder) -> None:
        """A function that raises at once is logged with its traceback, restarted, and past the
        restart intensity the parent's bus exits with code 70, the reason logged."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            supervisor = Supervisor(bus, max_restarts=2, within=60, backoff=0.01)
            supervisor.subscribe()
            ChildBroker(bus, "broken", child_functions.fails, supervisor=supervisor).subscribe()
            await bus.start()
            with anyio.fail_after(60):
                await bus.wait(State.EXITING)
        assert bus.exit_code == 70
        failure = log_recorder.matching("The child's function failed")[0]
        assert "could not connect to the exchange" in failure.fields["exception"]
        assert log_recorder.matching("Restart intensity exceeded")

    async def test_long_lived_children_do_not_starve_anyios_process_limiter(self) -> None:
        """With more children than cores, to_process still runs other work at once."""
        async with Bus() as bus:
            supervisor = Supervisor(bus)
            supervisor.subscribe()
            for number in range((os.cpu_count() or 2) + 1):
                ChildBroker(bus, f"worker{number}", child_functions.report_pid, supervisor=supervisor).subscribe()
            await bus.start()
            with anyio.fail_after(30):
                assert await anyio.to_process.run_sync(os.getpid) != os.getpid()


PARENT = """
import os, sys
sys.path.insert(0, {tests!r})
import anyio
import child_functions
from aiobus import Bus, configure_logging
from aiobus import ChildBroker
from aiobus.plugins import SignalHandler

async def main() -> int:
    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        broker = ChildBroker(bus, "echo", child_functions.echo)
        broker.subscribe()
        await bus.start()
        bus.log("child running", child_pid=broker.pid)
        await bus.block()
    return bus.exit_code

if __name__ == "__main__":
    configure_logging(format="json")
    raise SystemExit(anyio.run(main, backend=os.environ.get("BACKEND", "asyncio")))
"""


class TestProcesses:
    def start_parent(self, spawn: Spawner, backend: str = "asyncio") -> tuple[Any, int]:
        tests = os.path.dirname(os.path.abspath(__file__))
        parent = spawn.script(PARENT.format(tests=tests), env={"BACKEND": backend})
        parent.wait_for("child running")
        [event] = [e for e in parent.events() if e["event"] == "child running"]
        return parent, int(event["child_pid"])

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_parent_killed_with_sigkill_leaves_no_child(self, spawn: Spawner, backend: str) -> None:
        """SIGKILL to the parent ends its child too, within a second or so (here bounded at 10 s)."""
        parent, child = self.start_parent(spawn, backend)
        assert is_alive(child)
        parent.send(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not is_alive(child)
        parent.assert_nothing_left()

    def test_terminal_ctrl_c_lets_the_parent_drive_the_shutdown(self, spawn: Spawner) -> None:
        """SIGINT to the whole foreground group (a terminal's Ctrl-C): the child drains and both exit cleanly."""
        parent, child = self.start_parent(spawn)
        os.killpg(os.getpgid(parent.pid), signal.SIGINT)
        assert parent.wait() == 0, parent.output
        assert "echo child drained" in parent.output
        assert not is_alive(child)
        parent.assert_nothing_left()

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_sigterm_stops_parent_and_child_with_code_0(self, spawn: Spawner, backend: str) -> None:
        """SIGTERM to the parent stops the child first, then the parent exits 0."""
        parent, child = self.start_parent(spawn, backend)
        parent.send(signal.SIGTERM)
        assert parent.wait() == 0, parent.output
        assert not is_alive(child)
        parent.assert_nothing_left()


class TestMore:
    def test_bad_arguments_are_clear_errors(self) -> None:
        """A function that is not callable, a negative grace or a zero heartbeat_misses is refused."""
        bus = Bus()
        with pytest.raises(TypeError, match="callable"):
            ChildBroker(bus, "x", 42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="grace"):
            ChildBroker(bus, "x", child_functions.echo, grace=-1)
        with pytest.raises(ValueError, match="heartbeat_misses"):
            ChildBroker(bus, "x", child_functions.echo, heartbeat_misses=0)
        with pytest.raises(ValueError, match="name"):
            ChildBroker(bus, "", child_functions.echo)

    async def test_iterating_ends_after_the_stop_with_every_message(self) -> None:
        """``async for msg in child`` yields what the child sent, then ends once it is stopped."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "echo", child_functions.echo)
            broker.subscribe()
            await bus.start()
            for number in range(3):
                await broker.send(number)
            await bus.stop()
            with anyio.fail_after(30):
                received = [message async for message in broker]
            broker.unsubscribe()
            assert broker.supervisor is not None and broker.supervisor.children() == []
        assert received == [("echo", n) for n in range(3)]

    async def test_receiving_again_after_the_end_raises_end_of_link_again(self) -> None:
        """In the child, receive() after the iteration has ended raises EndOfLink again instead of waiting."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "again", child_functions.receives_after_the_end, grace=20)
            broker.subscribe()
            await bus.start()
            await bus.stop()
            with anyio.fail_after(30):
                assert [message async for message in broker] == [("again", "EndOfLink")]
            assert broker.state is ChildState.STOPPED

    async def test_a_child_not_ready_within_start_timeout_fails_the_start_and_is_killed(self) -> None:
        """A start_timeout shorter than a worker's boot fails bus.start() with TimeoutError; no worker is left."""
        before = descendants()
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            ChildBroker(bus, "slow", child_functions.echo, start_timeout=0.001, restart="temporary").subscribe()
            with anyio.fail_after(30), pytest.raises(ExceptionGroup) as info:
                await bus.start()
            assert bus.state is State.EXITING and bus.exit_code == 70
        [error] = info.value.exceptions
        assert isinstance(error, TimeoutError)
        assert str(error) == "child 'slow' was not ready within 0.001 s"
        [exit] = exits
        assert exit.name == "slow" and "was not ready within 0.001 s" in exit.reason
        await wait_gone(*(descendants() - before))

    async def test_sigterm_to_the_child_exits_it_through_its_bus(self, log_recorder: LogRecorder) -> None:
        """A child sent SIGTERM exits cleanly through its own bus (code 0); a permanent one comes back."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "worker", child_functions.report_pid)
            broker.subscribe()
            await bus.start()
            _, first = await broker.receive()
            os.kill(first, signal.SIGTERM)
            with anyio.fail_after(30):
                _, second = await broker.receive()
            assert second != first
        assert (exits[0].pid, exits[0].exit_code, exits[0].signal) == (first, 0, None)
        assert log_recorder.matching("Child got SIGTERM: exiting")


class TestEntryPointsAndFrames:
    async def test_a_class_with_a_run_method_is_a_child(self) -> None:
        """A class built with (bus, link) whose async run() serves the link works as a child."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "doubler", child_functions.Doubler)
            broker.subscribe()
            await bus.start()
            await broker.send(21)
            with anyio.fail_after(30):
                assert await broker.receive() == 42

    async def test_an_oversized_message_is_refused_and_nothing_else_is_lost(self) -> None:
        """A message over max_frame_size is an error at send; the messages around it arrive."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "echo", child_functions.echo, max_frame_size=1024)
            broker.subscribe()
            await bus.start()
            await broker.send("before")
            with pytest.raises(FrameTooLarge):
                await broker.send(b"x" * 4096)
            await broker.send("after")
            with anyio.fail_after(30):
                assert [await broker.receive(), await broker.receive()] == [("echo", "before"), ("echo", "after")]
