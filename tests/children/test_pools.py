"""Pools of child brokers (``ChildBroker(..., workers=N)``): messages spread and each done once,
a killed worker restarted alone, scaling under load, starts together, and nothing left running.

Every test runs real worker processes and checks that none of them is left running afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import fails_once
import hostile_functions
import pytest
from processes import alive, descendants, printed_pids

from aiobus import CHILD_EXIT_CHANNEL, Bus, ChannelFailures, ChildBroker, ChildExit, ChildState, Supervisor

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)"),
    pytest.mark.usefixtures("nothing_left_running"),
]

#: Generous bound for one step (a worker starts in about 0.3 s on a quiet machine).
STEP = 60.0


async def collect(pool: ChildBroker, count: int) -> list[tuple[int, Any]]:
    with anyio.fail_after(STEP):
        return [await pool.receive() for _ in range(count)]


class TestMessages:
    async def test_each_message_is_done_once_and_every_worker_gets_some(self) -> None:
        """90 messages to a pool of 3: each answered exactly once, by all three workers between them."""
        async with Bus() as bus:
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=3)
            pool.subscribe()
            await bus.start()
            assert [worker.name for worker in pool.members] == ["pool[0]", "pool[1]", "pool[2]"]
            assert pool.supervisor is not None
            assert [info.name for info in pool.supervisor.children()] == ["pool[0]", "pool[1]", "pool[2]"]
            pids = {worker.pid for worker in pool.members}
            for number in range(90):
                await pool.send(number)
            answers = await collect(pool, 90)
            await bus.exit()
        assert sorted(message for _, message in answers) == list(range(90))
        assert {pid for pid, _ in answers} == pids and len(pids) == 3

    async def test_a_message_goes_to_the_worker_with_the_fewest_unfinished(self) -> None:
        """Two workers hold a message each: the next messages, each sent once the one before was
        answered, all go to the third."""
        async with Bus() as bus:
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=3)
            pool.subscribe()
            await bus.start()
            first, second, third = pool.members
            free = third.pid
            await first.send("hold")
            await second.send("hold")
            holding = await collect(pool, 2)
            assert {pid for pid, _ in holding} == {first.pid, second.pid}
            answers = []
            for number in range(5):
                await pool.send(number)
                answers += await collect(pool, 1)
            await bus.exit()
        assert answers == [(free, number) for number in range(5)]

    async def test_a_pool_that_is_stopped_ends_its_iteration(self) -> None:
        """``async for`` over a pool ends once every worker has stopped, after their last answers."""
        async with Bus() as bus:
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=2)
            pool.subscribe()
            await bus.start()
            for number in range(4):
                await pool.send(number)
            await bus.stop()
            with anyio.fail_after(STEP):
                answers = [message async for _, message in pool]
        assert sorted(answers) == [0, 1, 2, 3]


class TestFailures:
    async def test_a_killed_worker_is_restarted_alone_and_its_unfinished_message_is_lost(self) -> None:
        """SIGKILL of the worker holding a message: it alone comes back in a new process, its exit counts
        the message it held as lost, and the others keep their processes and answer all along."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            supervisor = Supervisor(bus, backoff=0.01)
            supervisor.subscribe()
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=3, supervisor=supervisor)
            pool.subscribe()
            await bus.start()
            victim, *others = pool.members
            before = [worker.pid for worker in others]
            old = victim.pid
            assert old is not None
            await victim.send("hold")
            assert await collect(pool, 1) == [(old, "holding")]
            os.kill(old, signal.SIGKILL)
            with anyio.fail_after(STEP):
                while victim.state is not ChildState.RUNNING or victim.pid in (None, old):  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # no event says a child is running again
            for number in range(30):
                await pool.send(number)
            answers = await collect(pool, 30)
            after = [worker.pid for worker in others]
            await bus.exit()
        killed = [exit for exit in exits if exit.name == "pool[0]" and exit.signal == "SIGKILL"]
        assert [(exit.pid, exit.lost) for exit in killed] == [(old, 1)]
        assert before == after and victim.restarts == 1 and [w.restarts for w in others] == [0, 0]
        assert sorted(message for _, message in answers) == list(range(30))

    async def test_a_worker_that_cannot_start_fails_the_start_and_leaves_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Four workers starting together, one of which fails to import its function: the bus's start
        fails with that error, and no worker is left running."""
        monkeypatch.setenv(fails_once.FAIL_ONCE, str(tmp_path / "failed"))
        before = descendants()
        async with Bus() as bus:
            pool = ChildBroker(bus, "pool", fails_once.answers, workers=4)
            pool.subscribe()
            with pytest.raises(ChannelFailures) as failed:
                with anyio.fail_after(STEP):
                    await bus.start()
            assert "told to fail its start" in str(failed.value.exceptions[0])
            assert (tmp_path / "failed").exists()
            assert [worker.state for worker in pool.members] == [ChildState.STOPPED] * 4
            assert all(worker.pid is None for worker in pool.members)
        assert alive(sorted(descendants() - before)) == []


class TestScale:
    async def test_scaling_up_and_down_under_load_loses_nothing(self) -> None:
        """A sender sends 300 numbers while the pool grows from 2 to 4 and shrinks to 1: every number is
        answered once, no exit counts a lost message, and the pool ends with one worker."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=2)
            pool.subscribe()
            await bus.start()
            answers: list[Any] = []

            async def send_all() -> None:
                for number in range(300):
                    await pool.send(number)
                    if number % 10 == 0:
                        await anyio.sleep(0.01)

            async def receive_all() -> None:
                answers.extend(await collect(pool, 300))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(send_all)
                tasks.start_soon(receive_all)
                await pool.scale(4)
                grown = {worker.pid for worker in pool.members}
                await pool.scale(1)
            assert pool.supervisor is not None
            names = [info.name for info in pool.supervisor.children()]
            await bus.exit()
        assert sorted(message for _, message in answers) == list(range(300))
        assert len(grown) == 4 and names == ["pool[0]"]
        assert [exit.lost for exit in exits] == [0] * len(exits) and len(exits) == 4

    async def test_scale_before_the_start_changes_what_starts(self) -> None:
        """``scale(3)`` of a pool of 1 before the bus starts: three workers start with the bus."""
        async with Bus() as bus:
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=1)
            pool.subscribe()
            await pool.scale(3)
            await bus.start()
            pids = {worker.pid for worker in pool.members}
            await bus.exit()
        assert len(pids) == 3 and None not in pids

    async def test_bad_sizes_are_refused(self) -> None:
        """workers=0, a float, scale(0) of a pool, and scale() of a single child are errors."""
        async with Bus() as bus:
            for wrong in (0, 2.0, True):
                with pytest.raises(ValueError, match="workers"):
                    ChildBroker(bus, "pool", hostile_functions.works, workers=wrong)  # type: ignore[arg-type]
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=2)
            with pytest.raises(ValueError, match="workers"):
                await pool.scale(0)
            with pytest.raises(TypeError, match="not a pool"):
                await ChildBroker(bus, "single", hostile_functions.works).scale(2)


