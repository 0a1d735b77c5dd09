"""A module that fails to import in the first process to import it while $AIOBUS_TEST_FAIL_ONCE names
a file that does not exist yet (the process creates it): one worker of a pool fails to start."""

from __future__ import annotations

import os

from aiobus import Bus, ParentLink

FAIL_ONCE = "AIOBUS_TEST_FAIL_ONCE"

if os.environ.get(FAIL_ONCE):
    try:
        os.close(os.open(os.environ[FAIL_ONCE], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    else:
        raise ImportError("this worker was told to fail its start")


async def answers(bus: Bus, link: ParentLink) -> None:
    """Answer each message with ``(pid, message)``."""
    async for message in link:
        await link.send((os.getpid(), message))
