"""Fault injection: child brokers killed by real signals while messages flow, and a child that ignores SIGTERM.

The promise under test (see ``ChildBroker.send`` and ``ChildExit.lost``): a message that
``send`` accepted goes to the incarnation that was current then, and to no other; if that
incarnation dies before its function acknowledged the message (asked for the next one),
the message is counted in the ``lost`` of the exit published on ``child_exit``. So every
accepted message is processed at most once, and if it was not processed, it is counted.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import child_functions
import pytest
from helpers import LogRecorder
from processes import alive, descendants

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit, ChildState, ChildUnavailable, Supervisor

pytestmark = [pytest.mark.faults, pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)")]

NAME = "recorder"
#: Generous bounds: a restart takes about 0.3 s here.
STEP_TIMEOUT = 30.0

log = logging.getLogger(__name__)


@pytest.fixture
def no_process_left() -> Iterator[None]:
    """Fail the test if a process it started (or one of theirs) is still running at its end."""
    before = descendants()
    yield
    left = alive(sorted(descendants() - before))
    assert not left, f"the test left child processes running: {left}"


class Watch:
    """What the bus says about the child, with an event for each change (no polling)."""

    def __init__(self, broker: ChildBroker) -> None:
        self.broker = broker
        self.started: list[int] = []  # pid of each incarnation, in order
        self.exits: list[ChildExit] = []
        self.attempts = 0  # messages the senders tried to send so far
        self._changed = anyio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def on_log(self, msg: str, level: int, **fields: Any) -> None:
        if msg == f"Child {NAME} started":
            self.started.append(int(fields["child_pid"]))
            self.notify()

    def on_exit(self, exit: ChildExit) -> None:
        self.exits.append(exit)
        self.notify()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        with anyio.move_on_after(STEP_TIMEOUT):
            while not condition():
                await self._changed.wait()
        assert condition(), f"not within {STEP_TIMEOUT:g} s: {what}"

    def running(self) -> int | None:
        """The pid of the incarnation that is up, if one is (started and not ended yet)."""
        if len(self.started) > len(self.exits) and self.broker.state is ChildState.RUNNING:
            return self.started[-1]
        return None


@dataclass
class Outcome:
    """What the senders saw, what the children recorded, and what the exits said."""

    kills: int
    attempts: int
    accepted: list[tuple[int, int]] = field(default_factory=list)  # (number, pid), in the order accepted
    refused: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    exits: list[ChildExit] = field(default_factory=list)
    processed: list[tuple[int, int]] = field(default_factory=list)  # (pid, number), as recorded

    def check(self) -> dict[str, int]:
        """Assert the promise, and return the counts."""
        assert len(self.accepted) + len(self.refused) == self.attempts
        by_pid = {exit.pid: exit for exit in self.exits}
        assert len(by_pid) == len(self.exits) == self.kills + 1, self.exits

        # Each kill is an exit that says so; the last incarnation was stopped and drained.
        assert self.killed == [exit.pid for exit in self.exits[:-1]]
        for exit in self.exits[:-1]:
            assert exit.signal == "SIGKILL" and exit.exit_code is None, exit
            assert not exit.expected and exit.reason.startswith("killed by SIGKILL"), exit
            assert (exit.lost > 0) == ("may be lost" in exit.reason), exit
        last = self.exits[-1]
        assert last.expected and last.exit_code == 0 and last.signal is None and last.lost == 0, last

        # Nothing processed twice, nothing refused processed, each by the incarnation that accepted it.
        numbers = Counter(number for _, number in self.processed)
        duplicates = sorted(number for number, times in numbers.items() if times > 1)
        assert not duplicates, f"processed more than once: {duplicates}"
        accepted_by = dict(self.accepted)
        assert len(accepted_by) == len(self.accepted)
        processed_by = {number: pid for pid, number in self.processed}
        assert not set(self.refused) & set(processed_by), "a refused message was processed"
        assert set(processed_by) <= set(accepted_by), "a message nobody accepted was processed"
        wrong = {n: (pid, accepted_by[n]) for n, pid in processed_by.items() if pid != accepted_by[n]}
        assert not wrong, f"processed by another incarnation than the one that accepted it: {wrong}"

        # Per incarnation: in order, a prefix of what it accepted; the rest counted in its exit.
        unprocessed = 0
        for pid, exit in by_pid.items():
            mine = [number for number, accepted_pid in self.accepted if accepted_pid == pid]
            done = [number for done_pid, number in self.processed if done_pid == pid]
            assert done == mine[: len(done)], f"incarnation {pid} processed out of order or with a gap"
            missing = len(mine) - len(done)
            assert missing <= exit.lost, f"incarnation {pid}: {missing} accepted and not processed, {exit}"
            unprocessed += missing
        lost = sum(exit.lost for exit in self.exits)
        return {
            "kills": self.kills,
            "sent": self.attempts,
            "accepted": len(self.accepted),
            "refused": len(self.refused),
            "processed": len(self.processed),
            "accepted_not_processed": unprocessed,
            "reported_lost": lost,
            "reported_lost_but_processed": lost - unprocessed,
            "duplicates": len(duplicates),
        }


async def kill_while_sending(path: Path, *, kills: int, messages: int, senders: int, seed: int) -> Outcome:
    """``senders`` tasks send ``messages`` numbered messages to a recording child while another
    task SIGKILLs the child ``kills`` times, each time at a random point of the flow."""
    pace = random.Random(seed)
    outcome = Outcome(kills=kills, attempts=messages)
    async with Bus() as bus:
        supervisor = Supervisor(bus, max_restarts=kills + 10, within=3600, backoff=0.01, max_backoff=0.02)
        supervisor.subscribe()
        broker = ChildBroker(
            bus,
            NAME,
            child_functions.records,
            supervisor=supervisor,
            main_interval=0.01,  # frequent heartbeats: acknowledgements, so the lost counts are tight
            heartbeat_misses=None,  # every kill is ours
            send_timeout=STEP_TIMEOUT,
            high_water=2048,  # a few dozen messages fill the link: sends wait, and some are refused
        )
        broker.subscribe()
        watch = Watch(broker)
        bus.subscribe("log", watch.on_log)
        bus.subscribe(CHILD_EXIT_CHANNEL, watch.on_exit)
        await bus.start()

        numbers = iter(range(messages))

        async def send_all(yield_every: int) -> None:
            for number in numbers:
                try:
                    await broker.send((str(path), number))
                except ChildUnavailable:
                    outcome.refused.append(number)
                else:
                    pid = broker.pid  # no await since send returned: the incarnation that accepted it
                    assert pid is not None
                    outcome.accepted.append((number, pid))
                watch.attempts += 1
                watch.notify()
                if number % yield_every == 0:
                    await anyio.lowlevel.checkpoint()

        def attempted(threshold: int) -> Callable[[], bool]:
            return lambda: watch.attempts >= threshold

        def reported(kills: int) -> Callable[[], bool]:
            return lambda: len(watch.exits) >= kills

        async def kill_at_random() -> None:
            at = sorted(pace.sample(range(messages // 20, messages * 9 // 10), kills))
            for count, threshold in enumerate(at, 1):
                await watch.until(lambda: watch.running() is not None, "the child is up")
                await watch.until(attempted(threshold), "messages flow")
                await anyio.sleep(pace.choice([0, 0, pace.uniform(0, 0.01)]))  # the fault's moment, not a wait
                pid = watch.running()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                outcome.killed.append(pid)
                await watch.until(reported(count), "the kill is reported")
            await watch.until(lambda: watch.running() is not None, "the child is up after the last kill")

        async with anyio.create_task_group() as group:
            group.start_soon(kill_at_random)
            for sender in range(senders):
                group.start_soon(send_all, 3 + sender)
        await bus.stop()  # the last incarnation drains what it accepted
        outcome.exits = list(watch.exits)

    data = await anyio.Path(path).read_bytes() if await anyio.Path(path).exists() else b""
    assert len(data) % child_functions.RECORD_SIZE == 0, "a record was cut short"
    for line in data.decode().splitlines():
        pid, number = line.split()
        outcome.processed.append((int(pid), int(number)))
    return outcome


KILLS, MESSAGES, SENDERS = 25, 20_000, 3


async def test_sigkill_at_random_while_messages_flow_loses_nothing_silently(
    tmp_path: Path, no_process_left: None
) -> None:
    """25 SIGKILLs at random moments while 3 tasks send 20,000 messages: every accepted message is
    processed once by the incarnation that accepted it, or counted in that incarnation's exit."""
    outcome = await kill_while_sending(tmp_path / "processed", kills=KILLS, messages=MESSAGES, senders=SENDERS, seed=7)
    counts = outcome.check()
    log.info("asyncio: %s", counts)
    assert counts["kills"] == KILLS and counts["sent"] == MESSAGES and counts["duplicates"] == 0


