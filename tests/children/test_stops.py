"""Stopping child brokers when things are stuck: a link full towards a child that never reads,
a stop while the supervisor is between a crash and the restart, and a child whose loop blocks.

Every test runs real worker processes and checks that none of them (nor anything they
started) is left running afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import hostile_functions
import pytest
from hostile_functions import CRASH_FLAG, Records, is_worker
from processes import alive, descendants, printed_pids

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit, ChildUnavailable, Supervisor

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)"),
    pytest.mark.usefixtures("nothing_left_running"),
]

#: Generous bound for one step (a worker starts in about 0.3 s on a quiet machine).
STEP = 30.0
#: The size of each message sent to a child that never reads: a few fill its socket and link.
BIG = 64 * 1024


def new_workers(before: set[int]) -> list[int]:
    """Worker processes descended from this one since ``before``, still running."""
    return alive(sorted(pid for pid in descendants() - before if is_worker(pid)))


async def fill_the_link(broker: ChildBroker, blocked: anyio.Event) -> None:
    """Send big messages to a child that never reads until a send waits; then wait in a send
    until the stop refuses it (ChildUnavailable)."""
    message = b"m" * BIG
    try:
        while True:
            with anyio.move_on_after(2) as scope:  # a send that waits 2 s: the link is full
                await broker.send(message)
            if scope.cancelled_caught:
                blocked.set()
                await broker.send(message)  # stuck until the stop
    except ChildUnavailable:
        pass


class TestStopWithAFullLink:
    async def test_exit_with_a_full_link_ends_within_grace_and_term_grace(self) -> None:
        """A send is stuck on a full link to a child that never reads: ``bus.exit()`` with grace=1 and
        term_grace=1 still ends within 15 s (2 s of timetable, the rest slack for a noisy machine),
        the stuck send raises ChildUnavailable, and the child is gone."""
        async with Bus() as bus, anyio.create_task_group() as tasks:
            broker = ChildBroker(bus, "deaf", hostile_functions.never_reads, high_water=1024, grace=1, term_grace=1)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
            blocked = anyio.Event()
            tasks.start_soon(fill_the_link, broker, blocked)
            with anyio.fail_after(STEP):
                await blocked.wait()
            start = anyio.current_time()
            with anyio.fail_after(60):
                await bus.exit()
            took = anyio.current_time() - start
        assert took < 15, f"the exit took {took:.1f} s"
        assert [] == alive([pid])

    async def test_one_for_all_restart_is_not_held_up_by_a_siblings_full_link(self) -> None:
        """one_for_all, two children: one with a send stuck on its full link, the other SIGKILLed; the
        killed one comes back in a new process that answers, within 30 s (its sibling's stop takes
        grace + term_grace = 2 s at most, the rest is slack)."""
        async with Bus() as bus, anyio.create_task_group() as tasks:
            supervisor = Supervisor(bus, strategy="one_for_all", backoff=0.01)
            supervisor.subscribe()
            deaf = ChildBroker(
                bus,
                "deaf",
                hostile_functions.never_reads,
                supervisor=supervisor,
                high_water=1024,
                grace=1,
                term_grace=1,
            )
            deaf.subscribe()
            victim = ChildBroker(bus, "victim", hostile_functions.answers, supervisor=supervisor)
            victim.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, deaf_pid = await deaf.receive()
                _, first = await victim.receive()
            blocked = anyio.Event()
            tasks.start_soon(fill_the_link, deaf, blocked)
            with anyio.fail_after(STEP):
                await blocked.wait()
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(STEP):
                _, second = await victim.receive()
                await victim.send("back?")
                answer = await victim.receive()
            old_deaf_left = alive([deaf_pid])
            await bus.exit()
        assert first != second
        assert ("answer", "back?", second) == answer
        assert [] == old_deaf_left


class TestStopDuringRestart:
    @pytest.mark.parametrize("crash", ["exits", "sigkill"])
    @pytest.mark.parametrize("phase", ["backoff", "spawning"])
    async def test_stop_during_a_restart_leaves_no_worker_and_start_works_again(
        self, crash: str, phase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The child crashes (its bus exits at once, or SIGKILL); ``bus.stop()`` while the supervisor
        waits its 0.5 s backoff, or while the next worker is being spawned: afterwards no worker of
        it runs; once the crash cause is gone, ``bus.start()`` on the same bus brings it back."""
        flag = tmp_path / "crash"
        monkeypatch.setenv(CRASH_FLAG, str(flag))
        before = descendants()
        exits: list[ChildExit] = []
        async with Bus() as bus:
            crashed = anyio.Event()

            def on_exit(exit: ChildExit) -> None:
                exits.append(exit)
                crashed.set()

            bus.subscribe(CHILD_EXIT_CHANNEL, on_exit)
            supervisor = Supervisor(bus, backoff=0.5, max_restarts=100, within=60)
            supervisor.subscribe()
            broker = ChildBroker(bus, "crasher", hostile_functions.crashes_if_flagged, supervisor=supervisor)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, first = await broker.receive()
            running = set(new_workers(before))
            if crash == "exits":
                flag.touch()  # the next incarnations exit as soon as they start
                os.kill(first, signal.SIGTERM)  # this one exits cleanly: permanent, so restarted
            else:
                os.kill(first, signal.SIGKILL)
            with anyio.fail_after(STEP):
                await crashed.wait()
            if phase == "spawning":
                with anyio.fail_after(STEP):  # the backoff is over once a new worker process exists
                    while not set(new_workers(before)) - running:  # noqa: ASYNC110 - no event tells it
                        await anyio.sleep(0.005)
            await bus.stop()
            left_after_stop = new_workers(before)
            flag.unlink(missing_ok=True)
            await bus.start()
            with anyio.fail_after(STEP):
                while (message := await broker.receive())[0] != "pid":
                    pass
                await broker.send("again")
                answer = await broker.receive()
        assert [] == left_after_stop
        assert ("answer", "again", message[1]) == answer


