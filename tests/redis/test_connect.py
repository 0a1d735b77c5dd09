"""Connecting: a clear error for a wrong password or an absent server, and no password in it."""

from __future__ import annotations

import pytest
from redis_servers import RedisServer

from aiobus.redis import Backoff, RedisUnavailable, connect, redact


class TestRedact:
    def test_the_password_is_hidden_and_the_user_kept(self) -> None:
        """A URL's password never reaches a log line."""
        assert "redis://bank:***@10.0.0.1:6380/2" == redact("redis://bank:s3cret@10.0.0.1:6380/2")

    def test_a_url_without_password_is_unchanged(self) -> None:
        """Nothing to hide, nothing changed."""
        assert "rediss://10.0.0.1:6380" == redact("rediss://10.0.0.1:6380")


class TestConnect:
    async def test_the_shared_server_answers(self, shared_redis: str) -> None:
        """A connected client answers commands."""
        async with connect(shared_redis) as client:
            assert "PONG" == await client.ping()

    async def test_a_wrong_password_is_a_clear_error_without_the_password(self, own_redis: RedisServer) -> None:
        """A wrong password fails at connection, naming the server and hiding the password."""
        own_redis.password = "right-one"
        own_redis.restart()
        wrong = own_redis.url.replace("right-one", "wrong-one")
        with pytest.raises(RedisUnavailable, match="refused") as caught:
            async with connect(wrong):
                pass
        assert "wrong-one" not in str(caught.value)
        async with connect(own_redis.url) as client:
            assert "PONG" == await client.ping()

    async def test_an_absent_server_is_a_clear_error(self, own_redis: RedisServer) -> None:
        """Nothing listening: RedisUnavailable, not a hang."""
        own_redis.kill()
        with pytest.raises(RedisUnavailable, match="cannot reach"):
            async with connect(own_redis.url, timeout=5):
                pass

    async def test_a_url_of_another_scheme_is_refused(self) -> None:
        """http:// is not a Redis URL, and the error hides its password."""
        with pytest.raises(ValueError, match="not a Redis URL") as caught:
            async with connect("http://user:pw@host/"):
                pass
        assert "pw" not in str(caught.value)

    async def test_the_block_s_own_error_is_raised_as_it_is(self, shared_redis: str) -> None:
        """An error in the block is not mistaken for a connection failure."""
        with pytest.raises(OSError, match="mine"):
            async with connect(shared_redis):
                raise OSError("mine")


class TestBackoff:
    def test_delays_double_up_to_the_most_and_reset(self) -> None:
        """0.1, 0.2, 0.4... up to ``most``, and from the start again after a success."""
        backoff = Backoff(first=0.1, most=0.5)
        delays = [backoff.delay() for _ in range(5)]

        for got, base in zip(delays, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
            assert base <= got <= base * 1.1
        backoff.reset()
        assert 0.1 <= backoff.delay() <= 0.11
