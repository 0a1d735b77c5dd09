"""Child brokers against hostile children and neighbours: subprocesses on the child's stdout, a
same-user process writing forged replies into every descriptor it can open, log fields named
as the parent's own, and a privilege drop with a root worker idling in anyio's pool.

Every test runs real worker processes and checks that none of them (nor anything they
started) is left running afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import hostile_functions
import pytest
import structlog
from helpers import LogRecord
from hostile_functions import Records
from processes import Child, Spawner, alive

import aiobus
from aiobus import CHILD_EXIT_CHANNEL, Bus, ChildBroker, ChildExit

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc, pidfd (Linux)"),
    pytest.mark.usefixtures("nothing_left_running"),
]

#: Generous bound for one step (a worker starts in about 0.3 s on a quiet machine).
STEP = 30.0


def from_stream(text: str, stream: str) -> Any:
    """A condition: a line ``text`` logged from the child's ``stream``."""

    def condition(record: LogRecord) -> bool:
        return record.msg == text and record.fields.get("stream") == stream

    return condition


class TestSubprocessOutput:
    async def test_a_subprocess_inheriting_stdout_becomes_a_log_line(self, records: Records) -> None:
        """``subprocess.run(["echo", "hi"])`` in the child: "hi" is logged with stream="stdout"."""
        async with Bus() as bus:
            bus.subscribe("log", records)
            broker = ChildBroker(bus, "echoer", hostile_functions.runs_echo_subprocess)
            broker.subscribe()
            await bus.start()
            record = await records.wait_until(from_stream("hi", "stdout"), STEP)
            pid = broker.pid
        assert ("echoer", pid) == (record.fields["child"], record.fields["child_pid"])

    async def test_the_child_keeps_serving_after_its_subprocess_wrote_to_stdout(self) -> None:
        """After ``echo hi`` on its stdout the same incarnation answers a message; nothing restarted."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "echoer", hostile_functions.runs_echo_subprocess)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
                await broker.send("after echo")
                answer = await broker.receive()
            assert broker.supervisor is not None
            [info] = broker.supervisor.children()
            assert ([], 0) == (exits, info.restarts)
        assert ("answer", "after echo", pid) == answer


# -- a same-user process writing into the worker's descriptors ----------------------------

#: argv: worker pid, parent pid, marker path. Prints JSON: what it opened, what it could not.
HOSTILE_WRITER = r"""
import json, os, pickle, stat, struct, sys

worker, parent, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

class Marker:
    def __reduce__(self):
        return (open, (marker, "w"))

bomb = pickle.dumps(Marker())
garbage = bytes(range(256)) + b"\n"
forged_event = b'{"event": "forged event", "level": "critical", "child_pid": 1}\n'
payloads = [
    b"RETURN 40\n" + bomb,
    b"RETURN %d\n" % len(bomb) + bomb,
    b"EXCEPTION %d\n" % len(bomb) + bomb,
    b"EXCEPTION 40\n" + bomb,
    struct.pack(">I", len(bomb)) + bomb,
    bomb,
    garbage,
    forged_event,
]

def target(pid, fd):
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError as error:
        return repr(error)

worker_fds = sorted(int(fd) for fd in os.listdir(f"/proc/{worker}/fd"))
worker_targets = {fd: target(worker, fd) for fd in worker_fds}
shared = {link for link in worker_targets.values() if link.startswith("pipe:")}
candidates = [(worker, fd) for fd in worker_fds]
for fd in sorted(int(fd) for fd in os.listdir(f"/proc/{parent}/fd")):
    link = target(parent, fd)
    if link in shared or link.startswith("socket:"):
        candidates.append((parent, fd))

opened, refused = [], []
for pid, fd in candidates:
    path = f"/proc/{pid}/fd/{fd}"
    link = target(pid, fd)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        refused.append([pid, fd, link, error.strerror])
        continue
    try:
        if stat.S_ISREG(os.fstat(handle).st_mode) or stat.S_ISDIR(os.fstat(handle).st_mode):
            refused.append([pid, fd, link, "regular file: left alone"])
            continue
        written = 0
        for payload in payloads:
            try:
                written += os.write(handle, payload + b"\n")
            except OSError:
                pass
        opened.append([pid, fd, link, written])
    finally:
        os.close(handle)
