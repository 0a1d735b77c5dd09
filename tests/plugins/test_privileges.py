"""DropPrivileges: real processes switching user, group and umask at start."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from processes import Child, Spawner

from aiobus import Bus
from aiobus.plugins.privileges import DropPrivileges

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX users and /proc (Linux)")

try:
    NOBODY: pwd.struct_passwd | None = pwd.getpwnam("nobody")
except KeyError:
    NOBODY = None

needs_nobody = pytest.mark.skipif(NOBODY is None, reason="no user 'nobody' here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# argv: the DropPrivileges arguments as JSON; "as-nobody" to turn the child into nobody first.
SERVICE = """
import json, os, pwd, sys
import anyio, anyio._backends._asyncio
from aiobus import Bus, ChannelFailures, configure_logging
from aiobus.plugins.privileges import DropPrivileges

os.umask(0o022)
if sys.argv[2] == "as-nobody":
    # Popen(user=...) cannot run this interpreter where it lives in a private home
    # (/root/.pyenv): become nobody here, after the imports, with no capability left.
    nobody = pwd.getpwnam("nobody")
    os.setgroups([nobody.pw_gid])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)

def identity() -> str:
    mask = os.umask(0)
    os.umask(mask)
    return "identity: " + json.dumps(
        {"uids": os.getresuid(), "gids": os.getresgid(), "groups": sorted(set(os.getgroups())), "umask": mask}
    )

async def main() -> int:
    async with Bus() as bus:
        bus.subscribe("start", lambda: print(f"at 75: euid {os.geteuid()}"), priority=75)
        bus.subscribe("start", lambda: print(f"at 80: euid {os.geteuid()}"), priority=80)
        DropPrivileges(bus, **json.loads(sys.argv[1])).subscribe()
        try:
            await bus.start()
        except ChannelFailures:
            print("outcome: failed")
        else:
            print("outcome: started")
        print(identity())
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


# argv: the PID file. Runs as root, drops to nobody at 77, exits on SIGTERM.
WITH_PIDFILE = """
import os, signal, sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins.pidfile import PIDFile
from aiobus.plugins.privileges import DropPrivileges

async def main() -> int:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with Bus() as bus:
            PIDFile(bus, sys.argv[1]).subscribe()
            DropPrivileges(bus, uid="nobody").subscribe()
            await bus.start()
            print(f"running as euid {os.geteuid()}")
            async for _ in signals:
                break
    return bus.exit_code

configure_logging(format="json")
raise SystemExit(anyio.run(main))
"""


def run_service(spawn: Spawner, as_nobody: bool = False, **arguments: Any) -> Child:
    child = spawn.script(SERVICE, json.dumps(arguments), "as-nobody" if as_nobody else "as-is")
    child.wait(timeout=60)
    child.assert_nothing_left()
    return child


def identity_of(child: Child) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(child.wait_for("identity: ").removeprefix("identity: "))
    return found


def event(child: Child, text: str) -> dict[str, Any]:
    [found] = [event for event in child.events() if text in event["event"]]
    return found


