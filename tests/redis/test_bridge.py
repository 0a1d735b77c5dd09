"""The bridge between buses in one process, through the shared server: delivery both ways, the
envelope, no echo, the allow-lists, the key prefix, presence, and what is dropped and counted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from helpers import LogRecorder

from aiobus import Bus
from aiobus.redis import Envelope, Fleet, RedisBridge, connect, current_envelope


class Inbox:
    """A listener that keeps what it is sent, with the envelope, and can wait for a count."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Envelope | None]] = []
        self._changed = anyio.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs, current_envelope()))
        self._changed.set()

    async def wait(self, count: int, seconds: float = 10) -> None:
        with anyio.fail_after(seconds):
            while len(self.calls) < count:
                self._changed = anyio.Event()
                await self._changed.wait()


@asynccontextmanager
async def bridged(
    url: str, node: str, prefix: str, recorder: LogRecorder | None = None, **options: Any
) -> AsyncIterator[tuple[Bus, RedisBridge]]:
    """A started bus with a bridge, connected; exited after the block."""
    async with Bus() as bus:
        if recorder is not None:
            bus.subscribe("log", recorder)
        bridge = RedisBridge(bus, url, node=node, prefix=prefix, **options)
        bridge.subscribe()
        await bus.start()
        assert bridge.statistics().connected
        yield bus, bridge


async def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms (for counters that have no event)."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - no event tells it
            await anyio.sleep(0.01)


class TestDelivery:
    async def test_a_publish_reaches_the_other_bus_and_theirs_reach_ours(
        self, shared_redis: str, prefix: str, no_task_leak: None
    ) -> None:
        """Each bus's publish on a bridged channel reaches the other's listeners, with its arguments."""
        options: dict[str, Any] = {"outgoing": ["orders"], "incoming": ["orders"]}
        async with (
            bridged(shared_redis, "a", prefix, **options) as (bus_a, _),
            bridged(shared_redis, "b", prefix, **options) as (bus_b, _),
        ):
            inbox_a, inbox_b = Inbox(), Inbox()
            bus_a.subscribe("orders", inbox_a)
            bus_b.subscribe("orders", inbox_b)
            await bus_a.publish("orders", "BUY", 20, price=1.5)
            await inbox_b.wait(1)
            await bus_b.publish("orders", "SELL", 3)
            await inbox_a.wait(2)  # its own (local) and b's

        assert [(("BUY", 20), {"price": 1.5})] == [(args, kwargs) for args, kwargs, _ in inbox_b.calls[:1]]
        assert [(("SELL", 3), {})] == [(args, kwargs) for args, kwargs, _ in inbox_a.calls[1:]]

    async def test_the_envelope_names_origin_sequence_and_time(self, shared_redis: str, prefix: str) -> None:
        """A listener called for a bridged message sees its envelope; a local call sees None."""
        async with (
            bridged(shared_redis, "a", prefix, outgoing=["ticks"]) as (bus_a, _),
            bridged(shared_redis, "b", prefix, incoming=["ticks"]) as (bus_b, _),
        ):
            inbox = Inbox()
            bus_b.subscribe("ticks", inbox)
            local = Inbox()
            bus_a.subscribe("ticks", local)
            for i in range(3):
                await bus_a.publish("ticks", i)
            await inbox.wait(3)

        assert [1, 2, 3] == [envelope.seq for _, _, envelope in inbox.calls if envelope is not None]
        assert {"a"} == {envelope.origin for _, _, envelope in inbox.calls if envelope is not None}
        assert [None, None, None] == [envelope for _, _, envelope in local.calls]

    async def test_our_own_messages_do_not_come_back(self, shared_redis: str, prefix: str) -> None:
        """A bus bridging a channel both ways hears its own publish once, and counts the echo."""
        async with bridged(shared_redis, "a", prefix, outgoing=["news"], incoming=["news"]) as (bus, bridge):
            inbox = Inbox()
            bus.subscribe("news", inbox)
            await bus.publish("news", "hello")
            await wait_until(lambda: bridge.statistics().echoes == 1)

        assert 1 == len(inbox.calls)
        assert 0 == bridge.statistics().received

    async def test_a_received_message_is_not_sent_out_again(self, shared_redis: str, prefix: str) -> None:
        """Two buses bridging a channel both ways do not bounce a message between them."""
        options: dict[str, Any] = {"outgoing": ["news"], "incoming": ["news"]}
        async with (
            bridged(shared_redis, "a", prefix, **options) as (bus_a, bridge_a),
            bridged(shared_redis, "b", prefix, **options) as (_, bridge_b),
        ):
            await bus_a.publish("news", "once")
            await wait_until(lambda: bridge_b.statistics().received == 1)
            await bus_a.publish("news", "twice")  # after it, the first would have bounced back already
            await wait_until(lambda: bridge_b.statistics().received == 2)

        assert (2, 0) == (bridge_a.statistics().sent, bridge_a.statistics().received)
        assert 0 == bridge_b.statistics().sent