class TestBlockingWork:
    async def test_blocking_for_2_s_per_message_is_not_a_hang_by_default(self) -> None:
        """A child whose function blocks its loop 2 s per message (time.sleep) answers both messages
        with the default hang_timeout, in the same process: it is not killed as hung."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "sleeper", hostile_functions.sleeps_per_message)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
                await broker.send(1)
                await broker.send(2)
                answers = [await broker.receive(), await broker.receive()]
            unexpected_exits = list(exits)
        assert ([("answer", 1, pid), ("answer", 2, pid)], []) == (answers, unexpected_exits)

    async def test_blocking_past_hang_timeout_is_killed_and_the_log_says_what_to_do(self, records: Records) -> None:
        """With hang_timeout=0.5 the same child is killed as hung while it blocks, and the log line
        names ``hang_timeout`` and ``anyio.to_thread``."""
        exits: list[ChildExit] = []
        killed = anyio.Event()

        def on_exit(exit: ChildExit) -> None:
            exits.append(exit)
            killed.set()

        async with Bus() as bus:
            bus.subscribe("log", records)
            bus.subscribe(CHILD_EXIT_CHANNEL, on_exit)
            broker = ChildBroker(bus, "sleeper", hostile_functions.sleeps_per_message, hang_timeout=0.5)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
                await broker.send(1)
                await killed.wait()
        [hung] = [r for r in records.records if "hung" in r.msg and r.level == logging.ERROR]
        assert (True, True) == ("hang_timeout" in hung.msg, "anyio.to_thread" in hung.msg)
        assert (pid, "SIGKILL") == (exits[0].pid, exits[0].signal)
        assert exits[0].reason.startswith("hung")


class TestStopsFoundInReview:
    async def test_a_cancelled_terminate_kills_the_child_and_the_bus_still_stops(self) -> None:
        """A terminate() cut short by its caller kills the child at once; a later stop of the bus returns."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "deaf", hostile_functions.ignores_everything, grace=30, term_grace=30)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
            with anyio.move_on_after(0.3):
                await broker.terminate()
            assert not alive([pid])
            with anyio.fail_after(STEP):
                await bus.stop()
        assert broker.last_exit is not None and "the stop was cancelled" in broker.last_exit.reason

    async def test_a_subprocess_out_of_the_group_neither_delays_the_stop_nor_survives_it(self) -> None:
        """A setsid'd subprocess holding the child's stdout does not hold up the stop, and is gone after it."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "escaper", hostile_functions.starts_an_escaping_subprocess, grace=10)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, escaped = await broker.receive()
            assert alive([escaped])
            with anyio.fail_after(9):  # well within grace: the child itself ends at once
                await bus.stop()
        assert broker.last_exit is not None and broker.last_exit.reason == "exited"
        assert not alive([escaped])

    async def test_a_function_blocking_its_loop_at_once_still_starts(self) -> None:
        """A function that blocks the child's loop at once still lets the child say Ready: no timeout, it starts."""
        async with Bus() as bus:
            broker = ChildBroker(bus, "blocker", hostile_functions.blocks_its_loop_at_once, start_timeout=3)
            broker.subscribe()
            with anyio.fail_after(STEP):
                await bus.start()
            assert broker.state.value == "running"

    async def test_messages_a_child_sent_before_its_stop_all_arrive(self) -> None:
        """Messages sent and not read before the stop (past the inbox's bound, within its drain) still arrive."""
        async with Bus() as bus:
            broker = ChildBroker(
                bus, "sender", hostile_functions.sends_and_returns, inbox_bytes=1_000_000, restart="temporary"
            )
            broker.subscribe()
            await bus.start()
            await anyio.lowlevel.checkpoint()
            with anyio.fail_after(STEP):
                await bus.stop()
            received = [await broker.receive() for _ in range(hostile_functions.SENT_AT_STOP)]
        assert [number for number, _ in received] == list(range(hostile_functions.SENT_AT_STOP))
        assert all(len(blob) == hostile_functions.SENT_AT_STOP_BYTES for _, blob in received)


#: A service with a broker whose subprocesses (in its process group) would outlive a SIGKILLed parent.
PARENT_SERVICE = """
import subprocess
import anyio
from aiobus import Bus, ChildBroker


async def broker(bus, link):
    kids = [subprocess.Popen(["sleep", "1000"]), subprocess.Popen(["sh", "-c", "sleep 1001 & sleep 1002"])]
    await link.send([kid.pid for kid in kids])
    async for _ in link:
        pass


async def main():
    async with Bus() as bus:
        child = ChildBroker(bus, "broker", broker)
        child.subscribe()
        await bus.start()
        print("pids", child.pid, *await child.receive(), flush=True)
        await bus.block()


if __name__ == "__main__":
    anyio.run(main)
"""


class TestParentKilled:
    @pytest.mark.parametrize("attempt", range(5))
    def test_a_sigkilled_parent_leaves_no_worker_nor_subprocess(self, tmp_path: Path, attempt: int) -> None:
        """kill -9 of the parent: the worker and the subprocesses of its group are all gone within 5 s."""
        script = tmp_path / "service.py"
        script.write_text(PARENT_SERVICE)
        with subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
        ) as service:
            try:
                assert service.stdout is not None
                pids = printed_pids(service.stdout)
                before = set(descendants(service.pid))
                assert alive(pids) == pids
            finally:
                service.kill()
        deadline = time.monotonic() + 5
        while alive(sorted(before)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alive(sorted(before)) == []