print(json.dumps({"opened": opened, "refused": refused}))
"""


class TestHostileNeighbour:
    async def test_forged_replies_in_every_openable_descriptor_unpickle_nothing(
        self, records: Records, tmp_path: Path
    ) -> None:
        """A same-user process writes forged ``RETURN``/``EXCEPTION`` replies, frames, bare pickles and
        garbage into every ``/proc/<worker>/fd/*`` it can open (and the parent's ends of the worker's
        pipes): nothing is unpickled (no marker file), the child answers after, and it stops cleanly."""
        marker = tmp_path / "unpickled"
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe("log", records)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "target", hostile_functions.answers)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
            writer = await anyio.run_process(
                [sys.executable, "-c", HOSTILE_WRITER, str(pid), str(os.getpid()), str(marker)]
            )
            report = json.loads(writer.stdout)
            print("hostile writer:", json.dumps(report, indent=1))  # noqa: T201 - shown with -s: which fds opened
            with anyio.fail_after(STEP):
                await broker.send("after the attack")
                answer = await broker.receive()
            opened_pipes = [link for _, _, link, _ in report["opened"] if link.startswith("pipe:")]
            if opened_pipes:  # the forged lines arrive as the child's output, never as anything else
                await records.wait_until(lambda r: "forged event" in r.msg and "stream" in r.fields, STEP)
            unexpected_exits = list(exits)
        assert not marker.exists()
        assert ("answer", "after the attack", pid) == answer
        assert [] == unexpected_exits
        assert [(pid, 0, True)] == [(exit.pid, exit.exit_code, exit.expected) for exit in exits]
        assert [] == [r for r in records.records if r.msg == "forged event"]  # never decoded as an event
        assert [] == [link for _, _, link, _ in report["opened"] if link.startswith("socket:")]

    async def test_forged_lines_only_become_output_lines(self, records: Records, tmp_path: Path) -> None:
        """Every forged line that arrives is logged as the child's stdout/stderr output at INFO."""
        async with Bus() as bus:
            bus.subscribe("log", records)
            broker = ChildBroker(bus, "target", hostile_functions.answers)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
            await anyio.run_process(
                [sys.executable, "-c", HOSTILE_WRITER, str(pid), str(os.getpid()), str(tmp_path / "marker")]
            )
            await records.wait_until(lambda r: "forged event" in r.msg, STEP)
        forged = [r for r in records.records if "forged event" in r.msg]
        assert {("stdout", logging.INFO), ("stderr", logging.INFO)} >= {
            (r.fields.get("stream"), r.level) for r in forged
        }


# -- control messages a child should not send -------------------------------------------


class TestBadControlMessages:
    async def test_unknown_and_undecodable_control_messages_are_logged_and_dropped(self, records: Records) -> None:
        """A control message of an unknown kind and one that does not unpickle are each logged; the child runs on."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe("log", records)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "unruly", hostile_functions.sends_bad_control_messages)
            broker.subscribe()
            await bus.start()
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
                await records.wait_until(lambda r: "does not unpickle was dropped" in r.msg, STEP)
                await broker.send("still there?")
                answer = await broker.receive()
            assert (broker.pid, broker.restarts, exits) == (pid, 0, [])
        assert answer == ("answer", "still there?", pid)
        [unknown] = [r for r in records.records if "an unexpected control message was dropped" in r.msg]
        assert "('garbage', 1)" in unknown.msg and unknown.level == logging.WARNING
        assert unknown.fields["child"] == "unruly"


# -- fields named as the parent's own ---------------------------------------------------


class TestCollidingLogFields:
    async def wait_for_event(self, records: Records, text: str) -> tuple[LogRecord, int | None]:
        """Run the child until it has logged everything; the record ``text`` (AssertionError if none)."""
        async with Bus() as bus:
            bus.subscribe("log", records)
            broker = ChildBroker(bus, "collider", hostile_functions.logs_colliding_fields)
            broker.subscribe()
            await bus.start()
            await records.wait_until(lambda r: r.msg == "collisions logged", STEP)
            pid = broker.pid
        found = [r for r in records.records if r.msg == text]
        assert found, f"no {text!r} logged: {[r.msg for r in records.records if r.fields.get('child')]}"
        return found[0], pid

    async def test_the_parents_child_and_child_pid_stay_the_parents(self, records: Records) -> None:
        """A child's own ``child``/``child_pid`` fields do not replace the parent's."""
        record, pid = await self.wait_for_event(records, "colliding fields")
        assert ("collider", pid) == (record.fields["child"], record.fields["child_pid"])

    async def test_the_childs_colliding_fields_arrive_renamed(self, records: Records) -> None:
        """A child's ``child``, ``child_pid``, ``msg``, ``traceback``, ``timestamp``, ``child.x`` arrive as child.X."""
        record, _ = await self.wait_for_event(records, "colliding fields")
        expected = {
            "child.child": "child's child",
            "child.child_pid": -1,
            "child.msg": "child's msg",
            "child.traceback": "child's traceback",
            "child.timestamp": "child's timestamp",
            "child.child.x": "child's child.x",
        }
        assert expected == {key: record.fields.get(key) for key in expected}

    async def test_the_childs_level_field_arrives_as_child_level(self, records: Records) -> None:
        """A ``level="..."`` field of a ``.warning()`` event keeps the level WARNING and arrives as ``child.level``."""
        record, _ = await self.wait_for_event(records, "colliding fields")
        assert (logging.WARNING, "child's level") == (record.level, record.fields.get("child.level"))

    async def test_bus_log_in_the_child_with_an_event_field_arrives(self, records: Records) -> None:
        """bus.log with event= and child= in a child arrives: event as event_ (as on any bus), the rest child.X."""
        record, _ = await self.wait_for_event(records, "colliding through bus.log")
        expected = {"event_": "bus event", "child.child": "bus child", "child.child_pid": -2}
        assert expected == {key: record.fields.get(key) for key in expected}

    async def test_a_child_logging_colliding_fields_keeps_running(self, records: Records) -> None:
        """The child that logged colliding fields answers afterwards; it was never restarted."""
        exits: list[ChildExit] = []
        async with Bus() as bus:
            bus.subscribe("log", records)
            bus.subscribe(CHILD_EXIT_CHANNEL, exits.append)
            broker = ChildBroker(bus, "collider", hostile_functions.logs_colliding_fields)
            broker.subscribe()
            await bus.start()
            await records.wait_until(lambda r: r.msg == "colliding fields", STEP)
            with anyio.fail_after(STEP):
                _, pid = await broker.receive()
                await broker.send("still there?")
                answer = await broker.receive()
            unexpected_exits = list(exits)
        assert ([], ("answer", "still there?", pid)) == (unexpected_exits, answer)


# -- a privilege drop with a root worker idling in anyio's pool ---------------------------

#: Run as root: warms anyio's process pool as root, drops to nobody, starts a child broker.
DROPPING_SERVICE = """
import os
import anyio, anyio.to_process
from aiobus import Bus, ChildBroker, configure_logging
from aiobus.plugins import DropPrivileges, SignalHandler


async def report_uid(bus, link):
    await link.send(("uid", os.getuid(), os.geteuid(), os.getpid()))
    async for _ in link:
        pass


async def main() -> int:
    print(f"warm pool worker uid {await anyio.to_process.run_sync(os.getuid)}", flush=True)
    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        DropPrivileges(bus, uid="nobody", gid="nogroup").subscribe()
        broker = ChildBroker(bus, "who", report_uid)
        broker.subscribe()
        await bus.start()
        _, uid, euid, pid = await broker.receive()
        print(f"service uid {os.getuid()}; child uid {uid} euid {euid} pid {pid}", flush=True)
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    configure_logging(format="json")
    raise SystemExit(anyio.run(main))
"""


#: Makes the interpreter under a private /root reachable by nobody, in a mount namespace of the
#: service's own (nothing outside it changes): a tmpfs over /root holding only ~/.pyenv.
def closed_folders() -> list[tuple[str, str]]:
    """The folders nobody may not enter on the way to this interpreter and the packages it runs
    (/root for pyenv, a 0700 temporary folder holding a clone...), each with the entry below it
    that must be reachable, outermost first."""
    needed = {sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix}
    needed |= {os.path.dirname(module.__file__ or "") for module in (aiobus, anyio, structlog)}
    found: list[tuple[str, str]] = []
    for path in sorted(needed):
        parts = Path(path).parts
        for depth in range(1, len(parts) - 1):
            folder = os.path.join(*parts[: depth + 1])
            if not os.stat(folder).st_mode & stat.S_IXOTH and (folder, parts[depth + 1]) not in found:
                found.append((folder, parts[depth + 1]))
    return sorted(found, key=lambda pair: len(Path(pair[0]).parts))


def expose(folders: list[tuple[str, str]], view: Path) -> str:
    """A shell script that, in a mount namespace of its own, lets nobody through each of ``folders``
    (a 0711 tmpfs over it, the entry needed bound back into it) and then runs its arguments."""
    lines = ["set -e"]
    for number, (folder, entry) in enumerate(folders):
        saved = shlex.quote(str(view / str(number)))
        folder, entry = shlex.quote(folder), shlex.quote(entry)
        lines += [
            f"mkdir -p {saved}",
            f"mount --bind {folder} {saved}",
            f"mount -t tmpfs -o mode=0711 tmpfs {folder}",
            f"mkdir -p {folder}/{entry}",
            f"mount --bind {saved}/{entry} {folder}/{entry}",
        ]
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


#: argv: worker pid, marker path. Becomes nobody after its imports, then duplicates each socket the
#: worker was started with (pidfd_getfd, as ptrace allows for a process of the same user) and
#: writes forged replies and frames into it. Prints what it could duplicate.
NOBODY_DUPLICATOR = r"""
import ctypes, os, pickle, pwd, struct, sys

worker, marker = int(sys.argv[1]), sys.argv[2]
nobody = pwd.getpwnam("nobody")
os.setgroups([nobody.pw_gid])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)

class Marker:
    def __reduce__(self):
        return (open, (marker, "w"))

bomb = pickle.dumps(Marker())
libc = ctypes.CDLL(None, use_errno=True)
with open(f"/proc/{worker}/cmdline", "rb") as file:
    fds = [int(arg) for arg in file.read().split(b"\0") if arg.isdigit()]
pidfd = os.pidfd_open(worker)
for fd in fds:
    dup = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
    if dup < 0:
        print(f"fd {fd}: {os.strerror(ctypes.get_errno())}", flush=True)
        continue
    print(f"fd {fd}: duplicated", flush=True)
    for payload in (b"RETURN %d\n" % len(bomb) + bomb, struct.pack(">I", len(bomb)) + bomb):
        try:
            os.write(dup, payload)
        except OSError:
            pass
"""


def nobody_can_run(argv: list[str]) -> bool:
    """Whether ``argv`` runs as nobody."""
    try:
        result = subprocess.run(argv, user="nobody", group="nogroup", extra_groups=[], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def has_nobody() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not has_nobody(), reason="needs root and a user 'nobody'")
class TestPrivilegeDrop:
    def start_service(self, spawner: Spawner, directory: Path) -> Child:
        """Start the service as root where nobody can read its script and run its interpreter."""
        script = directory / "service.py"
        script.write_text(DROPPING_SERVICE)
        script.chmod(0o644)
        argv = [sys.executable, str(script)]
        if nobody_can_run([sys.executable, "-c", "pass"]):
            return spawner.run(argv)
        if not nobody_can_run(["true"]) or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("nobody cannot run this interpreter, and no mount namespace can change that")
        # The interpreter or the packages live under a folder nobody may not enter (/root for
        # pyenv, a private temporary folder): expose them, in the service's own mount namespace only.
        exposing = expose(closed_folders(), directory / "views")
        return spawner.run(["unshare", "-m", "--propagation", "private", "sh", "-c", exposing, "expose", *argv])

    def test_the_worker_runs_as_nobody_and_the_service_exits_0(self) -> None:
        """A root worker idles in anyio's pool before the drop: the child's worker still runs as nobody
        (uid 65534), the service exits 0 on SIGTERM with no traceback, and nothing is left running."""
        with tempfile.TemporaryDirectory(prefix="aiobus-drop-") as name:
            directory = Path(name)
            directory.chmod(0o755)
            spawner = Spawner(directory)
            try:
                service = self.start_service(spawner, directory)
                service.wait_for("warm pool worker uid 0", timeout=STEP)
                line = service.wait_for("service uid", timeout=STEP)
                child_pid = int(line.rsplit(" ", 1)[1])
                service.send(signal.SIGTERM)
                code = service.wait(timeout=STEP)
                service.assert_nothing_left()
            finally:
                left = spawner.close()
        assert "service uid 65534; child uid 65534 euid 65534" in line, service.output
        assert (0, [], []) == (code, left, alive([child_pid])), service.output
        assert "Traceback" not in service.output, service.output

    def test_a_nobody_process_cannot_make_the_dropped_parent_unpickle_through_the_workers_sockets(self) -> None:
        """Another process of the user the service dropped to duplicates the worker's sockets
        (pidfd_getfd) and writes a forged anyio reply and a forged frame into each: the parent
        (which still holds what it opened as root) never unpickles them (no marker file)."""
        with tempfile.TemporaryDirectory(prefix="aiobus-drop-") as name:
            directory = Path(name)
            directory.chmod(0o777)  # the marker would be created by the parent, as nobody
            marker = directory / "unpickled"
            spawner = Spawner(directory)
            try:
                service = self.start_service(spawner, directory)
                line = service.wait_for("service uid", timeout=STEP)
                child_pid = int(line.rsplit(" ", 1)[1])
                attack = subprocess.run(
                    [sys.executable, "-c", NOBODY_DUPLICATOR, str(child_pid), str(marker)],
                    capture_output=True,
                    text=True,
                    timeout=STEP,
                )
                service.send(signal.SIGTERM)
                service.wait(timeout=STEP)
            finally:
                spawner.close()
            unpickled = marker.exists()
        assert not unpickled, f"the parent unpickled a forged message; the attacker: {attack.stdout}{attack.stderr}"