def test_sigkill_at_random_while_messages_flow_on_trio(tmp_path: Path, no_process_left: None) -> None:
    """The same on trio, shorter: 10 SIGKILLs while 2 tasks send 8,000 messages."""
    outcome = anyio.run(
        lambda: kill_while_sending(tmp_path / "processed", kills=10, messages=8000, senders=2, seed=11),
        backend="trio",
    )
    counts = outcome.check()
    log.info("trio: %s", counts)
    assert counts["kills"] == 10 and counts["sent"] == 8000 and counts["duplicates"] == 0


async def test_a_message_being_worked_on_when_the_child_dies_is_counted(no_process_left: None) -> None:
    """A message the child's function took and had not finished with is in ``lost``, heartbeats or not."""
    exits: list[ChildExit] = []
    ended = anyio.Event()

    def record(exit: ChildExit) -> None:
        exits.append(exit)
        ended.set()

    async with Bus(main_interval=0.02) as bus:
        bus.subscribe(CHILD_EXIT_CHANNEL, record)
        broker = ChildBroker(bus, "stalls", child_functions.stalls_on_first, restart="temporary")
        broker.subscribe()
        await bus.start()
        for number in range(3):
            await broker.send(number)
        with anyio.fail_after(STEP_TIMEOUT):
            assert await broker.receive() == ("took", 0)  # sent after 3 heartbeats went out
        pid = broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(STEP_TIMEOUT):
            await ended.wait()
    [exit] = exits
    assert exit.pid == pid and exit.signal == "SIGKILL"
    assert exit.lost == 3  # the one being worked on, and the two never taken
    assert "3 message(s) sent to it were not acknowledged" in exit.reason


