"""Fleet operations from Python and from ``aiobus fleet``: status, graceful, stop and exit of a group of
buses, the answers collected by a deadline, who did not answer, and the presence of each bus."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest
from redis_servers import RedisServer

from aiobus import Bus, State
from aiobus.redis import Fleet, RedisBridge


@asynccontextmanager
async def fleet_of(url: str, prefix: str, *nodes: str, group: str = "g") -> AsyncIterator[dict[str, Bus]]:
    """Started buses, each with a bridge named after it, in one group."""
    async with AsyncExitStack() as stack:
        buses = {}
        for node in nodes:
            bus = await stack.enter_async_context(Bus())
            RedisBridge(bus, url, node=node, prefix=prefix, group=group).subscribe()
            await bus.start()
            buses[node] = bus
        yield buses


async def fleet_command(*args: str, url: str) -> tuple[int, str, str]:
    """``aiobus fleet ARGS`` as a real process, the URL in the environment: (exit code, stdout, stderr)."""
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "aiobus", "fleet", *args], env={**os.environ, "AIOBUS_REDIS_URL": url}, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


class TestFleet:
    async def test_status_collects_every_bus_state(self, shared_redis: str, prefix: str, no_task_leak: None) -> None:
        """Each bus present answers with its state; nobody is missing."""
        async with fleet_of(shared_redis, prefix, "a", "b"):
            fleet = Fleet(shared_redis, prefix=prefix, group="g")
            members = await fleet.members()
            result = await fleet.status(deadline=30)

        assert ["a", "b"] == list(members)
        assert ({"a": "STARTED", "b": "STARTED"}, (), True) == (dict(result.answered), result.missing, result.ok)

    async def test_graceful_stop_and_exit_are_done_after_the_answer(self, shared_redis: str, prefix: str) -> None:
        """graceful is published on each bus; stop leaves them STOPPED and reachable; exit ends them."""
        async with fleet_of(shared_redis, prefix, "a", "b") as buses:
            fleet = Fleet(shared_redis, prefix=prefix, group="g")
            graceful = {node: anyio.Event() for node in buses}
            for node, bus in buses.items():
                bus.subscribe("graceful", graceful[node].set)
            assert (await fleet.graceful(deadline=30)).ok
            with anyio.fail_after(30):
                for event in graceful.values():
                    await event.wait()
            assert (await fleet.stop(deadline=30)).ok
            with anyio.fail_after(30):
                for bus in buses.values():
                    await bus.wait(State.STOPPED)
            stopped = await fleet.status(deadline=30)
            exited = await fleet.exit(deadline=30)
            with anyio.fail_after(30):
                for bus in buses.values():
                    await bus.wait(State.EXITING)
            left = await fleet.members()

        assert {"a": "STOPPED", "b": "STOPPED"} == dict(stopped.answered)
        assert ({"a": "STOPPED", "b": "STOPPED"}, ()) == (dict(exited.answered), exited.missing)
        assert {} == left  # each deleted its presence key at its exit

    async def test_an_op_for_named_nodes_leaves_the_others_alone(self, shared_redis: str, prefix: str) -> None:
        """exit for node a: a exits, b goes on; a named node that is not there is missing."""
        async with fleet_of(shared_redis, prefix, "a", "b") as buses:
            fleet = Fleet(shared_redis, prefix=prefix, group="g")
            result = await fleet.exit(deadline=2, nodes=["a", "ghost"])
            with anyio.fail_after(30):
                await buses["a"].wait(State.EXITING)
            assert State.STARTED is buses["b"].state

        assert ({"a": "STARTED"}, ("ghost",)) == (dict(result.answered), result.missing)

    async def test_a_bus_that_does_not_answer_is_named_missing(self, shared_redis: str, prefix: str) -> None:
        """A bus present (its key alive) but not answering fleet requests is missing at the deadline."""
        async with AsyncExitStack() as stack:
            bus = await stack.enter_async_context(Bus())
            RedisBridge(bus, shared_redis, node="deaf", prefix=prefix, group="g", fleet=False).subscribe()
            await bus.start()
            await stack.enter_async_context(fleet_of(shared_redis, prefix, "a"))
            result = await Fleet(shared_redis, prefix=prefix, group="g").status(deadline=1)

        assert ({"a": "STARTED"}, ("deaf",), False) == (dict(result.answered), result.missing, result.ok)

    async def test_a_listener_that_hangs_does_not_keep_the_bus_from_answering(
        self, shared_redis: str, prefix: str
    ) -> None:
        """Fleet requests come on a connection of their own: a bus stuck in a bridged message's listener
        still answers, and its exit cancels that listener."""
        async with AsyncExitStack() as stack:
            sender = await stack.enter_async_context(Bus())
            RedisBridge(sender, shared_redis, node="sender", prefix=prefix, group="s", outgoing=["x"]).subscribe()
            stuck = await stack.enter_async_context(Bus())
            RedisBridge(stuck, shared_redis, node="stuck", prefix=prefix, group="g", incoming=["x"]).subscribe()
            entered = anyio.Event()

            async def hang(*_: object) -> None:
                entered.set()
                await anyio.sleep_forever()

            stuck.subscribe("x", hang)
            await sender.start()
            await stuck.start()
            await sender.publish("x", 1)
            with anyio.fail_after(30):
                await entered.wait()
            fleet = Fleet(shared_redis, prefix=prefix, group="g")
            status = await fleet.status(deadline=30)
            exited = await fleet.exit(deadline=30)
            with anyio.fail_after(30):
                await stuck.wait(State.EXITING)

        assert ({"stuck": "STARTED"}, ()) == (dict(status.answered), status.missing)
        assert exited.ok

    async def test_another_group_is_not_asked(self, shared_redis: str, prefix: str) -> None:
        """A bus of group h neither answers group g's request nor counts as missing there."""
        async with fleet_of(shared_redis, prefix, "a"), fleet_of(shared_redis, prefix, "other", group="h"):
            result = await Fleet(shared_redis, prefix=prefix, group="g").status(deadline=30)

        assert ({"a": "STARTED"}, ()) == (dict(result.answered), result.missing)

    async def test_an_unknown_op_is_refused(self, shared_redis: str) -> None:
        """Only status, graceful, stop and exit may be asked."""
        with pytest.raises(ValueError, match="status, graceful, stop, exit"):
            await Fleet(shared_redis).request("restart")


