"""Brokers over a Redis Stream, in one process: send, receive, replies, acknowledgement, envelopes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from helpers import LogRecorder

from aiobus import Bus
from aiobus.redis import RemoteBroker, StreamBroker, StreamLink, connect

pytestmark = pytest.mark.usefixtures("no_task_leak")


async def echo(bus: Bus, link: StreamLink) -> None:
    """Replies to each message with the message and its delivery count."""
    async for msg in link:
        await link.send({"echo": msg, "deliveries": link.deliveries})


async def pending(client: Any, key: str) -> int:
    """How many entries of the stream ``key`` the group ``brokers`` has delivered and not had acknowledged."""
    summary = await client.xpending(key, "brokers")
    return int(summary.pending)


def envelope(**fields: Any) -> str:
    """An envelope of version 1 with ``fields`` over the usual ones, as JSON."""
    return json.dumps({"v": 1, "id": "x", "origin": "o", "reply": "r", "t": 1, "body": None, **fields})


@asynccontextmanager
async def serving(url: str, prefix: str, fn: Any = echo, **options: Any) -> AsyncIterator[StreamBroker]:
    """A started bus with a StreamBroker named 'broker' under ``prefix``; stopped at the end."""
    async with Bus() as bus:
        broker = StreamBroker(bus, url, "broker", fn, prefix=prefix, **options)
        broker.subscribe()
        await bus.start()
        yield broker
        await bus.exit()


class TestSendAndReceive:
    async def test_a_message_is_served_and_its_reply_routed_back(self, shared_redis: str, prefix: str) -> None:
        """send -> the broker's function -> link.send -> the sender's receive, JSON both ways."""
        remote = RemoteBroker(shared_redis, "broker", prefix=prefix)
        async with serving(shared_redis, prefix) as broker, remote:
            await remote.send(("BUY", "ABCD", 3))
            with anyio.fail_after(30):
                reply = await remote.receive()
        assert {"echo": ["BUY", "ABCD", 3], "deliveries": 1} == reply
        assert 1 == broker.statistics().received
        assert 1 == broker.statistics().acknowledged

    async def test_replies_go_to_their_own_sender_only(self, shared_redis: str, prefix: str) -> None:
        """Two senders: each gets the replies to its own messages, all of them, in order."""
        async with serving(shared_redis, prefix):
            async with (
                RemoteBroker(shared_redis, "broker", prefix=prefix) as first,
                RemoteBroker(shared_redis, "broker", prefix=prefix) as second,
            ):
                for i in range(20):
                    await first.send(f"first {i}")
                    await second.send(f"second {i}")
                with anyio.fail_after(30):
                    got_first = [(await first.receive())["echo"] for _ in range(20)]
                    got_second = [(await second.receive())["echo"] for _ in range(20)]
        assert [f"first {i}" for i in range(20)] == got_first
        assert [f"second {i}" for i in range(20)] == got_second

    async def test_async_for_over_the_replies(self, shared_redis: str, prefix: str) -> None:
        """``async for reply in broker`` yields the replies as they come."""
        async with serving(shared_redis, prefix), RemoteBroker(shared_redis, "broker", prefix=prefix) as remote:
            for i in range(5):
                await remote.send(i)
            seen = []
            with anyio.fail_after(30):
                async for reply in remote:
                    seen.append(reply["echo"])
                    if len(seen) == 5:
                        break
        assert [0, 1, 2, 3, 4] == seen

    async def test_a_message_that_is_not_json_is_a_type_error_at_send(self, shared_redis: str, prefix: str) -> None:
        """A set, an object: TypeError naming JSON, and nothing reaches the stream."""
        async with RemoteBroker(shared_redis, "broker", prefix=prefix) as remote, connect(shared_redis) as client:
            with pytest.raises(TypeError, match="JSON"):
                await remote.send({1, 2})
            with pytest.raises(TypeError, match="JSON"):
                await remote.send(object())
            assert 0 == await client.xlen(f"{prefix}:broker:requests")

    async def test_an_oversized_message_is_refused_at_send(self, shared_redis: str, prefix: str) -> None:
        """Larger than max_message_size: ValueError, nothing sent."""
        async with RemoteBroker(shared_redis, "broker", prefix=prefix, max_message_size=1000) as remote:
            with pytest.raises(ValueError, match="more than the limit"):
                await remote.send("x" * 2000)

    async def test_send_outside_async_with_is_an_error(self, shared_redis: str) -> None:
        """A RemoteBroker not entered cannot send."""
        with pytest.raises(RuntimeError, match="async with"):
            await RemoteBroker(shared_redis, "broker").send(1)

    async def test_the_sender_s_reply_stream_is_deleted_when_it_closes(self, shared_redis: str, prefix: str) -> None:
        """Nothing of a closed sender is left in Redis."""
        async with RemoteBroker(shared_redis, "broker", prefix=prefix) as remote:
            key = remote.reply_key
            async with connect(shared_redis) as client:
                assert 1 == await client.exists([key])
        async with connect(shared_redis) as client:
            assert 0 == await client.exists([key])


class TestAcknowledgement:
    async def test_a_message_is_acknowledged_once_the_function_asks_for_the_next(
        self, shared_redis: str, prefix: str
    ) -> None:
        """While the function holds a message it is pending; once it asks for the next, it is not."""
        holding = anyio.Event()
        release = anyio.Event()

        async def slow(bus: Bus, link: StreamLink) -> None:
            async for _ in link:
                holding.set()
                await release.wait()

        async with (
            serving(shared_redis, prefix, slow, batch=1),
            RemoteBroker(shared_redis, "broker", prefix=prefix) as remote,
            connect(shared_redis) as client,
        ):
            await remote.send("one")
            with anyio.fail_after(30):
                await holding.wait()
            key = f"{prefix}:broker:requests"
            assert 1 == await pending(client, key)
            release.set()
            with anyio.fail_after(30):
                while await pending(client, key):  # noqa: ASYNC110 - no event tells it
                    await anyio.sleep(0.05)

    async def test_stopping_the_bus_ends_the_iteration_after_the_message_in_hand(
        self, shared_redis: str, prefix: str
    ) -> None:
        """The bus stops while the function works on a message: it finishes it, the loop ends,
        the message is acknowledged, and nothing is left pending."""
        holding = anyio.Event()
        ended: list[str] = []

        async def worker(bus: Bus, link: StreamLink) -> None:
            async for msg in link:
                holding.set()
                await anyio.sleep(0.2)
                ended.append(msg)
            ended.append("end")

        async with RemoteBroker(shared_redis, "broker", prefix=prefix) as remote, connect(shared_redis) as client:
            async with serving(shared_redis, prefix, worker) as broker:
                await remote.send("in hand")
                with anyio.fail_after(30):
                    await holding.wait()
                await broker.bus.stop()
            assert ["in hand", "end"] == ended
            assert 0 == await pending(client, f"{prefix}:broker:requests")


class TestEnvelopes:
    @pytest.mark.parametrize(
        ("fields", "reason"),
        [
            ({"other": "x"}, "foreign"),
            ({"aiobus": json.dumps({"v": 99, "body": 1})}, "foreign"),
            ({"aiobus": "{not json"}, "malformed"),
            ({"aiobus": "[1, 2]"}, "malformed"),
            ({"aiobus": json.dumps({"v": 1, "id": "x"})}, "malformed"),
            ({"aiobus": envelope(reply="r", body="y" * 5000)}, "oversized"),
            ({"aiobus": envelope(reply="other:key", body=1)}, "foreign"),
        ],
    )  # fmt: skip
    async def test_entries_not_ours_are_dropped_counted_and_logged(
        self, shared_redis: str, prefix: str, fields: dict[str, str], reason: str, log_recorder: LogRecorder
    ) -> None:
        """A foreign, malformed or oversized entry is acknowledged and dropped, counted and logged
        (not its payload); the message after it is served."""
        async with (
            serving(shared_redis, prefix, max_message_size=4000) as broker,
            RemoteBroker(shared_redis, "broker", prefix=prefix) as remote,
            connect(shared_redis) as client,
        ):
            broker.bus.subscribe("log", log_recorder)
            key = f"{prefix}:broker:requests"
            await client.xadd(key, fields)
            await remote.send("after")
            with anyio.fail_after(30):
                assert "after" == (await remote.receive())["echo"]
            assert 1 == broker.statistics().dropped
            with anyio.fail_after(30):  # "after" is acknowledged once the function asks for the next
                while await pending(client, key):  # noqa: ASYNC110 - no event tells it
                    await anyio.sleep(0.05)
        [record] = log_recorder.matching("an entry was dropped")
        assert f"an entry was dropped ({reason})" in record.msg
        assert "y" * 100 not in repr(record)


class TestBounds:
    async def test_the_requests_stream_is_trimmed_to_about_maxlen(self, shared_redis: str, prefix: str) -> None:
        """With no broker reading, 2 000 messages leave about maxlen entries (MAXLEN ~), not 2 000."""
        async with RemoteBroker(shared_redis, "broker", prefix=prefix, maxlen=100) as remote:
            for i in range(2000):
                await remote.send(i)
            async with connect(shared_redis) as client:
                length = await client.xlen(f"{prefix}:broker:requests")
        assert 100 <= length <= 300  # trimmed by whole nodes of the stream, about

    async def test_statistics_count_what_was_sent_and_received(self, shared_redis: str, prefix: str) -> None:
        """A sender counts its messages and replies; a broker what it received and acknowledged."""
        remote = RemoteBroker(shared_redis, "broker", prefix=prefix)
        async with serving(shared_redis, prefix) as broker, remote:
            for i in range(3):
                await remote.send(i)
            with anyio.fail_after(30):
                for _ in range(3):
                    await remote.receive()
        assert (3, 3, 0) == (remote.statistics().sent, remote.statistics().replies, remote.statistics().dropped)
        stats = broker.statistics()
        assert (3, 3, 3, 0) == (stats.received, stats.acknowledged, stats.replies, stats.redelivered)


class TestGraceful:
    async def test_graceful_ends_the_loop_and_runs_the_function_again(self, shared_redis: str, prefix: str) -> None:
        """A graceful (reload) ends ``async for`` after the message in hand; the function runs again
        with a new link and serves the next messages."""
        runs: list[int] = []

        async def counting(bus: Bus, link: StreamLink) -> None:
            runs.append(len(runs))
            async for msg in link:
                await link.send({"echo": msg, "run": runs[-1]})

        async with (
            serving(shared_redis, prefix, counting) as broker,
            RemoteBroker(shared_redis, "broker", prefix=prefix) as remote,
        ):
            await remote.send("first")
            with anyio.fail_after(30):
                assert {"echo": "first", "run": 0} == await remote.receive()
            await broker.bus.graceful()
            await remote.send("second")
            with anyio.fail_after(30):
                assert {"echo": "second", "run": 1} == await remote.receive()
