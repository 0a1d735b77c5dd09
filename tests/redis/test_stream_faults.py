"""Brokers over a Redis Stream, in real processes against a real server, through faults: a broker
SIGKILLed, Redis killed and restarted, Redis paused, credentials right and wrong."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from processes import Child, Spawner
from redis_servers import RedisServer

from aiobus.redis import RedisUnavailable, RemoteBroker
from aiobus.redis.streams import let_go

SERVICE = str(Path(__file__).resolve().parent.parent / "stream_services.py")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")


def broker(spawn: Spawner, url: str, prefix: str, *options: str, env: dict[str, str] | None = None) -> Child:
    """A broker process serving 'work' under ``prefix``; returned once it serves."""
    child = spawn.run([sys.executable, SERVICE, url, prefix, *options], env=env)
    child.wait_for('{"serving"', timeout=60)
    return child


async def until(child: Child, text: str, count: int = 1) -> None:
    """Wait, off the event loop, until ``child`` has printed ``text`` ``count`` times."""
    await anyio.to_thread.run_sync(lambda: child.wait_for(text, timeout=60, count=count))


async def stop(child: Child) -> int:
    """SIGTERM the child, and return its exit code once it ended."""
    child.send(signal.SIGTERM)
    return await anyio.to_thread.run_sync(child.wait, 60)


async def replies(remote: RemoteBroker, count: int, *brokers: Child) -> list[Any]:
    """The next ``count`` replies; on a timeout, the brokers' output tells why."""
    got: list[Any] = []
    try:
        with anyio.fail_after(60):
            while len(got) < count:
                got.append(await remote.receive())
    except TimeoutError:
        outputs = "\n-----\n".join(child.output for child in brokers)
        raise AssertionError(f"{len(got)} replies of {count} within 60 s:\n{outputs}") from None
    return got


class TestBrokerKilled:
    async def test_its_pending_messages_are_claimed_by_another_none_lost(
        self, spawn: Spawner, shared_redis: str, prefix: str
    ) -> None:
        """A broker SIGKILLed while it holds messages: another takes them over after claim_after,
        sees the one in hand delivered twice, and every message is served."""
        first = broker(spawn, shared_redis, prefix, "--claim-after", "1", "--hold", "600")
        async with RemoteBroker(shared_redis, "work", prefix=prefix) as remote:
            for i in range(5):
                await remote.send(i)
            await until(first, '{"got": 0')
            first.send(signal.SIGKILL)
            await anyio.to_thread.run_sync(first.wait, 60)
            second = broker(spawn, shared_redis, prefix, "--claim-after", "1")
            got = await replies(remote, 5, first, second)
        assert [0, 1, 2, 3, 4] == sorted(reply["done"] for reply in got)
        assert {second.pid} == {reply["by"] for reply in got}
        deliveries = {reply["done"]: reply["deliveries"] for reply in got}
        assert deliveries[0] >= 2  # the first broker had it in hand
        assert 0 == await stop(second), second.output
        second.assert_nothing_left()

    async def test_sigint_ends_a_broker_after_the_message_in_hand_and_the_others_go_on(
        self, spawn: Spawner, shared_redis: str, prefix: str
    ) -> None:
        """Two brokers; SIGINT to one while it works: it finishes the message, exits 0; the other
        serves every later message."""
        first = broker(spawn, shared_redis, prefix, "--hold", "1", "--batch", "1")
        second = broker(spawn, shared_redis, prefix, "--batch", "1")
        async with RemoteBroker(shared_redis, "work", prefix=prefix) as remote:
            sent = 0
            while first.output.count('{"got"') == 0:
                await remote.send(sent)
                sent += 1
                await anyio.sleep(0.05)  # a message every 50 ms, until the first broker holds one
            first.send(signal.SIGINT)
            assert 0 == await anyio.to_thread.run_sync(first.wait, 60), first.output
            for _ in range(5):
                await remote.send(sent)
                sent += 1
            got = await replies(remote, sent, first, second)
        assert list(range(sent)) == sorted(reply["done"] for reply in got)
        assert 0 == await stop(second), second.output


