"""The bridge under faults, with real processes and a real server: Redis killed and restarted, Redis
paused longer than the deadlines, three buses in three processes with one killed, passwords and ACL
users, a wrong password."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LogRecorder
from processes import Child, Spawner
from redis_servers import RedisServer

from aiobus import Bus, ChannelFailures
from aiobus.redis import Fleet, RedisBridge, RedisUnavailable

SERVICE = str(Path(__file__).resolve().parent.parent / "bridge_service.py")


class Heard:
    """A listener keeping the arguments it is called with; waits for one that matches."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._changed = anyio.Event()

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        self._changed.set()

    async def wait_for(self, first: Any, seconds: float = 30) -> None:
        """Wait for a call whose first argument is ``first``, made after this wait began."""
        start = len(self.calls)
        await self.wait_until(lambda: any(call[:1] == (first,) for call in self.calls[start:]), seconds)

    async def wait_until(self, condition: Callable[[], bool], seconds: float = 30) -> None:
        with anyio.fail_after(seconds):
            while not condition():
                self._changed = anyio.Event()
                await self._changed.wait()


def service(spawn: Spawner, url: str, node: str, prefix: str, *flags: str) -> Child:
    """A bridge_service.py process; returns once its bus has started (connected to Redis)."""
    child = spawn.run([sys.executable, SERVICE, node, prefix, *flags], env={"AIOBUS_REDIS_URL": url})
    child.wait_for("Bus STARTED")
    return child


@asynccontextmanager
async def observer(url: str, prefix: str, recorder: LogRecorder, **options: Any) -> AsyncIterator[tuple[Bus, Heard]]:
    """The test's own bus: sends ping, hears pong and tick."""
    async with Bus() as bus:
        bus.subscribe("log", recorder)
        bridge = RedisBridge(
            bus,
            url,
            node="observer",
            prefix=prefix,
            group="observers",
            outgoing=["ping"],
            incoming=["pong", "tick"],
            **options,
        )
        bridge.subscribe()
        heard = Heard()
        bus.subscribe("pong", heard)
        bus.subscribe("tick", heard)
        bus.bridge = bridge  # type: ignore[attr-defined]
        await bus.start()
        yield bus, heard


def stats(bus: Bus) -> Any:
    return bus.bridge.statistics()  # type: ignore[attr-defined]


class TestRedisKilled:
    async def test_killed_and_restarted_mid_run_the_buses_reconnect_and_state_what_was_missed(
        self, own_redis: RedisServer, spawn: Spawner, log_recorder: LogRecorder
    ) -> None:
        """While Redis is away publishes return at once and are counted; after its restart the buses
        reconnect by themselves, and the ticks published meanwhile are stated as missed."""
        child = service(spawn, own_redis.url, "b", "p", "--ticks", "--timeout", "2")
        async with observer(own_redis.url, "p", log_recorder, timeout=2) as (bus, heard):
            await heard.wait_for("b")  # ticks flow
            own_redis.kill()
            await log_recorder.wait_for("lost Redis", 30)
            with anyio.fail_after(10):  # never waits for Redis
                await bus.publish("ping", "while away")
            assert 1 <= stats(bus).not_bridged["away"]
            await anyio.to_thread.run_sync(child.wait_for, "lost Redis")
            own_redis.start()
            await log_recorder.wait_for("Redis back", 60)
            await anyio.to_thread.run_sync(lambda: child.wait_for("Redis back", timeout=60))
            await heard.wait_for("b", 30)  # ticks again
            await bus.publish("ping", "after")
            await heard.wait_for("b", 30)
            missed = log_recorder.matching("Missed")

        assert 1 <= stats(bus).reconnects
        assert 1 <= stats(bus).missed["b"], log_recorder.messages
        assert "on channel 'tick' from b" in missed[0].msg
        child.send(signal.SIGTERM)
        assert 0 == child.wait(), child.output
        [report] = [event for event in child.events() if event["event"] == "bridge statistics"]
        assert 1 <= report["not_bridged"]["away"]  # its ticks while away, counted
        child.assert_nothing_left()


class TestRedisPaused:
    async def test_paused_longer_than_the_deadlines_the_bus_goes_on_and_reconnects(
        self, own_redis: RedisServer, log_recorder: LogRecorder, spawn: Spawner
    ) -> None:
        """A server stopped with SIGSTOP is detected within the timeout; publishes meanwhile return at
        once, counted; after SIGCONT the bridge reconnects and messages flow again."""
        child = service(spawn, own_redis.url, "b", "p", "--timeout", "1")
        async with observer(own_redis.url, "p", log_recorder, timeout=1, buffer=2) as (bus, heard):
            await bus.publish("ping", 0)
            await heard.wait_for("b")
            own_redis.pause()
            try:
                with anyio.fail_after(30):
                    for i in range(10):
                        await bus.publish("ping", i)  # buffered, overflowing, or counted as away
                await log_recorder.wait_for("lost Redis", 30)
                await bus.publish("ping", "away")
                await anyio.to_thread.run_sync(child.wait_for, "lost Redis")  # its presence refresh timed out
            finally:
                own_redis.resume()
            await log_recorder.wait_for("Redis back", 60)
            await anyio.to_thread.run_sync(lambda: child.wait_for("Redis back", timeout=60))
            await bus.publish("ping", "after")
            await heard.wait_for("b", 30)

        not_bridged = stats(bus).not_bridged
        assert 11 == sum(not_bridged.values()), not_bridged  # none sent: each counted under a reason
        assert 1 <= not_bridged["away"]
        child.send(signal.SIGTERM)
        assert 0 == child.wait(), child.output
        gc.collect()  # the attempts that timed out left no stream open to warn about (warnings are errors)