class TestAllowLists:
    async def test_only_the_outgoing_channels_leave_and_only_the_incoming_ones_arrive(
        self, shared_redis: str, prefix: str
    ) -> None:
        """A channel not in a bus's outgoing list stays local; one not in the other's incoming list is not heard."""
        async with (
            bridged(shared_redis, "a", prefix, outgoing=["public", "other"]) as (bus_a, bridge_a),
            bridged(shared_redis, "b", prefix, incoming=["public", "private"]) as (bus_b, _),
        ):
            heard: dict[str, Inbox] = {name: Inbox() for name in ("public", "private", "other")}
            for name, inbox in heard.items():
                bus_b.subscribe(name, inbox)
            await bus_a.publish("private", 1)  # not outgoing
            await bus_a.publish("other", 2)  # outgoing, but b does not take it in
            await bus_a.publish("public", 3)
            await heard["public"].wait(1)
            await wait_until(lambda: bridge_a.statistics().sent == 2)

        assert ([], []) == (heard["private"].calls, heard["other"].calls)

    async def test_buses_of_another_prefix_do_not_hear_each_other(self, shared_redis: str, prefix: str) -> None:
        """Two deployments on one server, each with its key prefix, stay apart."""
        async with (
            bridged(shared_redis, "a", prefix, outgoing=["x"]) as (bus_a, _),
            bridged(shared_redis, "b", prefix + "-other", incoming=["x"]) as (bus_b, _),
            bridged(shared_redis, "c", prefix, incoming=["x"]) as (bus_c, _),
        ):
            other, same = Inbox(), Inbox()
            bus_b.subscribe("x", other)
            bus_c.subscribe("x", same)
            await bus_a.publish("x", 1)
            await same.wait(1)

        assert [] == other.calls

    def test_a_channel_list_given_as_one_str_is_refused(self) -> None:
        """``outgoing="orders"`` would bridge o, r, d...: a TypeError instead."""
        with pytest.raises(TypeError, match="list of names"):
            RedisBridge(Bus(), "redis://localhost", outgoing="orders")


class TestPresence:
    async def test_each_bus_has_a_key_with_its_state_and_a_time_to_live(self, shared_redis: str, prefix: str) -> None:
        """The presence key holds node, state, host and pid, expires, and is deleted at the exit."""
        key = f"{prefix}:bus:default:a"
        async with connect(shared_redis) as client:
            async with bridged(shared_redis, "a", prefix, presence_ttl=5):
                with anyio.fail_after(10):  # written at STARTING, rewritten at STARTED
                    while (record := json.loads(await client.get(key) or "{}")).get("state") != "STARTED":  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                ttl = await client.pttl(key)
            assert 0 == await client.exists([key])

        assert ("a", "STARTED", "default") == (record["node"], record["state"], record["group"])
        assert 0 < ttl <= 5000


def envelope(prefix: str, **changes: Any) -> str:
    """A valid envelope on channel ``x`` from node ``stranger``, with ``changes`` applied (None deletes)."""
    document: dict[str, Any] = {
        "v": 1,
        "prefix": prefix,
        "channel": "x",
        "origin": "stranger",
        "seq": 1,
        "time": 1.5,
        "args": ["ok"],
        "kwargs": {},
    }
    document.update(changes)
    return json.dumps({key: value for key, value in document.items() if value is not None})