@needs_root
@needs_nobody
class TestAsRoot:
    def test_root_drops_to_nobody_with_its_groups_and_umask(self, spawn: Spawner) -> None:
        """Started as root, the service runs as nobody, in nobody's groups, with the umask asked for."""
        assert NOBODY is not None
        child = run_service(spawn, uid="nobody", umask=0o027)
        assert child.proc.returncode == 0, child.output
        assert identity_of(child) == {
            "uids": [NOBODY.pw_uid] * 3,
            "gids": [NOBODY.pw_gid] * 3,
            "groups": sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid))),
            "umask": 0o027,
        }

    def test_drop_is_logged_before_and_after(self, spawn: Spawner) -> None:
        """A log line gives the identity before the drop, and another the identity after it."""
        assert NOBODY is not None
        child = run_service(spawn, uid=NOBODY.pw_uid, umask=0o027)
        before = event(child, "Privileges before the drop")
        after = event(child, "Privileges after the drop")
        assert (before["uid"], before["gid"], before["umask"]) == (0, 0, "022")
        assert (after["uid"], after["gid"], after["umask"]) == (NOBODY.pw_uid, NOBODY.pw_gid, "027")

    def test_given_group_replaces_the_primary_group(self, spawn: Spawner) -> None:
        """With uid and gid both given, the service runs in that group and not in the user's primary one."""
        assert NOBODY is not None
        group = 1 if NOBODY.pw_gid != 1 else 2
        child = run_service(spawn, uid="nobody", gid=group)
        identity = identity_of(child)
        assert identity["gids"] == [group] * 3
        assert identity["groups"] == sorted(set(os.getgrouplist("nobody", group)))

    def test_start_priority_77_comes_after_75_and_before_80(self, spawn: Spawner) -> None:
        """A start listener at 75 still runs as root; one at 80 already runs as nobody."""
        assert NOBODY is not None
        child = run_service(spawn, uid="nobody")
        assert child.wait_for("at 75:") == "at 75: euid 0"
        assert child.wait_for("at 80:") == f"at 80: euid {NOBODY.pw_uid}"

    def test_pid_file_written_as_root_is_removed_at_exit_as_nobody(self, spawn: Spawner) -> None:
        """With PIDFile (70) in a folder nobody may write to, the file written as root is removed at exit as nobody."""
        assert NOBODY is not None
        folder = Path(tempfile.mkdtemp(prefix="aiobus-test-"))  # tmp_path is private to root
        try:
            os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)
            pid_path = folder / "service.pid"
            child = spawn.script(WITH_PIDFILE, str(pid_path))
            assert child.wait_for("running as") == f"running as euid {NOBODY.pw_uid}"
            assert pid_path.read_text() == f"{child.pid}\n"
            assert pid_path.stat().st_uid == 0
            child.send(signal.SIGTERM)
            assert child.wait() == 0, child.output
            assert not pid_path.exists(), child.output
        finally:
            shutil.rmtree(folder)

    def test_uid_and_gid_without_entries_drop_to_that_group_alone(self, spawn: Spawner) -> None:
        """Numbers no user or group has are taken as they are: the supplementary groups become just that gid."""
        number = unused_uid()
        child = run_service(spawn, uid=str(number), gid=number)
        assert child.proc.returncode == 0, child.output
        assert identity_of(child) == {"uids": [number] * 3, "gids": [number] * 3, "groups": [number], "umask": 0o022}
        assert event(child, "Privileges after the drop")["groups"] == [number]


def user_namespaces_work() -> bool:
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not user_namespaces_work(), reason="needs unshare and user namespaces")
class TestInAUserNamespace:
    def test_step_failing_undoes_nothing_it_cannot_and_says_so(self, spawn: Spawner) -> None:
        """Root of a user namespace (all capabilities) asking for a group the namespace does not map: setgid fails,
        the groups cannot be put back (setgroups is denied there) and that is logged; the start fails with the
        OS error and the identity is unchanged."""
        number = unused_uid()
        path = spawn.directory / "service.py"
        path.write_text(SERVICE)
        arguments = json.dumps({"gid": number, "umask": 0o077})
        child = spawn.run(["unshare", "--user", "--map-root-user", sys.executable, str(path), arguments, "as-is"])
        assert child.wait(timeout=60) == 70, child.output
        child.assert_nothing_left()
        assert child.wait_for("outcome: ") == "outcome: failed"
        assert "Bus STARTED" not in child.output
        assert "[Errno 22] Invalid argument" in child.output
        restore = event(child, "Could not restore the groups after a failed drop")
        assert restore["level"] == "error"
        assert not [e for e in child.events() if "Privileges after the drop" in e["event"]]
        assert identity_of(child) == {"uids": [0, 0, 0], "gids": [0, 0, 0], "groups": [], "umask": 0o022}