class TestFleetCommand:
    async def test_status_prints_a_table_and_ends_with_0(self, shared_redis: str, prefix: str) -> None:
        """Every bus answered: a row each, and exit code 0."""
        async with fleet_of(shared_redis, prefix, "a", "b"):
            code, out, err = await fleet_command("--prefix", prefix, "--group", "g", "status", url=shared_redis)

        assert 0 == code, out + err
        assert ["a", "b"] == [line.split()[0] for line in out.splitlines()[1:3]]
        assert "status: 2 of 2 answered." in out

    async def test_json_names_who_answered_and_who_did_not_and_ends_with_1(
        self, shared_redis: str, prefix: str
    ) -> None:
        """--json: answered, missing and members; a silent bus makes the exit code 1."""
        async with AsyncExitStack() as stack:
            bus = await stack.enter_async_context(Bus())
            RedisBridge(bus, shared_redis, node="deaf", prefix=prefix, group="g", fleet=False).subscribe()
            await bus.start()
            await stack.enter_async_context(fleet_of(shared_redis, prefix, "a"))
            args = ("--prefix", prefix, "--group", "g", "--deadline", "1", "--json", "status")
            code, out, err = await fleet_command(*args, url=shared_redis)

        document = json.loads(out)
        assert 1 == code, out + err
        assert ({"a": "STARTED"}, ["deaf"]) == (document["answered"], document["missing"])
        assert {"a", "deaf"} == set(document["members"])

    async def test_an_absent_server_is_exit_code_3_with_the_password_hidden(self) -> None:
        """Nothing listening: one line naming the server without its password, exit code 3."""
        code, out, err = await fleet_command("status", url="redis://me:hidden-pw@127.0.0.1:1/0")

        assert 3 == code
        assert "cannot reach Redis at redis://me:***@127.0.0.1:1/0" in err
        assert "hidden-pw" not in out + err

    async def test_a_wrong_password_is_exit_code_3_with_the_password_hidden(self, own_redis: RedisServer) -> None:
        """Redis refuses us: one line saying so, the password hidden, exit code 3."""
        own_redis.password = "right-pw-1234"
        own_redis.restart()
        code, out, err = await fleet_command("status", url=own_redis.url.replace("right-pw-1234", "wrong-pw-5678"))

        assert 3 == code
        assert "refused us" in err and "default:***@" in err
        assert "wrong-pw-5678" not in out + err and "Traceback" not in err

    async def test_without_a_url_it_is_a_usage_error(self) -> None:
        """No --redis and no AIOBUS_REDIS_URL: exit code 2."""
        with anyio.fail_after(60):
            env = {key: value for key, value in os.environ.items() if key != "AIOBUS_REDIS_URL"}
            done = await anyio.run_process([sys.executable, "-m", "aiobus", "fleet", "status"], env=env, check=False)

        assert 2 == done.returncode
        assert "AIOBUS_REDIS_URL" in done.stderr.decode()