class TestHostileEnvelopes:
    async def test_malformed_oversized_and_foreign_envelopes_are_dropped_counted_and_logged(
        self, shared_redis: str, prefix: str
    ) -> None:
        """Each bad message is dropped under its reason and logged without its payload; the good one after
        them all is delivered, and the bridge goes on."""
        recorder = LogRecorder()
        bad: dict[str, list[str | bytes]] = {
            "malformed": [
                "not json SECRET-PAYLOAD",
                b"\xff\xfe SECRET-PAYLOAD",
                "[1, 2]",
                "NaN",
                envelope(prefix, seq=0),
                envelope(prefix, seq=True),
                envelope(prefix, origin=None),
                envelope(prefix, origin="has space"),
                envelope(prefix, time="late"),
                envelope(prefix, args={"a": 1}),
                envelope(prefix, kwargs={"channel": "y"}),
                envelope(prefix, channel="y"),  # bridged in, but sent on channel x
                '{"v": 1, "prefix": "' + prefix + '", "channel": "x", "time": Infinity}',
            ],
            "too_large": [envelope(prefix, args=["SECRET-PAYLOAD" * 5000])],
            "foreign": [envelope(prefix, v=2), envelope(prefix + "-other"), '{"hello": "SECRET-PAYLOAD"}'],
            "unknown_channel": [envelope(prefix, channel="z")],
        }
        async with (
            connect(shared_redis) as client,
            bridged(shared_redis, "a", prefix, recorder, incoming=["x", "y"], max_envelope=4096) as (bus, bridge),
        ):
            inbox = Inbox()
            bus.subscribe("x", inbox)
            for messages in bad.values():
                for message in messages:
                    await client.publish(f"{prefix}:channel:x", message)
            await client.publish(f"{prefix}:channel:x", envelope(prefix, args=["good"]))
            await inbox.wait(1)

        assert [(("good",), {})] == [(args, kwargs) for args, kwargs, _ in inbox.calls]
        assert {reason: len(messages) for reason, messages in bad.items()} == dict(bridge.statistics().dropped)
        dropped = recorder.matching("Dropped a message")
        assert {"malformed", "too_large", "foreign", "unknown_channel"} == {r.fields["reason"] for r in dropped}
        assert not [r for r in recorder.records if "SECRET-PAYLOAD" in r.msg + json.dumps(r.fields, default=str)]

    async def test_a_gap_in_an_origin_s_sequence_is_stated_as_missed(self, shared_redis: str, prefix: str) -> None:
        """Sequence 1 then 4 from one origin: 2 messages missed, logged with the origin; nothing invented."""
        recorder = LogRecorder()
        async with (
            connect(shared_redis) as client,
            bridged(shared_redis, "a", prefix, recorder, incoming=["x"]) as (bus, bridge),
        ):
            inbox = Inbox()
            bus.subscribe("x", inbox)
            for seq in (1, 4):
                await client.publish(f"{prefix}:channel:x", envelope(prefix, seq=seq))
            await inbox.wait(2)

        assert {"stranger": 2} == dict(bridge.statistics().missed)
        [missed] = recorder.matching("Missed")
        assert "Missed 2 message(s) on channel 'x' from stranger (sequence 1, then 4)" == missed.msg

    async def test_what_json_cannot_carry_is_counted_not_sent(self, shared_redis: str, prefix: str) -> None:
        """A set, NaN or an envelope over the limit: the publish returns, the message is counted, not sent."""
        recorder = LogRecorder()
        async with bridged(shared_redis, "a", prefix, recorder, outgoing=["x"], max_envelope=1024) as (bus, bridge):
            await bus.publish("x", {1, 2})
            await bus.publish("x", float("nan"))
            await bus.publish("x", "y" * 2000)

        assert {"unencodable": 2, "too_large": 1} == dict(bridge.statistics().not_bridged)
        assert 0 == bridge.statistics().sent
        assert recorder.matching("was not sent")


class TestTrio:
    def test_two_buses_bridge_and_answer_the_fleet_on_trio(self, shared_redis: str, prefix: str) -> None:
        """The bridge and the fleet use anyio only: the same works on trio."""

        async def main() -> tuple[list[tuple[Any, ...]], dict[str, str]]:
            async with (
                bridged(shared_redis, "a", prefix, outgoing=["x"]) as (bus_a, _),
                bridged(shared_redis, "b", prefix, incoming=["x"]) as (bus_b, _),
            ):
                inbox = Inbox()
                bus_b.subscribe("x", inbox)
                await bus_a.publish("x", 1, "one")
                await inbox.wait(1)
                result = await Fleet(shared_redis, prefix=prefix).status(deadline=30)
            return [args for args, _, _ in inbox.calls], dict(result.answered)

        calls, answered = anyio.run(main, backend="trio")

        assert ([(1, "one")], {"a": "STARTED", "b": "STARTED"}) == (calls, answered)
