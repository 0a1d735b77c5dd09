"""Real child processes for the tests: start a Python script, read its output as it comes,
send it real signals, and check that nothing of it is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie counts as gone)."""
    left = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("Z", "X"):
            left.append(pid)
    return left


def descendants(pid: int | None = None) -> set[int]:
    """The pids of every process descended from ``pid`` (this process by default), zombies included."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found: set[int] = set()
    frontier = {os.getpid() if pid is None else pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _json_line(line: str) -> dict[str, Any] | None:
    """A JSON log line's fields; None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


class Child:
    """A Python process in a session of its own, its stdout and stderr read line by line."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, **popen: Any) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
            text=True,
            errors="replace",
            **popen,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30, count: int = 1) -> str:
        """Wait until ``count`` lines containing ``text`` have been printed, and return the last."""
        return self._wait_for_line(lambda line: text in line, repr(text), timeout, count)

    def wait_for_own_event(self, event: str, timeout: float = 30) -> dict[str, Any]:
        """Wait for a JSON log line of this process's own bus (not one relayed from a child, which
        has a ``child`` field) whose event is ``event``; return it parsed."""

        def own(line: str) -> bool:
            fields = _json_line(line)
            return fields is not None and fields.get("event") == event and "child" not in fields

        line = self._wait_for_line(own, f"its own {event!r} event", timeout, 1)
        fields = _json_line(line)
        assert fields is not None
        return fields

    def _wait_for_line(self, matches: Callable[[str], bool], what: str, timeout: float, count: int) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        found = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if matches(line):
                        found += 1
                        if found == count:
                            return line
                seen = len(self.lines)
                if self._eof:
                    output = self.output_locked()
                    raise AssertionError(f"the child ended without printing {what} {count} time(s):\n{output}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {what} within {timeout} s:\n{self.output_locked()}")
                self._changed.wait(remaining)

    def output_locked(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines printed so far, parsed."""
        return [fields for fields in map(_json_line, self.lines) if fields is not None]

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to end and its output to be read; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def session_processes(self) -> list[int]:
        """Processes still alive in the child's session (the child and anything it started)."""
        result = subprocess.run(["pgrep", "-s", str(self.pid)], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def assert_nothing_left(self, timeout: float = 10) -> None:
        """Fail unless the child and every process of its session have ended."""
        deadline = time.monotonic() + timeout
        while (left := self.session_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"processes left behind: {left}"

    def kill(self) -> None:
        """Kill the child's whole session (cleanup)."""
        for pid in self.session_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Spawner:
    """Starts Python scripts as children and makes sure none outlives the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[Child] = []

    def script(
        self, code: str, *args: str, env: dict[str, str] | None = None, name: str = "service.py", **popen: Any
    ) -> Child:
        """Write ``code`` to a file and run it with this interpreter (extra Popen arguments pass through)."""
        path = self.directory / name
        path.write_text(code)
        return self.run([sys.executable, str(path), *args], env=env, **popen)

    def run(self, argv: list[str], env: dict[str, str] | None = None, **popen: Any) -> Child:
        child = Child(argv, self.directory, env, **popen)
        self.children.append(child)
        return child

    def close(self) -> list[int]:
        """Kill whatever is still running; return the pids that were."""
        left = []
        for child in self.children:
            left += child.session_processes()
            child.kill()
        return left


def printed_pids(stream: IO[str]) -> list[int]:
    """The pids of the first line ``pids N N ...`` a service prints (after its log lines)."""
    line = ""
    while not line.startswith("pids "):
        line = stream.readline()
        assert line, "the service ended before it printed its pids"
    return [int(pid) for pid in line.split()[1:]]