# coredis leaves the anyio memory streams of a connection it could not make unclosed; it may drop them
# at any time while Redis is away (when its own garbage is collected): their warnings are not ours.
@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")
class TestRedisAway:
    async def test_killed_and_restarted_mid_run(self, spawn: Spawner, own_redis: RedisServer, prefix: str) -> None:
        """Redis killed: a send waits for it; restarted (empty): the broker makes its group again,
        the sender its reply stream, and the message sent meanwhile is served."""
        worker = broker(spawn, own_redis.url, prefix, "--timeout", "1")
        async with RemoteBroker(own_redis.url, "work", prefix=prefix, send_timeout=120, connect_timeout=1) as remote:
            await remote.send("before")
            assert "before" == (await replies(remote, 1, worker))[0]["done"]
            own_redis.kill()
            sent = anyio.Event()

            async def send_meanwhile() -> None:
                await remote.send("meanwhile")
                sent.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(send_meanwhile)
                await anyio.lowlevel.checkpoint()
                assert not sent.is_set()
                await anyio.to_thread.run_sync(own_redis.start)
            while (await replies(remote, 1, worker))[0]["done"] != "meanwhile":  # or "before" again: at-least-once
                pass
        assert 0 == await stop(worker), worker.output
        let_go([])  # collected now, while the warnings are off

    async def test_paused_longer_than_the_deadlines(self, spawn: Spawner, own_redis: RedisServer, prefix: str) -> None:
        """Redis paused (SIGSTOP): send fails with RedisUnavailable after send_timeout; resumed, all
        works again; and a broker stopped while Redis is paused still exits 0."""
        worker = broker(spawn, own_redis.url, prefix, "--timeout", "1")
        async with RemoteBroker(own_redis.url, "work", prefix=prefix, send_timeout=2, connect_timeout=1) as remote:
            await remote.send("before")
            assert "before" == (await replies(remote, 1, worker))[0]["done"]
            own_redis.pause()
            try:
                with pytest.raises(RedisUnavailable, match="no answer"), anyio.fail_after(60):
                    await remote.send("paused")
            finally:
                own_redis.resume()
            await remote.send("after")
            while (await replies(remote, 1, worker))[0]["done"] != "after":  # "paused" may have gone through
                pass
            own_redis.pause()
            try:
                assert 0 == await stop(worker), worker.output
            finally:
                own_redis.resume()
        worker.assert_nothing_left()
        let_go([])


class TestCredentials:
    async def test_a_password_in_the_url_or_the_environment(
        self, spawn: Spawner, own_redis: RedisServer, prefix: str
    ) -> None:
        """With the password in the URL (sender) or in AIOBUS_REDIS_URL (broker), it works, and the
        password appears in no output."""
        own_redis.password = "pw-never-shown"
        own_redis.restart()
        worker = broker(spawn, "-", prefix, env={"AIOBUS_REDIS_URL": own_redis.url})
        async with RemoteBroker(own_redis.url, "work", prefix=prefix) as remote:
            await remote.send("hello")
            assert "hello" == (await replies(remote, 1, worker))[0]["done"]
        assert 0 == await stop(worker)
        assert "pw-never-shown" not in worker.output

    async def test_a_wrong_password_is_a_clear_error_at_start(
        self, spawn: Spawner, own_redis: RedisServer, prefix: str
    ) -> None:
        """A wrong password: the broker exits 1 at once saying Redis refused it, the sender raises
        RedisUnavailable; neither shows the password."""
        own_redis.password = "right-pw"
        own_redis.restart()
        wrong = own_redis.url.replace("right-pw", "wrong-pw")
        worker = spawn.run([sys.executable, SERVICE, wrong, prefix])
        assert 1 == await anyio.to_thread.run_sync(worker.wait, 60)
        assert "cannot start: Redis at redis://default:***@" in worker.output and "refused" in worker.output
        assert "wrong-pw" not in worker.output and "Traceback" not in worker.output
        with pytest.raises(RedisUnavailable, match="refused") as caught:
            async with RemoteBroker(wrong, "work", prefix=prefix):
                pass
        assert "wrong-pw" not in str(caught.value)

    async def test_an_acl_user_limited_to_the_prefix(self, spawn: Spawner, own_redis: RedisServer, prefix: str) -> None:
        """A user of its own (ACL), allowed only the keys under the prefix: sender and broker work."""
        setuser = ["ACL", "SETUSER", "bank", "on", ">bank-pw", f"~{prefix}:*", "+@all", "-@dangerous"]
        await anyio.run_process(["redis-cli", "-p", str(own_redis.port), *setuser])
        url = f"redis://bank:bank-pw@127.0.0.1:{own_redis.port}/0"
        worker = broker(spawn, url, prefix)
        async with RemoteBroker(url, "work", prefix=prefix) as remote:
            await remote.send("as bank")
            assert "as bank" == (await replies(remote, 1, worker))[0]["done"]
        assert 0 == await stop(worker)
        assert "bank-pw" not in worker.output