async def test_a_child_that_ignores_sigterm_is_killed_at_the_stop(
    log_recorder: LogRecorder, no_process_left: None
) -> None:
    """stop: grace, SIGTERM (discarded by the child), term_grace, SIGKILL; the exit says so; nothing is left."""
    exits: list[ChildExit] = []
    async with Bus() as bus:
        bus.subscribe("log", log_recorder)
        bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
        broker = ChildBroker(bus, "deaf", child_functions.ignores_sigterm, grace=0.3, term_grace=0.3)
        broker.subscribe()
        await bus.start()
        with anyio.fail_after(STEP_TIMEOUT):
            _, pid = await broker.receive()  # SIGTERM is ignored from here on
            await bus.stop()
        assert not alive([pid])
        assert broker.state is ChildState.STOPPED
    [exit] = exits
    assert exit.pid == pid
    assert exit.signal == "SIGKILL" and exit.exit_code is None
    assert exit.reason.startswith("killed by SIGKILL (SIGKILL ")
    assert "s after the stop, SIGTERM having failed)" in exit.reason
    assert exit.expected and not exit.failed and exit.lost == 0
    sigterm, sigkill = (log_recorder.matching(text) for text in ("Child deaf still running after", ": SIGKILL"))
    assert sigterm[0].msg == "Child deaf still running after 0.3 s: SIGTERM"
    assert sigkill[-1].msg == "Child deaf still running after SIGTERM: SIGKILL"