class TestThreeProcesses:
    async def test_three_buses_one_killed_the_others_go_on_and_the_fleet_names_it(
        self, shared_redis: str, prefix: str, spawn: Spawner, log_recorder: LogRecorder, tmp_path: Path
    ) -> None:
        """Three services answer pings; one SIGKILLed: the two others still do, and the fleet's status
        and exit name it as the one that did not answer (exit code 1)."""
        children = {node: service(spawn, shared_redis, node, prefix, "--ttl", "60") for node in ("n1", "n2", "n3")}
        fleet = Fleet(shared_redis, prefix=prefix, group="test")
        async with observer(shared_redis, prefix, log_recorder) as (bus, heard):
            await bus.publish("ping", "first")
            await heard.wait_until(lambda: {(node, "first") for node in children} <= set(heard.calls))
            status = await fleet.status(deadline=30)
            children["n2"].proc.kill()
            await anyio.to_thread.run_sync(children["n2"].wait)
            await bus.publish("ping", "second")
            await heard.wait_until(lambda: {("n1", "second"), ("n3", "second")} <= set(heard.calls))
            after_kill = await fleet.status(deadline=2)

        assert ({"n1": "STARTED", "n2": "STARTED", "n3": "STARTED"}, ()) == (dict(status.answered), status.missing)
        assert (["n1", "n3"], ("n2",)) == (sorted(after_kill.answered), after_kill.missing)
        assert ("n2", "second") not in heard.calls
        argv = [sys.executable, "-m", "aiobus", "fleet", "--prefix", prefix, "--group", "test", "--deadline", "2"]
        with anyio.fail_after(60):
            cli = await anyio.run_process(
                [*argv, "exit"], env={**os.environ, "AIOBUS_REDIS_URL": shared_redis}, check=False
            )
        output = cli.stdout.decode() + cli.stderr.decode()
        assert 1 == cli.returncode, output
        assert "no answer from n2" in output
        for node in ("n1", "n3"):
            assert 0 == children[node].wait(), children[node].output
            children[node].assert_nothing_left()
        assert ["n2"] == list(await fleet.members())  # its key lives until its time to live ends


class TestCredentials:
    async def test_a_password_in_the_url_works_and_is_never_logged(
        self, own_redis: RedisServer, log_recorder: LogRecorder
    ) -> None:
        """A bridge connects with the password of its URL; no log line holds the password."""
        own_redis.password = "pw-in-url-1234"
        own_redis.restart()
        async with observer(own_redis.url, "p", log_recorder) as (bus, _):
            assert stats(bus).connected
            await log_recorder.wait_for("connected to Redis")

        assert not [r for r in log_recorder.records if "pw-in-url-1234" in r.msg + json.dumps(r.fields, default=str)]
        assert "default:***@" in log_recorder.matching("connected to Redis")[0].msg

    async def test_an_acl_user_in_the_url_works(self, own_redis: RedisServer, log_recorder: LogRecorder) -> None:
        """A user of Redis's ACL, allowed the deployment's keys and channels only, is enough."""
        acl = ["ACL", "SETUSER", "bridge", "on", ">acl-pw-5678", "~p:*", "&p:*", "+@all"]
        with anyio.fail_after(30):
            await anyio.run_process(["redis-cli", "-p", str(own_redis.port), *acl])
        url = f"redis://bridge:acl-pw-5678@127.0.0.1:{own_redis.port}/0"
        async with observer(url, "p", log_recorder) as (bus, _):
            assert stats(bus).connected

    async def test_a_wrong_password_is_a_clear_error_at_start(
        self, own_redis: RedisServer, log_recorder: LogRecorder
    ) -> None:
        """The start fails with RedisUnavailable naming the server, the password hidden; the bus exits with 70."""
        own_redis.password = "right-pw-1234"
        own_redis.restart()
        wrong = own_redis.url.replace("right-pw-1234", "wrong-pw-5678")
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            RedisBridge(bus, wrong, prefix="p").subscribe()
            with pytest.raises(ChannelFailures) as caught:
                await bus.start()

        [error] = caught.value.exceptions
        assert isinstance(error, RedisUnavailable)
        assert "refused" in str(error) and "default:***@" in str(error)
        assert 70 == bus.exit_code
        assert not [r for r in log_recorder.records if "wrong-pw-5678" in r.msg + json.dumps(r.fields, default=str)]

    def test_a_service_with_a_wrong_password_ends_with_one_line(self, own_redis: RedisServer, spawn: Spawner) -> None:
        """As a process: exit code 70, the refusal on one line, no traceback, no password."""
        own_redis.password = "right-pw-1234"
        own_redis.restart()
        wrong = own_redis.url.replace("right-pw-1234", "wrong-pw-5678")
        child = spawn.run([sys.executable, SERVICE, "b", "p"], env={"AIOBUS_REDIS_URL": wrong})
        assert 70 == child.wait(), child.output
        assert "refused us" in child.output
        assert "wrong-pw-5678" not in child.output and "Traceback" not in child.output


class TestAbsentAtStart:
    async def test_a_server_absent_at_the_start_is_waited_for_in_the_background(
        self, own_redis: RedisServer, log_recorder: LogRecorder
    ) -> None:
        """The bus starts without Redis, its bridged publishes counted as away; once the server is up,
        the bridge connects by itself."""
        own_redis.kill()
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bridge = RedisBridge(bus, own_redis.url, prefix="p", outgoing=["x"], timeout=2)
            bridge.subscribe()
            await bus.start()
            await bus.publish("x", 1)
            connected_at_first = bridge.statistics().connected
            own_redis.start()
            await log_recorder.wait_for("Redis back", 60)

        assert not connected_at_first
        assert 1 == bridge.statistics().not_bridged["away"]
        assert log_recorder.matching("cannot reach Redis")