@needs_root  # to turn the child into nobody
@needs_nobody
class TestWithoutPrivilege:
    def test_asking_for_root_fails_at_start_and_changes_nothing(self, spawn: Spawner) -> None:
        """A service without privilege asking to become root fails at start with a clear error, nothing changed."""
        assert NOBODY is not None
        child = run_service(spawn, as_nobody=True, uid=0, gid=0, umask=0o077)
        assert child.proc.returncode == 70, child.output
        assert child.wait_for("outcome: ") == "outcome: failed"
        assert "Bus STARTED" not in child.output
        assert "PermissionError" in child.output
        assert "the user to uid 0 (root) (needs root or CAP_SETUID)" in child.output
        assert "nothing was changed" in child.output
        assert identity_of(child) == {
            "uids": [NOBODY.pw_uid] * 3,
            "gids": [NOBODY.pw_gid] * 3,
            "groups": [NOBODY.pw_gid],
            "umask": 0o022,
        }

    def test_umask_alone_needs_no_privilege(self, spawn: Spawner) -> None:
        """A service without privilege may set the umask alone, and stays the same user."""
        assert NOBODY is not None
        child = run_service(spawn, as_nobody=True, umask=0o077)
        assert child.proc.returncode == 0, child.output
        identity = identity_of(child)
        assert identity["umask"] == 0o077
        assert identity["uids"] == [NOBODY.pw_uid] * 3

    def test_asking_for_the_current_user_needs_no_privilege(self, spawn: Spawner) -> None:
        """A service already running as nobody (after a restart, say) may ask for nobody again."""
        assert NOBODY is not None
        child = run_service(spawn, as_nobody=True, uid="nobody")
        assert child.proc.returncode == 0, child.output
        assert identity_of(child)["uids"] == [NOBODY.pw_uid] * 3


def unused_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


class TestArguments:
    async def test_unknown_user_is_an_error_at_construction(self) -> None:
        """An unknown user name is refused by the constructor with a ValueError naming it."""
        async with Bus() as bus:
            with pytest.raises(ValueError, match="unknown user 'no-such-user-aiobus'"):
                DropPrivileges(bus, uid="no-such-user-aiobus")

    async def test_unknown_group_is_an_error_at_construction(self) -> None:
        """An unknown group name is refused by the constructor with a ValueError naming it."""
        async with Bus() as bus:
            with pytest.raises(ValueError, match="unknown group 'no-such-group-aiobus'"):
                DropPrivileges(bus, gid="no-such-group-aiobus")

    @needs_nobody
    async def test_names_are_resolved_at_construction(self) -> None:
        """A user name becomes its uid, and the gid defaults to the user's primary group."""
        assert NOBODY is not None
        async with Bus() as bus:
            plugin = DropPrivileges(bus, uid="nobody")
        assert (plugin.uid, plugin.gid, plugin.user) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")

    async def test_start_listener_has_priority_77(self) -> None:
        """The plugin's start listener runs after one at 76.9 and before one at 77.1."""
        async with Bus() as bus:
            before, after = (lambda: None), (lambda: None)
            bus.subscribe("start", after, priority=77.1)
            plugin = DropPrivileges(bus, umask=0o022)
            plugin.subscribe()
            bus.subscribe("start", before, priority=76.9)
            assert bus.listeners["start"] == (before, plugin.start, after)

    async def test_uid_without_user_entry_needs_a_gid(self) -> None:
        """A uid that no user has, given without gid, is refused: there is no primary group to take."""
        uid = unused_uid()
        async with Bus() as bus:
            with pytest.raises(ValueError, match=f"uid {uid} has no user entry"):
                DropPrivileges(bus, uid=uid)
            assert DropPrivileges(bus, uid=uid, gid=uid).gid == uid

    @pytest.mark.parametrize(
        ("arguments", "error"),
        [
            ({"uid": -1}, ValueError),
            ({"gid": -5}, ValueError),
            ({"uid": 1.5}, TypeError),
            ({"gid": True}, TypeError),
            ({"umask": 0o1000}, ValueError),
            ({"umask": -1}, ValueError),
            ({"umask": "022"}, TypeError),
        ],
    )
    async def test_bad_arguments_are_errors_at_construction(self, arguments: dict[str, Any], error: type) -> None:
        """Negative ids, ids of the wrong type and a umask outside 0..0o777 are refused by the constructor."""
        async with Bus() as bus:
            with pytest.raises(error):
                DropPrivileges(bus, **arguments)

    async def test_numbers_given_as_text_without_entries_are_taken_as_numbers(self) -> None:
        """A uid and a gid written as digits that name no user or group are the numbers themselves."""
        number = unused_uid()
        async with Bus() as bus:
            plugin = DropPrivileges(bus, uid=str(number), gid=str(number))
        assert (plugin.uid, plugin.gid, plugin.user) == (number, number, None)