class TestTogether:
    async def test_workers_start_together_within_the_concurrency(self) -> None:
        """With concurrency=2, up to two of the four workers are starting at any moment, and two are."""
        async with Bus() as bus:
            supervisor = Supervisor(bus, concurrency=2)
            supervisor.subscribe()
            pool = ChildBroker(bus, "pool", hostile_functions.works, workers=4, supervisor=supervisor)
            pool.subscribe()
            most = 0
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:
                    nonlocal most
                    while True:
                        starting = sum(worker.state is ChildState.STARTING for worker in pool.members)
                        most = max(most, starting)
                        await anyio.sleep(0.005)

                tasks.start_soon(watch)
                await bus.start()
                tasks.cancel_scope.cancel()
            await bus.exit()
        assert most == 2

    async def test_an_unordered_group_starts_different_children_together(self) -> None:
        """ordered=False: two single children are starting at the same moment."""
        async with Bus() as bus:
            supervisor = Supervisor(bus, ordered=False)
            supervisor.subscribe()
            children = [ChildBroker(bus, name, hostile_functions.works, supervisor=supervisor) for name in ("a", "b")]
            for child in children:
                child.subscribe()
            both = False
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:
                    nonlocal both
                    while True:
                        both = both or all(child.state is ChildState.STARTING for child in children)
                        await anyio.sleep(0.005)

                tasks.start_soon(watch)
                await bus.start()
                tasks.cancel_scope.cancel()
            await bus.exit()
        assert both


#: A service with a pool of 16 workers; it prints their pids once they are all ready.
POOL_SERVICE = """
import anyio
from aiobus import Bus, ChildBroker
from hostile_functions import works


async def main():
    async with Bus() as bus:
        pool = ChildBroker(bus, "pool", works, workers=16)
        pool.subscribe()
        await bus.start()
        print("pids", *(worker.pid for worker in pool.members), flush=True)
        await bus.block()


if __name__ == "__main__":
    anyio.run(main)
"""


class TestParentKilled:
    def test_a_sigkilled_parent_of_a_16_worker_pool_leaves_nothing(self, tmp_path: Path) -> None:
        """kill -9 of a service running a pool of 16: every worker is gone soon after (the pidfd watch
        in each; a second on a quiet machine, 10 s allowed here)."""
        script = tmp_path / "service.py"
        script.write_text(POOL_SERVICE)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        with subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
        ) as service:
            try:
                assert service.stdout is not None
                pids = printed_pids(service.stdout)
                assert len(pids) == 16 and alive(pids) == pids
            finally:
                service.kill()
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert alive(pids) == []
