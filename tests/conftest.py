"""Shared fixtures: a log recorder, a check that no asyncio task leaks, real child processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import LogRecorder
from hostile_functions import Records, left_running
from hypothesis import HealthCheck, settings
from processes import Spawner, descendants

# Property tests: no example database written into the tree, no per-example deadline
# (the machines are shared and noisy; a slow example is not a failure).
settings.register_profile(
    "aiobus", database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("aiobus")


@pytest.fixture
def log_recorder() -> LogRecorder:
    return LogRecorder()


@pytest.fixture
async def no_task_leak() -> AsyncIterator[None]:
    """Fail the test if it leaves an asyncio task running."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not leaked, f"tasks left running: {leaked}"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Start real child processes; fail the test if any of them is still running at its end."""
    spawner = Spawner(tmp_path)
    yield spawner
    left = spawner.close()
    assert not left, f"the test left processes running: {left}"


@pytest.fixture
def nothing_left_running() -> Iterator[None]:
    """Fail the test if a process it started (a worker, or a worker's subprocess) still runs after it."""
    before = descendants()
    yield
    left = left_running(before)
    assert [] == left, f"processes left running: {left}"


@pytest.fixture
def records() -> Records:
    """A log recorder that can wait for a condition (tests/hostile_functions.py)."""
    return Records()
