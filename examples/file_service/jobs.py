"""The job broker of examples/file_service/aiobus.toml: `target = "jobs:worker"`, `setup = "jobs:setup"`."""

from __future__ import annotations

from typing import Any

from aiobus import Bus, ParentLink, Priority


async def worker(bus: Bus, link: ParentLink) -> None:
    """Runs in the child process: does each job the parent sends, until the parent stops it."""
    bus.log("jobs worker ready")
    async for job in link:
        bus.log("job done", job=job)
        await link.send(("done", job))


def setup(bus: Bus, children: dict[str, Any]) -> None:
    """Called by `aiobus run` once the file's children are subscribed: sends the broker a job at start."""
    jobs = children["jobs"]

    async def first_job() -> None:
        await jobs.send("warm the cache")
        bus.log("job answered", answer=await jobs.receive())

    bus.subscribe("start", lambda: bus.start_soon(first_job), priority=Priority.START_CHILD_USERS)
