"""Shared fixtures: a recorder for the log channel, and a check that no asyncio task leaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import LogRecorder


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
