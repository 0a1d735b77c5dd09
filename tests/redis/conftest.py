"""Redis for the tests: the machine's shared server (each test under a key prefix of its own) and, for
tests that stop, pause or cut a server, one of their own started from the same binary on a free
loopback port. In CI (``CI=true``) a missing server or binary fails the run; elsewhere the tests are
skipped with a one-line reason."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.importorskip("coredis", reason="the redis extra is not installed: pip install 'aiobus[redis]'")

from redis_servers import RedisServer, answers

from aiobus.redis import connect

SHARED_URL = os.environ.get("AIOBUS_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs Redis: {reason}", pytrace=False)
    pytest.skip(f"no Redis here: {reason}")


@pytest.fixture(scope="session")
def shared_redis() -> str:
    """The URL of the machine's shared server (never stopped by a test)."""
    if not answers("127.0.0.1", 6379) and SHARED_URL == "redis://127.0.0.1:6379/0":
        _unavailable("nothing answers on 127.0.0.1:6379")
    return SHARED_URL


@pytest.fixture
async def prefix(shared_redis: str) -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared server; its keys are deleted after the test."""
    name = f"aiobus-test:{uuid.uuid4().hex[:12]}"
    yield name
    async with connect(shared_redis) as client:
        keys = [key async for key in client.scan_iter(match=f"{name}*")]
        if keys:
            await client.delete(keys)


@pytest.fixture
def redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        _unavailable("no redis-server binary on PATH")
    assert binary is not None
    return binary


@pytest.fixture
def own_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, started; killed after the test."""
    server = RedisServer(redis_binary, tmp_path)
    server.start()
    yield server
    server.close()
